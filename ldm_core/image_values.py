"""The two value ranges: images are kept as uint8 [0, 255] and fed to models as float [-1, 1].

Images are converted to the model's range only when a batch is fed (`to_model_input`); model outputs
go back through `to_uint8`, so every metric reads two uint8 tensors (docs/reconstruction-protocol.md).
"""

from __future__ import annotations

import torch


def to_model_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float32 [-1, 1] as x / 127.5 - 1 (the LDM / diffusers convention)."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_input expects a uint8 tensor, got {images_uint8.dtype}; "
                        f"convert decoded images with torch.from_numpy first.")
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] back to uint8 as round((clamp(y, -1, 1) + 1) * 127.5) (docs/reconstruction-protocol.md)."""
    return ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)

