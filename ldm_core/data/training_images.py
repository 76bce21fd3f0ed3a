"""The training images of a run, held in memory or streamed, behind one interface for both stages.

- ``memory``: the dataset is decoded once into one uint8 array (ldm_core/data/in_memory.py); a batch is a
  gather. Fastest when the decoded set is small, and the only option before this file existed.
- ``stream``: the images are decoded batch by batch in DataLoader workers (ldm_core/data/loader.py);
  memory and start-up time do not grow with the dataset, and random crops are fresh at every draw.

``data.loader: auto`` holds a folder or the shapes in memory when it is centre-cropped and its decoded
size is at most `MEMORY_LOADER_LIMIT` (a fixed size, not the free memory of the machine, so the same
config chooses the same path everywhere and a resumed run sees the same split); otherwise it streams.
Both paths give the same batches for the same seed when no image is bad (tests/test_image_loader.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ldm_core.data.step_batches import StepBatches, images_to_batch, train_val_split
from ldm_core.config.settings import DataConfig
from ldm_core.data.image_files import DataError
from ldm_core.data.loader import StreamedBatches, read_images
from ldm_core.data.in_memory import load_dataset
from ldm_core.data.sources import FolderSource, ImageSource, open_image_source, source_kind
from ldm_core.data.crops import ImageTransform
from ldm_core.image_values import to_model_input

MEMORY_LOADER_LIMIT = 1 << 30  # bytes of decoded uint8 images that auto holds in memory


def choose_loader(requested: str, kind: str, count: int, resolution: int, crop: str) -> tuple[str, str]:
    """("memory" | "stream", why) for `data.loader` = `requested` on a `kind` source of `count` images."""
    decoded = count * 3 * resolution * resolution
    size = f"{decoded / 2**20:,.0f} MiB decoded"
    if requested == "memory":
        if kind not in ("folder", "shapes"):
            raise DataError(f"data.loader=memory reads image folders and builtin:shapes; a {kind} dataset is "
                            f"streamed: set data.loader=stream (or auto).")
        if crop != "center":
            raise DataError(f"data.loader=memory holds one centre crop of every image, so data.crop={crop} "
                            f"needs data.loader=stream (or auto).")
        return "memory", f"data.loader=memory ({size})"
    if requested == "stream":
        return "stream", "data.loader=stream"
    if kind not in ("folder", "shapes"):
        return "stream", f"auto: a {kind} dataset is streamed"
    if crop != "center":
        return "stream", f"auto: data.crop={crop} draws a fresh crop every time"
    if decoded > MEMORY_LOADER_LIMIT:
        return "stream", f"auto: {size} is more than {MEMORY_LOADER_LIMIT / 2**20:,.0f} MiB"
    return "memory", f"auto: {size}, at most {MEMORY_LOADER_LIMIT / 2**20:,.0f} MiB"


class TrainingImages:
    """A run's images: the train / validation split, per-micro-step batches, and reads by index.

    Parameters:
        spec: `--data`.
        data: the stage's data config.
        step_batches: builds the `StepBatches` of an index array and a flip setting (`TrainingRun.step_batches`);
            None when the images are only read by index (Stage B encodes them into its latent cache).
        seed: the run's seed (crops are drawn from it).
        image_cache_dir: the memory path's decoded-image cache (Stage A's `data.image_cache_dir`).
        progress: progress bars while decoding.
        pin_memory: page-lock streamed batches (for a GPU).
    """

    def __init__(self, spec: str, data: DataConfig, step_batches: Optional[Callable[[np.ndarray, bool], StepBatches]], *,
                 seed: int, image_cache_dir: Optional[Path] = None, progress: bool = True, pin_memory: bool = False):
        self.spec, self.data, self.resolution = str(spec), data, data.resolution
        kind = source_kind(self.spec)
        self.source: Optional[ImageSource] = None
        if kind == "shapes":
            count = data.shapes_count
        else:
            self.source = open_image_source(self.spec, image_column=data.image_column, label_column=data.label_column)
            count = len(self.source)
        self.mode, self.reason = choose_loader(data.loader, kind, count, data.resolution, data.crop)
        self.array: Optional[np.ndarray] = None
        if self.mode == "memory":
            image_set = load_dataset(self.spec, data.resolution, shapes_count=data.shapes_count,
                                     shapes_seed=data.shapes_seed, cache_dir=image_cache_dir, progress=progress)
            self.array, self.labels, self.class_names = image_set.images, image_set.labels, image_set.class_names
            self.names, self._summary = image_set.names, image_set.report.summary()
            self.source = None
        else:
            if self.source is None:
                self.source = open_image_source(self.spec, shapes_count=data.shapes_count, shapes_seed=data.shapes_seed)
            self.labels, self.class_names = self.source.labels, self.source.class_names
            self._summary = f"{len(self.source)} images in {self.source.kind} {self.spec}, decoded while training"
        self.train_idx, self.val_idx = train_val_split(len(self), data.val_count, data.split_seed)
        self.batches = step_batches(self.train_idx, data.flip) if step_batches is not None else None
        self._stream = None
        if self.mode == "stream" and self.batches is not None:
            transform = ImageTransform(data.resolution, data.crop, data.crop_min_scale)
            self._stream = StreamedBatches(self.source, transform, self.batches, self.train_idx, seed=seed,
                                           num_workers=data.num_workers, pin_memory=pin_memory,
                                           decoded_cache_bytes=data.decoded_cache_mb << 20)

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.source)

    def batch(self, micro_step: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
        """The micro-step's images in [-1, 1] on `device`, and which images they are."""
        if self._stream is None:
            indices, flips = self.batches(micro_step)
            return images_to_batch(self.array, indices, flips, device), indices
        images, indices = self._stream(micro_step)
        return to_model_input(images.to(device, non_blocking=True)), indices

    def iter_read(self, indices: np.ndarray, *, batch_size: int = 64, progress: bool = False,
                  desc: str = "reading images") -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Images `indices`, centre-cropped and unflipped, in order: yields (indices, uint8 (B, 3, R, R))."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.array is not None:
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                yield chunk, self.array[chunk]
            return
        yield from read_images(self.source, indices, self.resolution, num_workers=self.data.num_workers,
                               batch_size=batch_size, progress=progress, desc=desc)

    def read(self, indices: np.ndarray, **kwargs) -> np.ndarray:
        """Images `indices` as one uint8 array (for small sets: validation, latent statistics)."""
        if len(indices) == 0:
            return np.empty((0, 3, self.resolution, self.resolution), dtype=np.uint8)
        return np.concatenate([images for _, images in self.iter_read(indices, **kwargs)])

    def fingerprint(self) -> str:
        """Identifies the images (see `ImageSource.fingerprint`); the memory path hashes its array."""
        import hashlib

        if self.array is not None:
            return hashlib.sha256(np.ascontiguousarray(self.array).data).hexdigest()
        return self.source.fingerprint()

    @property
    def skipped(self) -> dict[str, str]:
        """Images replaced while streaming because they could not be used: name -> reason kind."""
        return dict(self._stream.skipped) if self._stream is not None else {}

    def summary(self) -> dict:
        """What run_info.json records about the data."""
        info = {"images": len(self), "train": len(self.train_idx), "val": len(self.val_idx),
                "summary": self._summary, "loader": self.mode, "loader_reason": self.reason,
                "crop": self.data.crop}
        if self._stream is not None:
            info["skipped_while_streaming"] = len(self.skipped)
            info["num_workers"] = self.data.num_workers
        if isinstance(self.source, FolderSource) or self.source is None:
            return info
        info["source"] = self.source.kind
        if getattr(self.source, "skipped_shards", None):
            info["skipped_shards"] = list(self.source.skipped_shards)
        return info

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
