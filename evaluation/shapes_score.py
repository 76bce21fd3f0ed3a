"""Exact scorer for images meant to look like the built-in `shapes` dataset (no learned model).

An image is *valid* when it shows what `ldm_core/data/shapes.py` defines: a uniform background and exactly
one filled circle, square or upright triangle in another colour, its bounding box 16-40 px, inside the
frame. Every dataset image passes exactly; the tolerances below exist only for what a generative model
adds (slight blur and colour error):

1. Colours: a pixel belongs to a colour when it lies within COLOUR_TOLERANCE of it (RGB distance on the
   0-255 scale; the dataset's two colours are at least MIN_CONTRAST = 128 apart).
2. Background: the per-channel median of the outer 2-px ring (the dataset keeps shapes 2 px from the
   edge). At least BORDER_FRACTION of the ring must be that colour.
3. One shape: the non-background pixels are split into 8-connected components. The largest is the shape;
   any other component of EXTRA_COMPONENT_PIXELS or more means a second object.
4. Foreground: the per-channel median of that component, at least MIN_CONTRAST - COLOUR_TOLERANCE from
   the background. Pixels on the straight RGB segment between background and foreground colours are
   blends (blurred edges); those closer to the foreground form the shape mask.
5. Noise: pixels explained neither as background nor as the shape or its edge (other colours, loose
   specks) must stay below NOISE_FRACTION of the image.
6. Class: each class's ideal shape (`ldm_core.data.shapes.shape_mask`) is fitted to the mask by matching
   its centroid and second moments, which fixes the box the shape would need (a square's side is
   sqrt(12 var), a circle's diameter 4 std, a triangle's centroid sits 2/3 down from the apex). The
   class whose fitted template (refined by a short search) overlaps the mask best is the answer, if
   its intersection-over-union reaches MIN_IOU. This is the fill-ratio idea (square 1, circle pi/4,
   triangle 1/2) made robust: blur rounds corners and resampling leaves stray edge pixels, which move
   a min/max bounding box but hardly the moments; and shapes outside the definition (an inverted triangle, a diamond, a ring)
   fit no template well enough.
7. Size: the fitted box's sides lie in [14, 42] (the definition's 16-40 plus 2 px for blur) and are
   equal up to ASPECT_TOLERANCE.
8. Crisp edges: the dataset's edges are hard, so a shape must not be smeared. The blend pixels (between
   10% and 90% of the way from background to foreground) divided by the shape's outline length is the
   width of the edge's transition in pixels; it must not exceed MAX_EDGE_WIDTH = 2, one blend pixel on
   either side of the edge. Measured on the dataset's images (tests/test_shapes.py): hard edges give 0,
   a 2x bicubic downscale 0.7 (at most 1.1), a Gaussian blur of sigma 0.5 px 1.6 (at most 2.0), and
   sigma 0.6 to 1.0 px 2.0 to 3.0, so an edge smeared over more than about a pixel is refused.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from ldm_core.data.image_files import BadImageError, BUILTIN_SHAPES, DataError, load_image_uint8, resize_center_crop
from ldm_core.data.shapes import CORNER_NAMES, MIN_CONTRAST, SHAPE_CLASSES, corner_name, shape_mask
from ldm_core.sample_folder import GRID_FILE, LABELS_FILE

logger = logging.getLogger("ldm.eval")

SIZE = 64
COLOUR_TOLERANCE = 40.0  # RGB distance on 0-255; under a third of the dataset's least contrast (128)
BORDER_RING = 2
BORDER_FRACTION = 0.9
EXTRA_COMPONENT_PIXELS = 16
NOISE_FRACTION = 0.05
MIN_SIDE, MAX_SIDE = 14, 42
ASPECT_TOLERANCE = 0.15  # |w - h| / max(w, h)
MIN_IOU = 0.9  # dataset shapes fit at >= 0.98; the best wrong-class fit of a clean shape is ~0.86
MAX_EDGE_WIDTH = 2.0  # blend pixels per outline pixel; hard-edged data has 0
BLEND_RANGE = (0.1, 0.9)
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass
class ShapeVerdict:
    """The scorer's decision on one image.

    Parameters:
        valid: the image shows one clean shape of a known class on a uniform background.
        shape: the recognised class (None when invalid).
        background, foreground: RGB colours (ints, 0-255), when they could be determined.
        reason: "ok" when valid, otherwise a short fixed phrase (used as a counter key).
        bbox: the shape's (x0, y0, x1, y1) in 64x64 coordinates, end-exclusive, when found.
    """

    valid: bool
    shape: Optional[str]
    background: Optional[tuple[int, int, int]]
    foreground: Optional[tuple[int, int, int]]
    reason: str
    bbox: Optional[tuple[int, int, int, int]] = None


def _as_64(image: np.ndarray) -> np.ndarray:
    """Check a (3, H, W) uint8 image and bring it to (64, 64, 3) float64 via the dataset's resize/crop."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"score_image expects a uint8 numpy array of shape (3, H, W), got "
                         f"{type(image).__name__} {getattr(image, 'dtype', '')}; quantise model "
                         f"outputs with ldm_core.image_values.to_uint8 first.")
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

    # 2. Background.
    ring = np.ones((SIZE, SIZE), dtype=bool)
    ring[BORDER_RING:-BORDER_RING, BORDER_RING:-BORDER_RING] = False
    bg = np.median(pixels[ring], axis=0)
    bg_name = _rgb(bg)
    is_bg = np.linalg.norm(pixels - bg, axis=-1) < COLOUR_TOLERANCE
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
    fg = np.median(pixels[in_main], axis=0)
    fg_name = _rgb(fg)
    direction = fg - bg
    if np.linalg.norm(direction) < MIN_CONTRAST - COLOUR_TOLERANCE:
        return ShapeVerdict(False, None, bg_name, fg_name, "too little contrast")
    t = np.clip(((pixels - bg) @ direction) / (direction @ direction), 0.0, 1.0)
    off_segment = np.linalg.norm(pixels - (bg + t[..., None] * direction), axis=-1)
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

    # 8. Crisp edges.
    # Blends near the background count too: those within COLOUR_TOLERANCE of it were attributed to it.
    near_shape = ndimage.binary_dilation(in_main, iterations=2)
    blend = near_shape & (off_segment < COLOUR_TOLERANCE) & (t > BLEND_RANGE[0]) & (t < BLEND_RANGE[1])
    if edge_width(mask, blend) > MAX_EDGE_WIDTH:
        return ShapeVerdict(False, None, bg_name, fg_name, "blurred edge", bbox)
    return ShapeVerdict(True, shape, bg_name, fg_name, "ok", bbox)


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(float(v))) for v in colour)


def edge_width(mask: np.ndarray, blend: np.ndarray) -> float:
    """Mean width in pixels of the transition around a shape: blend pixels per outline pixel.

    The outline is the shape's pixels that touch a non-shape pixel (4-neighbours), which counts one
    pixel per pixel of edge length, so a one-pixel-wide ramp all round gives about 1.
    """
    outline = mask & ~ndimage.binary_erosion(mask, border_value=0)
    return float(blend.sum()) / max(int(outline.sum()), 1)


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
        and `background_colour_histogram` ({nearest corner of the RGB cube: fraction of the valid images}), `reasons` ({reason:
        count} over invalid images) and, with `requested_labels`, the fields of `class_match_summary`.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"score_images expects a batch (N, 3, H, W), got shape {images.shape}.")
    if requested_labels is not None:
        requested_labels = np.asarray(requested_labels).reshape(-1)
        if len(requested_labels) != len(images):
            raise ValueError(f"requested_labels has {len(requested_labels)} entries for "
                             f"{len(images)} images; give one class index per image.")
        integer = np.issubdtype(requested_labels.dtype, np.integer)
        if not integer or ((requested_labels < 0) | (requested_labels >= len(SHAPE_CLASSES))).any():
            raise ValueError(f"requested_labels must be integer indices into SHAPE_CLASSES "
                             f"(0..{len(SHAPE_CLASSES) - 1} for {', '.join(SHAPE_CLASSES)}).")
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
        "foreground_colour_histogram": histogram([corner_name(v.foreground) for v in valid], CORNER_NAMES),
        "background_colour_histogram": histogram([corner_name(v.background) for v in valid], CORNER_NAMES),
        "reasons": dict(Counter(v.reason for v in verdicts if not v.valid)),
    }
    if requested_labels is not None:
        result.update(class_match_summary(verdicts, [SHAPE_CLASSES[int(k)] for k in requested_labels]))
    return result


def class_match_summary(verdicts: list[ShapeVerdict], requested: list[str]) -> dict:
    """How often conditional samples show the class they were generated for.

    Parameters:
        verdicts: `score_image` results, one per image.
        requested: the SHAPE_CLASSES name each image was asked for, in the same order.

    Returns:
        `class_match`: fraction of ALL images that are valid and show the requested class (an invalid
        image counts as a miss, so a model cannot score by drawing nothing recognisable);
        `class_match_among_valid`: the same among valid images only (None without valid images);
        `class_match_by_class`: {requested class: {"n", "n_valid", "class_match",
        "class_match_among_valid", "shown": {class or "invalid": count}}} for each class requested.
    """
    def rates(pairs):
        n, shown = len(pairs), Counter(v.shape if v.valid else "invalid" for v, _ in pairs)
        hits = sum(v.valid and v.shape == want for v, want in pairs)
        n_valid = n - shown["invalid"]
        return {"n": n, "n_valid": n_valid, "class_match": hits / n if n else None,
                "class_match_among_valid": hits / n_valid if n_valid else None,
                "shown": {name: shown[name] for name in (*SHAPE_CLASSES, "invalid")}}

    pairs = list(zip(verdicts, requested))
    overall = rates(pairs)
    return {
        "class_match": overall["class_match"],
        "class_match_among_valid": overall["class_match_among_valid"],
        "class_match_by_class": {name: rates([p for p in pairs if p[1] == name])
                                 for name in SHAPE_CLASSES if name in requested},
    }


def read_requested_classes(folder: str | Path) -> Optional[dict]:
    """Read `folder/labels.json`, the requested class of each generated image, as SHAPE_CLASSES names.

    Returns None when the folder has no labels.json, else {"labels": {file name: shape class},
    "guidance_scale", "class_names"}. A label may be a class name or, for a model with unnamed classes,
    an id into the file's `class_names`.

    Raises:
        DataError: the file is not valid labels.json, or asks for a class that is not a shapes class (the
            class names of a model trained on builtin:shapes are the shape classes).
    """
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        labels, class_names = record["labels"], record.get("class_names")
        if not isinstance(labels, dict):
            raise TypeError("'labels' is not an object")
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a labels file written by `ldm generate` ({err}). Regenerate the "
                        f"images, or delete {path.name} to score them without their requested classes.") from None
    resolved = {}
    for name, label in labels.items():
        if isinstance(label, int) and not isinstance(label, bool):
            if not class_names or not 0 <= label < len(class_names):
                raise DataError(f"{path}: {name} asks for class id {label}, which its class_names "
                                f"{class_names} do not name; the shapes scorer needs class names.")
            label = class_names[label]
        if label not in SHAPE_CLASSES:
            raise DataError(f"{path}: {name} asks for class {label!r}, which is not a {BUILTIN_SHAPES} class "
                            f"({', '.join(SHAPE_CLASSES)}). Only a model trained on {BUILTIN_SHAPES} can be scored "
                            f"with --dataset {BUILTIN_SHAPES}; use --reference for FID instead.")
        resolved[name] = label
    return {"labels": resolved, "guidance_scale": record.get("guidance_scale"), "class_names": class_names}


def score_folder(folder: str | Path) -> dict:
    """Score the PNG and JPEG files directly inside `folder` (not recursive), in sorted order.

    `grid.png`, the overview `ldm generate` writes beside the images, is not a sample and is left out.

    Each file is brought to 64x64 by the dataset loader (shorter side, bicubic, centre crop). Files that
    cannot be decoded are logged, listed under `unreadable_files` and left out of the scores.

    When the folder holds `labels.json` (class-conditional samples from `ldm generate`), every scored
    image must be listed there, and the result adds the fields of `class_match_summary` plus
    `conditioning`: {"labels_file", "guidance_scale", "class_names"}.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; give the folder that holds the generated images.")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in FOLDER_EXTENSIONS and p.name != GRID_FILE)
    requested = read_requested_classes(folder)
    if requested is not None:
        listed = requested["labels"]
        unlisted = [p.name for p in files if p.name not in listed]
        missing = sorted(set(listed) - {p.name for p in files})
        if unlisted or missing:
            problem = (f"{len(unlisted)} image(s) not listed in it ({', '.join(unlisted[:3])})" if unlisted else
                       f"{len(missing)} listed image(s) missing ({', '.join(missing[:3])})")
            raise DataError(f"{folder / LABELS_FILE} does not match the images in {folder}: {problem}. Generate "
                            f"into an empty folder, or delete {LABELS_FILE} to score without requested classes.")
    arrays, names, unreadable = [], [], []
    for path in files:
        try:
            arrays.append(load_image_uint8(path, SIZE)[0])
            names.append(path.name)
        except BadImageError as err:
            logger.warning("skipping %s: %s", path, err)
            unreadable.append(path.name)
    if not arrays:
        raise DataError(f"No readable .png/.jpg image directly inside {folder} "
                        f"({len(files)} candidate files).")
    wanted = None
    if requested is not None:
        wanted = np.array([SHAPE_CLASSES.index(requested["labels"][name]) for name in names], dtype=np.int64)
    result = score_images(np.stack(arrays), wanted)
    result["unreadable_files"] = unreadable
    if requested is not None:
        result["conditioning"] = {"labels_file": LABELS_FILE, "guidance_scale": requested["guidance_scale"],
                                  "class_names": requested["class_names"]}
    return result


__all__ = ["ShapeVerdict", "edge_width", "score_image", "score_images", "class_match_summary", "read_requested_classes",
           "score_folder", "LABELS_FILE"]
