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


# What to give instead, appended to every message about a folder given as --vae.
VAE_FOLDER_HINT = ("; give a Stage A run folder (holding vae/), a diffusers AutoencoderKL folder (holding "
                   "config.json and diffusion_pytorch_model.safetensors), or a pipeline folder (holding vae/)")


def resolve_vae_folder(path: str | Path) -> Path:
    """The folder holding the autoencoder's config.json: `path/vae` for a Stage A run (or pipeline)
    folder, `path/pipeline/vae` for a Stage B run folder, else `path`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--vae {path}: no such folder. Give a run folder (holding vae/) or a "
                                f"diffusers AutoencoderKL folder (holding config.json).")
    for candidate in (path / "vae", path / "pipeline" / "vae", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"--vae {path} is neither a run folder (no vae/config.json) nor a diffusers "
                            f"AutoencoderKL folder (no config.json).")


def read_vae_folder(vae_path: str | Path) -> tuple[Path, dict]:
    """Find and check an autoencoder folder without loading it: (folder, its config.json as a dict).

    Checks what can be checked from the files alone, so a wrong folder is refused before any work: no
    code and no pickle-only weights, a config.json that is a JSON object describing an AutoencoderKL
    (not, say, the U-Net folder of a pipeline), and weights that are exactly that model's tensors.

    Raises:
        FileNotFoundError: not a folder, or no config.json in it or its vae/.
        UnsafeModelFolderError, ModelFolderError: see `ldm_core.models.pretrained`; the message names the file.
    """
    from diffusers import AutoencoderKL

    from ldm_core.models.pretrained import check_model_folder, check_model_weights, read_model_config

    path = resolve_vae_folder(vae_path)
    check_model_folder(path, what="--vae folder")  # data only: no code, no pickle-only weights
    config = read_model_config(path, AutoencoderKL, hint=VAE_FOLDER_HINT)
    check_model_weights(AutoencoderKL, path, config)
    return path, config


def load_frozen_vae(vae_path: str | Path, **kwargs):
    """Load any diffusers AutoencoderKL folder (ours: RUN/vae) in eval mode with gradients off.

    Every check of `read_vae_folder` runs first, and the weights must fill every tensor of the model
    (diffusers would otherwise start the missing ones from random values). `kwargs` go to
    `from_pretrained` (e.g. `torch_dtype`).

    Returns the model and the folder it came from (a Stage A run folder resolves to its vae/).
    """
    from diffusers import AutoencoderKL

    from ldm_core.models.pretrained import load_model_folder

    path = resolve_vae_folder(vae_path)
    vae = load_model_folder(AutoencoderKL, path, what="--vae folder", hint=VAE_FOLDER_HINT, **kwargs)
    vae.eval().requires_grad_(False)
    return vae, path
