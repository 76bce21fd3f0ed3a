"""The real-photograph benchmark end to end at toy size: training copies, the test set of six kinds, the run
without and with the discriminator (with its snapshot at the switch), the tables at two resolutions and the
figures."""

import json

import numpy as np
from PIL import Image

from benchmarks import real_photos


def test_benchmark_runs_with_and_without_the_discriminator(tmp_path):
    photos = tmp_path / "mine"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(photos / f"p{k}.png")
    out = tmp_path / "bench"
    argv = ["--out", str(out), "--photos", str(photos), "--corpus", str(tmp_path / "no-corpus"), "--zoom", "2",
            "--steps", "4", "--compare-gan", "--gan-start", "2", "--test-sizes", "32,64", "--test-fraction", "0.01",
            "model.preset=kl-f8-tiny", "data.resolution=32",
            "train.batch_size=2", "train.progress_bar=false", "train.log_every=1", "train.validate_every=1000",
            "train.latent_stats_images=4", "ema.enabled=false", "data.num_workers=0"]
    assert real_photos.main(argv) == 0
    # Training copies: brought to a shorter side of zoom x R = 64 px, plus scikit-image's photographs.
    copies = sorted((out / "photos").iterdir())
    assert len(copies) == 3 + len(real_photos.SKIMAGE_TRAIN)
    assert all(min(Image.open(p).size) == 64 for p in copies)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gan_start"] == 2 and summary["cpu"]["model"]
    models = ["bicubic-f8", "without-gan", "with-gan-at-2", "with-gan"]
    for size in ("32", "64"):
        rows = [line.split("|") for line in summary["table_markdown"].splitlines() if line.startswith("| texture")]
        assert [r[3].strip() for r in rows if r[2].strip() == size] == models
        # Every kind has its rows; the flat fields are summarised per model.
        assert set(summary["per_kind"][size]["without-gan"]["kinds"]) == {"texture", "whole", "smooth", "dark",
                                                                          "bright", "flat"}
        assert summary["per_kind"][size]["bicubic-f8"]["flat"]["n"] == 8  # a quick run: the cube's corners
    # The discriminator ran only in the second run and only from step 2; its logits are in metrics.json.
    history = json.loads((out / "with_gan" / "metrics.json").read_text())["history"]
    assert [r["step"] for r in history if "logits_real" in r] == [3, 4]
    assert not any("logits_real" in r for r in json.loads((out / "without_gan" / "metrics.json").read_text())["history"])
    # The snapshot at the switch is the autoencoder before any discriminator step.
    assert (out / "with_gan_before" / "config.json").is_file()
    with Image.open(out / "gan_zoom.png") as figure:  # 4 crops x (original, bicubic, 3 autoencoders) at 4x
        assert figure.size == (5 * 128 + 4 * 4, 4 * 128 + 3 * 4)
    with Image.open(out / "kinds.png") as figure:  # five kinds, and black, white and pure blue fields
        assert figure.size == (5 * 128 + 4 * 4, 8 * 128 + 7 * 4)
    # A second call keeps the finished runs instead of training again.
    before = (out / "with_gan" / "metrics.json").stat().st_mtime_ns
    assert real_photos.main(argv) == 0
    assert (out / "with_gan" / "metrics.json").stat().st_mtime_ns == before
