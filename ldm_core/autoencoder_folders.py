"""KL autoencoder folders (diffusers `AutoencoderKL` layout): finding one, loading it frozen, its factor f."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def downsampling_factor(block_out_channels: Sequence[int]) -> int:
    """Spatial downsampling factor f of an `AutoencoderKL`: every block but the last halves H and W."""
    return 2 ** (len(block_out_channels) - 1)


def vae_downsampling_factor(vae_or_config: Any) -> int:
    """f of a loaded `AutoencoderKL`, its `config`, or a config.json read as a dict."""
    config = getattr(vae_or_config, "config", vae_or_config)
    channels = config["block_out_channels"] if isinstance(config, Mapping) else config.block_out_channels
    return downsampling_factor(channels)


def resolve_vae_folder(path: str | Path) -> Path:
    """The folder holding the autoencoder's config.json: `path/vae` for a Stage A run folder, else `path`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--vae {path}: no such folder. Give a run folder (holding vae/) or a "
                                f"diffusers AutoencoderKL folder (holding config.json).")
    for candidate in (path / "vae", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"--vae {path} is neither a run folder (no vae/config.json) nor a diffusers "
                            f"AutoencoderKL folder (no config.json).")


def load_frozen_vae(vae_path: str | Path):
    """Load any diffusers AutoencoderKL folder (ours: RUN/vae) in eval mode with gradients off.

    Returns the model and the folder it came from (a Stage A run folder resolves to its vae/).
    """
    from diffusers import AutoencoderKL

    from ldm_core.pretrained import check_model_folder

    path = resolve_vae_folder(vae_path)
    check_model_folder(path, what="--vae folder")  # data only: no code, no pickle-only weights
    vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    vae.eval().requires_grad_(False)
    return vae, path
