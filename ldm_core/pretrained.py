"""Locating pretrained weights that cannot be downloaded on an offline machine.

Nothing here downloads. A weight file is looked for at an explicit path first, then in torch hub's
checkpoint cache (`$TORCH_HOME/hub/checkpoints/`, the place torchvision and the lpips package read
from). When it is absent the error says exactly which file is missing and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

# ANCHORS section 6: the files, with the names their upstream loaders expect.
VGG16_FILE = "vgg16-397923af.pth"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
INCEPTION_FID_FILE = "weights-inception-2015-12-05-6726825d.pth"

_SOURCES = {
    VGG16_FILE: "torchvision's VGG16 ImageNet weights (download.pytorch.org/models/vgg16-397923af.pth)",
    ALEXNET_FILE: "torchvision's AlexNet ImageNet weights (download.pytorch.org/models/alexnet-owt-7be5be79.pth)",
    INCEPTION_FID_FILE: "the FID Inception-v3 weights used by torch-fidelity and torchmetrics "
                        "(github.com/toshas/torch-fidelity/releases, file weights-inception-2015-12-05-6726825d.pth)",
}


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file is not on this machine; the message says which and where to put it."""


def torch_hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(filename: str, explicit_path: Optional[str | os.PathLike] = None, *,
                 option_hint: str = "") -> Path:
    """Return the path of `filename`, from `explicit_path` or torch hub's cache; never download.

    `option_hint` names the config key or CLI flag that accepts an explicit path, for the error.
    """
    if explicit_path:
        path = Path(explicit_path).expanduser()
        if path.is_file():
            return path
        raise MissingWeightsError(f"The weights file {path} does not exist (expected {filename}: "
                                  f"{_SOURCES.get(filename, filename)}).")
    cached = torch_hub_checkpoint_dir() / filename
    if cached.is_file():
        return cached
    hint = f", or pass its path with {option_hint}" if option_hint else ""
    raise MissingWeightsError(
        f"Missing pretrained weights: {filename} ({_SOURCES.get(filename, filename)}). "
        f"This machine cannot download it. Copy the file to {cached}{hint}.")


def load_state_dict(path: Path) -> dict:
    """Read a weights file safely: safetensors directly, anything else with `weights_only=True`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)
