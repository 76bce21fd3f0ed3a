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

# README "Pretrained weights on an offline machine": the files, with the names their upstream loaders expect.
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


# --------------------------------------------------------------------------------------------------
# Model folders (diffusers `save_pretrained` layout) are data. Python files in one are never imported
# (diffusers would, for custom pipelines and components, given trust_remote_code), and weights are only
# read from safetensors, because unpickling a .bin/.pt/.ckpt file can run code.

CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeModelFolderError(ValueError):
    """A model folder holds code, or weights only in a pickle format; the message says what to do."""


def check_model_folder(folder: str | os.PathLike, *, what: str = "model folder") -> Path:
    """Refuse a model folder that ships code or whose weights are not safetensors; return its path.

    Every file under `folder` is looked at: any Python source or extension module is refused (a folder
    that needs code to load is not a folder this project loads), and so is any subfolder whose weights
    exist only as pickle files. Folders with no weights at all (a scheduler's) are fine.

    Parameters:
        folder: the folder given by the user.
        what: how to name it in messages (e.g. "pipeline folder", "--vae folder").

    Raises:
        FileNotFoundError: `folder` is not a folder.
        UnsafeModelFolderError: code or pickle-only weights were found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"The {what} {folder} does not exist or is not a folder.")
    files = [p for p in folder.rglob("*") if p.is_file()]
    code = sorted(p.relative_to(folder).as_posix() for p in files if p.suffix in CODE_SUFFIXES)
    if code:
        raise UnsafeModelFolderError(
            f"The {what} {folder} contains code ({', '.join(code[:5])}). Model folders are loaded as data "
            f"only and code in them is never run; remove those files (after checking where they came from).")
    for sub in sorted({p.parent for p in files}):
        names = [p for p in files if p.parent == sub]
        pickled = [p.name for p in names if p.suffix in PICKLE_SUFFIXES]
        if pickled and not any(p.suffix == ".safetensors" for p in names):
            raise UnsafeModelFolderError(
                f"{sub} holds weights only as pickle files ({', '.join(sorted(pickled))}); only safetensors "
                f"weights are read, because unpickling can run code. Re-save the model with diffusers' "
                f"save_pretrained (safetensors is its default) in a trusted environment.")
    return folder


# --------------------------------------------------------------------------------------------------
# LPIPS: the lpips package ships its small linear heads but fetches the ImageNet trunk through
# torchvision when it is built, which is impossible offline. So the module is built with a random trunk
# (`pnet_rand=True`, nothing is fetched) and torchvision's weights are copied in from a local file.

LPIPS_TRUNK_FILES = {"vgg": VGG16_FILE, "alex": ALEXNET_FILE}


def build_pretrained_lpips(net: str, weights_path: Optional[str | os.PathLike] = None, *, option_hint: str = ""):
    """`lpips.LPIPS(net=net)` with its ImageNet trunk read from a local torchvision file, frozen, in eval mode.

    Raises MissingWeightsError (naming the file and where to put it) when the trunk file is absent.
    """
    if net not in LPIPS_TRUNK_FILES:
        raise ValueError(f"Unknown LPIPS backbone {net!r}; choose one of {', '.join(LPIPS_TRUNK_FILES)}.")
    path = find_weights(LPIPS_TRUNK_FILES[net], weights_path, option_hint=option_hint)
    module = build_random_lpips(net)
    load_lpips_trunk(module, load_state_dict(path), source=str(path))
    return module


def build_random_lpips(net: str = "vgg"):
    """LPIPS with the package's linear heads and a randomly initialised trunk (nothing is downloaded)."""
    import warnings

    import lpips

    with warnings.catch_warnings():
        # lpips still calls torchvision with the deprecated `pretrained=` argument; nothing is fetched.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        module = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    return module.eval().requires_grad_(False)


def load_lpips_trunk(module, state_dict: dict, source: str = "state dict") -> None:
    """Copy torchvision `features.N.*` tensors into an LPIPS module's trunk.

    lpips keeps torchvision's layer indices inside its slices (`slice3.10.weight` is torchvision's
    `features.10.weight`). Every trunk tensor must be present with the right shape; otherwise ValueError
    names the problem, so a wrong or truncated file is never half-loaded.
    """
    import re

    expected_file = LPIPS_TRUNK_FILES.get(getattr(module, "pnet_type", ""), "the torchvision ImageNet weights")
    mapped = {}
    for name, param in module.net.state_dict().items():
        match = re.match(r"^slice\d+\.(\d+)\.(weight|bias)$", name)
        if match is None:
            raise ValueError(f"Unexpected parameter {name!r} in the LPIPS trunk; this lpips version's layout "
                             f"is not supported.")
        key = f"features.{match.group(1)}.{match.group(2)}"
        if key not in state_dict:
            raise ValueError(f"{source} does not fit the LPIPS trunk: key {key!r} is missing "
                             f"(expected the file {expected_file}).")
        if tuple(state_dict[key].shape) != tuple(param.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(state_dict[key].shape)}, the trunk needs "
                             f"{tuple(param.shape)} (expected the file {expected_file}).")
        mapped[name] = state_dict[key].to(param.dtype)
    module.net.load_state_dict(mapped, strict=True)  # every trunk tensor replaced, none left random
