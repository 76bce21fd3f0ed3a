"""The built-in `shapes` dataset: one flat-coloured shape on a flat-coloured background.

Definition (the scorer in `evaluation/shapes_score.py` checks generated images against exactly this):

* 64x64 RGB (other sizes scale every length by `size / 64`);
* a uniform background in one palette colour and exactly one filled, axis-aligned shape in a different
  palette colour: a circle, a square, or an upright isosceles triangle (apex at the top, horizontal base
  at the bottom, height equal to its base);
* the shape's bounding box is square with a side of 16 to 40 px, and lies wholly inside the frame with
  at least a 2 px margin, so the outer ring of the image is always pure background;
* shapes are drawn with hard edges (no antialiasing): a pixel belongs to the shape when its centre does.
  Every pixel is therefore exactly one of the two palette colours, which lets the scorer be exact on the
  data and measure tolerance only for what a model adds;
* the classes are balanced (each appears `count // 3` or `count // 3 + 1` times) and the whole set is a
  deterministic function of `(count, seed, size)`.

The palette is the eight corners of the RGB cube pulled in to [20, 235]: the colours are as far apart as
eight colours can be (minimum pairwise distance 215 on the 0-255 scale), so a generated colour is
attributed to its palette entry without ambiguity even after blur.
"""

from __future__ import annotations

import functools

import numpy as np

SHAPE_CLASSES = ("circle", "square", "triangle")

_LO, _HI = 20, 235
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (_LO, _LO, _LO),
    "white": (_HI, _HI, _HI),
    "red": (_HI, _LO, _LO),
    "green": (_LO, _HI, _LO),
    "blue": (_LO, _LO, _HI),
    "yellow": (_HI, _HI, _LO),
    "cyan": (_LO, _HI, _HI),
    "magenta": (_HI, _LO, _HI),
}
PALETTE_NAMES = tuple(PALETTE)
PALETTE_ARRAY = np.array([PALETTE[name] for name in PALETTE_NAMES], dtype=np.uint8)  # (8, 3)

# Lengths at the reference size of 64 px.
BASE_SIZE = 64
MIN_SIDE, MAX_SIDE, MARGIN = 16, 40, 2


def side_range(size: int = BASE_SIZE) -> tuple[int, int]:
    """Smallest and largest bounding-box side (inclusive) at image size `size`."""
    return round(MIN_SIDE * size / BASE_SIZE), round(MAX_SIDE * size / BASE_SIZE)


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    ys.flags.writeable = False
    xs.flags.writeable = False
    return ys, xs


def shape_mask(shape: str, size: int, x0: float, y0: float, w: float, h: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape whose bounding box starts at (x0, y0) and is w x h.

    A pixel (x, y) is inside when its centre (x + 0.5, y + 0.5) is, so the mask's extent is exactly the
    bounding box for integer boxes. `circle` becomes an ellipse and `square` a rectangle when w != h,
    which is what the scorer needs to build a template for a measured, slightly non-square box.

    Parameters:
        shape: one of SHAPE_CLASSES.
        size: side of the square image grid.
        x0, y0: top-left corner of the bounding box (pixels).
        w, h: width and height of the bounding box (pixels).
    """
    if shape not in SHAPE_CLASSES:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {', '.join(SHAPE_CLASSES)}.")
    ys, xs = _pixel_centres(int(size))
    inside_rows = (ys > y0) & (ys < y0 + h)
    inside_cols = (xs > x0) & (xs < x0 + w)
    if shape == "square":
        return inside_rows & inside_cols
    cx, cy = x0 + w / 2.0, y0 + h / 2.0
    if shape == "circle":
        return ((xs - cx) / (w / 2.0)) ** 2 + ((ys - cy) / (h / 2.0)) ** 2 <= 1.0
    # Upright triangle: row j (0 = top) of the box has half-width (j + 1) / h * w / 2, so the top row is
    # about one pixel wide and the bottom row spans the whole base.
    row = np.floor(ys - y0)
    half_width = (row + 1.0) / h * (w / 2.0)
    return inside_rows & (np.abs(xs - cx) <= half_width)


def make_shapes(count: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw the built-in shapes dataset.

    Parameters:
        count: number of images (>= 1).
        seed: the dataset is a deterministic function of (count, seed, size).
        size: image side in pixels (>= 32); 64 is the reference definition.

    Returns:
        images: uint8 array (count, 3, size, size).
        labels: int64 array (count,) of indices into SHAPE_CLASSES.
        metadata: one dict per image with `shape` (class name), `bbox` (x0, y0, x1, y1), end-exclusive
            pixel coordinates, `background` and `foreground` (palette colour names).
    """
    if int(count) < 1:
        raise ValueError(f"make_shapes needs count >= 1, got {count}.")
    if int(size) < 32:
        raise ValueError(f"make_shapes needs size >= 32 so the smallest shape stays recognisable, got {size}.")
    count, size = int(count), int(size)
    rng = np.random.default_rng(seed)
    # Balanced classes in a random order.
    labels = rng.permutation(np.arange(count) % len(SHAPE_CLASSES)).astype(np.int64)
    n_colours = len(PALETTE_NAMES)
    background = rng.integers(0, n_colours, count)
    # A uniformly chosen *different* colour for the shape.
    foreground = (background + rng.integers(1, n_colours, count)) % n_colours
    lo, hi = side_range(size)
    margin = max(1, round(MARGIN * size / BASE_SIZE))
    sides = rng.integers(lo, hi + 1, count)
    x0 = rng.integers(margin, size - margin - sides + 1)
    y0 = rng.integers(margin, size - margin - sides + 1)

    images = np.empty((count, 3, size, size), dtype=np.uint8)
    metadata = []
    for i in range(count):
        shape = SHAPE_CLASSES[labels[i]]
        mask = shape_mask(shape, size, x0[i], y0[i], sides[i], sides[i])
        hwc = np.where(mask[..., None], PALETTE_ARRAY[foreground[i]], PALETTE_ARRAY[background[i]])
        images[i] = hwc.transpose(2, 0, 1)
        metadata.append({
            "shape": shape,
            "bbox": (int(x0[i]), int(y0[i]), int(x0[i] + sides[i]), int(y0[i] + sides[i])),
            "background": PALETTE_NAMES[background[i]],
            "foreground": PALETTE_NAMES[foreground[i]],
        })
    return images, labels, metadata


__all__ = ["SHAPE_CLASSES", "PALETTE", "PALETTE_NAMES", "PALETTE_ARRAY", "make_shapes", "shape_mask",
           "side_range"]
