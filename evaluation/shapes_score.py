"""Exact scorer for images meant to look like the built-in `shapes` dataset (no learned model).

An image is *valid* when it shows what `ldm_core/shapes.py` defines: a uniform palette-coloured
background and exactly one filled circle, square or upright triangle in another palette colour, its
bounding box 16-40 px, inside the frame. Every dataset image passes exactly; the tolerances below exist
only for what a generative model adds (slight blur and colour error):

1. Colours: a pixel is attributed to its nearest palette colour when it lies within COLOUR_TOLERANCE of
   it (the palette's colours are at least 215 apart, so the attribution is unambiguous).
2. Background: the most common attributed colour. At least BORDER_FRACTION of the outer 2-px ring must
   be that colour (the dataset keeps shapes 2 px from the edge).
3. One shape: the non-background pixels are split into 8-connected components. The largest is the shape;
   any other component of EXTRA_COMPONENT_PIXELS or more means a second object.
4. Foreground: the most common palette colour in that component. Pixels on the straight RGB segment
   between background and foreground colours are blends (blurred edges); those closer to the
   foreground form the shape mask.
5. Noise: pixels explained neither as background nor as the shape or its edge (other colours, off-palette
   values, loose specks) must stay below NOISE_FRACTION of the image.
6. Class: each class's ideal shape (`ldm_core.shapes.shape_mask`) is fitted to the mask by matching
   its centroid and second moments, which fixes the box the shape would need (a square's side is
   sqrt(12 var), a circle's diameter 4 std, a triangle's centroid sits 2/3 down from the apex). The
   class whose fitted template (refined by a short search) overlaps the mask best is the answer, if
   its intersection-over-union reaches MIN_IOU. This is the fill-ratio idea (square 1, circle pi/4,
   triangle 1/2) made robust: blur rounds corners and resampling leaves stray edge pixels, which move
   a min/max bounding box but hardly the moments; and shapes outside the definition (an inverted triangle, a diamond, a ring)
   fit no template well enough.
7. Size: the fitted box's sides lie in [14, 42] (the definition's 16-40 plus 2 px for blur) and are
   equal up to ASPECT_TOLERANCE.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from ldm_core.data import BadImageError, DataError, load_image_uint8, resize_center_crop
from ldm_core.shapes import PALETTE_ARRAY, PALETTE_NAMES, SHAPE_CLASSES, shape_mask

logger = logging.getLogger("ldm.eval")

SIZE = 64
COLOUR_TOLERANCE = 80.0  # RGB distance on 0-255; under half the palette's minimum separation (215)
BORDER_RING = 2
BORDER_FRACTION = 0.9
EXTRA_COMPONENT_PIXELS = 16
NOISE_FRACTION = 0.05
MIN_SIDE, MAX_SIDE = 14, 42
ASPECT_TOLERANCE = 0.15  # |w - h| / max(w, h)
MIN_IOU = 0.9  # dataset shapes fit at >= 0.98; the best wrong-class fit of a clean shape is ~0.86
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass
class ShapeVerdict:
    """The scorer's decision on one image.

    Parameters:
        valid: the image shows one clean shape of a known class on a uniform background.
        shape: the recognised class (None when invalid).
        background, foreground: palette colour names, when they could be determined.
        reason: "ok" when valid, otherwise a short fixed phrase (used as a counter key).
        bbox: the shape's (x0, y0, x1, y1) in 64x64 coordinates, end-exclusive, when found.
    """

    valid: bool
    shape: Optional[str]
    background: Optional[str]
    foreground: Optional[str]
    reason: str
    bbox: Optional[tuple[int, int, int, int]] = None


def _as_64(image: np.ndarray) -> np.ndarray:
    """Check a (3, H, W) uint8 image and bring it to (64, 64, 3) float64 via the dataset's resize/crop."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"score_image expects a uint8 numpy array of shape (3, H, W), got "
                         f"{type(image).__name__} {getattr(image, 'dtype', '')}; quantise model "
                         f"outputs with ldm_core.data.to_uint8 first.")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"score_image expects channels-first (3, H, W), got shape {image.shape}; "
                         f"transpose HWC images with image.transpose(2, 0, 1).")
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
    if hwc.shape[:2] != (SIZE, SIZE):
        hwc = np.asarray(resize_center_crop(Image.fromarray(hwc), SIZE))
    return hwc.astype(np.float64)


def score_image(image_uint8_chw: np.ndarray) -> ShapeVerdict:
    """Decide whether one image is a valid `shapes` image, and which shape and colours it shows.

    Parameters:
        image_uint8_chw: uint8 array (3, H, W); images other than 64x64 are resized (shorter side to 64,
            bicubic, centre crop), as the dataset loader does.
    """
    pixels = _as_64(image_uint8_chw)
    palette = PALETTE_ARRAY.astype(np.float64)
    distances = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)  # (64, 64, 8)
    nearest = distances.argmin(axis=-1)
    attributed = distances.min(axis=-1) < COLOUR_TOLERANCE

    # 2. Background.
    if not attributed.any():
        return ShapeVerdict(False, None, None, None, "colours not in palette")
    bg = int(np.bincount(nearest[attributed], minlength=len(palette)).argmax())
    bg_name = PALETTE_NAMES[bg]
    is_bg = attributed & (nearest == bg)
    ring = np.ones((SIZE, SIZE), dtype=bool)
    ring[BORDER_RING:-BORDER_RING, BORDER_RING:-BORDER_RING] = False
    if is_bg[ring].mean() < BORDER_FRACTION:
        return ShapeVerdict(False, None, bg_name, None, "background not uniform")

    # 3. One object.
    components, count = ndimage.label(~is_bg, structure=np.ones((3, 3), dtype=int))
    if count == 0:
        return ShapeVerdict(False, None, bg_name, None, "no shape")
    sizes = np.bincount(components.ravel())[1:]
    main = int(sizes.argmax()) + 1
    if np.sum(sizes >= EXTRA_COMPONENT_PIXELS) > 1:
        return ShapeVerdict(False, None, bg_name, None, "more than one shape")
    in_main = components == main

    # 4. Foreground colour, blends and the shape mask.
    candidates = in_main & attributed & (nearest != bg)
    if not candidates.any():
        return ShapeVerdict(False, None, bg_name, None, "no shape")
    fg = int(np.bincount(nearest[candidates], minlength=len(palette)).argmax())
    fg_name = PALETTE_NAMES[fg]
    direction = palette[fg] - palette[bg]
    t = np.clip(((pixels - palette[bg]) @ direction) / (direction @ direction), 0.0, 1.0)
    off_segment = np.linalg.norm(pixels - (palette[bg] + t[..., None] * direction), axis=-1)
    on_edge = in_main & (off_segment < COLOUR_TOLERANCE)
    mask = on_edge & (t >= 0.5)

    # 5. Noise.
    if (~(is_bg | on_edge)).mean() >= NOISE_FRACTION:
        return ShapeVerdict(False, None, bg_name, fg_name, "stray pixels")

    # 6. Class: the template (fitted by moments) that overlaps the mask best.
    if mask.sum() < (MIN_SIDE * MIN_SIDE) // 4:
        return ShapeVerdict(False, None, bg_name, fg_name, "no shape")
    shape, iou, (x0, y0, w, h) = max((_fit(mask, name) for name in SHAPE_CLASSES), key=lambda f: f[1])
    bbox = (int(round(x0)), int(round(y0)), int(round(x0 + w)), int(round(y0 + h)))
    if iou < MIN_IOU:
        return ShapeVerdict(False, None, bg_name, fg_name, "unknown shape", bbox)

    # 7. Size and proportions.
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE):
        return ShapeVerdict(False, None, bg_name, fg_name, "size out of range", bbox)
    if abs(w - h) / max(w, h) > ASPECT_TOLERANCE:
        return ShapeVerdict(False, None, bg_name, fg_name, "bounding box not square", bbox)
    return ShapeVerdict(True, shape, bg_name, fg_name, "ok", bbox)


# Second moments of the filled shapes in a w x h box: var_x = w^2 / kx, var_y = h^2 / ky, and the
# centroid's height below the box top as a fraction of h. Square: uniform (1/12); ellipse: 1/16;
# upright isosceles triangle: w^2/24 across, h^2/18 down, centroid at 2/3 of the height from the apex.
_MOMENTS = {"square": (12.0, 12.0, 0.5), "circle": (16.0, 16.0, 0.5), "triangle": (24.0, 18.0, 2.0 / 3.0)}


def _fit(mask: np.ndarray, shape: str) -> tuple[str, float, tuple[float, float, float, float]]:
    """Fit `shape`'s box (x0, y0, w, h) to the mask; return (shape, IoU, box).

    The start is the box whose ideal shape has the mask's centroid and second moments; moments barely
    move when blur rounds corners or resampling leaves a stray edge pixel, where a min/max bounding box
    would. A short coordinate ascent on the IoU (steps of 1 and 0.5 px) then absorbs the
    pixel-grid effects that the continuous moment formulas ignore.
    """
    rows, cols = np.nonzero(mask)
    # Pixel centres are at index + 0.5; a one-pixel-wide sampling adds 1/12 to each variance.
    cx, cy = cols.mean() + 0.5, rows.mean() + 0.5
    var_x, var_y = max(cols.var() - 1 / 12, 0.0), max(rows.var() - 1 / 12, 0.0)
    kx, ky, centroid = _MOMENTS[shape]
    w, h = np.sqrt(kx * var_x), np.sqrt(ky * var_y)
    box = [cx - w / 2.0, cy - centroid * h, w, h]

    def iou(candidate):
        ideal = shape_mask(shape, mask.shape[0], *candidate)
        return (mask & ideal).sum() / float((mask | ideal).sum())

    best = iou(box)
    for step in (1.0, 0.5):
        improved = True
        while improved:
            improved = False
            for k in range(4):
                for delta in (-step, step):
                    candidate = list(box)
                    candidate[k] += delta
                    value = iou(candidate)
                    if value > best + 1e-12:
                        box, best, improved = candidate, value, True
    return shape, float(best), tuple(float(v) for v in box)


def score_images(images: np.ndarray, requested_labels: Optional[np.ndarray] = None) -> dict:
    """Score a batch and summarise it.

    Parameters:
        images: uint8 (N, 3, H, W).
        requested_labels: optional int (N,) indices into SHAPE_CLASSES that the images were generated
            for (class-conditional sampling).

    Returns:
        dict with `n`, `n_valid`, `validity` (fraction valid), `class_histogram` ({class: fraction of
        the valid images}), `max_class_deviation` (max |fraction - 1/3|), `foreground_colour_histogram`
        and `background_colour_histogram` ({colour: fraction of the valid images}), `reasons` ({reason:
        count} over invalid images) and, with `requested_labels`, `class_match` (fraction of all images
        that are valid and show the requested class).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"score_images expects a batch (N, 3, H, W), got shape {images.shape}.")
    if requested_labels is not None:
        requested_labels = np.asarray(requested_labels).reshape(-1)
        if len(requested_labels) != len(images):
            raise ValueError(f"requested_labels has {len(requested_labels)} entries for "
                             f"{len(images)} images; give one class index per image.")
    verdicts = [score_image(image) for image in images]
    valid = [v for v in verdicts if v.valid]
    n, n_valid = len(verdicts), len(valid)

    def histogram(values, names):
        counts = Counter(values)
        return {name: (counts[name] / n_valid if n_valid else 0.0) for name in names}

    class_hist = histogram([v.shape for v in valid], SHAPE_CLASSES)
    result = {
        "n": n,
        "n_valid": n_valid,
        "validity": n_valid / n if n else 0.0,
        "class_histogram": class_hist,
        "max_class_deviation": max(abs(f - 1.0 / len(SHAPE_CLASSES)) for f in class_hist.values()),
        "foreground_colour_histogram": histogram([v.foreground for v in valid], PALETTE_NAMES),
        "background_colour_histogram": histogram([v.background for v in valid], PALETTE_NAMES),
        "reasons": dict(Counter(v.reason for v in verdicts if not v.valid)),
    }
    if requested_labels is not None:
        hits = sum(v.valid and v.shape == SHAPE_CLASSES[int(label)]
                   for v, label in zip(verdicts, requested_labels))
        result["class_match"] = hits / n if n else 0.0
    return result


GRID_NAME = "grid.png"


def score_folder(folder: str | Path) -> dict:
    """Score the PNG and JPEG files directly inside `folder` (not recursive), in sorted order.

    `grid.png`, the overview `ldm generate` writes beside the images, is not a sample and is left out.

    Each file is brought to 64x64 by the dataset loader (shorter side, bicubic, centre crop). Files that
    cannot be decoded are logged, listed under `unreadable_files` and left out of the scores.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give the folder that holds the generated images.")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in FOLDER_EXTENSIONS and p.name != GRID_NAME)
    arrays, unreadable = [], []
    for path in files:
        try:
            arrays.append(load_image_uint8(path, SIZE)[0])
        except BadImageError as err:
            logger.warning("skipping %s: %s", path, err)
            unreadable.append(path.name)
    if not arrays:
        raise DataError(f"No readable .png/.jpg image directly inside {folder} "
                        f"({len(files)} candidate files).")
    result = score_images(np.stack(arrays))
    result["unreadable_files"] = unreadable
    return result


__all__ = ["ShapeVerdict", "score_image", "score_images", "score_folder"]
