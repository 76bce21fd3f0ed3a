"""`ldm demo` (what `make demo` runs) end to end with tiny overrides: every output its summary names exists."""

import json
from pathlib import Path

from workflows.cli import main

TINY = ["stage_a.model.preset=kl-f8-tiny", "stage_a.data.resolution=32", "stage_a.data.shapes_count=48",
        "stage_a.data.val_count=8", "stage_a.train.max_steps=2", "stage_a.train.batch_size=4",
        "stage_a.train.latent_stats_images=8", "stage_a.train.progress_bar=false",
        "stage_b.model.preset=unet-tiny", "stage_b.model.block_out_channels=null", "stage_b.data.resolution=32",
        "stage_b.data.shapes_count=48",
        "stage_b.data.val_count=8", "stage_b.train.max_steps=2", "stage_b.train.batch_size=4",
        "stage_b.train.progress_bar=false", "stage_b.sampling.grid_images=2", "stage_b.sampling.num_inference_steps=2",
        "evaluation.num_images=4", "evaluation.num_inference_steps=2"]


def test_demo_writes_every_output_its_summary_names_and_does_not_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY, f"stage_b.data.latent_cache_dir={tmp_path / 'cache'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage_a"]["steps"] == 2 and summary["stage_b"]["steps"] == 2
    assert summary["samples"]["n"] == 4 and 0.0 <= summary["samples"]["validity"] <= 1.0
    assert "| vae |" in summary["bench_recon"] and "bicubic-f8" in summary["bench_recon"]
    assert summary["stage_a"]["bicubic_psnr"] > 0 and summary["stage_a"]["heldout_psnr"] > 0
    assert 0.0 <= summary["stage_a"]["reconstructions_valid"] <= 1.0
    # The plain-diffusers path scored the same number of images from the same noise.
    plain = json.loads((out / "samples" / "scores_plain_diffusers.json").read_text())
    assert plain["n"] == summary["samples_plain_diffusers"]["n"] == 4
    for name, path in summary["outputs"].items():
        if name != "tensorboard":
            assert Path(path).exists(), name
    printed = capsys.readouterr().out
    assert "# two-stage-ldm demo" in printed
    # A finished demo is not trained again: the second call prints the summary and says how to start anew.
    before = (out / "summary.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), *TINY]) == 0
    assert "already complete" in capsys.readouterr().out and (out / "summary.json").stat().st_mtime_ns == before
