"""The built-in `shapes` datasets: one flat-coloured shape on a flat-coloured background.

Definition (the scorer in `evaluation/shapes_score.py` checks generated images against exactly this):

* 64x64 RGB (other sizes scale every length by `size / 64`);
* a uniform background and exactly one filled, axis-aligned shape of another colour: a circle, a
  square, or an upright isosceles triangle (apex at the top, horizontal base at the bottom, height equal
  to its base);
* the shape's bounding box is square with a side of 16 to 40 px, and lies wholly inside the frame with
  at least a 2 px margin, so the outer ring of the image is always pure background;
* shapes are drawn with hard edges (no antialiasing): a pixel belongs to the shape when its centre does.
  Every pixel is therefore exactly one of the two colours, which lets the scorer be exact on the data
  and measure tolerance only for what a model adds;
* the classes are balanced (each appears `count // 3` or `count // 3 + 1` times) and the whole set is a
  deterministic function of `(count, seed, size, colours)`.

Colours come from the whole RGB cube (integers 0-255), background and shape at least MIN_CONTRAST
apart, so an autoencoder has to carry colour as a continuous quantity instead of learning a handful of
colours as a code book (with eight colours it did: shapes in other colours came back snapped to the
nearest of the eight). The colours within HELDOUT_RADIUS of the named HELDOUT_COLOURS never appear in
the training set (`colours="training"`, `builtin:shapes`); `colours="unseen"`
(`builtin:shapes-unseen-colours`) draws background and shape from inside those balls only, to measure
how an autoencoder does on colours it never saw.
"""

from __future__ import annotations

import functools

import numpy as np

SHAPE_CLASSES = ("circle", "square", "triangle")

MIN_CONTRAST = 128.0  # least RGB distance (0-255 scale) between background and shape
HELDOUT_RADIUS = 40.0
HELDOUT_COLOURS: dict[str, tuple[int, int, int]] = {
    "purple": (128, 0, 128), "orange": (255, 165, 0), "crimson": (220, 20, 60), "olive": (128, 128, 0),
    "teal": (0, 128, 128), "navy": (0, 0, 128), "pink": (255, 192, 203), "sky": (135, 206, 235),
}
COLOUR_SETS = ("training", "unseen")
# Coarse names for summaries of which colours a set of images shows: the nearest corner of the cube.
CORNER_NAMES = ("black", "blue", "green", "cyan", "red", "magenta", "yellow", "white")


def corner_name(rgb) -> str:
    """The name of the RGB cube's corner nearest to a colour (0-255 scale)."""
    r, g, b = (int(float(v) >= 127.5) for v in rgb)
    return CORNER_NAMES[4 * r + 2 * g + b]


def in_heldout(colours: np.ndarray) -> np.ndarray:
    """Boolean (N,): which of the (N, 3) colours lie within HELDOUT_RADIUS of a held-out colour."""
    centres = np.array(list(HELDOUT_COLOURS.values()), dtype=np.float64)
    distances = np.linalg.norm(np.asarray(colours, np.float64)[:, None, :] - centres[None], axis=-1)
    return (distances < HELDOUT_RADIUS).any(axis=1)


def draw_colour_pairs(rng: np.random.Generator, count: int, colours: str = "training") -> tuple[np.ndarray, np.ndarray]:
    """(background, foreground): two uint8 (count, 3) arrays of colours at least MIN_CONTRAST apart.

    Each colour is uniform over the integer RGB cube restricted to the set: outside the held-out balls
    for "training", inside them for "unseen" (rejection sampling, in rounds, so the draw is a fixed
    function of the generator's state).
    """
    if colours not in COLOUR_SETS:
        raise ValueError(f"Unknown colour set {colours!r}; choose one of {', '.join(COLOUR_SETS)}.")
    want_heldout = colours == "unseen"

    def allowed(candidates):
        return in_heldout(candidates) == want_heldout

    background = np.zeros((count, 3), np.int64)
    foreground = np.zeros((count, 3), np.int64)
    for target, reference in ((background, None), (foreground, background)):
        pending = np.arange(count)
        while len(pending):
            candidates = rng.integers(0, 256, (len(pending), 3))
            ok = allowed(candidates)
            if reference is not None:
                ok &= np.linalg.norm((candidates - reference[pending]).astype(np.float64), axis=1) >= MIN_CONTRAST
            target[pending[ok]] = candidates[ok]
            pending = pending[~ok]
    return background.astype(np.uint8), foreground.astype(np.uint8)


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


def make_shapes(count: int, seed: int = 0, size: int = 64, colours: str = "training"
                ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw a built-in shapes dataset.

    Parameters:
        count: number of images (>= 1).
        seed: the dataset is a deterministic function of (count, seed, size, colours).
        size: image side in pixels (>= 32); 64 is the reference definition.
        colours: "training" (the whole cube but the held-out colours) or "unseen" (only those).

    Returns:
        images: uint8 array (count, 3, size, size).
        labels: int64 array (count,) of indices into SHAPE_CLASSES.
        metadata: one dict per image with `shape` (class name), `bbox` (x0, y0, x1, y1), end-exclusive
            pixel coordinates, `background` and `foreground` (RGB tuples of ints).
    """
    if int(count) < 1:
        raise ValueError(f"make_shapes needs count >= 1, got {count}.")
    if int(size) < 32:
        raise ValueError(f"make_shapes needs size >= 32 so the smallest shape stays recognisable, got {size}.")
    count, size = int(count), int(size)
    rng = np.random.default_rng(seed)
    # Balanced classes in a random order.
    labels = rng.permutation(np.arange(count) % len(SHAPE_CLASSES)).astype(np.int64)
    lo, hi = side_range(size)
    margin = max(1, round(MARGIN * size / BASE_SIZE))
    sides = rng.integers(lo, hi + 1, count)
    x0 = rng.integers(margin, size - margin - sides + 1)
    y0 = rng.integers(margin, size - margin - sides + 1)
    background, foreground = draw_colour_pairs(rng, count, colours)

    images = np.empty((count, 3, size, size), dtype=np.uint8)
    metadata = []
    for i in range(count):
        shape = SHAPE_CLASSES[labels[i]]
        mask = shape_mask(shape, size, x0[i], y0[i], sides[i], sides[i])
        hwc = np.where(mask[..., None], foreground[i], background[i])
        images[i] = hwc.transpose(2, 0, 1)
        metadata.append({
            "shape": shape,
            "bbox": (int(x0[i]), int(y0[i]), int(x0[i] + sides[i]), int(y0[i] + sides[i])),
            "background": tuple(int(v) for v in background[i]),
            "foreground": tuple(int(v) for v in foreground[i]),
        })
    return images, labels, metadata


__all__ = ["SHAPE_CLASSES", "MIN_CONTRAST", "HELDOUT_COLOURS", "HELDOUT_RADIUS", "COLOUR_SETS", "CORNER_NAMES",
           "corner_name", "in_heldout", "draw_colour_pairs", "make_shapes", "shape_mask", "side_range"]
