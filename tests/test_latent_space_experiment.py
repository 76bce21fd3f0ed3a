"""The latent-space experiment's plumbing: its overrides make the runs it says, and its summary reads them."""

import argparse
import json

import pytest

from benchmarks.latent_space_experiment import VARIANTS, finetune_overrides, stage_b_overrides, summarise
from ldm_core.config.preset_files import config_path
from ldm_core.config.settings import load_config
from workflows.config import LDMConfig


@pytest.mark.parametrize("variant", [v for v, o in VARIANTS.items() if o is not None])
def test_every_fine_tune_starts_from_the_demo_and_never_turns_the_discriminator_on(variant):
    cfg = load_config(LDMConfig, config_path("demo.yaml"), finetune_overrides("runs/demo/stage_a/vae", 300)
                      + VARIANTS[variant]).stage_a
    assert cfg.model.pretrained == "runs/demo/stage_a/vae" and cfg.model.preset == "kl-f8-mini"
    assert cfg.train.max_steps == 300 and cfg.loss.disc_start >= cfg.train.max_steps
    assert cfg.loss.l2_warmup_steps == 0 and cfg.loss.reconstruction == "l1"  # LDM's loss throughout
    changed = {o.split("=")[0].split(".", 1)[1] for o in VARIANTS[variant]}
    control = load_config(LDMConfig, config_path("demo.yaml"), finetune_overrides("x", 300)).stage_a
    for key in ("loss.equivariance", "loss.latent_noise", "loss.kl_weight"):
        section, name = key.split(".")
        differs = getattr(getattr(cfg, section), name) != getattr(getattr(control, section), name)
        assert differs == (key in changed), key


def test_stage_b_is_the_demos_but_shorter_with_checkpoints_halfway_and_at_the_end():
    demo = load_config(LDMConfig, config_path("demo.yaml")).stage_b
    cfg = load_config(LDMConfig, config_path("demo.yaml"), stage_b_overrides(2000, 1)).stage_b
    assert cfg.train.max_steps == 2000 and cfg.train.seed == 1 and cfg.train.checkpoint_every == 1000
    assert cfg.train.keep_checkpoints >= 2
    assert (cfg.model, cfg.diffusion, cfg.data) == (demo.model, demo.diffusion, demo.data)
    assert (cfg.train.lr, cfg.train.batch_size) == (demo.train.lr, demo.train.batch_size)


def _report(psnr: float, hf: float) -> dict:
    return {"decoder_under_noise": [{"sigma": s, "psnr": psnr - 10 * s} for s in (0.0, 0.1, 0.2)],
            "equivariance_psnr": {"downscale_2x": 20.0, "rotate_90": 21.0},
            "spectra": {"latents_hf_share": hf},
            "channels": [{"kl_per_position": 7.0, "posterior_over_spread": 0.001}],
            "interpolation_evenness": {"linear": 0.1}, "pca_explained_variance": 0.5}


def test_summary_ranks_each_figure_against_the_mean_valid_share_over_seeds(tmp_path):
    # Valid share rises with PSNR and falls with the high-frequency share, across three autoencoders.
    for variant, psnr, hf, valid in [("as-is", 30.0, 0.5, (0.2, 0.3)), ("fine-tune", 31.0, 0.4, (0.5, 0.4)),
                                     ("eqvae", 32.0, 0.3, (0.7, 0.8))]:
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "inspect.json").write_text(json.dumps(_report(psnr, hf)))
        for seed, v in enumerate(valid):
            run = tmp_path / variant / f"seed{seed}"
            (run / "stage_b").mkdir(parents=True)
            (run / "stage_b" / "metrics.json").write_text(json.dumps({"history": [{"step": 500, "swd": 1.0, "valid": v}]}))
            (run / "scores.json").write_text(json.dumps({
                str(s): {"valid": v * s / 20, "swd": 100.0, "max_class_deviation": 0.05} for s in (10, 20)}))
    args = argparse.Namespace(out=tmp_path, stage_b_steps=20, demo_vae="d", finetune_steps=10, num_images=8)
    result = summarise(args)
    assert result["predictors"]["seeds"] == ["seed0", "seed1"]
    assert result["predictors"]["rho"]["held-out PSNR"] == pytest.approx(1.0)
    assert result["predictors"]["rho"]["latent high-frequency share"] == pytest.approx(-1.0)
    assert result["predictors"]["rho"]["KL per position"] is None  # the same for all: no ranking
    # eqvae against the control (fine-tune), seed by seed: (0.7 - 0.5 + 0.8 - 0.4) / 2 = +30 points.
    assert result["against_control"]["eqvae"] == pytest.approx(30.0)
    assert result["against_control"]["fine-tune"] == pytest.approx(0.0)
    assert "| eqvae | 32.00 | 31.00 |" in result["table_markdown"]
    assert "70.0% / 80.0%" in result["table_markdown"]
    assert (tmp_path / "latent_space_experiment.png").stat().st_size > 0


def test_an_autoencoder_missing_a_seed_limits_the_ranking_to_the_seeds_all_have(tmp_path):
    import shutil

    test_summary_ranks_each_figure_against_the_mean_valid_share_over_seeds(tmp_path)
    shutil.rmtree(tmp_path / "as-is" / "seed1")
    args = argparse.Namespace(out=tmp_path, stage_b_steps=20, demo_vae="d", finetune_steps=10, num_images=8)
    result = summarise(args)
    assert result["predictors"]["seeds"] == ["seed0"]
    assert "seed0, the seeds all of them have" in result["table_markdown"]
    assert result["against_control"]["as-is"] == pytest.approx(100 * (0.2 - 0.5))  # seed 0 only
