"""The sliced Wasserstein distance (evaluation/swd.py) against answers known in advance: a set against itself,
two samples of one distribution, a growing shift or blur, the order of the images, the pyramid itself."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from evaluation.swd import PatchDescriptors, laplacian_pyramid, sliced_wasserstein, swd, swd_between
from ldm_core.data.image_files import SHAPES_COLOUR_SETS
from ldm_core.data.shapes import make_shapes


def shapes(count: int, seed: int, size: int = 32) -> torch.Tensor:
    images, _, _ = make_shapes(count, seed, size, SHAPES_COLOUR_SETS["builtin:shapes"])
    return torch.from_numpy(images)


@pytest.fixture(scope="module")
def two_samples():
    return shapes(64, 0), shapes(64, 1)


def test_a_set_against_itself_is_zero_and_two_samples_are_close(two_samples):
    a, b = two_samples
    assert swd_between(a, a)["mean"] == 0.0
    near = swd_between(b, a)["mean"]
    blurred = F.interpolate(F.avg_pool2d(b.float(), 4), size=32, mode="bilinear").round().to(torch.uint8)
    assert 0 < near < swd_between(blurred, a)["mean"] / 3  # another sample is far closer than a blurred one


def test_a_growing_shift_or_blur_grows_the_distance(two_samples):
    a, b = two_samples
    shifted = [swd_between((b.int() + s).clamp(0, 255).to(torch.uint8), a)["mean"] for s in (0, 15, 40)]
    assert shifted == sorted(shifted) and shifted[-1] > 2 * shifted[0]
    blurred = []
    for k in (1, 2, 4):
        small = F.avg_pool2d(b.float(), k)
        blurred.append(swd_between(F.interpolate(small, size=32, mode="bilinear").round().to(torch.uint8), a))
    finest = [r["levels"]["32"] for r in blurred]
    assert finest == sorted(finest) and finest[-1] > 5 * finest[0]  # blur shows at the fine level first


def test_the_order_of_the_images_does_not_matter(two_samples):
    a, b = two_samples
    order = torch.randperm(len(b), generator=torch.Generator().manual_seed(0))
    base = swd_between(b, a)["mean"]
    # Equal up to the rounding of a matrix product whose rows come in another order.
    assert swd_between(b[order], a)["mean"] == pytest.approx(base, rel=1e-6)
    assert swd_between(b, a[order])["mean"] == pytest.approx(base, rel=1e-6)


def test_sets_of_different_sizes_compare_at_quantiles():
    # Two one-dimensional sets whose sorted values differ by exactly 1 everywhere: a distance of 1 in any direction.
    x = torch.linspace(0, 1, 1000)[:, None]
    y = torch.linspace(0, 1, 100)[:, None] + 1
    assert sliced_wasserstein(x, y, torch.Generator().manual_seed(0), repeats=1, directions=4) == pytest.approx(1, abs=1e-2)


def test_descriptors_are_drawn_from_each_pyramid_level():
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    levels = laplacian_pyramid(images.float())
    assert [level.shape[-1] for level in levels] == [64, 32, 16]
    # The band-pass levels and the low-pass residual add back up to the image (the pyramid is invertible).
    up = levels[-1]
    for band in reversed(levels[:-1]):
        z = torch.zeros_like(band)
        z[..., ::2, ::2] = up
        from evaluation.swd import _blur
        up = band + 4 * _blur(z)
    torch.testing.assert_close(up, images.float(), atol=1e-3, rtol=0)
    collected = PatchDescriptors(per_image=5)
    collected.add(images)
    assert [d.shape for d in collected.stacked()] == [torch.Size([15, 147])] * 3
    result = swd(collected, collected)
    assert set(result["levels"]) == {"64", "32", "16"} and result["mean"] == 0.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        PatchDescriptors().add(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="power of two"):
        laplacian_pyramid(torch.zeros(1, 3, 48, 48))
    collected = PatchDescriptors()
    collected.add(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one size"):
        collected.add(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_eval_samples_prints_swd_beside_its_floor(tmp_path, capsys):
    """`ldm eval-samples FOLDER --reference SPEC`: real shapes score at their floor, blurred ones far above it."""
    from PIL import Image

    from workflows.cli import main

    real, blurred = tmp_path / "real", tmp_path / "blurred"
    images = shapes(48, seed=7, size=64)
    soft = F.interpolate(F.avg_pool2d(images.float(), 4), size=64, mode="bilinear").round().to(torch.uint8)
    for folder, batch in ((real, images), (blurred, soft)):
        folder.mkdir()
        for k, image in enumerate(batch):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"image_{k:05d}.png")
    scores = {}
    for folder in (real, blurred):
        assert main(["eval-samples", str(folder), "--reference", "builtin:shapes", "--num-reference", "96"]) == 0
        scores[folder.name] = json.loads((folder / "eval.json").read_text())["swd"]
    out = capsys.readouterr().out
    assert "SWD x1e3" in out and "floor" in out and "48 other real images" in out
    assert scores["real"]["n_reference"] == 96 and scores["real"]["n_floor"] == 48
    # The floor is the same computation on other real shapes: the same for both folders.
    assert scores["real"]["floor"] == scores["blurred"]["floor"]
    assert scores["real"]["value"] < 2 * scores["real"]["floor"] < scores["blurred"]["value"]
