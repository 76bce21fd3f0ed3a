"""Held-out reconstruction quality during Stage A training.

Uses the benchmark's protocol (docs/reconstruction-protocol.md): posterior mode, fp32, reconstructions quantised to
uint8, PSNR and SSIM per image on the two uint8 tensors, then averaged.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm_core.images.metrics import psnr_per_image, ssim_per_image
from ldm_core.image_values import to_model_input, to_uint8


@torch.no_grad()
def reconstruct_uint8(vae, images_uint8: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Encode to the posterior mode, decode in fp32, quantise: uint8 in, uint8 out."""
    was_training = vae.training
    vae.eval()
    x = to_model_input(images_uint8.to(device))
    z = vae.encode(x).latent_dist.mode()
    out = to_uint8(vae.decode(z).sample.float()).cpu()
    vae.train(was_training)
    return out


@torch.no_grad()
def validate_reconstructions(vae, images_uint8: np.ndarray, device: torch.device | str = "cpu",
                             batch_size: int = 32) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of the autoencoder over held-out uint8 images (N, 3, H, W)."""
    psnr, ssim = [], []
    for start in range(0, len(images_uint8), batch_size):
        ref = torch.from_numpy(np.ascontiguousarray(images_uint8[start:start + batch_size]))
        rec = reconstruct_uint8(vae, ref, device)
        psnr.append(psnr_per_image(ref, rec))
        ssim.append(ssim_per_image(ref, rec))
    return {"psnr": float(torch.cat(psnr).mean()), "ssim": float(torch.cat(ssim).mean())}
