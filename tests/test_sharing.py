"""Sharing a run: the model card every saved folder carries, `ldm push`, and the Weights & Biases tracker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from workflows.cli import main

TINY_A = ["model.preset=kl-f8-tiny", "train.max_steps=4", "train.batch_size=4", "data.shapes_count=40",
          "data.val_count=4", "train.validate_every=4", "train.checkpoint_every=4", "train.latent_stats_images=16",
          "loss.perceptual_weight=0", "train.progress_bar=false", "data.resolution=32"]
TINY_B = ["model.preset=unet-tiny", "train.max_steps=4", "train.batch_size=4", "data.shapes_count=40", "data.val_count=4",
          "sampling.grid_images=2", "sampling.num_inference_steps=2", "train.checkpoint_every=4", "train.log_every=2",
          "train.progress_bar=false", "data.resolution=32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny Stage A, and a Stage B on it logging to Weights & Biases in offline mode."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train-vae", "--config", "vae/kl-f8-small", "--data", "builtin:shapes", "--out", str(root / "a"),
                 *TINY_A]) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        assert main(["train-unet", "--config", "unet/unet-small", "--vae", str(root / "a" / "vae"), "--data",
                     "builtin:shapes", "--out", str(root / "b"), *TINY_B, "train.report_to=all"]) == 0
    return root


def test_the_autoencoders_card_parses_and_carries_the_runs_figures(runs):
    from huggingface_hub import ModelCard

    card = ModelCard.load(runs / "a" / "vae" / "README.md")
    assert card.data.library_name == "diffusers" and "two-stage-ldm" in card.data.tags
    metrics = json.loads((runs / "a" / "metrics.json").read_text())
    assert f"| {metrics['validation']['psnr']:.4g} |" in card.text
    assert f"| {metrics['latent_stats']['scaling_factor']:.4g} |" in card.text
    assert "| steps | 4 |" in card.text and "![reconstructions.png](reconstructions.png)" in card.text
    assert (runs / "a" / "vae" / "reconstructions.png").is_file()
    assert "model:\n  preset: kl-f8-tiny" in card.text  # the resolved config


def test_the_pipelines_card_names_its_task_and_autoencoder(runs):
    from huggingface_hub import ModelCard

    card = ModelCard.load(runs / "b" / "pipeline" / "README.md")
    assert card.data.pipeline_tag == "unconditional-image-generation" and card.data.base_model is None
    history = json.loads((runs / "b" / "metrics.json").read_text())["history"]
    last_loss = [row["loss"] for row in history if "loss" in row][-1]
    assert f"| final training loss | {last_loss:.4g} |" in card.text
    assert str(runs / "a" / "vae") in card.text and (runs / "b" / "pipeline" / "samples.png").is_file()


def test_weights_and_biases_offline_writes_its_run_files(runs):
    wandb_runs = list((runs / "b" / "logs" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("run-*.wandb"))
    assert list((runs / "b" / "logs" / "stage_b").glob("events.out.tfevents.*"))  # TensorBoard too ("all")


def test_report_to_wandb_without_the_package_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train-vae", "--config", "vae/kl-f8-small", "--data", "builtin:shapes", "--out", str(tmp_path / "r"),
                 *TINY_A, "train.report_to=wandb"]) == 2
    assert "needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.fixture
def stand_in_upload(monkeypatch):
    """HfApi's two network calls replaced by recorders: what would be created and committed."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = {"repos": [], "commits": []}

    def create_repo(self, repo_id, **kwargs):
        calls["repos"].append((repo_id, kwargs.get("private")))

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commits"].append((repo_id, sorted(op.path_in_repo for op in operations), kwargs.get("commit_message")))
        return type("Commit", (), {"commit_url": f"https://hub.test/{repo_id}/commit/1"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_uploads_exactly_the_folders_files_in_one_commit(runs, stand_in_upload, capsys):
    assert main(["push", str(runs / "b"), "me/tiny-ldm", "--private"]) == 0
    folder = runs / "b" / "pipeline"
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert stand_in_upload["repos"] == [("me/tiny-ldm", True)]
    assert stand_in_upload["commits"] == [("me/tiny-ldm", expected, "Upload pipeline with two-stage-ldm")]
    assert "README.md" in expected and "samples.png" in expected
    assert "Uploaded to https://hub.test/me/tiny-ldm/commit/1" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["{runs}", "me/x"], "holds 2 models"),
    (["{runs}/a/vae", "not a repo id"], "is not a Hub repository id"),
    (["{runs}/a/checkpoints", "me/x"], "holds no model"),
])
def test_push_refuses_what_it_cannot_upload_in_one_line(runs, stand_in_upload, capsys, args, message, tmp_path):
    # A folder holding both stages' models, as `ldm train` writes it, is ambiguous.
    both = tmp_path / "both"
    (both / "stage_a").mkdir(parents=True)
    (both / "stage_b").mkdir(parents=True)
    os.symlink(runs / "a" / "vae", both / "stage_a" / "vae")
    os.symlink(runs / "b" / "pipeline", both / "stage_b" / "pipeline")
    args = [a.replace("{runs}", str(both) if a == "{runs}" else str(runs)) for a in args]
    assert main(["push", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and stand_in_upload["commits"] == []


def test_push_offline_says_where_to_run_it(runs, stand_in_upload, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["push", str(runs / "a" / "vae"), "me/vae"]) == 2
    assert "needs the network and this machine is offline" in capsys.readouterr().err
    assert stand_in_upload["repos"] == [] and stand_in_upload["commits"] == []
