"""benchmarks/sample_metric_rank.py at toy size: checkpoints of a Stage B run scored by the exact shapes scorer
and by SWD, the rank correlation between them, and the real shapes blurred and shifted in colour."""

import json

from benchmarks import sample_metric_rank
from workflows.cli import main

TINY = ["stage_a.model.preset=kl-f8-tiny", "stage_a.data.shapes_count=32", "stage_a.data.val_count=4",
        "stage_a.train.max_steps=2", "stage_a.train.batch_size=4", "stage_a.train.latent_stats_images=8",
        "stage_a.train.progress_bar=false", "stage_b.model.preset=unet-tiny", "stage_b.model.block_out_channels=null",
        "stage_b.data.shapes_count=32", "stage_b.data.val_count=4", "stage_b.train.max_steps=4",
        "stage_b.train.batch_size=4", "stage_b.train.checkpoint_every=2", "stage_b.train.keep_checkpoints=4",
        "stage_b.train.progress_bar=false", "stage_b.sampling.grid_images=2", "stage_b.sampling.num_inference_steps=2",
        "stage_b.sampling.metrics_every=1000"]


def test_checkpoints_are_scored_and_ranked(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/demo.yaml", "--data", "builtin:shapes", "--out", str(run), *TINY]) == 0
    out = tmp_path / "bench"
    assert sample_metric_rank.main(["--run", str(run / "stage_b"), "--steps", "2,4", "--num-images", "6",
                                    "--sampler-steps", "2", "--out", str(out)]) == 0
    result = json.loads((out / "sample_metric_rank.json").read_text())
    assert set(result["checkpoints"]) == {"2", "4"}
    assert result["spearman"] is None or -1 <= result["spearman"] <= 1  # None: four steps make no valid shape
    known = result["known"]
    # On real shapes the exact scorer's answers are known: real shapes are valid, and a growing blur or colour
    # shift moves the distance away from the floor's side.
    assert known["real"]["valid"] >= 0.8
    assert known["blurred 4x"]["swd"] > known["blurred 2x"]["swd"] > known["real"]["swd"]
    assert known["colours +30 levels"]["swd"] > known["colours +10 levels"]["swd"] > known["real"]["swd"]
    assert "Spearman rank correlation" in (out / "sample_metric_rank.md").read_text()
