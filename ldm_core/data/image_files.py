"""Finding image files and decoding one file to a uint8 array at the working resolution.

Every image is brought to the working resolution once, the way docs/reconstruction-protocol.md asks: resize the
shorter side to R with Pillow's antialiased bicubic filter and centre-crop to R x R, keep it as uint8.
A file that cannot be used raises `BadImageError` with the reason; the callers skip it with one warning.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger("ldm.data")

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
BUILTIN_SHAPES = "builtin:shapes"
# The shapes in the colours the training set never shows (ldm_core/data/shapes.py), for benchmarks.
BUILTIN_SHAPES_UNSEEN_COLOURS = "builtin:shapes-unseen-colours"
SHAPES_COLOUR_SETS = {BUILTIN_SHAPES: "training", BUILTIN_SHAPES_UNSEEN_COLOURS: "unseen"}
_DECODE_CHUNK = 64


class DataError(ValueError):
    """A dataset problem the user must fix (missing path, empty folder, no usable image, ...)."""


class BadImageError(Exception):
    """One file cannot be used; `str(err)` is the reason and `kind` a short category for summaries."""

    def __init__(self, reason: str, kind: str = "unreadable"):
        super().__init__(reason)
        self.kind = kind


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


def require_image_files(root: Path) -> list[Path]:
    files = list_image_files(root)
    if not files:
        raise DataError(f"No image files in {root} (searched recursively). Supported extensions: "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}.")
    return files


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

    The file is decoded by `decode_rgb` (any mode to RGB, EXIF orientation, first frame), then the
    shorter side is resized to R (bicubic, antialiased) and the centre R x R square kept.

    Returns:
        (image, upscaled): the array, and whether the short side was below R (the image was enlarged).

    Raises:
        BadImageError: see `decode_rgb`.
    """
    rgb = decode_rgb(path)
    return pil_to_chw(resize_center_crop(rgb, resolution)), min(rgb.size) < resolution


def pil_to_chw(image: Image.Image) -> np.ndarray:
    """An RGB Pillow image as a C-contiguous (3, H, W) uint8 array."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def decode_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file, or the bytes of one (a tar member, a dataset cell), to an 8-bit RGB Pillow image.

    Any mode becomes RGB: grayscale is repeated, palette images are expanded, CMYK uses Pillow's
    conversion (embedded ICC profiles are not applied), 16-bit grayscale ('I;16', 'I') is scaled by
    255/65535, and transparent images (RGBA, LA, palette with transparency) are composited on white,
    so transparent areas look as most viewers show them instead of exposing the hidden colour values.
    The EXIF orientation is applied; animated files (GIF, WebP) give their first frame.

    Raises:
        BadImageError: for empty, unreadable, non-image or truncated data, and for images whose pixel
            count exceeds Pillow's `Image.MAX_IMAGE_PIXELS` (decompression bombs).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        size, opened = len(source), io.BytesIO(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size  # follows symbolic links
        except OSError as err:
            link = " (a broken or looping symbolic link)" if path.is_symlink() else ""
            raise BadImageError(f"cannot read the file{link}: {err.strerror}", kind="unreadable") from None
        opened = path
    try:
        if size == 0:
            raise BadImageError("empty file (0 bytes)", kind="empty")
        with Image.open(opened) as image:
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
            return _to_rgb(ImageOps.exif_transpose(image))
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


def _decode_failure(err: Exception) -> BadImageError:
    """A decoder error as a BadImageError: 'truncated' when Pillow says so, else 'corrupt'."""
    text = str(err) or type(err).__name__
    if "truncat" in text.lower():
        return BadImageError(text, kind="truncated")
    return BadImageError(f"corrupt file: {text}", kind="corrupt")


def decode_stream(paths: Iterable[Path], resolution: int, workers: int) -> Iterator[tuple]:
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


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution < 1:
        raise DataError(f"resolution must be a positive integer number of pixels, got {resolution!r}.")
    return int(resolution)

