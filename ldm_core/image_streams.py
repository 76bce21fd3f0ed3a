"""Streaming a dataset in batches without holding it in memory, each process taking its own share."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

from ldm_core.image_files import DataError, check_resolution, decode_stream, default_workers, require_image_files
from ldm_core.image_sets import SHAPES_NATIVE_RESOLUTION, builtin_name, shapes_at
from ldm_core.shapes import make_shapes

logger = logging.getLogger("ldm.data")


def iter_image_batches(spec: str | Path, resolution: int, batch_size: int, *, limit: Optional[int] = None,
                       rank: int = 0, world_size: int = 1, shapes_count: int = 4096,
                       shapes_seed: int = 0, progress: bool = False
                       ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Stream a dataset in batches without holding it in memory (for benchmarks over big folders).

    Takes the first `limit` usable images in sorted order (all when None); usable image k goes to
    process `k % world_size`. Because whether a file is usable is only known once it is decoded, every
    process decodes every file and keeps its own share; bad files are skipped with the same warning as
    in `load_dataset`, logged by rank 0 only.

    Parameters:
        spec, resolution, shapes_count, shapes_seed: as for `load_dataset`.
        batch_size: images per yielded batch (the last may be smaller).
        limit: number of usable images taken over all processes.
        rank, world_size: this process and the number of processes.
        progress: show a tqdm bar over the files (rank 0 only).

    Yields:
        (global_indices int64 (B,), images uint8 (B, 3, R, R), names): names are paths relative to the
        folder, or "shapes_000123".

    Raises:
        DataError: bad arguments, missing path, no image files, or no usable image (raised at the call
            for the first three, at the end of iteration for the last).
    """
    resolution = check_resolution(resolution)
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size) and world_size >= 1; got rank={rank}, "
                        f"world_size={world_size}.")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images or None, got {limit}.")
    spec = str(spec)
    if builtin_name(spec) == "shapes":
        images64, _, _ = make_shapes(int(shapes_count), shapes_seed, SHAPES_NATIVE_RESOLUTION)
        n = len(images64) if limit is None else min(limit, len(images64))
        source = ((f"shapes_{k:06d}", images64[k]) for k in range(n))
        return _batches(source, resolution, batch_size, rank, world_size, n, source_is_folder=False)
    root = Path(spec).expanduser()
    files = require_image_files(root)
    return _batches(_folder_source(root, files, resolution, rank, progress), resolution, batch_size,
                    rank, world_size, limit, source_is_folder=True, root=root)


def _folder_source(root: Path, files: list[Path], resolution: int, rank: int, progress: bool):
    stream = decode_stream(files, resolution, default_workers())
    for path, array, _, err in tqdm(stream, total=len(files), disable=not progress or rank != 0,
                                    desc="decoding images", unit="img"):
        if err is not None:
            if rank == 0:
                logger.warning("skipping %s: %s", path, err)
            continue
        yield path.relative_to(root).as_posix(), array


def _batches(source, resolution, batch_size, rank, world_size, limit, *, source_is_folder, root=None):
    indices, arrays, names = [], [], []
    usable = 0
    for name, array in source:
        if limit is not None and usable >= limit:
            break
        k, usable = usable, usable + 1
        if k % world_size != rank:
            continue
        if not source_is_folder:
            array = shapes_at(array[None], resolution)[0]
        indices.append(k)
        arrays.append(array)
        names.append(name)
        if len(arrays) == batch_size:
            yield np.array(indices, dtype=np.int64), np.stack(arrays), names
            indices, arrays, names = [], [], []
    if arrays:
        yield np.array(indices, dtype=np.int64), np.stack(arrays), names
    if usable == 0:
        raise DataError(f"No usable image in {root}: every file was skipped (see the warnings above).")

