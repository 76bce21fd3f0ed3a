"""Measures of a KL autoencoder's latent space: what Stage B will have to learn, before it is trained.

Each function takes the autoencoder (anything with diffusers' `encode(x).latent_dist` and `decode(z).sample`)
and uint8 images (N, 3, H, W), and returns plain numbers; `evaluation/inspect_vae.py` writes them up.

- Channels: per latent channel the mean and std of the posterior samples, the mean posterior std, their
  ratio (a channel whose posterior is as wide as its spread carries no information about the image), and
  the KL to N(0, 1) that the loss charges (Kingma & Welling 2014, appendix B, per channel and position).
- The normalisation the data implies: scale 1/std over every latent value (LDM's `scale_by_std`) and the
  shift, the mean (SD3's and Flux's `shift_factor`), beside the config's.
- The decoder under latent noise: PSNR of `decode(z + sigma * eps / scale)` for sigma in unit-variance units
  (what a sampler's error looks like to the decoder; l-DeTok and RAE train decoders for it).
- Equivariance, as EQ-VAE (Kouzelis et al. 2025) and Skorokhodov et al. 2025 measure it: PSNR of
  `decode(T(encode(x)))` against `T(x)` for a 2x bilinear downscale and for rotations by 90, 180, 270 degrees.
- Spectra: the share of each signal's energy in the upper half of its frequencies, for the latents and for
  the images brought to the latents' size (the KL term pushes high frequencies into latents, Skorokhodov et al.).
- Interpolation: decoded paths between pairs of images, linear and spherical in the normalised latent space,
  and how evenly the decoded image changes along each path (the coefficient of variation of the step sizes).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm_core.image_values import to_model_input, to_uint8
from ldm_core.images.metrics import psnr_per_image

NOISE_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.5)
ROTATIONS = (1, 2, 3)  # quarter turns


def _batches(images: torch.Tensor, size: int = 32):
    return (images[i:i + size] for i in range(0, len(images), size))


@torch.no_grad()
def posteriors(vae, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds (N, C, h, w), float32 on the CPU, of uint8 images."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for batch in _batches(images, batch_size):
        dist = vae.encode(to_model_input(batch).to(device)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode_uint8(vae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    device = next(vae.parameters()).device
    return torch.cat([to_uint8(vae.decode(z.to(device)).sample).cpu() for z in _batches(latents, batch_size)])


def channel_statistics(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> list[dict]:
    """Per channel: the samples' mean and std, the mean posterior std, their ratio, and the KL to N(0, 1)
    per latent position (0.5 (mu^2 + sigma^2 - 1 - log sigma^2), averaged over images and positions)."""
    samples = mean + std * torch.randn(mean.shape, generator=generator)
    kl = 0.5 * (mean.square() + std.square() - 1 - 2 * std.clamp_min(1e-12).log())
    rows = []
    for c in range(mean.shape[1]):
        spread = float(samples[:, c].std())
        posterior = float(std[:, c].mean())
        rows.append({"channel": c, "mean": float(samples[:, c].mean()), "std": spread, "posterior_std": posterior,
                     "posterior_over_spread": posterior / spread if spread > 0 else None,
                     "kl_per_position": float(kl[:, c].mean())})
    return rows


def implied_normalisation(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                          config) -> dict:
    """The scale (1/std of every latent value) and the shift (their mean) the data implies, beside the config's."""
    samples = mean + std * torch.randn(mean.shape, generator=generator)
    return {"implied_scaling_factor": float(1 / samples.std()), "implied_shift_factor": float(samples.mean()),
            "config_scaling_factor": float(getattr(config, "scaling_factor", float("nan"))),
            "config_shift_factor": getattr(config, "shift_factor", None)}


def decoder_under_noise(vae, images: torch.Tensor, mean: torch.Tensor, scale: float,
                        generator: torch.Generator, sigmas: Sequence[float] = NOISE_SIGMAS) -> list[dict]:
    """Mean PSNR against the images of `decode(mean + sigma * eps / scale)`, sigma in unit-variance units."""
    rows = []
    for sigma in sigmas:
        noisy = mean + (sigma / scale) * torch.randn(mean.shape, generator=generator)
        rows.append({"sigma": sigma, "psnr": float(psnr_per_image(images, decode_uint8(vae, noisy)).mean())})
    return rows


def _down2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)


def equivariance(vae, images: torch.Tensor, mean: torch.Tensor) -> dict:
    """PSNR of decode(T(z)) against T(x) for T a 2x downscale and rotations by quarter turns; beside it the
    plain reconstruction's PSNR, where T is the identity (EQ-VAE, Kouzelis et al. 2025, eq. 4)."""
    x = to_model_input(images)
    out = {"identity": float(psnr_per_image(images, decode_uint8(vae, mean)).mean())}
    if min(mean.shape[-2:]) >= 2:
        target = to_uint8(_down2(x))
        out["downscale_2x"] = float(psnr_per_image(target, decode_uint8(vae, _down2(mean))).mean())
    for turns in ROTATIONS:
        target = torch.rot90(images, turns, dims=(2, 3))
        out[f"rotate_{90 * turns}"] = float(psnr_per_image(target, decode_uint8(vae, torch.rot90(mean, turns, dims=(2, 3)))).mean())
    return out


def high_frequency_share(signals: torch.Tensor) -> float:
    """The share of the signals' energy (mean removed per map, Hann window) at radial frequencies in the upper half
    of the band, [0.25, 0.5] cycles per sample, pooled over every map of (N, C, h, w)."""
    x = signals.to(torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    h, w = x.shape[-2:]
    window = torch.outer(torch.hann_window(h, periodic=False, dtype=torch.float64),
                         torch.hann_window(w, periodic=False, dtype=torch.float64))
    power = torch.fft.fft2(x * window).abs().square()
    radius = torch.sqrt(torch.fft.fftfreq(h, dtype=torch.float64)[:, None] ** 2
                        + torch.fft.fftfreq(w, dtype=torch.float64)[None, :] ** 2)
    total = float(power[..., radius > 0].sum())
    return float(power[..., radius >= 0.25].sum()) / total if total > 0 else 0.0


def spectra(images: torch.Tensor, mean: torch.Tensor) -> dict:
    """High-frequency share of the latents, and of the images brought to the latents' size (area average)."""
    small = F.adaptive_avg_pool2d(to_model_input(images), mean.shape[-2:])
    return {"latents_hf_share": high_frequency_share(mean), "images_hf_share": high_frequency_share(small)}


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two flattened latents (Shoemake 1985), linear where they are parallel."""
    fa, fb = a.flatten(), b.flatten()
    cos = float(torch.dot(fa, fb) / (fa.norm() * fb.norm()).clamp_min(1e-12))
    omega = math.acos(max(-1.0, min(1.0, cos)))
    if omega < 1e-4:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def interpolations(vae, mean: torch.Tensor, pairs: Sequence[tuple[int, int]], normalise: Callable,
                   unnormalise: Callable, steps: int = 9) -> dict:
    """Decoded paths between pairs of latents, linear and spherical in the normalised space.

    Returns {"linear": [uint8 (steps, 3, H, W) per pair], "spherical": [...], "evenness": {path: mean over
    pairs of the coefficient of variation of the RMS change between consecutive images}} (0: perfectly even).
    """
    out: dict = {"linear": [], "spherical": [], "evenness": {}}
    ts = np.linspace(0, 1, steps)
    for kind, path in (("linear", lambda a, b, t: (1 - t) * a + t * b), ("spherical", slerp)):
        variation = []
        for i, j in pairs:
            a, b = normalise(mean[i:i + 1]), normalise(mean[j:j + 1])
            strip = decode_uint8(vae, unnormalise(torch.cat([path(a, b, float(t)) for t in ts])))
            out[kind].append(strip)
            change = (strip[1:].double() - strip[:-1].double()).square().flatten(1).mean(dim=1).sqrt()
            variation.append(float(change.std() / change.mean()) if change.mean() > 0 else 0.0)
        out["evenness"][kind] = float(np.mean(variation))
    return out


def pca_2d(mean: torch.Tensor) -> np.ndarray:
    """The first two principal components of the flattened posterior means: (N, 2)."""
    x = mean.flatten(1).to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).numpy()


def explained_variance(mean: torch.Tensor, components: int = 2) -> Optional[float]:
    """The share of the latents' variance the first `components` principal components hold."""
    x = mean.flatten(1).to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    singular = torch.linalg.svdvals(x)
    total = float(singular.square().sum())
    return float(singular[:components].square().sum()) / total if total > 0 else None
