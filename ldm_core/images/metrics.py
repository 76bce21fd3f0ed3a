"""Per-image fidelity metrics that read only two uint8 image tensors.

The protocol follows docs/reconstruction-protocol.md: every number is computed from a uint8 reference and a uint8
reconstruction (N, 3, H, W), so it can be reproduced from saved PNGs, and every metric is reported
per image (mean, std and n are taken afterwards, never a pooled number).

- PSNR in float64 on [0, 255], capped at `PSNR_CAP_DB` when the two images are identical.
- SSIM with the standard 11x11 Gaussian window (sigma 1.5) and an explicit data range of 255
  (torchmetrics infers the range from the batch when it is not given, which makes numbers depend on
  the batch).
- MS-SSIM (Wang et al. 2003) with the same window, only when the short side exceeds 160 px: with five
  scales and an 11-tap window the coarsest scale would otherwise be smaller than the window.
- LPIPS (Zhang et al. 2018) with a named backbone, whose ImageNet trunk weights are read from a local
  file; without that file the metric is unavailable, never computed with a random trunk.
- Two measures that need no pretrained network, read as a ratio over a set of images (reconstructions'
  sum over originals' sum; 1.0 means kept): the power of the top octave of spatial frequencies (blur
  lowers it) and the mean chroma (desaturation lowers it).
- Where the errors are: PSNR over the outer ring of pixels and over the rest (a decoder's zero padding
  shows there first), and each channel's mean shift in levels (a colour cast: black coming back grey).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from ldm_core.image_values import to_model_input
from ldm_core.models.pretrained import LPIPS_TRUNK_FILES, build_pretrained_lpips

# PSNR of two identical images is infinite; a finite cap keeps means and stds defined.
PSNR_CAP_DB = 100.0
SSIM_SIGMA = 1.5
SSIM_KERNEL = 11
DATA_RANGE = 255.0
# MS-SSIM needs the short side to exceed (kernel - 1) * 2 ** (scales - 1) = 10 * 16 (torchmetrics' check).
MSSSIM_MIN_SIDE = (SSIM_KERNEL - 1) * 2 ** 4

# The lpips package's trunks and the torchvision files they are built from
# (docs/commands.md, "Pretrained weights on an offline machine").
LPIPS_BACKBONES = LPIPS_TRUNK_FILES

PSNR_IMPL = f"per image, float64 on [0,255], MSE 0 capped at {PSNR_CAP_DB:g} dB"
SSIM_IMPL = ("torchmetrics structural_similarity_index_measure map per image, Gaussian window 11 "
             "sigma 1.5, data_range=255, float64, averaged over valid window positions (5-px border "
             "excluded, as Wang et al. and scikit-image)")
MSSSIM_IMPL = ("torchmetrics multiscale_structural_similarity_index_measure per image, Gaussian window 11 "
               "sigma 1.5, data_range=255, 5 scales, betas of Wang et al. 2003, normalize='relu', float64, "
               "torchmetrics' reflect-padded border included")


def _check_pair(reference: torch.Tensor, reconstruction: torch.Tensor) -> None:
    for name, t in (("reference", reference), ("reconstruction", reconstruction)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"The {name} must be a uint8 tensor of shape (N, 3, H, W); got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}. "
                             f"Quantise with ldm_core.image_values.to_uint8 first.")
    if reference.shape != reconstruction.shape:
        raise ValueError(f"Reference {tuple(reference.shape)} and reconstruction "
                         f"{tuple(reconstruction.shape)} must have the same shape.")


def psnr_per_image(reference: torch.Tensor, reconstruction: torch.Tensor,
                   cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """PSNR of each image pair in dB, computed in float64 on [0, 255].

    torchmetrics' PSNR with its default `dim=None` pools the MSE over the whole batch into one number;
    the per-image mean and std the protocol asks for need one MSE per image, so it is computed here.

    Parameters:
        reference, reconstruction: uint8 tensors (N, 3, H, W).
        cap_db: value reported when the MSE is 0 (identical images).

    Returns:
        float64 CPU tensor of N values.
    """
    _check_pair(reference, reconstruction)
    diff = reference.to(torch.float64) - reconstruction.to(torch.float64)
    mse = diff.square().flatten(1).mean(dim=1).cpu()
    psnr = 10.0 * torch.log10(DATA_RANGE ** 2 / mse)  # inf where mse == 0, then capped
    return psnr.clamp(max=cap_db)


def ssim_per_image(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair (Wang et al. 2004), Gaussian window 11 / sigma 1.5, data range 255.

    Matches scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255)` averaged over channels.
    """
    _check_pair(reference, reconstruction)
    _, ssim_map = structural_similarity_index_measure(
        reconstruction.to(torch.float64), reference.to(torch.float64), gaussian_kernel=True,
        sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL, data_range=DATA_RANGE, reduction="none",
        return_full_image=True)
    # torchmetrics averages the map over the reflect-padded border too; the reference implementation
    # (Wang et al.'s ssim_index.m, 'valid' filtering) and scikit-image average only positions whose
    # window lies inside the image, so the (kernel - 1) / 2 border is cropped here.
    pad = (SSIM_KERNEL - 1) // 2
    if min(ssim_map.shape[-2:]) <= 2 * pad:
        raise ValueError(f"SSIM needs images larger than {2 * pad} px; got {tuple(reference.shape[-2:])}.")
    return ssim_map[..., pad:-pad, pad:-pad].flatten(1).mean(dim=1).to(torch.float64).cpu()


def msssim_unavailable_reason(height: int, width: int) -> Optional[str]:
    """Why MS-SSIM cannot be computed at this size, or None when it can."""
    if min(height, width) > MSSSIM_MIN_SIDE:
        return None
    return (f"MS-SSIM needs the short side to exceed {MSSSIM_MIN_SIDE} px (5 scales of an 11-px window); "
            f"the images are {height}x{width}. Use --resolution 192 or more.")


def msssim_per_image(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of each image pair; raises ValueError when the images are too small (see above)."""
    _check_pair(reference, reconstruction)
    reason = msssim_unavailable_reason(reference.shape[2], reference.shape[3])
    if reason:
        raise ValueError(reason)
    values = multiscale_structural_similarity_index_measure(
        reconstruction.to(torch.float64), reference.to(torch.float64), gaussian_kernel=True,
        sigma=SSIM_SIGMA, kernel_size=SSIM_KERNEL, data_range=DATA_RANGE, reduction="none",
        normalize="relu")
    return values.to(torch.float64).cpu()


# --------------------------------------------------------------------------------------------------
# LPIPS


def lpips_impl(backbone: str) -> str:
    return (f"lpips 0.1.4 LPIPS(net='{backbone}', version 0.1), ImageNet trunk "
            f"{LPIPS_BACKBONES[backbone]}, input uint8 mapped to [-1, 1]")


def load_lpips(backbone: str = "alex", weights_path: Optional[str | os.PathLike] = None):
    """Build `lpips.LPIPS(net=backbone)` with its ImageNet trunk from torchvision's weights file.

    The package's small linear heads ship inside it. The trunk file is a path given, or torch hub's
    cache, where it is downloaded on first use with its sha256 checked
    (`ldm_core.models.pretrained.find_weights`); it is loaded into a model built with a random trunk
    (`pnet_rand=True`), and every trunk parameter must be filled, or this raises.

    Parameters:
        backbone: "alex" (the lpips package's default) or "vgg" (common in papers).
        weights_path: explicit path of the torchvision file; otherwise torch hub's cache.

    Raises:
        MissingWeightsError: the trunk file is absent and cannot be fetched now (offline, or the download
            failed); the message names the file, how to fetch it and where to put it.
        WeightsFileError: the file is there but is not that trunk (random bytes, text, Python objects,
            another network's tensors); the message names the file and what it should be.
    """
    return build_pretrained_lpips(backbone, weights_path, option_hint="--lpips-weights PATH")


@torch.no_grad()
def lpips_per_image(model, reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """LPIPS distance of each pair; uint8 inputs are mapped to [-1, 1] as the lpips package expects."""
    _check_pair(reference, reconstruction)
    device = next(model.parameters()).device
    ref = to_model_input(reference.to(device))
    rec = to_model_input(reconstruction.to(device))
    return model(rec, ref).flatten().to(torch.float64).cpu()


# --------------------------------------------------------------------------------------------------
# Blur and colour, without a pretrained network

HIGH_FREQUENCY_IMPL = ("mean power of the top octave of the radially averaged power spectrum (radial frequency "
                       "in [0.25, 0.5) cycles/px), per channel after removing the image mean and applying a 2-D "
                       "Hann window, averaged over channels; reported as reconstructions' sum / originals' sum")
CHROMA_IMPL = ("mean over pixels of max(R,G,B) - min(R,G,B) on [0,255] (the chroma of HSV/HSL); reported as "
               "reconstructions' sum / originals' sum")


def high_frequency_power(images: torch.Tensor) -> torch.Tensor:
    """Mean spectral power of each image in the top octave of spatial frequencies.

    The power spectrum |FFT|^2 of each channel (mean removed, 2-D Hann window so that the image's borders do
    not leak into high frequencies) is averaged over the annulus 0.25 <= sqrt(fx^2 + fy^2) < 0.5 cycles per
    pixel, the octave below the Nyquist frequency, which is the mean of the radially averaged spectrum
    there weighted by each radius's share of the annulus. Blur removes that octave first, so
    ``high_frequency_power(reconstructions).sum() / high_frequency_power(originals).sum()`` is the share
    of the originals' fine detail that the reconstructions keep: 1.0 for no blur, below for blur, above
    for added noise or ringing.

    Parameters:
        images: uint8 tensor (N, 3, H, W).

    Returns:
        float64 CPU tensor of N values (on the scale of [0, 255] pixel values squared).
    """
    _check_pair(images, images)
    x = images.to(torch.float64).cpu()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    height, width = x.shape[-2:]
    window = torch.outer(torch.hann_window(height, periodic=False, dtype=torch.float64),
                         torch.hann_window(width, periodic=False, dtype=torch.float64))
    power = torch.fft.fft2(x * window).abs().square()
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    radius = torch.sqrt(fy ** 2 + fx ** 2)
    band = (radius >= 0.25) & (radius < 0.5)
    return power[..., band].mean(dim=-1).mean(dim=1) / (height * width)


def mean_chroma(images: torch.Tensor) -> torch.Tensor:
    """Mean chroma of each image, max(R,G,B) - min(R,G,B) per pixel on [0, 255]: 0 for gray, 255 for a
    pure primary. A desaturating autoencoder gives reconstructions of lower mean chroma than its inputs."""
    _check_pair(images, images)
    x = images.to(torch.float64).cpu()
    return (x.amax(dim=1) - x.amin(dim=1)).flatten(1).mean(dim=1)


def kept_ratio(reconstruction_values: Sequence[float], reference_values: Sequence[float]) -> Optional[float]:
    """Reconstructions' sum over the references' sum of a per-image quantity (None when the references'
    sum is 0). A pooled ratio, not a mean of per-image ratios: a flat crop's tiny high-frequency power
    would make its own ratio mostly noise."""
    reference = float(np.sum(np.asarray(reference_values, dtype=np.float64)))
    if reference <= 0:
        return None
    return float(np.sum(np.asarray(reconstruction_values, dtype=np.float64))) / reference


# --------------------------------------------------------------------------------------------------
# Where the errors are: the border, and a shift of each channel's mean

BORDER_RING_PX = 4
BORDER_IMPL = (f"PSNR per image over the outer {BORDER_RING_PX}-pixel ring and over the interior, float64 on "
               f"[0,255], each capped as PSNR")
BIAS_IMPL = "per image and channel, mean(reconstruction) - mean(reference) in levels of [0,255]"


def border_interior_psnr(reference: torch.Tensor, reconstruction: torch.Tensor, ring: int = BORDER_RING_PX,
                         cap_db: float = PSNR_CAP_DB) -> tuple[torch.Tensor, torch.Tensor]:
    """PSNR of each pair over the outer `ring` pixels of every side, and over the interior left inside it.

    Returns two float64 CPU tensors of N values (border, interior). Raises ValueError when the images are
    too small to have an interior (a side of at most 2 * ring)."""
    _check_pair(reference, reconstruction)
    height, width = reference.shape[-2:]
    if min(height, width) <= 2 * ring:
        raise ValueError(f"Images of {height}x{width} px have no interior inside a {ring}-pixel ring.")
    squared = (reference.to(torch.float64) - reconstruction.to(torch.float64)).square().mean(dim=1).cpu()
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[ring:height - ring, ring:width - ring] = True

    def psnr(mask: torch.Tensor) -> torch.Tensor:
        return (10.0 * torch.log10(DATA_RANGE ** 2 / squared[:, mask].mean(dim=1))).clamp(max=cap_db)

    return psnr(~inside), psnr(inside)


def channel_bias(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Each image's per-channel mean shift, reconstruction minus reference, in levels: (N, 3) float64 on the
    CPU. A flat field that comes back 9 levels lighter in red reads +9 in its first column."""
    _check_pair(reference, reconstruction)
    diff = reconstruction.to(torch.float64) - reference.to(torch.float64)
    return diff.mean(dim=(2, 3)).cpu()


# --------------------------------------------------------------------------------------------------
# Summaries


def summarize(values: Sequence[float]) -> dict:
    """Mean, population standard deviation (ddof=0) and count of per-image values."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


__all__ = ["PSNR_CAP_DB", "LPIPS_BACKBONES", "MSSSIM_MIN_SIDE", "PSNR_IMPL", "SSIM_IMPL", "MSSSIM_IMPL",
           "psnr_per_image", "ssim_per_image", "msssim_per_image", "msssim_unavailable_reason",
           "load_lpips", "lpips_impl", "lpips_per_image", "HIGH_FREQUENCY_IMPL", "CHROMA_IMPL",
           "BORDER_RING_PX", "BORDER_IMPL", "BIAS_IMPL", "border_interior_psnr", "channel_bias",
           "high_frequency_power", "mean_chroma", "kept_ratio", "summarize"]
