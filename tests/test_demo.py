"""`ldm demo` (what `make demo` runs) end to end with tiny overrides: every output its summary names exists."""

import json
from pathlib import Path

import pytest

from workflows.cli import main

TINY = ["stage_a.model.preset=kl-f8-tiny", "stage_a.data.resolution=32", "stage_a.data.shapes_count=48",
        "stage_a.data.val_count=8", "stage_a.train.max_steps=2", "stage_a.train.batch_size=4",
        "stage_a.train.latent_stats_images=8", "stage_a.train.progress_bar=false",
        "stage_b.model.preset=unet-tiny", "stage_b.model.block_out_channels=null", "stage_b.data.resolution=32",
        "stage_b.data.shapes_count=48",
        "stage_b.data.val_count=8", "stage_b.train.max_steps=2", "stage_b.train.batch_size=4",
        "stage_b.train.progress_bar=false", "stage_b.sampling.grid_images=2", "stage_b.sampling.num_inference_steps=2",
        "evaluation.num_images=4", "evaluation.num_inference_steps=2", "evaluation.recon_images=8"]


@pytest.mark.loss_curves  # the summary names the loss curves among its outputs
def test_demo_writes_every_output_its_summary_names_and_does_not_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY, f"stage_b.data.latent_cache_dir={tmp_path / 'cache'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage_a"]["steps"] == 2 and summary["stage_b"]["steps"] == 2
    assert summary["samples"]["n"] == 4 and 0.0 <= summary["samples"]["validity"] <= 1.0
    assert "| vae |" in summary["bench_recon"] and "bicubic-f8" in summary["bench_recon"]
    assert summary["stage_a"]["bicubic_psnr"] > 0 and summary["stage_a"]["heldout_psnr"] > 0
    assert 0.0 <= summary["stage_a"]["reconstructions_valid"] <= 1.0 and summary["stage_a"]["recon_images"] == 8
    assert json.loads((out / "bench_recon" / "results.json").read_text())["meta"]["num_images_requested"] == 8
    # Shapes in the colours held out of training are benchmarked beside the training colours.
    assert summary["stage_a"]["unseen_colours_psnr"] > 0 and "| vae |" in summary["bench_recon_unseen_colours"]
    assert summary["stage_a"]["unseen_colours_bicubic_psnr"] != summary["stage_a"]["bicubic_psnr"]
    # Each part's wall time and the machine it ran on.
    seconds = summary["seconds"]
    assert set(seconds) == {"stage_a", "stage_b", "sampling", "sampling_plain_diffusers", "bench_recon"}
    assert all(value >= 0 for value in seconds.values()) and sum(seconds.values()) <= summary["wall_minutes"] * 60 + 1
    assert summary["cpu"]["model"] and {"avx512", "avx512_bf16", "amx"} <= set(summary["cpu"])
    assert summary["precision"] == {"stage_a": "no", "stage_b": "no"}
    # The plain-diffusers path scored the same number of images from the same noise.
    plain = json.loads((out / "samples" / "scores_plain_diffusers.json").read_text())
    assert plain["n"] == summary["samples_plain_diffusers"]["n"] == 4
    for name, path in summary["outputs"].items():
        if name != "tensorboard":
            assert Path(path).exists(), name
    printed = capsys.readouterr().out
    assert "# two-stage-ldm demo" in printed and "stage a" in printed and summary["cpu"]["model"] in printed
    # A finished demo is not trained again: the second call prints the summary and says how to start anew.
    before = (out / "summary.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), *TINY]) == 0
    assert "already complete" in capsys.readouterr().out and (out / "summary.json").stat().st_mtime_ns == before


def test_class_conditional_demo_guides_both_sampling_paths_and_scores_the_requested_classes(tmp_path):
    """`ldm demo stage_b.model.num_classes=3 evaluation.guidance_scale=W`: the pipeline and the hand-written
    sampler get the same classes (each in turn) and guidance, and both are scored against them."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY, "stage_b.model.num_classes=3", "evaluation.guidance_scale=2",
                 f"stage_b.data.latent_cache_dir={tmp_path / 'cache'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampler"].endswith("guidance 2")
    labels = json.loads((out / "samples" / "labels.json").read_text())
    assert labels["guidance_scale"] == 2.0
    assert [labels["labels"][f"image_{i:05d}.png"] for i in range(4)] == ["circle", "square", "triangle", "circle"]
    plain = json.loads((out / "samples" / "scores_plain_diffusers.json").read_text())
    for scores in (summary["samples"], summary["samples_plain_diffusers"]):
        assert 0.0 <= scores["class_match"] <= scores["validity"]
    assert [c["n"] for c in plain["class_match_by_class"].values()] == [2, 1, 1]


def test_guidance_needs_a_class_conditional_stage_b(tmp_path, capsys):
    """Refused before any training, not after it at sampling time."""
    assert main(["demo", "--out", str(tmp_path / "demo"), *TINY, "evaluation.guidance_scale=2"]) == 2
    assert "guidance needs stage_b.model.num_classes > 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
