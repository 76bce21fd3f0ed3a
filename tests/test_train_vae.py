"""Stage A end to end on builtin:shapes: learning, export, reload, resume, the discriminator switch."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from ldm_core.config.settings import load_config
from ldm_core.data.in_memory import load_dataset
from ldm_core.image_values import to_model_input
from stage_a_vae.config import StageAConfig
from stage_a_vae.train import train_vae

BASE = [
    "model.preset=kl-f8-tiny", "model.block_out_channels=[16,16,32,32]", "model.norm_num_groups=8",
    "data.resolution=32", "data.shapes_count=96", "data.val_count=16",
    "loss.lpips_trunk=random", "train.batch_size=8", "train.lr=1e-4", "train.lr_schedule=constant",
    "train.log_every=1", "train.validate_every=1000", "train.checkpoint_every=1000", "train.progress_bar=false",
    "train.latent_stats_images=32", "ema.enabled=false",
]


def _cfg(*extra):
    return load_config(StageAConfig, None, BASE + list(extra))


DISC_START = 60


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage_a") / "run"
    # The demo recipe's fast start (lr 5e-4, Adam betas (0.9, 0.99), squared error until the discriminator),
    # so that 80 steps show the learning.
    train_vae(_cfg("train.max_steps=80", f"loss.disc_start={DISC_START}", "loss.perceptual_weight=0",
                   "train.lr=5e-4", "train.adam_beta1=0.9", "train.adam_beta2=0.99", "train.disc_adam_beta1=0.5",
                   "train.disc_adam_beta2=0.9", f"loss.l2_warmup_steps={DISC_START}", "train.lr_warmup_steps=10",
                   "train.lr_schedule=cosine", "train.validate_every=30"), "builtin:shapes", out)
    return out


def test_training_raises_validation_psnr(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    psnr = [r["val_psnr"] for r in metrics["history"] if "val_psnr" in r]
    assert len(psnr) >= 3  # step 0 (the baseline), every 30 steps, final
    # Measured +3.2 dB (9.7 -> 12.9 dB); an untrained or broken loop stays within 1 dB.
    assert psnr[-1] > psnr[0] + 1.5, psnr


@pytest.mark.loss_curves
def test_run_folder_is_self_describing(trained_run):
    for name in ("config.yaml", "metrics.json", "run_info.json", "vae/config.json",
                 "vae/latent_stats.json", "images/recon_final.png", "images/loss_curves.png"):
        assert (trained_run / name).is_file(), name
    info = json.loads((trained_run / "run_info.json").read_text())
    assert info["lpips_trunk"] == "none" and info["exported_weights"] == "raw"
    assert any((trained_run / "logs").rglob("events.out.tfevents.*"))


def test_discriminator_switches_on_at_disc_start(trained_run):
    rows = json.loads((trained_run / "metrics.json").read_text())["history"]
    train_rows = [r for r in rows if "rec" in r]
    # `step` is logged after the update, so the update of optimizer step s is logged as s + 1.
    assert all("d_loss" not in r for r in train_rows if r["step"] <= DISC_START)
    assert all("d_loss" in r and r["d_weight"] > 0 for r in train_rows if r["step"] > DISC_START)
    # The game over the run is readable from metrics.json: the discriminator's mean logits on real and
    # reconstructed images, which a hinge loss pushes apart once it learns to tell them.
    on = [r for r in train_rows if r["step"] > DISC_START]
    assert all(all(k in r and r[k] == r[k] for k in ("logits_real", "logits_fake")) for r in on)
    assert sum(r["logits_real"] - r["logits_fake"] for r in on) > 0


def test_saved_vae_reloads_with_plain_diffusers(trained_run):
    vae = AutoencoderKL.from_pretrained(trained_run / "vae").eval()
    stats = json.loads((trained_run / "vae" / "latent_stats.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    assert vae.config.scaling_factor != pytest.approx(0.18215)  # measured, not SD's placeholder
    again = AutoencoderKL.from_pretrained(trained_run / "vae").eval()
    x = to_model_input(torch.from_numpy(load_dataset("builtin:shapes", 32, shapes_count=4).images))
    with torch.no_grad():
        a = vae.decode(vae.encode(x).latent_dist.mode()).sample
        b = again.decode(again.encode(x).latent_dist.mode()).sample
    assert torch.equal(a, b)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    full = tmp_path / "full"
    train_vae(_cfg("train.max_steps=6", "loss.disc_start=3"), "builtin:shapes", full)
    part = tmp_path / "part"
    train_vae(_cfg("train.max_steps=4", "loss.disc_start=3"), "builtin:shapes", part)
    train_vae(_cfg("train.max_steps=6", "loss.disc_start=3"), "builtin:shapes", part, resume="latest")

    def losses(run):
        rows = json.loads((run / "metrics.json").read_text())["history"]
        return [(r["step"], r["total"], r.get("d_loss")) for r in rows if "total" in r]

    assert losses(full) == losses(part)
    a = AutoencoderKL.from_pretrained(full / "vae").state_dict()
    b = AutoencoderKL.from_pretrained(part / "vae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume(tmp_path):
    from ldm_core.training.run_folder import RunFolderError

    out = tmp_path / "run"
    train_vae(_cfg("train.max_steps=1"), "builtin:shapes", out)
    assert json.loads((out / "run_info.json").read_text())["lpips_trunk"] == "random"  # always recorded
    with pytest.raises(RunFolderError, match="--resume latest"):
        train_vae(_cfg("train.max_steps=1"), "builtin:shapes", out)



def test_the_discriminator_keeps_its_own_adam_betas_and_lr_schedule(tmp_path):
    out = tmp_path / "run"
    train_vae(_cfg("train.max_steps=4", "loss.disc_start=0", "loss.perceptual_weight=0", "train.adam_beta1=0.9",
                   "train.adam_beta2=0.99", "train.disc_adam_beta1=0.5", "train.disc_adam_beta2=0.9",
                   "train.lr_schedule=cosine", "train.disc_lr_schedule=constant", "train.checkpoint_every=2"),
              "builtin:shapes", out)
    state = torch.load(out / "checkpoints" / "step-0000002" / "training_state.pt", weights_only=False)
    assert tuple(state["opt_ae"]["param_groups"][0]["betas"]) == (0.9, 0.99)
    assert tuple(state["opt_d"]["param_groups"][0]["betas"]) == (0.5, 0.9)
    # Halfway through a cosine schedule the autoencoder's rate is half of lr; the discriminator's stays at lr.
    assert state["opt_ae"]["param_groups"][0]["lr"] == pytest.approx(0.5e-4)
    assert state["opt_d"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    # Unset, the discriminator follows the autoencoder (LDM: the same betas and rates for both).
    unset = _cfg("train.lr_schedule=cosine").train
    assert unset.disc_adam_beta1 is None and unset.disc_adam_beta2 is None and unset.disc_schedule == "cosine"


TINY = ["model.preset=kl-f8-tiny", "model.block_out_channels=[4,4,8,8]", "model.norm_num_groups=2",
        "data.resolution=16", "loss.perceptual_weight=0", "loss.disc_start=2", "loss.disc_channels=4",
        "loss.disc_num_layers=2"]


def _initial_discriminator(cfg):
    """The discriminator's weights as `build_stage_a` draws them from `train.seed`."""
    from stage_a_vae.networks import build_stage_a

    return {k: v.clone() for k, v in build_stage_a(cfg).discriminator.state_dict().items()}


def _run_stage_a(tmp_path, name, *extra):
    """A tiny Stage A run of 2 steps; its config, its last checkpoint's tensors and its logged rows."""
    from ldm_core.training.checkpoints import list_checkpoints, load_checkpoint

    cfg = _cfg(*TINY, "data.shapes_count=24", "data.val_count=4", "train.batch_size=2", "train.max_steps=2",
               "train.log_every=1", "train.validate_every=1000", "train.checkpoint_every=1000",
               "train.progress_bar=false", "train.latent_stats_images=4", "ema.enabled=false", *extra)
    run = train_vae(cfg, "builtin:shapes", tmp_path / name)
    rows = json.loads((run / "metrics.json").read_text())["history"]
    return cfg, load_checkpoint(list_checkpoints(run / "checkpoints")[-1]).models, rows


def test_before_disc_start_the_step_updates_the_autoencoder_and_leaves_the_discriminator_alone(tmp_path):
    cfg, models, rows = _run_stage_a(tmp_path, "off", "loss.disc_start=2")
    initial = _initial_discriminator(cfg)
    assert all(torch.equal(v, initial[k]) for k, v in models["discriminator"].items())
    logged = [r for r in rows if "rec" in r]
    assert len(logged) == 2 and all("d_loss" not in r and r["g_loss"] == 0.0 for r in logged)


def test_from_disc_start_the_step_updates_the_discriminator_after_the_autoencoder(tmp_path):
    cfg, models, rows = _run_stage_a(tmp_path, "on", "loss.disc_start=1")
    initial = _initial_discriminator(cfg)
    assert not all(torch.equal(v, initial[k]) for k, v in models["discriminator"].items())
    first, second = [r for r in rows if "rec" in r]
    assert "d_loss" not in first  # step 0: before disc_start
    assert {"rec", "g_loss", "d_loss", "logits_real", "logits_fake"} <= second.keys()
