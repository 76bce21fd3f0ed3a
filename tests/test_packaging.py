"""Packaging: the wheel ships the YAML presets, and `--config` finds them by name from any folder.

The slow tests build the wheel, install it (no dependencies) into a fresh virtual environment outside
the source tree, and run the installed `ldm` from a temporary folder. The dependencies (torch, diffusers,
...) come from this test's own environment through a `.pth` path line; the `.pth` files inside that
folder are not run, so its editable install of this project stays inactive and every project module is
imported from the wheel.

The unit tests at the end check how `load_config` looks up a preset name.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ldm_core.config.settings import ConfigError, load_config
from ldm_core.config.preset_files import available_presets, config_path, find_preset
from stage_a_vae.config import StageAConfig

ROOT = Path(__file__).resolve().parent.parent

# Top-level entries of the repository that are not part of a build (environments, runs, caches, earlier
# build output); `__pycache__` and `*.egg-info` are left out at every level.
_NOT_BUILT = {".git", ".venv", "venv", "runs", "outputs", "build", "dist", ".pytest_cache", ".ruff_cache",
              ".whl", ".gl"}


def _version(distribution: str) -> tuple[int, ...] | None:
    """(major, minor) of an installed distribution, read from its metadata (nothing is imported)."""
    try:
        return tuple(int(n) for n in re.findall(r"\d+", importlib.metadata.version(distribution))[:2])
    except importlib.metadata.PackageNotFoundError:
        return None


def _build_tools_missing() -> str:
    """Why the wheel cannot be built and installed here ('' when it can)."""
    reasons = []
    pip, setuptools, wheel = _version("pip"), _version("setuptools"), _version("wheel")
    if pip is None:
        reasons.append("pip is not installed")
    elif pip < (22, 3):
        reasons.append(f"pip {'.'.join(map(str, pip))} is older than 22.3, which added `pip --python`")
    # The wheel is built with --no-build-isolation, from this environment's setuptools; bdist_wheel comes
    # from the `wheel` package, or from setuptools itself since 70.1.
    if setuptools is None:
        reasons.append("setuptools is not installed")
    elif wheel is None and setuptools < (70, 1):
        reasons.append("wheel is not installed (and setuptools is older than 70.1, which has its own bdist_wheel)")
    return "; ".join(reasons)


_MISSING = _build_tools_missing()
needs_build_tools = pytest.mark.skipif(bool(_MISSING), reason=f"cannot build and install the wheel: {_MISSING}")


def _run(cmd, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd`, text output captured; fail the test with its output if it times out."""
    try:
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{cmd[0]} {' '.join(map(str, cmd[1:4]))} ... ran past {timeout}s.\n"
                    f"stdout:\n{err.stdout}\nstderr:\n{err.stderr}")


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    """Fail with the command's output unless it exited with 0."""
    assert proc.returncode == 0, (f"{what} exited with {proc.returncode}.\nstdout:\n{proc.stdout[-4000:]}\n"
                                  f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def _ignore_unbuilt(folder: str, names: list[str]) -> set[str]:
    """`shutil.copytree` ignore function: leave out `_NOT_BUILT` at the top, caches everywhere."""
    skipped = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(folder).resolve() == ROOT:
        skipped |= _NOT_BUILT & set(names)
    return skipped


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, a fresh environment with it installed, a work folder and the environment variables to
    run the installed commands with, all outside the source tree."""
    tmp = tmp_path_factory.mktemp("packaging")
    assert ROOT not in tmp.resolve().parents, f"the temporary folder {tmp} is inside the source tree {ROOT}"

    # Built from a copy of the source tree, so the build's build/ and *.egg-info folders (and any stale
    # files in them) neither come from nor land in the working copy.
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_ignore_unbuilt)
    wheels = tmp / "wheels"
    _check(_run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation",
                 "--disable-pip-version-check", "-w", wheels], timeout=300), "pip wheel")
    (wheel,) = wheels.glob("two_stage_ldm-*.whl")

    env = tmp / "env"
    _check(_run([sys.executable, "-m", "venv", "--without-pip", env], timeout=120), "python -m venv")
    python = env / "bin" / "python"
    _check(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                 "--disable-pip-version-check", wheel], timeout=300), "pip install (the wheel)")

    # Only now the dependencies: a path line adds the folder; the .pth files inside it are not run.
    site = Path(_check(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            timeout=60), "sysconfig").stdout.strip())
    ours = sysconfig.get_paths()
    lines = dict.fromkeys([ours["purelib"], ours["platlib"]])
    (site / "_two_stage_ldm_test_deps.pth").write_text("".join(f"{line}\n" for line in lines))

    work = tmp / "work"
    work.mkdir()
    variables = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    variables.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return {"wheel": wheel, "env": env.resolve(), "python": python, "ldm": env / "bin" / "ldm", "work": work,
            "variables": variables}


def _inside(path: str | Path, folder: Path) -> bool:
    path = Path(path).resolve()
    return path == folder or folder in path.parents


@needs_build_tools
def test_wheel_ships_every_preset_and_no_namespace_packages(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped = {f"configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert {"configs/vae/kl-f8-small.yaml", "configs/unet/unet-small.yaml", "configs/demo.yaml"} <= shipped
    assert shipped <= names, f"presets missing from the wheel: {sorted(shipped - names)}"
    assert "configs/__init__.py" in names
    assert not any(n.startswith("ldm_core/presets/") for n in names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    packages = zipfile.ZipFile(installed["wheel"]).read(top_level).decode().split()
    assert "configs" in packages and not any(p.startswith("configs.") for p in packages)


@needs_build_tools
def test_installed_modules_and_presets_come_from_the_new_environment(installed):
    code = ("import json, configs, ldm_core, workflows; from ldm_core.config.preset_files import config_path; "
            "print(json.dumps({'ldm_core': ldm_core.__file__, 'workflows': workflows.__file__, "
            "'configs': configs.__file__, 'demo': str(config_path('demo.yaml'))}))")
    proc = _check(_run([installed["python"], "-c", code], cwd=installed["work"], env=installed["variables"],
                       timeout=120), "python -c (imports)")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, path in found.items():
        assert _inside(path, installed["env"]), f"{name} came from {path}, not from {installed['env']}"
    assert Path(found["demo"]).name == "demo.yaml" and Path(found["demo"]).is_file()


@needs_build_tools
def test_installed_ldm_trains_with_the_readme_config_path_from_another_folder(installed):
    work = installed["work"]
    assert not (work / "configs").exists()
    proc = _run([installed["ldm"], "train-vae", "--config", "configs/vae/kl-f8-small.yaml",
                 "--data", "builtin:shapes", "--out", "run",
                 "model.preset=kl-f8-tiny", "data.resolution=32", "data.shapes_count=64", "data.val_count=8",
                 "train.max_steps=2", "train.batch_size=4", "train.validate_every=2", "train.checkpoint_every=2",
                 "train.latent_stats_images=8", "loss.perceptual_weight=0", "train.progress_bar=false"],
                cwd=work, env=installed["variables"], timeout=600)
    _check(proc, "ldm train-vae")
    assert (work / "run" / "vae" / "config.json").is_file()
    assert (work / "run" / "vae" / "diffusion_pytorch_model.safetensors").is_file()


@needs_build_tools
def test_installed_ldm_names_an_unknown_preset_without_a_traceback(installed):
    proc = _run([installed["ldm"], "train-vae", "--config", "vae/no-such-preset", "--data", "builtin:shapes",
                 "--out", "run-unknown"], cwd=installed["work"], env=installed["variables"], timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "vae/no-such-preset" in proc.stderr and "vae/kl-f8-small.yaml" in proc.stderr
    assert "Traceback" not in output
    assert not (installed["work"] / "run-unknown").exists()


# --------------------------------------------------------------------------------------------------
# Preset names in load_config (no build needed)


def test_a_path_that_exists_wins_over_the_preset_of_that_name(tmp_path, monkeypatch):
    own = tmp_path / "vae" / "kl-f8-small.yaml"
    own.parent.mkdir()
    own.write_text("train:\n  max_steps: 7\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(StageAConfig, "vae/kl-f8-small.yaml").train.max_steps == 7
    assert load_config(StageAConfig, "vae/kl-f8-small").train.max_steps != 7  # no such file: the preset


def test_three_forms_of_a_preset_name_load_the_same_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: every form is looked up as a preset
    expected = dataclasses.asdict(load_config(StageAConfig, config_path("vae/kl-f8-small.yaml")))
    for name in ("configs/vae/kl-f8-small.yaml", "vae/kl-f8-small.yaml", "vae/kl-f8-small"):
        relative, resource = find_preset(name)
        assert relative == "vae/kl-f8-small.yaml"
        assert Path(str(resource)) == config_path("vae/kl-f8-small.yaml")
        assert dataclasses.asdict(load_config(StageAConfig, name)) == expected


def test_an_unknown_preset_is_named_and_the_presets_are_listed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    presets = available_presets()
    assert {"demo.yaml", "vae/kl-f8-small.yaml", "unet/unet-small.yaml"} <= set(presets)
    with pytest.raises(ConfigError) as err:
        load_config(StageAConfig, "vae/no-such-preset")
    message = str(err.value)
    assert "vae/no-such-preset" in message and "does not exist" in message
    assert all(p in message for p in presets)
    with pytest.raises(ConfigError) as err:
        config_path("no-such-preset.yaml")
    assert "no-such-preset.yaml" in str(err.value) and all(p in str(err.value) for p in presets)
    assert "pip install -e" not in message + str(err.value)


def test_preset_names_never_leave_the_presets_folder():
    assert find_preset("../configs/vae/kl-f8-small.yaml") is None
    assert find_preset("vae/../../pyproject.toml") is None
    assert find_preset(str(ROOT / "configs" / "vae" / "kl-f8-small.yaml")) is None  # absolute: a file, not a name
