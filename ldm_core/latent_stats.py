"""The latent scale: statistics of an autoencoder's latents and the scaling Stage B trains on.

LDM's `scale_by_std` (CompVis/latent-diffusion: ldm/models/diffusion/ddpm.py, `on_train_batch_start`)
sets `scale_factor = 1 / z.flatten().std()` from the posterior *samples* of the first training batch;
Stable Diffusion's 0.18215 is that number for its VAE. It must be measured again for every new
autoencoder. Here it is measured over many images (CompVis/latent-diffusion: ldm/models/diffusion/ddpm.py, `scale_by_std`) and stored in the VAE's own config
(`AutoencoderKL.config.scaling_factor`) so the model folder carries it.

Convention (the one diffusers' SD3/Flux pipelines use): scaled = (z - shift_factor) * scaling_factor,
with shift_factor None meaning 0. Stage B trains on scaled latents; the pipeline inverts this before
decoding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm_core.data import to_model_input


@dataclass
class LatentStats:
    """Statistics of posterior latents over `num_images` images.

    Parameters:
        channel_mean, channel_std: per latent channel, over images and positions.
        std: the global standard deviation over every latent element (LDM's `z.flatten().std()`).
        scaling_factor: 1 / std, the factor that gives the diffusion model unit-variance inputs.
        num_images: how many images were encoded.
    """

    channel_mean: list[float]
    channel_std: list[float]
    std: float
    scaling_factor: float
    num_images: int

    def to_json(self) -> dict:
        return asdict(self)


def _vae_device(vae) -> torch.device:
    return next(vae.parameters()).device


@torch.no_grad()
def iter_posteriors(vae, images_uint8: np.ndarray, batch_size: int = 32, progress: bool = False,
                    desc: str = "Encoding") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (mean, std) of the VAE posterior for consecutive batches of uint8 images (N, 3, R, R).

    The VAE runs in eval mode and fp32 (its training mode is restored afterwards); outputs are fp32 CPU
    tensors. diffusers' `DiagonalGaussianDistribution` clamps logvar to [-30, 20] as LDM does.
    """
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"Expected uint8 images of shape (N, 3, R, R), got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if vae.dtype != torch.float32:
        raise ValueError(f"The VAE is in {vae.dtype}; encode latents in float32 (load it with "
                         f"torch_dtype=torch.float32 or call vae.float()).")
    device = _vae_device(vae)
    was_training = vae.training
    vae.eval()
    try:
        starts = range(0, len(images_uint8), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress):
            batch = torch.from_numpy(np.ascontiguousarray(images_uint8[start:start + batch_size]))
            posterior = vae.encode(to_model_input(batch).to(device)).latent_dist
            yield posterior.mean.float().cpu(), posterior.std.float().cpu()
    finally:
        vae.train(was_training)


def measure_latent_stats(vae, images_uint8: np.ndarray, *, max_images: int = 1024, batch_size: int = 32,
                         sample: bool = True, seed: int = 0) -> LatentStats:
    """Measure latent statistics over the first `max_images` images.

    Parameters:
        vae: a diffusers `AutoencoderKL` (float32).
        images_uint8: (N, 3, R, R) uint8 images.
        max_images: how many images, from the start of the array, to encode.
        sample: True measures posterior samples z = mean + std * eps as LDM does; False the means.
        seed: seed of the eps draws (CPU generator, so the result does not depend on the device).
    """
    if max_images < 1:
        raise ValueError(f"max_images must be positive, got {max_images}.")
    images = np.asarray(images_uint8)[:max_images]
    if len(images) < 1:
        raise ValueError("No images to measure latent statistics on.")
    generator = torch.Generator().manual_seed(seed)
    # Streaming sums in float64: exact enough for millions of elements without holding them all.
    total = sq_total = None
    count = 0
    for mean, std in iter_posteriors(vae, images, batch_size):
        z = mean + std * torch.randn(mean.shape, generator=generator) if sample else mean
        z = z.double()
        per_channel = z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3))
        total = per_channel[0] if total is None else total + per_channel[0]
        sq_total = per_channel[1] if sq_total is None else sq_total + per_channel[1]
        count += z.shape[0] * z.shape[2] * z.shape[3]
    channel_mean = total / count
    # Unbiased (n - 1) variances, as torch.std computes them.
    channel_var = (sq_total - count * channel_mean.pow(2)) / (count - 1)
    n_all = count * len(total)
    global_mean = total.sum() / n_all
    global_var = (sq_total.sum() - n_all * global_mean.pow(2)) / (n_all - 1)
    std = float(global_var.clamp_min(0).sqrt())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"The latents have standard deviation {std}; the autoencoder is degenerate "
                         f"(check that Stage A trained and its weights loaded).")
    return LatentStats(channel_mean=[float(v) for v in channel_mean],
                       channel_std=[float(v) for v in channel_var.clamp_min(0).sqrt()],
                       std=std, scaling_factor=1.0 / std, num_images=len(images))


def apply_scaling_factor(vae, stats: LatentStats) -> None:
    """Store `stats.scaling_factor` in the VAE's config (saved with it in `config.json`).

    Only `scaling_factor` is written. diffusers' AutoencoderKL config also has `latents_mean` /
    `latents_std`, but diffusers' SDXL pipelines treat those as a per-channel normalisation replacing
    the shift, which is not the convention Stage B trains with, so they are left unset.
    """
    vae.register_to_config(scaling_factor=float(stats.scaling_factor))


def scale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Unscaled VAE latents -> the diffusion model's space: (z - shift_factor) * scaling_factor."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def unscale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse of `scale_latents`: z = scaled / scaling_factor + shift_factor."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return latents / vae_config.scaling_factor + shift
