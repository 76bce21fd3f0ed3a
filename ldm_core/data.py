"""Reading image datasets: a folder of images (searched recursively) or the built-in `shapes` set.

Every image is brought to the working resolution once, the way docs/reconstruction-protocol.md asks: resize the
shorter side to R with Pillow's antialiased bicubic filter and centre-crop to R x R, keep it as uint8,
and convert to the model's [-1, 1] range only when a batch is fed (`to_model_input`). Model outputs go
back through `to_uint8`, so every metric reads two uint8 tensors.

Bad files never stop a run: each is skipped with one warning on the `ldm.data` logger naming the file
and the reason, and counted in the `LoadReport` summary. A folder with no usable image is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from ldm_core.shapes import SHAPE_CLASSES, make_shapes

logger = logging.getLogger("ldm.data")

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
BUILTIN_SHAPES = "builtin:shapes"
SHAPES_NATIVE_RESOLUTION = 64
# Bumped whenever decoding changes, so old caches are not reused.
_CACHE_FORMAT = 2
_DECODE_CHUNK = 64


class DataError(ValueError):
    """A dataset problem the user must fix (missing path, empty folder, no usable image, ...)."""


class BadImageError(Exception):
    """One file cannot be used; `str(err)` is the reason and `kind` a short category for summaries."""

    def __init__(self, reason: str, kind: str = "unreadable"):
        super().__init__(reason)
        self.kind = kind


# --------------------------------------------------------------------------------------------------
# Finding and decoding files


def list_image_files(root: str | Path) -> list[Path]:
    """Every file under `root` whose extension is in IMAGE_EXTENSIONS (case-insensitive).

    The search is recursive and follows symbolic links to folders, but visits each real folder once, so
    a link loop cannot make it run forever. File names need not be valid UTF-8 (Linux allows any bytes):
    such names are kept as Python's surrogate-escaped strings, which `open` turns back into the same
    bytes. The result is sorted by path relative to `root`, so it is the same on every machine and process.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Data path {root} does not exist. Give a folder of images (searched "
                        f"recursively) or {BUILTIN_SHAPES}.")
    if not root.is_dir():
        raise DataError(f"Data path {root} is a file; give the folder that contains the images.")
    found = []
    seen_dirs = set()

    def unreadable_folder(err: OSError) -> None:
        # os.walk drops folders it cannot list; say so instead of silently training on fewer images.
        logger.warning("cannot list folder %s (%s); its images are skipped", err.filename, err.strerror)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable_folder):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []  # a link back to a folder already walked: do not descend again
            continue
        seen_dirs.add(real)
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` and centre-crop to a square, in one bicubic resampling.

    Pillow's `resize` antialiases when it shrinks (its filter support widens with the scale). Passing
    the centre square as `box` resamples just that region, which equals "resize, then crop" without
    rounding the intermediate size.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    if (width, height) == (resolution, resolution):
        return image
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC,
                        box=(left, top, left + side, top + side))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white (see load_image_uint8)."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale: scale 0..65535 to 0..255 (Pillow's own convert would clip instead). Mode "I"
        # is read as 16-bit too, which is what 16-bit PNG/TIFF files decode to in Pillow.
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "F":
        raise BadImageError("32-bit floating-point image: its value range is unknown; convert it to "
                            "8- or 16-bit first", kind="unsupported mode")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def load_image_uint8(path: str | Path, resolution: int) -> tuple[np.ndarray, bool]:
    """Decode one file to a (3, R, R) uint8 array at `resolution` R.

    Any mode becomes RGB: grayscale is repeated, palette images are expanded, CMYK uses Pillow's
    conversion (embedded ICC profiles are not applied), 16-bit grayscale ('I;16', 'I') is scaled by
    255/65535, and transparent images (RGBA, LA, palette with transparency) are composited on white,
    so transparent areas look as most viewers show them instead of exposing the hidden colour values.
    The EXIF orientation is applied; animated files (GIF, WebP) give their first frame. Then the shorter
    side is resized to R (bicubic, antialiased) and the centre R x R square kept.

    Parameters:
        path: image file.
        resolution: output side R in pixels.

    Returns:
        (image, upscaled): the array, and whether the short side was below R (the image was enlarged).

    Raises:
        BadImageError: for empty, unreadable, non-image or truncated files, and for images whose pixel
            count exceeds Pillow's `Image.MAX_IMAGE_PIXELS` (decompression bombs).
    """
    path = Path(path)
    try:
        size = path.stat().st_size  # follows symbolic links
    except OSError as err:
        link = " (a broken or looping symbolic link)" if path.is_symlink() else ""
        raise BadImageError(f"cannot read the file{link}: {err.strerror}", kind="unreadable") from None
    try:
        if size == 0:
            raise BadImageError("empty file (0 bytes)", kind="empty")
        with Image.open(path) as image:
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; such a file is refused here.
            # (Checked explicitly rather than by turning the warning into an error, because warning
            # filters are process-wide and decoding runs in threads.)
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and image.width * image.height > limit:
                raise BadImageError(
                    f"decompression bomb: {image.width}x{image.height} pixels exceeds the limit of "
                    f"{limit} (PIL.Image.MAX_IMAGE_PIXELS)", kind="decompression bomb")
            if ImageFile.LOAD_TRUNCATED_IMAGES:
                raise BadImageError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, so truncated files "
                                    "would load silently; unset it", kind="unsupported mode")
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
            upscaled = min(rgb.size) < resolution
            out = resize_center_crop(rgb, resolution)
            array = np.ascontiguousarray(np.asarray(out, dtype=np.uint8).transpose(2, 0, 1))
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise BadImageError(f"decompression bomb: {err}", kind="decompression bomb") from None
    except UnidentifiedImageError:
        raise BadImageError("not an image Pillow can read", kind="unreadable") from None
    except OSError as err:
        if err.errno is not None:  # the operating system refused (permissions, I/O error), not the decoder
            raise BadImageError(f"cannot read the file: {err.strerror}", kind="unreadable") from None
        raise _decode_failure(err) from None
    except (SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
        raise _decode_failure(err) from None
    return array, upscaled


def _decode_failure(err: Exception) -> BadImageError:
    """A decoder error as a BadImageError: 'truncated' when Pillow says so, else 'corrupt'."""
    text = str(err) or type(err).__name__
    if "truncat" in text.lower():
        return BadImageError(text, kind="truncated")
    return BadImageError(f"corrupt file: {text}", kind="corrupt")


def _decode_stream(paths: Iterable[Path], resolution: int, workers: int) -> Iterator[tuple]:
    """Decode files in order, a chunk at a time on a thread pool (Pillow releases the GIL while it
    decodes and resizes). Yields (path, array or None, upscaled, BadImageError or None)."""
    def decode(path: Path):
        try:
            array, upscaled = load_image_uint8(path, resolution)
            return path, array, upscaled, None
        except BadImageError as err:
            return path, None, False, err

    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), _DECODE_CHUNK):
            # Chunking bounds memory: at most one chunk of decoded images is in flight.
            yield from pool.map(decode, paths[start:start + _DECODE_CHUNK])


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------
# Whole datasets


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


def _check_resolution(resolution: int) -> int:
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution < 1:
        raise DataError(f"resolution must be a positive integer number of pixels, got {resolution!r}.")
    return int(resolution)


def _builtin_name(spec: str) -> Optional[str]:
    if not spec.startswith("builtin:"):
        return None
    if spec != BUILTIN_SHAPES:
        raise DataError(f"Unknown built-in dataset {spec!r}; the built-in dataset is {BUILTIN_SHAPES}.")
    return "shapes"


def _shapes_at(images64: np.ndarray, resolution: int) -> np.ndarray:
    """The 64x64 shapes brought to another resolution through the same bicubic resize/crop path."""
    if resolution == SHAPES_NATIVE_RESOLUTION:
        return images64
    out = np.empty((len(images64), 3, resolution, resolution), dtype=np.uint8)
    for i, chw in enumerate(images64):
        resized = resize_center_crop(Image.fromarray(chw.transpose(1, 2, 0)), resolution)
        out[i] = np.asarray(resized).transpose(2, 0, 1)
    return out


def _load_shapes(resolution: int, count: int, seed: int) -> ImageSet:
    images, labels, _ = make_shapes(count, seed, SHAPES_NATIVE_RESOLUTION)
    report = LoadReport(total_files=count, resolution=resolution,
                        upscaled=count if resolution > SHAPES_NATIVE_RESOLUTION else 0)
    return ImageSet(images=np.ascontiguousarray(_shapes_at(images, resolution)), labels=labels,
                    class_names=list(SHAPE_CLASSES), source=BUILTIN_SHAPES, report=report,
                    names=[f"shapes_{i:06d}" for i in range(count)])


def _cache_key(root: Path, files: list[Path], resolution: int) -> str:
    # os.fsencode gives back the exact bytes of names that are not valid UTF-8 (str.encode would fail).
    digest = hashlib.sha256(f"v{_CACHE_FORMAT}|".encode() + os.fsencode(root.resolve()) + f"|{resolution}".encode())
    for path in files:
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a broken link: it is skipped when decoded; (-1, -1) still changes the key
            size = mtime = -1
        digest.update(b"|" + os.fsencode(path.relative_to(root).as_posix()) + f"|{size}|{mtime}".encode())
    return digest.hexdigest()[:24]


def _atomic_write(target: Path, write) -> None:
    """Write via a unique temporary name in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    resolution = _check_resolution(resolution)
    spec = str(spec)
    if _builtin_name(spec) == "shapes":
        result = _load_shapes(resolution, int(shapes_count), shapes_seed)
        logger.info("%s: %s", BUILTIN_SHAPES, result.report.summary())
        return result

    root = Path(spec).expanduser()
    files = _require_files(root)

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
            labels, class_names = _folder_labels(meta["names"])
            logger.info("%s (from cache %s): %s", root, array_path.name, report.summary())
            return ImageSet(images, labels, class_names, str(root), report, meta["names"])

    images = np.empty((len(files), 3, resolution, resolution), dtype=np.uint8)
    report = LoadReport(total_files=len(files), resolution=resolution)
    names: list[str] = []
    stream = _decode_stream(files, resolution, _default_workers())
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
        _atomic_write(array_path, lambda fh: np.save(fh, images))
        meta = {"count": len(names), "nbytes": array_path.stat().st_size, "names": names,
                "report": dataclasses.asdict(report)}
        _atomic_write(meta_path, lambda fh: fh.write(json.dumps(meta).encode()))
    labels, class_names = _folder_labels(names)
    logger.info("%s: %s", root, report.summary())
    return ImageSet(images, labels, class_names, str(root), report, names)


def _require_files(root: Path) -> list[Path]:
    files = list_image_files(root)
    if not files:
        raise DataError(f"No image files in {root} (searched recursively). Supported extensions: "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}.")
    return files


def _folder_labels(names: list[str]) -> tuple[Optional[np.ndarray], Optional[list[str]]]:
    """Class ids from first-level subfolders, when every image lies in one."""
    parts = [name.split("/") for name in names]
    if not parts or any(len(p) < 2 for p in parts):
        return None, None
    class_names = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(class_names)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64), class_names


# --------------------------------------------------------------------------------------------------
# Streaming, splitting, value ranges


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
    resolution = _check_resolution(resolution)
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, world_size) and world_size >= 1; got rank={rank}, "
                        f"world_size={world_size}.")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images or None, got {limit}.")
    spec = str(spec)
    if _builtin_name(spec) == "shapes":
        images64, _, _ = make_shapes(int(shapes_count), shapes_seed, SHAPES_NATIVE_RESOLUTION)
        n = len(images64) if limit is None else min(limit, len(images64))
        source = ((f"shapes_{k:06d}", images64[k]) for k in range(n))
        return _batches(source, resolution, batch_size, rank, world_size, n, source_is_folder=False)
    root = Path(spec).expanduser()
    files = _require_files(root)
    return _batches(_folder_source(root, files, resolution, rank, progress), resolution, batch_size,
                    rank, world_size, limit, source_is_folder=True, root=root)


def _folder_source(root: Path, files: list[Path], resolution: int, rank: int, progress: bool):
    stream = _decode_stream(files, resolution, _default_workers())
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
            array = _shapes_at(array[None], resolution)[0]
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


def train_val_split(n: int, val_count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint split of range(n) into (train, validation) index arrays, each sorted.

    `val_count` is clipped so that at least one training image remains.
    """
    if n < 1:
        raise DataError(f"Cannot split a dataset of {n} images; at least one image is needed.")
    if val_count < 0:
        raise DataError(f"val_count must be 0 or more, got {val_count}.")
    val_count = min(int(val_count), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_count:]).astype(np.int64), np.sort(order[:val_count]).astype(np.int64)


def to_model_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float32 [-1, 1] as x / 127.5 - 1 (the LDM / diffusers convention)."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_model_input expects a uint8 tensor, got {images_uint8.dtype}; "
                        f"convert decoded images with torch.from_numpy first.")
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] back to uint8 as round((clamp(y, -1, 1) + 1) * 127.5) (docs/reconstruction-protocol.md)."""
    return ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


__all__ = ["IMAGE_EXTENSIONS", "BUILTIN_SHAPES", "DataError", "BadImageError", "ImageSet", "LoadReport",
           "list_image_files", "load_image_uint8", "resize_center_crop", "load_dataset",
           "iter_image_batches", "train_val_split", "to_model_input", "to_uint8"]
