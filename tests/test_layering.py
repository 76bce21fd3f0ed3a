"""The layers of README "Layout" hold: no package imports one above it or beside it.

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


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import of one of our packages in `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update((name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in OURS)
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_package_imports_only_the_layers_below(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files or package == "configs", f"{package}/ has no Python files"
    allowed = MAY_IMPORT[package] | {package}
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in files for name, line in sorted(imported_packages(path)) if name not in allowed]
    assert not wrong, f"{package} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def test_every_package_is_in_the_table():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"benchmarks", "tests"} <= set(MAY_IMPORT), packages - set(MAY_IMPORT)


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from workflows.cli import main\n    import stage_a_vae.train\n")
    assert imported_packages(source) == {("workflows", 2), ("stage_a_vae", 3)}
