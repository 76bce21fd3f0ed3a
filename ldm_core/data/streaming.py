"""Streaming a dataset in batches without holding it in memory, each process taking its own share
(for benchmarks and evaluation, which read each image once, in order)."""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

from ldm_core.data.image_files import (BadImageError, DataError, check_resolution, default_workers, pil_to_chw,
                                  resize_center_crop)
from ldm_core.data.sources import ImageSource, open_image_source

logger = logging.getLogger("ldm.data")

_DECODE_CHUNK = 64


def iter_image_batches(spec: str | Path, resolution: int, batch_size: int, *, limit: Optional[int] = None,
                       rank: int = 0, world_size: int = 1, shapes_count: int = 4096, shapes_seed: int = 0,
                       progress: bool = False, image_column: Optional[str] = None, streaming: bool = False
                       ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str], list[bool]]]:
    """Stream any `--data` source (ldm_core/data/sources.py) in batches, centre-cropped to `resolution`.

    Takes the first `limit` usable images in the source's order (all when None); usable image k goes to
    process `k % world_size`. Because whether an image is usable is only known once it is decoded, every
    process decodes every image and keeps its own share; bad images are skipped with one warning each,
    logged by rank 0 only.

    Parameters:
        spec: `--data` (a folder, shards, a Hugging Face dataset or builtin:shapes).
        resolution: output side R (resize the shorter side, centre crop; docs/reconstruction-protocol.md).
        batch_size: images per yielded batch (the last may be smaller).
        limit: number of usable images taken over all processes.
        rank, world_size: this process and the number of processes.
        shapes_count, shapes_seed: size and seed of builtin:shapes.
        progress: show a tqdm bar over the images (rank 0 only).
        image_column: a Hugging Face dataset's image column (default: its first Image column).
        streaming: read a Hub dataset as a stream, without downloading it whole (`open_image_source`).

    Yields:
        (global_indices int64 (B,), images uint8 (B, 3, R, R), names, upscaled): names are paths relative
        to the folder, "shard.tar#k", "dataset[k]" or "shapes_000123"; upscaled says which images had a
        shorter side below R (the resize enlarged them).

    Raises:
        DataError: bad arguments, missing path, no images, or no usable image (raised at the call for
            the first three, at the end of iteration for the last).
    """
    resolution = check_resolution(resolution)
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size) and world_size >= 1; got rank={rank}, "
                        f"world_size={world_size}.")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images or None, got {limit}.")
    source = open_image_source(spec, shapes_count=shapes_count, shapes_seed=shapes_seed, image_column=image_column,
                               streaming=streaming)
    return _batches(_decoded(source, resolution, rank, progress), source, batch_size, rank, world_size, limit)


def _decoded(source: ImageSource, resolution: int, rank: int, progress: bool):
    def decode(item):
        name, open_image = item
        try:
            rgb = open_image()
            return name, pil_to_chw(resize_center_crop(rgb, resolution)), min(rgb.size) < resolution, None
        except BadImageError as err:
            return name, None, False, err

    total = None if getattr(source, "streaming", False) else len(source)  # a stream's length is unknown
    images = source.in_order()
    with ThreadPoolExecutor(max_workers=default_workers()) as pool, \
            tqdm(total=total, disable=not progress or rank != 0, desc="decoding images", unit="img") as bar:
        # Chunking bounds memory: at most one chunk of decoded images is in flight.
        while chunk := list(itertools.islice(images, _DECODE_CHUNK)):
            for name, array, upscaled, err in pool.map(decode, chunk):
                bar.update(1)
                if err is not None:
                    if rank == 0:
                        logger.warning("skipping %s: %s", name, err)
                    continue
                yield name, array, upscaled


def _batches(decoded, source: ImageSource, batch_size: int, rank: int, world_size: int, limit: Optional[int]):
    indices, arrays, names, upscaled = [], [], [], []
    usable = 0
    for name, array, enlarged in decoded:
        if limit is not None and usable >= limit:
            break
        k, usable = usable, usable + 1
        if k % world_size != rank:
            continue
        indices.append(k)
        arrays.append(array)
        names.append(name)
        upscaled.append(enlarged)
        if len(arrays) == batch_size:
            yield np.array(indices, dtype=np.int64), np.stack(arrays), names, upscaled
            indices, arrays, names, upscaled = [], [], [], []
    if arrays:
        yield np.array(indices, dtype=np.int64), np.stack(arrays), names, upscaled
    if usable == 0:
        raise DataError(f"No usable image in {source.spec}: every image was skipped (see the warnings above).")
