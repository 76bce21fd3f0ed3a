"""Encode the training images once with the frozen VAE and keep the posterior on disk.

diffusers' text-to-image trainer runs the encoder on every batch; its SDXL trainer caches one fixed
posterior sample. Caching the posterior mean and std instead keeps LDM's reparameterised sampling
(a fresh z = mean + std * eps every time an image is drawn, as LDM's `DiagonalGaussianDistribution.sample`
does in CompVis/latent-diffusion: ldm/models/diffusion/ddpm.py) while the encoder leaves the training
step. Horizontal flips are encoded as separate entries, since the encoder is not flip-equivariant.

The file name carries a hash of everything the latents depend on (VAE weights and config, the image
bytes, the flip setting), so a changed autoencoder or dataset can never reuse stale latents.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ldm_core.latent_stats import iter_posteriors

_FORMAT = "1"



class LatentCache:
    """Posterior mean and std of every training image: float32 tensors (M, C, h, w).

    M = N, or 2N with flips (entry N + i is image i flipped horizontally).

    Parameters:
        mean, std: the posterior parameters.
        num_images: N, the number of distinct images.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_images: int):
        if mean.shape != std.shape or mean.ndim != 4:
            raise ValueError(f"mean and std must both be (M, C, h, w); got {tuple(mean.shape)} and {tuple(std.shape)}.")
        if mean.shape[0] not in (num_images, 2 * num_images):
            raise ValueError(f"{mean.shape[0]} cached entries do not fit {num_images} images (expected N or 2N).")
        # Contiguous whatever produced them: a freshly encoded cache comes out of the encoder in
        # channels-last strides, a loaded one does not, and the U-Net must see the same layout either way
        # for runs to be bit-identical.
        self.mean = mean.contiguous()
        self.std = std.contiguous()
        self.num_images = num_images

    @property
    def has_flips(self) -> bool:
        return self.mean.shape[0] == 2 * self.num_images

    def __len__(self) -> int:
        return self.num_images

    def to(self, device: torch.device | str) -> "LatentCache":
        """Move the cache (e.g. to the GPU, so drawing a batch never copies from the host)."""
        return LatentCache(self.mean.to(device), self.std.to(device), self.num_images)

    def draw(self, indices: torch.Tensor, generator: torch.Generator, mode: str = "sample",
             flip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """UNSCALED latents of images `indices`.

        Parameters:
            indices: (B,) image indices in [0, N).
            generator: source of eps for mode "sample" (fresh noise on every call).
            mode: "sample" draws z = mean + std * eps (reparameterisation); "mode" returns the mean.
            flip: optional (B,) bool; True selects the flipped image's entry.
        """
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_images):
            raise IndexError(f"Image indices must lie in [0, {self.num_images}); got "
                             f"[{int(indices.min())}, {int(indices.max())}].")
        if flip is not None:
            flip = torch.as_tensor(flip, dtype=torch.bool)
            if flip.any() and not self.has_flips:
                raise ValueError("This latent cache holds no flipped images; build it with flip=True.")
            indices = indices + self.num_images * flip.long()
        indices = indices.to(self.mean.device)
        mean = self.mean[indices]
        if mode == "mode":
            return mean
        if mode != "sample":
            raise ValueError(f"Unknown latent sampling mode {mode!r}: use sample or mode.")
        eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + self.std[indices] * eps


def _hash_vae(digest, vae) -> None:
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    # The scaling factor changes no latent: leave it out so measuring it does not invalidate the cache.
    config.pop("scaling_factor", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def vae_digest(vae) -> str:
    """sha256 over the VAE's config and weights: which autoencoder a run's latents come from."""
    digest = hashlib.sha256(b"vae|")
    _hash_vae(digest, vae)
    return digest.hexdigest()


def cache_key(vae, images_uint8: np.ndarray, flip: bool) -> str:
    """sha256 over the VAE (config and weights), the image bytes and shape, and the flip setting."""
    digest = hashlib.sha256(f"latent-cache-v{_FORMAT}|flip={bool(flip)}|shape={images_uint8.shape}|".encode())
    _hash_vae(digest, vae)
    digest.update(hashlib.sha256(np.ascontiguousarray(images_uint8).data).digest())
    return digest.hexdigest()


def _encode(vae, images_uint8: np.ndarray, flip: bool, batch_size: int, progress: bool) -> LatentCache:
    sources = [images_uint8]
    if flip:
        sources.append(images_uint8[..., ::-1])
    means, stds = [], []
    for k, source in enumerate(sources):
        desc = "Encoding latents" + (" (flipped)" if k else "")
        for mean, std in iter_posteriors(vae, source, batch_size, progress=progress, desc=desc):
            means.append(mean)
            stds.append(std)
    return LatentCache(torch.cat(means), torch.cat(stds), len(images_uint8))


def _read(path: Path, key: str, num_images: int, flip: bool) -> Optional[LatentCache]:
    """The cache at `path` if it is complete and describes these latents, else None."""
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        meta = header.get("__metadata__", {})
        if meta.get("key") != key or meta.get("format") != _FORMAT:
            return None
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError):
        return None
    mean, std = tensors.get("mean"), tensors.get("std")
    expected = (2 if flip else 1) * num_images
    if (mean is None or std is None or mean.dtype != torch.float32 or mean.shape != std.shape
            or mean.ndim != 4 or mean.shape[0] != expected
            or not torch.isfinite(mean).all() or not torch.isfinite(std).all()):
        return None
    return LatentCache(mean, std, num_images)


def load_or_build_latent_cache(vae, images_uint8: np.ndarray, *, flip: bool, cache_dir: str | Path,
                               batch_size: int = 32, progress: bool = True) -> LatentCache:
    """Return the latent cache of `images_uint8` under `vae`, encoding only when no valid file exists.

    Parameters:
        vae: the frozen `AutoencoderKL` (float32; run in eval mode under no_grad).
        images_uint8: (N, 3, R, R) uint8 training images.
        flip: also encode every image flipped horizontally (entries N..2N-1).
        cache_dir: folder of `latents-<key16>.safetensors` files.

    The file is written under a temporary name and renamed into place, so a reader never sees half a
    file; a file that is truncated, corrupt or of the wrong shape is rebuilt. Several processes may call
    this at once: each writes its own temporary file and the renames are atomic.
    """
    images_uint8 = np.asarray(images_uint8)
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"Expected uint8 images of shape (N, 3, R, R), got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}.")
    if len(images_uint8) == 0:
        raise ValueError("No images to encode.")
    key = cache_key(vae, images_uint8, flip)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"latents-{key[:16]}.safetensors"
    if path.is_file():
        cached = _read(path, key, len(images_uint8), flip)
        if cached is not None:
            return cached
    cache = _encode(vae, images_uint8, flip, batch_size, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"key": key, "format": _FORMAT, "num_images": str(len(images_uint8)), "flip": str(bool(flip)),
            "resolution": str(images_uint8.shape[-1])}
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"mean": cache.mean.contiguous(), "std": cache.std.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return cache
