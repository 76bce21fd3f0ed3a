"""The photograph test set (benchmarks/photo_test_set.py) and the measures it is read with: the kinds, no
image shared with training, and the border and flat-field measures against answers known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import photo_test_set as T
from benchmarks.real_photos import SKIMAGE_TRAIN
from ldm_core.images import metrics as M


def fake_corpus(root: Path, photos: int = 10, renders: int = 4) -> Path:
    """A corpus folder with a manifest, as benchmarks/photo_corpus.py writes it, of small random images."""
    rng = np.random.default_rng(0)
    rows = []
    for kind, count in (("photo", photos), ("render", renders)):
        for k in range(count):
            file = f"images/pkg/{kind}{k:02d}.png"
            (root / file).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)).save(root / file)
            rows.append({"file": file, "kind": kind, "package": "pkg"})
    (root / "manifest.json").write_text(json.dumps({"images": rows}))
    return root


def test_held_out_images_are_never_training_images(tmp_path):
    corpus = fake_corpus(tmp_path / "corpus")
    rows = json.loads((corpus / "manifest.json").read_text())["images"]
    test = T.held_out(rows)
    train = T.training_files(corpus, ("photo", "render"))
    assert test and train and not {str(p.relative_to(corpus)) for p in train} & test
    assert {f for f in test if "photo" in f} == {"images/pkg/photo00.png", "images/pkg/photo05.png"}  # every fifth
    assert len([f for f in test if "render" in f]) == 2  # every second render
    # scikit-image's training photographs are in no test kind.
    named = {*T.TEXTURE_PHOTOS, *T.WHOLE_SKIMAGE, *T.DARK_SKIMAGE, *T.BRIGHT_SKIMAGE}
    assert not named & set(SKIMAGE_TRAIN)


def test_every_kind_is_built_from_its_sources(tmp_path):
    corpus = fake_corpus(tmp_path / "corpus")
    counts = T.build_test_set(tmp_path / "test", 64, corpus, fraction=0.05)
    assert set(counts) == set(T.KINDS) and all(n > 0 for n in counts.values())
    names = {kind: sorted(p.name for p in (tmp_path / "test" / kind).iterdir()) for kind in T.KINDS}
    assert all(n.split("_", 1)[1].startswith(("chelsea", "coffee")) for n in names["texture"])
    assert any("wallpaper" in n for n in names["dark"]) and any("hubble" in n or "retina" in n for n in names["dark"])
    assert any("render" in n for n in names["smooth"]) and any("gradient" in n for n in names["smooth"])
    # Dark crops lie low, bright ones high; whole squares are at the test size already.
    dark = [np.asarray(Image.open(tmp_path / "test" / "dark" / n)) for n in names["dark"] if "wallpaper" in n]
    bright = [np.asarray(Image.open(tmp_path / "test" / "bright" / n)) for n in names["bright"] if "wallpaper" in n]
    assert max(int(d.max()) for d in dark) <= round(255 * 0.30) and min(int(b.min()) for b in bright) >= 255 - round(255 * 0.30)
    assert all(Image.open(tmp_path / "test" / "whole" / n).size == (64, 64) for n in names["whole"])


def test_the_full_flat_grid_holds_black_white_and_the_cube():
    levels = T.FLAT_LEVELS
    assert levels[0] == 0 and levels[-1] == 255 and len(levels) ** 3 == 125


def test_a_perfect_reconstruction_scores_the_cap_and_no_bias():
    ref = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    border, interior = M.border_interior_psnr(ref, ref.clone())
    assert torch.all(border == M.PSNR_CAP_DB) and torch.all(interior == M.PSNR_CAP_DB)
    assert torch.all(M.channel_bias(ref, ref.clone()) == 0)


def test_an_error_only_in_the_ring_reads_there_and_a_shift_reads_back():
    ref = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    rec = ref.clone()
    rec[..., :4, :] += 10  # the top four rows, inside the 4-pixel ring only
    border, interior = M.border_interior_psnr(ref, rec)
    ring_pixels = 32 * 32 - 24 * 24
    expected = 10 * np.log10(255 ** 2 / (100 * (4 * 32) / ring_pixels))
    assert interior.item() == M.PSNR_CAP_DB and border.item() == pytest.approx(expected)
    shifted = ref.clone()
    shifted[:, 1] += 3  # green 3 levels up
    assert M.channel_bias(ref, shifted).tolist() == [[0.0, 3.0, 0.0]]


def test_too_small_images_have_no_interior():
    small = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no interior"):
        M.border_interior_psnr(small, small)


def test_the_flat_field_summary_names_what_black_and_white_come_back_as():
    rows = [{"name": "flat/0000_flat_0_0_0.png", "psnr": 30.0, "bias": [9.0, 10.0, 9.0]},
            {"name": "flat/0001_flat_128_128_128.png", "psnr": 50.0, "bias": [0.5, -0.5, 0.0]},
            {"name": "flat/0002_flat_255_255_255.png", "psnr": 35.0, "bias": [-11.0, -15.0, -13.0]}]
    summary = T.flat_field_summary(rows)
    assert summary["black"] == [9.0, 10.0, 9.0] and summary["white"] == [244.0, 240.0, 242.0]
    assert summary["median_psnr"] == 35.0 and summary["worst_psnr"] == 30.0
    assert summary["worst_abs_bias"] == 15.0 and summary["median_abs_bias"] == 10.0
