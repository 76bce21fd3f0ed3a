"""The LPIPS perceptual distance used by the Stage A loss.

LDM's loss uses LPIPS with a VGG16 trunk (Zhang et al. 2018). The `lpips` package ships the small
calibrated linear heads; torchvision's ImageNet VGG16 weights come from the file
`ldm_core.models.pretrained.find_weights` gives (a path given, torch hub's cache, or downloaded there on
first use with torchvision's sha256 check) and are copied into a module built with a random trunk
(``pnet_rand=True``). Offline, a missing file is an error that says how to fetch it and where to put it; a
random trunk is only ever used when asked for by name (``trunk="random"``), and then with a warning.
"""

from __future__ import annotations

import logging
from typing import Optional

import lpips

from ldm_core.config.settings import ConfigError
from ldm_core.models.pretrained import build_pretrained_lpips, build_random_lpips

logger = logging.getLogger(__name__)

TRUNKS = ("vgg", "random")


def build_lpips(trunk: str = "vgg", weights_path: Optional[str] = None) -> lpips.LPIPS:
    """Build a frozen LPIPS(VGG) module for use inside a loss.

    Parameters:
        trunk (`str`, defaults to ``"vgg"``):
            ``"vgg"`` loads torchvision's ImageNet VGG16 weights (``vgg16-397923af.pth``) into the trunk;
            ``"random"`` keeps a randomly initialised trunk (demos and tests only; a warning is logged).
        weights_path (`str`, *optional*):
            Explicit path of ``vgg16-397923af.pth``. When None the file is looked for in torch hub's
            checkpoint cache (``$TORCH_HOME/hub/checkpoints/``) and downloaded there when absent.

    Returns:
        `lpips.LPIPS` in eval mode with every parameter frozen. It expects images in [-1, 1] and returns
        one distance per image, shape ``(N, 1, 1, 1)``.

    Raises:
        MissingWeightsError: the VGG16 file is not on this machine and cannot be downloaded now (the message
            names it, how to fetch it and where to put it).
        ConfigError: an unknown trunk, or a weights path given with the random trunk.
    """
    if trunk not in TRUNKS:
        raise ConfigError(f"LPIPS trunk {trunk!r} is not supported; choose one of {', '.join(TRUNKS)}.")
    if trunk == "random" and weights_path:
        raise ConfigError(f"loss.lpips_weights={weights_path!r} was given with loss.lpips_trunk=random; "
                          f"use loss.lpips_trunk=vgg to load it, or drop loss.lpips_weights.")

    if trunk == "vgg":
        return build_pretrained_lpips("vgg", weights_path, option_hint="loss.lpips_weights=PATH")
    logger.warning("LPIPS is using a RANDOMLY INITIALISED VGG16 trunk (loss.lpips_trunk=random): the "
                   "perceptual term is not the published LPIPS and its values are not comparable.")
    return build_random_lpips("vgg")


__all__ = ["TRUNKS", "build_lpips"]
