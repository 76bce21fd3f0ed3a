"""The layers of README "Layout" hold: no package imports one above it or beside it, and inside
`ldm_core` no sub-package imports one above it or beside it either.

Every import statement is read from the source (module-level and inside functions, so lazy imports
count too), and checked against the table below, the same table the README draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the packages of ours it may import (besides itself).
MAY_IMPORT = {
    "configs": set(),
    "ldm_core": set(),
    "stage_a_vae": {"ldm_core"},
    "stage_b_diffusion": {"ldm_core"},
    "pipelines": {"ldm_core"},
    "evaluation": {"ldm_core"},
    "workflows": {"ldm_core", "stage_a_vae", "stage_b_diffusion", "pipelines", "evaluation"},
}
OURS = set(MAY_IMPORT) | {"benchmarks", "tests"}

# Inside ldm_core: sub-package (or "base", the modules at its top) -> what it may import besides itself.
CORE_MAY_IMPORT = {
    "base": set(),
    "config": {"base"},
    "models": {"base"},
    "images": {"base", "models"},
    "data": {"base", "config"},
    "training": {"base", "config", "data"},
}


def imported_names(path: Path) -> set[tuple[str, int]]:
    """(dotted name, line) of every absolute import in `path`; `from a.b import c` gives `a.b.c`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update((f"{node.module}.{alias.name}", node.lineno) for alias in node.names)
    return found


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import of one of our packages in `path`."""
    return {(name.split(".")[0], line) for name, line in imported_names(path) if name.split(".")[0] in OURS}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_package_imports_only_the_layers_below(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files or package == "configs", f"{package}/ has no Python files"
    allowed = MAY_IMPORT[package] | {package}
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in files for name, line in sorted(imported_packages(path)) if name not in allowed]
    assert not wrong, f"{package} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def core_part(module: str) -> str:
    """The ldm_core sub-package a dotted module name belongs to ("base" for ldm_core's top-level modules)."""
    part = module.split(".")[1]
    return part if part in CORE_MAY_IMPORT else "base"


def core_imports(path: Path) -> set[tuple[str, int]]:
    """(ldm_core part, line) of every import of an ldm_core module in `path`."""
    return {(core_part(name), line) for name, line in imported_names(path) if name.startswith("ldm_core.")}


@pytest.mark.parametrize("part", sorted(CORE_MAY_IMPORT))
def test_core_sub_package_imports_only_the_parts_below(part):
    root = ROOT / "ldm_core"
    files = sorted(root.glob("*.py")) if part == "base" else sorted((root / part).rglob("*.py"))
    assert files, f"ldm_core/{part} has no Python files"
    allowed = CORE_MAY_IMPORT[part] | {part}
    wrong = [f"{path.relative_to(ROOT)}:{line} imports ldm_core's {name}"
             for path in files for name, line in sorted(core_imports(path)) if name not in allowed]
    assert not wrong, f"ldm_core's {part} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def test_every_core_sub_package_is_in_the_table():
    parts = {p.parent.name for p in (ROOT / "ldm_core").glob("*/__init__.py")}
    assert parts == set(CORE_MAY_IMPORT) - {"base"}, parts ^ (set(CORE_MAY_IMPORT) - {"base"})


def test_every_package_is_in_the_table():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"benchmarks", "tests"} <= set(MAY_IMPORT), packages - set(MAY_IMPORT)


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from workflows.cli import main\n    import stage_a_vae.train\n")
    assert imported_packages(source) == {("workflows", 2), ("stage_a_vae", 3)}


def test_the_core_checker_names_sub_packages_and_base_modules(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from ldm_core.data import shapes\nfrom ldm_core.training.run import TrainingRun\n"
                      "import ldm_core.atomic_files\nfrom ldm_core import randomness\n")
    assert core_imports(source) == {("data", 1), ("training", 2), ("base", 3), ("base", 4)}
