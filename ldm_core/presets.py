"""Finding the YAML presets that ship in `configs/`."""

from __future__ import annotations

from pathlib import Path

from ldm_core.config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def config_path(name: str) -> Path:
    """Path of a preset in configs/ (e.g. "demo.yaml", "vae/kl-f8-small.yaml")."""
    path = CONFIG_DIR / name
    if not path.is_file():
        available = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
        raise ConfigError(f"No preset {name} in {CONFIG_DIR}. Available: {', '.join(available) or 'none'}. "
                          f"Install the project from its source folder (pip install -e .) so configs/ is found.")
    return path
