"""Images read while training runs: a torch DataLoader over an `ImageSource`, whose worker processes
decode and crop the images of each micro-step ahead of the step that uses them.

What a micro-step sees is still a pure function of the step: the batch sampler asks `StepBatches`
(ldm_core/data/step_batches.py) for the step's images and flips, and seeds each image's crop from (seed, step,
position in the global batch). A resumed run starts the sampler at its step, so it draws the same
batches without reading the dataset from the start, and each process reads only its own share.

An image that cannot be used is replaced by the next usable training image (so batches keep their
size and stay a function of the step), named in one warning per process, and counted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm_core.data.step_batches import StepBatches
from ldm_core.data.image_files import BadImageError, DataError
from ldm_core.data.sources import ImageSource
from ldm_core.data.crops import ImageTransform

logger = logging.getLogger("ldm.data")

_CROP_STREAM = 7  # keeps crop seeds apart from the other seeded streams of a step


class DrawnImages(Dataset):
    """Map-style dataset whose items are draws `(micro_step, index, flip, crop_seed)`.

    Parameters:
        source: where the images come from.
        transform: the crop (and resolution) applied to each image.
        pool: sorted indices a bad image may be replaced from (the training split, or the images read).
        decoded_cache_bytes: decoded images kept in each process, most recently used first, so a small
            set of large photographs is decoded once and cropped afresh at every draw (0: none).
    """

    def __init__(self, source: ImageSource, transform: ImageTransform, pool: np.ndarray,
                 decoded_cache_bytes: int = 0):
        self.source, self.transform = source, transform
        self.pool = np.asarray(pool, dtype=np.int64)
        self._warned: set[int] = set()
        self._decoded: OrderedDict[int, Image.Image] = OrderedDict()
        self._decoded_bytes, self._decoded_limit = 0, int(decoded_cache_bytes)

    def _open(self, index: int) -> Image.Image:
        image = self._decoded.get(index)
        if image is not None:
            self._decoded.move_to_end(index)
            return image
        image = self.source.open(index)
        size = image.width * image.height * len(image.getbands())
        if size <= self._decoded_limit:
            self._decoded[index] = image
            self._decoded_bytes += size
            while self._decoded_bytes > self._decoded_limit:
                _, old = self._decoded.popitem(last=False)
                self._decoded_bytes -= old.width * old.height * len(old.getbands())
        return image

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, draw: tuple[int, int, bool, int]) -> dict:
        micro_step, index, flip, crop_seed = draw
        skipped = []
        candidate = int(index)
        position = int(np.searchsorted(self.pool, candidate))
        for _ in range(len(self.pool)):
            try:
                image = self._open(candidate)
                array = self.transform(image, np.random.default_rng(crop_seed), flip)
                return {"image": torch.from_numpy(array), "index": candidate, "micro_step": micro_step,
                        "skipped": skipped}
            except BadImageError as err:
                skipped.append((self.source.name(candidate), err.kind))
                if candidate not in self._warned:
                    self._warned.add(candidate)
                    logger.warning("skipping %s: %s", self.source.name(candidate), err)
                position = (position + 1) % len(self.pool)
                candidate = int(self.pool[position])
        raise DataError(f"No usable image in {self.source.spec}: every image tried was skipped (see the warnings above).")


def collate_draws(items: list[dict]) -> dict:
    return {"image": torch.stack([item["image"] for item in items]),
            "index": np.array([item["index"] for item in items], dtype=np.int64),
            "micro_step": items[0]["micro_step"] if items else -1,
            "skipped": [s for item in items for s in item["skipped"]]}


class StepBatchSampler(Sampler):
    """The draws of micro-steps start, start + 1, ... of `batches` (endless; the trainer stops it)."""

    def __init__(self, batches: StepBatches, start: int, seed: int):
        self.batches, self.start, self.seed = batches, int(start), int(seed)

    def __iter__(self) -> Iterator[list[tuple[int, int, bool, int]]]:
        micro_step = self.start
        offset = self.batches.rank * self.batches.batch_size
        while True:
            indices, flips = self.batches(micro_step)
            seeds = [[self.seed, _CROP_STREAM, micro_step, offset + j] for j in range(len(indices))]
            yield [(micro_step, int(i), bool(f), s) for i, f, s in zip(indices, flips, seeds)]
            micro_step += 1


class StreamedBatches:
    """uint8 batches (B, 3, R, R) of micro-steps, decoded by DataLoader workers.

    Call with the micro-step; consecutive calls stream, any other step restarts the loader at that step.
    `skipped` maps each image name that was replaced to its reason kind.
    """

    def __init__(self, source: ImageSource, transform: ImageTransform, batches: StepBatches, pool: np.ndarray, *,
                 seed: int, num_workers: int, prefetch_factor: int = 4, pin_memory: bool = False,
                 decoded_cache_bytes: int = 0):
        self.dataset = DrawnImages(source, transform, pool, decoded_cache_bytes)
        self.batches, self.seed = batches, seed
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.skipped: dict[str, str] = {}
        self._iterator: Optional[Iterator] = None
        self._next = -1

    def _start(self, micro_step: int) -> None:
        self.close()
        loader = DataLoader(self.dataset, batch_sampler=StepBatchSampler(self.batches, micro_step, self.seed),
                            collate_fn=collate_draws, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None)
        self._iterator = iter(loader)

    def __call__(self, micro_step: int) -> tuple[torch.Tensor, np.ndarray]:
        if self._iterator is None or micro_step != self._next:
            self._start(micro_step)
        batch = next(self._iterator)
        if batch["micro_step"] != micro_step:  # cannot happen unless the sampler and the trainer disagree
            raise RuntimeError(f"data loader delivered micro-step {batch['micro_step']} for {micro_step}")
        self._next = micro_step + 1
        for name, kind in batch["skipped"]:
            self.skipped.setdefault(name, kind)
        return batch["image"], batch["index"]

    def close(self) -> None:
        """Stop the worker processes (they also stop when this object is garbage collected)."""
        self._iterator = None


def read_images(source: ImageSource, indices: np.ndarray, resolution: int, *, num_workers: int = 0,
                batch_size: int = 64, progress: bool = False, desc: str = "reading images") -> Iterator[tuple]:
    """Images `indices` in order, centre-cropped and unflipped, in batches: yields (indices, uint8 array).

    A bad image is replaced by the next usable one of `indices` (so the batch keeps its size); the
    returned indices say which image each row is.
    """
    from tqdm.auto import tqdm

    indices = np.asarray(indices, dtype=np.int64)
    dataset = DrawnImages(source, ImageTransform(resolution), np.sort(indices))
    draws = [(-1, int(i), False, 0) for i in indices]
    chunks = [draws[k:k + batch_size] for k in range(0, len(draws), batch_size)]
    loader = DataLoader(dataset, batch_sampler=chunks, collate_fn=collate_draws, num_workers=num_workers)
    with tqdm(total=len(indices), disable=not progress, desc=desc, unit="img") as bar:
        for batch in loader:
            bar.update(len(batch["index"]))
            yield batch["index"], batch["image"].numpy()
