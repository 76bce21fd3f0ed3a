"""Bringing one decoded image to the training resolution: a centre, random or random-resized crop and an
optional horizontal flip, each drawn from a generator the caller seeds, so a resumed run crops alike.

- ``center``: resize the shorter side to R and keep the centre square (docs/reconstruction-protocol.md);
  the only crop of validation, benchmarks and Stage B's latent cache.
- ``random``: resize the shorter side to R and keep a random R x R square: LDM's ImageNet crop
  (CompVis/latent-diffusion: ldm/data/imagenet.py, `SmallestMaxSize` then `RandomCrop`).
- ``random_resized``: torchvision's `RandomResizedCrop` (a random area fraction in
  [`min_scale`, 1] and aspect ratio in [3/4, 4/3], resized to R x R), the Inception-style crop.
- ``random_scaled``: a square of a random size at a random place, resized to R x R: its side is a
  fraction of the image's shorter side drawn log-uniformly from [sqrt(`min_scale`), 1] (so each octave
  of zoom is equally likely, where an area drawn uniformly almost always zooms far out), and never
  below R px, so a crop is never enlarged. It is a random downscale followed by a random crop, without
  RandomResizedCrop's change of aspect ratio: for photographs far larger than R, whose R-px windows at
  full size are mostly flat or out of focus.

Each crop is one bicubic resampling of the source region (Pillow's `resize` with a `box`), so a crop
never resamples twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from ldm_core.data.image_files import DataError, pil_to_chw, resize_center_crop

CROPS = ("center", "random", "random_resized", "random_scaled")


@dataclass(frozen=True)
class ImageTransform:
    """Crop an RGB image to R x R and flip it; `__call__` returns a (3, R, R) uint8 array."""

    resolution: int
    crop: str = "center"
    min_scale: float = 0.35  # random_resized and random_scaled: the smallest area fraction kept

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise DataError(f"data.crop={self.crop!r} is not a crop; choose one of {', '.join(CROPS)}.")
        if not 0.0 < self.min_scale <= 1.0:
            raise DataError(f"data.crop_min_scale={self.min_scale} must lie in (0, 1].")

    def __call__(self, image: Image.Image, rng: np.random.Generator, flip: bool = False) -> np.ndarray:
        R = self.resolution
        if self.crop == "center":
            out = resize_center_crop(image, R)
        else:
            out = image.resize((R, R), Image.Resampling.BICUBIC, box=self._box(image, rng))
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_chw(out)

    def _box(self, image: Image.Image, rng: np.random.Generator) -> tuple[float, float, float, float]:
        width, height = image.size
        if self.crop in ("random", "random_scaled"):
            side = min(width, height)
            if self.crop == "random_scaled":
                smallest = min(1.0, max(self.min_scale ** 0.5, self.resolution / side))
                side *= float(np.exp(rng.uniform(np.log(smallest), 0.0)))
            left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
            return left, top, left + side, top + side
        # torchvision's own parameter draw, fed from our generator so that it is reproducible and leaves
        # the global torch generator as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**62)))
            top, left, h, w = RandomResizedCrop.get_params(image, scale=(self.min_scale, 1.0), ratio=(3 / 4, 4 / 3))
        return left, top, left + w, top + h
