"""The built-in shapes dataset and its exact scorer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from evaluation.shapes_score import edge_width, score_folder, score_image, score_images
from ldm_core.data.shapes import (CORNER_NAMES, HELDOUT_COLOURS, HELDOUT_RADIUS, MIN_CONTRAST, SHAPE_CLASSES, corner_name,
                              make_shapes, shape_mask)


@pytest.fixture(scope="module")
def dataset():
    return make_shapes(512, seed=0)


RED, BLACK, GREEN, YELLOW, BLUE = (235, 20, 20), (20, 20, 20), (20, 235, 20), (235, 235, 20), (20, 20, 235)


def paint(mask, fg=RED, bg=BLACK):
    hwc = np.where(mask[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8))
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def _distance_to_heldout(colours):
    centres = np.array(list(HELDOUT_COLOURS.values()), float)
    return np.linalg.norm(np.asarray(colours, float)[:, None] - centres[None], axis=-1).min(axis=1)


def test_colours_cover_the_cube_but_the_held_out_ones(dataset):
    _, _, meta = dataset
    background = np.array([m["background"] for m in meta])
    foreground = np.array([m["foreground"] for m in meta])
    both = np.concatenate([background, foreground])
    assert np.linalg.norm((background - foreground).astype(float), axis=1).min() >= MIN_CONTRAST
    assert _distance_to_heldout(both).min() >= HELDOUT_RADIUS
    # Not a palette: hundreds of distinct colours, every corner region of the cube well represented.
    assert len({tuple(c) for c in both}) > 900
    corners = np.bincount([CORNER_NAMES.index(corner_name(c)) for c in both], minlength=8) / len(both)
    assert corners.min() > 0.05
    _, _, unseen = make_shapes(200, seed=0, colours="unseen")
    colours = np.array([m[k] for m in unseen for k in ("background", "foreground")])
    assert _distance_to_heldout(colours).max() < HELDOUT_RADIUS
    pairs = colours.reshape(-1, 2, 3).astype(float)
    assert np.linalg.norm(pairs[:, 0] - pairs[:, 1], axis=1).min() >= MIN_CONTRAST
    with pytest.raises(ValueError, match="training, unseen"):
        make_shapes(4, colours="pastel")


def test_definition_holds_for_every_image(dataset):
    images, labels, meta = dataset
    assert images.shape == (512, 3, 64, 64) and images.dtype == np.uint8 and labels.dtype == np.int64
    for image, label, info in zip(images, labels, meta):
        x0, y0, x1, y1 = info["bbox"]
        assert 16 <= x1 - x0 <= 40 and x1 - x0 == y1 - y0
        assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
        assert info["shape"] == SHAPE_CLASSES[label] and info["background"] != info["foreground"]
        # Exactly two colours, the named ones; the foreground's extent is exactly the box.
        hwc = image.transpose(1, 2, 0)
        colours = {tuple(c) for c in hwc.reshape(-1, 3)}
        assert colours == {info["background"], info["foreground"]}
        rows, cols = np.nonzero((hwc == info["foreground"]).all(axis=-1))
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x0, y0, x1, y1)


def test_classes_are_balanced_and_seeds_are_deterministic(dataset):
    _, labels, _ = dataset
    counts = np.bincount(labels, minlength=3)
    assert counts.max() - counts.min() <= 1
    a, la, _ = make_shapes(40, seed=7)
    b, lb, _ = make_shapes(40, seed=7)
    c, _, _ = make_shapes(40, seed=8)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)


def test_fill_ratios_match_the_shapes():
    square, circle, triangle = (shape_mask(s, 64, 10, 10, 40, 40).sum() / 1600 for s in
                                ("square", "circle", "triangle"))
    assert square == 1.0 and abs(circle - np.pi / 4) < 0.01 and abs(triangle - 0.5) < 0.03
    # Upright: the triangle's rows widen from the apex to the base.
    widths = shape_mask("triangle", 64, 10, 10, 40, 40).sum(axis=1)[10:50]
    assert widths[0] <= 2 and widths[-1] == 40 and np.all(np.diff(widths) >= 0)


def test_dataset_images_score_valid_with_the_right_class(dataset):
    images, labels, meta = dataset
    result = score_images(images, labels)
    assert result["n"] == 512 and result["validity"] >= 0.99 and result["class_match"] >= 0.99
    assert result["max_class_deviation"] < 0.01
    for image, info in list(zip(images, meta))[:60]:
        verdict = score_image(image)
        assert (verdict.shape, verdict.background, verdict.foreground) == \
            (info["shape"], info["background"], info["foreground"])
    # The wrong requested classes give no matches.
    assert score_images(images[:30], (labels[:30] + 1) % 3)["class_match"] <= 0.01


def _blur(images, sigma):
    """A Gaussian blur of `sigma` pixels, quantised back to uint8."""
    return np.clip(np.round(ndimage.gaussian_filter(images.astype(np.float64), (0, 0, sigma, sigma))),
                   0, 255).astype(np.uint8)


def test_scorer_tolerates_slight_blur_and_other_sizes(dataset):
    images, labels, _ = dataset
    assert score_images(_blur(images[:60], 0.4), labels[:60])["class_match"] >= 0.95
    big, big_labels, _ = make_shapes(30, seed=1, size=128)  # bicubic 2x downscale: 1-2 px ramps
    assert score_images(big, big_labels)["class_match"] >= 0.95


def test_scorer_refuses_edges_smeared_over_more_than_a_pixel(dataset):
    images, _, _ = dataset
    result = score_images(_blur(images[:60], 1.0))
    assert result["validity"] == 0.0 and result["reasons"] == {"blurred edge": 60}
    # The width measure itself: hard edges 0, a one-pixel ramp round a square about 1.
    square = shape_mask("square", 64, 20, 20, 20, 20)
    ring = shape_mask("square", 64, 19, 19, 22, 22) & ~square
    assert edge_width(square, np.zeros_like(square)) == 0.0
    assert edge_width(square, ring) == pytest.approx(84 / 76)


def test_noise_and_uniform_images_are_invalid():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (40, 3, 64, 64), dtype=np.uint8)
    assert score_images(noise)["validity"] == 0.0
    colours = rng.integers(0, 256, (8, 3)).astype(np.uint8)
    uniform = np.stack([np.broadcast_to(c[:, None, None], (3, 64, 64)) for c in colours])
    result = score_images(uniform)
    assert result["validity"] == 0.0 and result["reasons"] == {"no shape": 8}


def test_shapes_outside_the_definition_are_invalid():
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    two = shape_mask("square", 64, 5, 5, 20, 20) | shape_mask("circle", 64, 35, 35, 20, 20)
    assert score_image(paint(two)).reason == "more than one shape"
    two_colours = paint(shape_mask("square", 64, 5, 5, 20, 20))
    two_colours[:, 35:55, 35:55] = np.array(GREEN, np.uint8)[:, None, None]
    assert not score_image(two_colours).valid
    inverted = shape_mask("triangle", 64, 20, 20, 24, 24)[::-1]
    diamond = (np.abs(xs - 32) + np.abs(ys - 32)) <= 14
    ring = shape_mask("circle", 64, 12, 12, 36, 36) & ~shape_mask("circle", 64, 20, 20, 20, 20)
    for mask in (inverted, diamond, ring):
        assert score_image(paint(mask)).reason == "unknown shape"
    assert score_image(paint(shape_mask("square", 64, 20, 20, 10, 10))).reason == "size out of range"
    assert score_image(paint(shape_mask("square", 64, 10, 20, 40, 20))).reason == "bounding box not square"
    speckled = paint(shape_mask("circle", 64, 20, 20, 24, 24))
    rng = np.random.default_rng(1)
    spots = rng.random((64, 64)) < 0.08
    speckled[:, spots] = rng.integers(0, 256, (3, int(spots.sum())), dtype=np.uint8)
    assert not score_image(speckled).valid
    clean = score_image(paint(shape_mask("circle", 64, 20, 20, 24, 24), fg=YELLOW, bg=BLUE))
    assert (clean.valid, clean.shape, clean.foreground, clean.background) == (True, "circle", YELLOW, BLUE)
    # A shape barely lighter than its background is outside the definition (contrast >= MIN_CONTRAST).
    faint = score_image(paint(shape_mask("circle", 64, 20, 20, 24, 24), fg=(90, 90, 90), bg=(40, 40, 40)))
    assert faint.reason == "too little contrast"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="channels-first"):
        score_image(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        score_image(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="one class index per image"):
        score_images(np.zeros((2, 3, 64, 64), np.uint8), np.array([0]))


def test_score_folder(tmp_path, dataset):
    images, labels, _ = dataset
    for i in range(6):
        Image.fromarray(images[i].transpose(1, 2, 0)).save(tmp_path / f"sample_{i}.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "blank.jpg")
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "sub").mkdir()  # not searched
    Image.fromarray(images[7].transpose(1, 2, 0)).save(tmp_path / "sub" / "x.png")
    Image.fromarray(np.zeros((130, 130, 3), np.uint8)).save(tmp_path / "grid.png")  # ldm generate's overview
    result = score_folder(tmp_path)
    assert result["n"] == 7 and result["n_valid"] == 6 and result["unreadable_files"] == ["broken.png"]
