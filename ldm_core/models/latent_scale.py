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

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm_core.image_values import to_model_input

logger = logging.getLogger("ldm.latent_stats")


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


class LatentMoments:
    """Running per-channel sums of latents in float64: the one estimator of latent mean and std here.

    Streaming sums are exact enough for millions of elements without holding them all; `merge` combines
    the sums of several processes. Standard deviations are unbiased (n - 1), as `torch.std` and LDM's
    `scale_by_std` (`z.flatten().std()`, CompVis/latent-diffusion: ldm/models/diffusion/ddpm.py) compute them.
    """

    def __init__(self, total: Optional[torch.Tensor] = None, sq_total: Optional[torch.Tensor] = None, count: int = 0):
        self.total, self.sq_total, self.count = total, sq_total, count  # count: values per channel

    def add(self, latents: torch.Tensor) -> None:
        """Add a batch of latents (B, C, h, w)."""
        z = latents.detach().to("cpu", torch.float64)
        per_channel = z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3))
        self.total = per_channel[0] if self.total is None else self.total + per_channel[0]
        self.sq_total = per_channel[1] if self.sq_total is None else self.sq_total + per_channel[1]
        self.count += z.shape[0] * z.shape[2] * z.shape[3]

    def to_state(self) -> dict:
        """Plain lists, to send between processes (`accelerate.utils.gather_object`)."""
        return {"sum": self.total.tolist(), "sumsq": self.sq_total.tolist(), "count": self.count}

    @classmethod
    def merge(cls, states: list[dict]) -> "LatentMoments":
        """The moments of all values that several `to_state()` summaries describe."""
        as_tensor = lambda key: torch.tensor([s[key] for s in states], dtype=torch.float64).sum(0)  # noqa: E731
        return cls(as_tensor("sum"), as_tensor("sumsq"), sum(int(s["count"]) for s in states))

    def channel_mean(self) -> torch.Tensor:
        return self.total / self.count

    def channel_std(self) -> torch.Tensor:
        var = (self.sq_total - self.count * self.channel_mean().pow(2)) / (self.count - 1)
        return var.clamp_min(0).sqrt()

    def values(self) -> int:
        return self.count * len(self.total)

    def mean(self) -> float:
        return float(self.total.sum() / self.values())

    def std(self) -> float:
        """Over every latent element, all channels together."""
        n_all = self.values()
        global_mean = self.total.sum() / n_all
        global_var = (self.sq_total.sum() - n_all * global_mean.pow(2)) / (n_all - 1)
        return float(global_var.clamp_min(0).sqrt())


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
    moments = LatentMoments()
    for mean, std in iter_posteriors(vae, images, batch_size):
        moments.add(mean + std * torch.randn(mean.shape, generator=generator) if sample else mean)
    std = moments.std()
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"The latents have standard deviation {std}; the autoencoder is degenerate "
                         f"(check that Stage A trained and its weights loaded).")
    return LatentStats(channel_mean=moments.channel_mean().tolist(), channel_std=moments.channel_std().tolist(),
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


def resolve_latent_scale(vae, vae_path: Path, images: np.ndarray, max_images: int, seed: int,
                         input_scale: float = 1.0):
    """Set `vae.config.scaling_factor` to the scale Stage B trains with, and return it for metrics.json.

    The unit-variance scale comes from the VAE folder's measurement (latent_stats.json, written by Stage A,
    whose config then already holds 1/std). A published autoencoder whose config states a `shift_factor`
    (SD3: 0.0609 and 1.5305; Flux: 0.1159 and 0.3611) is used with its own shift and scale, as diffusers'
    pipelines use it. Otherwise 1/std is measured here and the warning says so (LDM's `scale_by_std`;
    Stable Diffusion's 0.18215 is that measurement for its VAE on its data). `input_scale` (Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models", sec. 3: the
    input scaling factor b) multiplies it: the U-Net sees latents of standard deviation b, so every
    timestep's SNR is b^2 times the schedule's. It is written into the VAE's config, so the saved pipeline
    and any diffusers user divide by the same number before decoding."""
    stats_file = Path(vae_path) / "latent_stats.json"
    if stats_file.is_file():
        info = {"source": str(stats_file), **json.loads(stats_file.read_text())}
    elif getattr(vae.config, "shift_factor", None) is not None:
        info = {"source": "config.json", "shift_factor": float(vae.config.shift_factor),
                "scaling_factor": float(vae.config.scaling_factor)}
        logger.info("%s states its own latent normalisation: (z - %g) * %g (config.json)", vae_path,
                    info["shift_factor"], info["scaling_factor"])
    else:
        stats = measure_latent_stats(vae, images, max_images=max_images, seed=seed)
        logger.warning("%s has no measured latent scale (latent_stats.json); measured 1/std = %.5f over %d images "
                       "(its config says %.5f). Using the measured value.", vae_path, stats.scaling_factor,
                       stats.num_images, float(vae.config.scaling_factor))
        apply_scaling_factor(vae, stats)
        info = {"source": "measured", **stats.to_json()}
    if input_scale != 1.0:
        vae.register_to_config(scaling_factor=float(vae.config.scaling_factor) * input_scale)
    return {**info, "input_scale": input_scale, "trained_scaling_factor": float(vae.config.scaling_factor)}
