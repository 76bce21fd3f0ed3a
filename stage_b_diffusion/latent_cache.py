"""Encode the training images once with the frozen VAE and keep the posterior on disk.

diffusers' text-to-image trainer runs the encoder on every batch; its SDXL trainer caches one fixed
posterior sample. Caching the posterior mean and std instead keeps LDM's reparameterised sampling
(a fresh z = mean + std * eps every time an image is drawn, as LDM's `DiagonalGaussianDistribution.sample`
does in CompVis/latent-diffusion: ldm/models/diffusion/ddpm.py) while the encoder leaves the training
step. Horizontal flips are encoded as separate entries, since the encoder is not flip-equivariant.

The cache is a folder of shards, each a .npy array of which a batch reads only its own rows, so
training on a million images needs no more memory than the rows of a batch; the values are stored in float32, float16 or
bfloat16 (`data.latent_cache_dtype`). Every process encodes its own shards, and a killed encoding keeps
the shards it finished. The folder name carries a hash of everything the latents depend on (VAE weights
and config, the images, the flip setting, the storage layout), so a changed autoencoder or dataset can
never reuse stale latents.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ldm_core.atomic_files import write_atomic
from ldm_core.models.latent_scale import iter_posteriors

_FORMAT = "2"



class LatentCache:
    """Posterior mean and std of N training images, in shards on disk read row by row.

    Shard s holds images [s * shard_size, (s + 1) * shard_size) as one array (2, M_s, C, h, w): mean then
    std, M_s = n_s entries, or 2 n_s with flips (entry n_s + j is image j of the shard flipped). Only the
    rows a batch draws are read, so a cache of a million images needs no more memory than a batch.

    Parameters:
        shards: the stored shards (`ShardFile`) or in-memory arrays, as float32, float16 or bfloat16 bits (uint16).
        shard_size: images per shard (the last may hold fewer).
        num_images: N.
        has_flips: whether every shard also holds its images flipped.
        dtype: "float32", "float16" or "bfloat16": how the values are stored.
    """

    def __init__(self, shards: list[np.ndarray], shard_size: int, num_images: int, has_flips: bool,
                 dtype: str = "float32"):
        self.shards, self.shard_size, self.num_images = shards, int(shard_size), int(num_images)
        self.has_flips, self.dtype = bool(has_flips), dtype

    @classmethod
    def from_tensors(cls, mean: torch.Tensor, std: torch.Tensor, num_images: int) -> "LatentCache":
        """One in-memory float32 shard of (M, C, h, w) means and stds; M = N, or 2N with flips."""
        if mean.shape != std.shape or mean.ndim != 4:
            raise ValueError(f"mean and std must both be (M, C, h, w); got {tuple(mean.shape)} and {tuple(std.shape)}.")
        if mean.shape[0] not in (num_images, 2 * num_images):
            raise ValueError(f"{mean.shape[0]} cached entries do not fit {num_images} images (expected N or 2N).")
        stacked = torch.stack([mean.float(), std.float()]).numpy()
        return cls([stacked], max(1, num_images), num_images, mean.shape[0] == 2 * num_images)

    def __len__(self) -> int:
        return self.num_images

    def _rows(self, indices: np.ndarray, flips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (B, C, h, w) mean and std of images `indices` (flipped where `flips`)."""
        shard_of = indices // self.shard_size
        local = indices % self.shard_size
        first = self.shards[0]
        mean = np.empty((len(indices), *first.shape[2:]), dtype=np.float32)
        std = np.empty_like(mean)
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            array = self.shards[int(shard)]
            images_in_shard = array.shape[1] // (2 if self.has_flips else 1)
            entries = local[rows] + images_in_shard * flips[rows]
            taken = array.take(entries) if isinstance(array, ShardFile) else np.asarray(array[:, entries])
            values = _to_float32(taken, self.dtype)
            mean[rows], std[rows] = values[0], values[1]
        return torch.from_numpy(mean), torch.from_numpy(std)

    @property
    def mean(self) -> torch.Tensor:
        """Every entry's mean as one float32 tensor (M, C, h, w), unflipped entries first (small caches, tests)."""
        return self._all(0)

    @property
    def std(self) -> torch.Tensor:
        return self._all(1)

    def _all(self, which: int) -> torch.Tensor:
        indices = np.arange(self.num_images)
        parts = [self._rows(indices, np.zeros(self.num_images, dtype=bool))[which]]
        if self.has_flips:
            parts.append(self._rows(indices, np.ones(self.num_images, dtype=bool))[which])
        return torch.cat(parts)

    def draw(self, indices: torch.Tensor, generator: torch.Generator, mode: str = "sample",
             flip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """UNSCALED float32 latents of images `indices`.

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
        flips = np.zeros(indices.numel(), dtype=bool)
        if flip is not None:
            flips = torch.as_tensor(flip, dtype=torch.bool).numpy()
            if flips.any() and not self.has_flips:
                raise ValueError("This latent cache holds no flipped images; build it with flip=True.")
        if mode not in ("sample", "mode"):
            raise ValueError(f"Unknown latent sampling mode {mode!r}: use sample or mode.")
        mean, std = self._rows(indices.numpy(), flips)
        if mode == "mode":
            return mean
        eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * eps


STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def _from_float32(values: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: keep its bits as uint16
        return values.to(torch.bfloat16).view(torch.uint16).numpy()
    return values.to(getattr(torch, dtype)).numpy()


def _to_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(values)).view(torch.bfloat16).float().numpy()
    return values.astype(np.float32, copy=False)


@dataclass
class ImagesToEncode:
    """The training images a cache is built from, read in position order.

    Parameters:
        count: N.
        resolution: R.
        fingerprint: identifies the images (see `ImageSource.fingerprint`); part of the cache key.
        read: `read(start, stop)` yields uint8 (B, 3, R, R) batches of positions [start, stop) in order.
    """

    count: int
    resolution: int
    fingerprint: str
    read: Callable[[int, int], Iterator[np.ndarray]]

    @classmethod
    def from_array(cls, images_uint8: np.ndarray, batch_size: int = 64) -> "ImagesToEncode":
        images_uint8 = np.asarray(images_uint8)
        if images_uint8.dtype != np.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
            raise ValueError(f"Expected uint8 images of shape (N, 3, R, R), got {images_uint8.dtype} "
                             f"{tuple(images_uint8.shape)}.")
        digest = hashlib.sha256(f"shape={images_uint8.shape}|".encode())
        digest.update(hashlib.sha256(np.ascontiguousarray(images_uint8).data).digest())

        def read(start: int, stop: int) -> Iterator[np.ndarray]:
            for k in range(start, stop, batch_size):
                yield images_uint8[k:min(k + batch_size, stop)]

        return cls(len(images_uint8), images_uint8.shape[-1], digest.hexdigest(), read)


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


def cache_key(vae, images: ImagesToEncode, flip: bool, dtype: str, shard_size: int) -> str:
    """sha256 over the VAE (config and weights), the images, the flip setting and the storage layout."""
    digest = hashlib.sha256(f"latent-cache-v{_FORMAT}|flip={bool(flip)}|dtype={dtype}|shard={shard_size}|"
                            f"count={images.count}|R={images.resolution}|{images.fingerprint}|".encode())
    _hash_vae(digest, vae)
    return digest.hexdigest()


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:06d}.npy"


class ShardFile:
    """One stored shard, read by explicit reads of the rows a batch draws (no memory map).

    A memory map would serve the same rows, but every page it touches stays in the process's resident
    set until the system reclaims it, so a long run over a large cache would look as if it held the whole
    cache. Reading with `os.pread` leaves those pages in the page cache, shared and reclaimable, and the
    process holds only the rows of the batch.
    """

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype, data_offset: int):
        self.path, self.shape, self.dtype, self.data_offset = path, tuple(shape), np.dtype(dtype), int(data_offset)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def take(self, entries: np.ndarray) -> np.ndarray:
        """(2, len(entries), C, h, w): the mean and std rows of `entries`, in that order."""
        row_bytes = int(np.prod(self.shape[2:])) * self.dtype.itemsize
        out = np.empty((2, len(entries), *self.shape[2:]), dtype=self.dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for which in range(2):  # mean rows, then the std rows M entries later
                for k, entry in enumerate(entries):
                    start = self.data_offset + (which * self.shape[1] + int(entry)) * row_bytes
                    data = os.pread(fd, row_bytes, start)
                    if len(data) != row_bytes:
                        raise RuntimeError(f"Latent cache shard {self.path} is shorter than its header says; "
                                           f"delete {self.path.parent} and run again.")
                    out[which, k] = np.frombuffer(data, dtype=self.dtype).reshape(self.shape[2:])
        finally:
            os.close(fd)
        return out


def _open_shard(path: Path, expected: tuple, dtype: str) -> Optional[ShardFile]:
    """The shard at `path`, if it is complete and of the expected shape, else None."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, stored = read_header(fh)
            data_offset = fh.tell()
        size = path.stat().st_size
    except (OSError, ValueError):
        return None
    wanted = np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
    if stored != wanted or fortran_order or tuple(shape[:2]) != expected:
        return None
    if size < data_offset + int(np.prod(shape)) * stored.itemsize:  # truncated
        return None
    return ShardFile(path, shape, stored, data_offset)


def _encode_shard(vae, images: ImagesToEncode, start: int, stop: int, flip: bool, batch_size: int) -> torch.Tensor:
    """(2, M, C, h, w) float32 posterior mean and std of positions [start, stop), then their flips."""
    means, stds, fmeans, fstds = [], [], [], []
    for batch in images.read(start, stop):
        for mean, std in iter_posteriors(vae, batch, batch_size):
            means.append(mean)
            stds.append(std)
        if flip:
            for mean, std in iter_posteriors(vae, np.ascontiguousarray(batch[..., ::-1]), batch_size):
                fmeans.append(mean)
                fstds.append(std)
    mean, std = torch.cat(means + fmeans), torch.cat(stds + fstds)
    if len(mean) != (stop - start) * (2 if flip else 1):
        raise RuntimeError(f"read {len(mean)} latents for positions [{start}, {stop})")
    return torch.stack([mean, std])


def load_or_build_latent_cache(vae, images: np.ndarray | ImagesToEncode, *, flip: bool, cache_dir: str | Path,
                               batch_size: int = 32, progress: bool = True, dtype: str = "float32",
                               shard_size: int = 4096, rank: int = 0, world_size: int = 1,
                               wait_for_everyone: Callable[[], None] = lambda: None) -> LatentCache:
    """Return the latent cache of `images` under `vae`, encoding only the shards that are not on disk.

    Parameters:
        vae: the frozen `AutoencoderKL` (float32; run in eval mode under no_grad).
        images: uint8 (N, 3, R, R) images, or an `ImagesToEncode` that reads them batch by batch.
        flip: also encode every image flipped horizontally.
        cache_dir: holds one folder `latents-<key16>/` per cache, of `shard-<s>.npy` files.
        dtype: storage precision, "float32", "float16" or "bfloat16" (tests/test_latent_cache.py
            measures what the smaller ones cost).
        shard_size: images per shard.
        rank, world_size, wait_for_everyone: process s % world_size encodes shard s; all then wait and
            open every shard. Single-process callers keep the defaults.

    Each shard is written under a temporary name, fsynced and renamed, so a killed encoding keeps the
    shards it finished and the next call encodes only the rest; a truncated or misshapen shard is
    encoded again.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"data.latent_cache_dtype={dtype!r}: choose one of {', '.join(STORAGE_DTYPES)}.")
    if not isinstance(images, ImagesToEncode):
        images = ImagesToEncode.from_array(images)
    if images.count == 0:
        raise ValueError("No images to encode.")
    key = cache_key(vae, images, flip, dtype, shard_size)
    folder = Path(cache_dir) / f"latents-{key[:16]}"
    folder.mkdir(parents=True, exist_ok=True)

    def entries(shard: int) -> int:  # rows of one shard: its images, and as many flipped ones with flip
        return min(shard_size, images.count - shard * shard_size) * (2 if flip else 1)

    num_shards = -(-images.count // shard_size)
    mine = [s for s in range(num_shards) if s % world_size == rank]
    todo = [s for s in mine if _open_shard(_shard_path(folder, s), (2, entries(s)), dtype) is None]
    from tqdm.auto import tqdm

    for s in tqdm(todo, desc=f"Encoding latents ({len(todo)} of {num_shards} shards)", disable=not progress or not todo):
        start, stop = s * shard_size, min((s + 1) * shard_size, images.count)
        values = _encode_shard(vae, images, start, stop, flip, batch_size)
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"The VAE gave non-finite latents for images {start}..{stop - 1}; the cache "
                                     f"is not written. Check the VAE ({vae.config.get('_name_or_path', '')}).")
        stored = _from_float32(values, dtype)
        write_atomic(_shard_path(folder, s), lambda fh: np.save(fh, stored), fsync=True)  # survives a crash
    wait_for_everyone()
    shards = []
    for s in range(num_shards):
        array = _open_shard(_shard_path(folder, s), (2, entries(s)), dtype)
        if array is None:
            raise RuntimeError(f"Latent cache shard {_shard_path(folder, s)} is missing or damaged after encoding; "
                               f"delete {folder} and run again.")
        shards.append(array)
    if rank == 0:
        meta = {"key": key, "format": _FORMAT, "num_images": images.count, "flip": bool(flip), "dtype": dtype,
                "shard_size": shard_size, "shards": num_shards, "resolution": images.resolution,
                "latent_shape": list(shards[0].shape[2:])}
        (folder / "cache.json").write_text(json.dumps(meta, indent=2))
    return LatentCache(shards, shard_size, images.count, flip, dtype)
