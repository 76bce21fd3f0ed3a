"""Pictures a user looks at: image grids and reconstruction comparisons, as PNG files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid


def grid_image(images_uint8: torch.Tensor | np.ndarray, ncols: Optional[int] = None, padding: int = 2) -> Image.Image:
    """Tile uint8 images (N, 3, H, W) into one PIL image, `ncols` wide (default: about square)."""
    images = torch.as_tensor(np.asarray(images_uint8))
    n = images.shape[0]
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    grid = make_grid(images, nrow=ncols, padding=padding, pad_value=255)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_grid(images_uint8: torch.Tensor | np.ndarray | Sequence[Image.Image], path: str | Path,
              ncols: Optional[int] = None) -> Path:
    """Save a grid PNG of uint8 (N,3,H,W) images or PIL images."""
    if isinstance(images_uint8, (list, tuple)) and images_uint8 and isinstance(images_uint8[0], Image.Image):
        images_uint8 = np.stack([np.asarray(im.convert("RGB")).transpose(2, 0, 1) for im in images_uint8])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images_uint8, ncols).save(path)
    return path


def difference_image(reference: torch.Tensor, reconstruction: torch.Tensor, gain: float = 4.0) -> torch.Tensor:
    """|reference - reconstruction| per pixel, amplified by `gain` so small errors are visible (uint8)."""
    diff = (reference.float() - reconstruction.float()).abs().mul(gain).clamp(0, 255)
    return diff.to(torch.uint8)


def save_reconstruction_grid(reference: torch.Tensor, reconstruction: torch.Tensor, path: str | Path,
                             gain: float = 4.0) -> Path:
    """One row per image: input | reconstruction | difference (x`gain`)."""
    reference = torch.as_tensor(reference).cpu()
    reconstruction = torch.as_tensor(reconstruction).cpu()
    rows = torch.stack([reference, reconstruction, difference_image(reference, reconstruction, gain)], dim=1)
    return save_grid(rows.flatten(0, 1), path, ncols=3)
