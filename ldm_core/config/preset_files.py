"""Finding the YAML presets that ship with the project.

The presets live in the top-level `configs` package (`configs/demo.yaml`, `configs/vae/*.yaml`,
`configs/unet/*.yaml`) and are installed as its package data, so they are read through
`importlib.resources` and found the same way from a source checkout, an editable install and a wheel,
whatever the current folder is.

A preset is named by its path inside `configs/`, with or without the `configs/` prefix and the `.yaml`
suffix: `configs/vae/kl-f8-small.yaml`, `vae/kl-f8-small.yaml` and `vae/kl-f8-small` are the same preset.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Optional

from ldm_core.config.settings import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PRESET_PACKAGE = "configs"
PRESET_SUFFIX = ".yaml"


def preset_root() -> Optional[Traversable]:
    """The `configs` package's folder as an `importlib.resources` Traversable, or None when it is missing."""
    try:
        return importlib.resources.files(PRESET_PACKAGE)
    except ModuleNotFoundError:
        return None


def available_presets() -> list[str]:
    """Every preset's name relative to `configs/` (e.g. "demo.yaml", "vae/kl-f8-small.yaml"), sorted."""
    root = preset_root()
    if root is None:
        return []
    names = []
    pending = [(root, PurePosixPath())]
    while pending:
        folder, prefix = pending.pop()
        for entry in folder.iterdir():
            if entry.is_dir():
                if entry.name != "__pycache__":
                    pending.append((entry, prefix / entry.name))
            elif entry.name.endswith(PRESET_SUFFIX):
                names.append(str(prefix / entry.name))
    return sorted(names)


def _preset_parts(name: str) -> Optional[tuple[str, ...]]:
    """The path components inside `configs/` that `name` stands for, or None if it cannot name a preset.

    Drops a leading `./` and `configs/`, adds `.yaml` when there is no suffix, and refuses absolute
    names and '..' components, so a preset name never reaches outside the package.
    """
    text = str(name).strip().replace("\\", "/")
    if not text or "\0" in text:
        return None
    path = PurePosixPath(text)
    if path.is_absolute():
        return None
    parts = [p for p in path.parts if p != "."]
    if parts and parts[0] == PRESET_PACKAGE:
        parts = parts[1:]
    if not parts or ".." in parts:
        return None
    if not PurePosixPath(parts[-1]).suffix:
        parts[-1] += PRESET_SUFFIX
    return tuple(parts)


def find_preset(name: str) -> Optional[tuple[str, Traversable]]:
    """(relative name, resource) of the preset `name` denotes, or None when there is no such preset."""
    root = preset_root()
    parts = _preset_parts(name)
    if root is None or parts is None:
        return None
    resource = root.joinpath(*parts)
    if not resource.is_file():
        return None
    return "/".join(parts), resource


def describe_presets() -> str:
    """'demo.yaml, unet/unet-small.yaml, ...' for error messages, or why there are none."""
    names = available_presets()
    if names:
        return ", ".join(names)
    return (f"none (the '{PRESET_PACKAGE}' package that holds them is not installed; reinstall "
            f"two-stage-ldm with `pip install .`)")


def config_path(name: str) -> Path:
    """Path of a preset in configs/ (e.g. "demo.yaml", "vae/kl-f8-small.yaml", "vae/kl-f8-small").

    Raises:
        ConfigError: no preset has that name (the message lists the available ones), or the presets are
            not files on disk (a zipped install), which `load_config` reads through `find_preset`.
    """
    found = find_preset(name)
    if found is None:
        raise ConfigError(f"No preset {name!r} among the presets shipped with two-stage-ldm. Available: "
                          f"{describe_presets()}. Name one of them (for example vae/kl-f8-small) or give the "
                          f"path of a YAML file.")
    relative, resource = found
    if not isinstance(resource, Path):
        raise ConfigError(f"Preset {relative} is not a file on disk ({resource}); install two-stage-ldm "
                          f"unzipped (pip install .) to use its path.")
    return resource



__all__ = ["PRESET_PACKAGE", "available_presets", "config_path", "describe_presets", "find_preset",
           "preset_root"]
