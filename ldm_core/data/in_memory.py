"""Whole datasets held in memory: a folder of images or the built-in `shapes` set, decoded once to one
uint8 array, with an optional on-disk cache of the decoded array and labels from first-level subfolders.

Bad files never stop a run: each is skipped with one warning on the `ldm.data` logger naming the file
and the reason, and counted in the `LoadReport` summary. A folder with no usable image is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ldm_core.atomic_files import write_atomic
from ldm_core.data.image_files import (IMAGE_EXTENSIONS, SHAPES_COLOUR_SETS, BadImageError, DataError, check_resolution,
                                  decode_stream, default_workers, require_image_files, resize_center_crop)
from ldm_core.data.sources import folder_labels, hash_file_list, source_kind
from ldm_core.data.shapes import SHAPE_CLASSES, make_shapes

logger = logging.getLogger("ldm.data")

SHAPES_NATIVE_RESOLUTION = 64
# Bumped whenever decoding changes, so old caches are not reused.
_CACHE_FORMAT = 2


@dataclass
class LoadReport:
    """What happened while a dataset was read."""

    total_files: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    upscaled: int = 0
    resolution: int = 0
    skipped_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def loaded(self) -> int:
        return self.total_files - len(self.skipped)

    def summary(self) -> str:
        """One line, e.g. '1024 images loaded from 1030 files: 6 skipped (5 corrupt, 1 empty), 3 upscaled'."""
        text = f"{self.loaded} images loaded from {self.total_files} files"
        parts = []
        if self.skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped_kinds.items()))
            parts.append(f"{len(self.skipped)} skipped ({kinds})")
        if self.upscaled:
            parts.append(f"{self.upscaled} upscaled (short side below {self.resolution} px)")
        return text + (": " + ", ".join(parts) if parts else "")

    def add_skip(self, path: str, err: BadImageError) -> None:
        self.skipped.append((path, str(err)))
        self.skipped_kinds[err.kind] = self.skipped_kinds.get(err.kind, 0) + 1


@dataclass
class ImageSet:
    """A decoded dataset held as one uint8 array."""

    images: np.ndarray  # uint8 (N, 3, R, R), C-contiguous; may be a read-only np.memmap
    labels: Optional[np.ndarray]  # int64 (N,) class ids, or None
    class_names: Optional[list[str]]
    source: str  # "builtin:shapes" or the folder path
    report: LoadReport
    names: list[str] = field(default_factory=list)  # relative file paths, or "shapes_000123"

    def __len__(self) -> int:
        return int(self.images.shape[0])



def shapes_at(images64: np.ndarray, resolution: int) -> np.ndarray:
    """The 64x64 shapes brought to another resolution through the same bicubic resize/crop path."""
    if resolution == SHAPES_NATIVE_RESOLUTION:
        return images64
    out = np.empty((len(images64), 3, resolution, resolution), dtype=np.uint8)
    for i, chw in enumerate(images64):
        resized = resize_center_crop(Image.fromarray(chw.transpose(1, 2, 0)), resolution)
        out[i] = np.asarray(resized).transpose(2, 0, 1)
    return out


def _load_shapes(spec: str, resolution: int, count: int, seed: int) -> ImageSet:
    images, labels, _ = make_shapes(count, seed, SHAPES_NATIVE_RESOLUTION, SHAPES_COLOUR_SETS[spec])
    report = LoadReport(total_files=count, resolution=resolution,
                        upscaled=count if resolution > SHAPES_NATIVE_RESOLUTION else 0)
    return ImageSet(images=np.ascontiguousarray(shapes_at(images, resolution)), labels=labels,
                    class_names=list(SHAPE_CLASSES), source=spec, report=report,
                    names=[f"shapes_{i:06d}" for i in range(count)])


def _cache_key(root: Path, files: list[Path], resolution: int) -> str:
    digest = hashlib.sha256(f"v{_CACHE_FORMAT}|{resolution}|".encode())
    hash_file_list(digest, root, files)
    return digest.hexdigest()[:24]


def _read_cache(array_path: Path, meta_path: Path, resolution: int) -> Optional[tuple]:
    """Return (images memmap, meta) or None when the cache is absent or unusable."""
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(array_path, mmap_mode="r")
        count = int(meta["count"])
        if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, resolution, resolution)
                or images.shape[0] < count or array_path.stat().st_size != meta["nbytes"]):
            raise ValueError("shape or size does not match its metadata")
        return images[:count], meta
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unusable cache %s (%s); decoding the images again", array_path, err)
        return None


def load_dataset(spec: str | Path, resolution: int, *, shapes_count: int = 4096, shapes_seed: int = 0,
                 cache_dir: str | Path | None = None, progress: bool = True) -> ImageSet:
    """Read a whole dataset into one uint8 array (N, 3, R, R), each file decoded once.

    Parameters:
        spec: a folder (searched recursively, see `list_image_files`) or "builtin:shapes".
        resolution: output side R; see `load_image_uint8` for the resize/crop.
        shapes_count, shapes_seed: size and seed of the built-in shapes set. Its images are defined at
            64x64; at any other R they are resized with the same bicubic resize/crop as files are.
        cache_dir: if given, a folder's decoded array is stored there as .npy (with a .json beside it),
            keyed by a hash of the file paths, sizes, modification times and R, and memory-mapped on
            later calls. Both files are written under temporary names and renamed into place, so a
            half-written cache is never read; an unreadable one is ignored and rebuilt. The built-in
            set is generated in memory and not cached.
        progress: show a tqdm progress bar while decoding.

    Labels: when every usable image lies inside a first-level subfolder of the folder, the sorted names
    of those subfolders are the classes; otherwise `labels` is None. The shapes set is labelled with
    its shape class.

    Raises:
        DataError: missing path, no image files, or no usable image.
    """
    resolution = check_resolution(resolution)
    spec = str(spec)
    if source_kind(spec) == "shapes":  # raises DataError for an unknown builtin: name
        result = _load_shapes(spec, resolution, int(shapes_count), shapes_seed)
        logger.info("%s: %s", spec, result.report.summary())
        return result

    root = Path(spec).expanduser()
    files = require_image_files(root)

    array_path = meta_path = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = _cache_key(root, files, resolution)
        array_path, meta_path = cache_dir / f"images-{key}.npy", cache_dir / f"images-{key}.json"
        cached = _read_cache(array_path, meta_path, resolution)
        if cached is not None:
            images, meta = cached
            report = LoadReport(**meta["report"])
            report.skipped = [tuple(item) for item in report.skipped]
            labels, class_names = folder_labels(meta["names"])
            logger.info("%s (from cache %s): %s", root, array_path.name, report.summary())
            return ImageSet(images, labels, class_names, str(root), report, meta["names"])

    images = np.empty((len(files), 3, resolution, resolution), dtype=np.uint8)
    report = LoadReport(total_files=len(files), resolution=resolution)
    names: list[str] = []
    stream = decode_stream(files, resolution, default_workers())
    for path, array, upscaled, err in tqdm(stream, total=len(files), disable=not progress,
                                           desc="decoding images", unit="img"):
        name = path.relative_to(root).as_posix()
        if err is not None:
            logger.warning("skipping %s: %s", path, err)
            report.add_skip(str(path), err)
            continue
        images[len(names)] = array
        names.append(name)
        report.upscaled += int(upscaled)
    if not names:
        reasons = "; ".join(f"{Path(p).name}: {r}" for p, r in report.skipped[:3])
        raise DataError(f"No usable image in {root}: {len(files)} files, all skipped ({reasons}"
                        f"{'; ...' if len(files) > 3 else ''}). Supported extensions: "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}.")
    images = images[:len(names)]  # a view of the first rows: still C-contiguous
    if array_path is not None:
        write_atomic(array_path, lambda fh: np.save(fh, images))
        meta = {"count": len(names), "nbytes": array_path.stat().st_size, "names": names,
                "report": dataclasses.asdict(report)}
        write_atomic(meta_path, json.dumps(meta))
    labels, class_names = folder_labels(names)
    logger.info("%s: %s", root, report.summary())
    return ImageSet(images, labels, class_names, str(root), report, names)
