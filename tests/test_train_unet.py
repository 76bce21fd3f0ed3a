"""Stage B and the whole job end to end on builtin:shapes, through the `ldm` command."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel
from PIL import Image

from workflows.cli import main
from ldm_core.config.settings import load_config
from stage_b_diffusion.config import StageBConfig
from workflows.config import LDMConfig
from workflows.train_unet import train_unet

STAGE_A = ["stage_a.model.preset=kl-f8-tiny", "stage_a.data.resolution=32", "stage_a.data.shapes_count=64",
           "stage_a.data.val_count=8", "stage_a.loss.lpips_trunk=random", "stage_a.train.max_steps=4",
           "stage_a.train.batch_size=4", "stage_a.train.latent_stats_images=16", "stage_a.train.progress_bar=false"]
STAGE_B = ["stage_b.model.preset=unet-tiny", "stage_b.model.block_out_channels=null", "stage_b.data.resolution=32",
           "stage_b.data.shapes_count=64",
           "stage_b.data.val_count=8", "stage_b.train.max_steps=4", "stage_b.train.batch_size=4",
           "stage_b.train.progress_bar=false", "stage_b.sampling.grid_images=4", "stage_b.sampling.num_inference_steps=2",
           "stage_b.sampling.sample_every=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    out = root / "run"
    rc = main(["train", "--config", "configs/demo.yaml", "--data", "builtin:shapes", "--out", str(out),
               *STAGE_A, *STAGE_B, f"stage_b.data.latent_cache_dir={root / 'cache'}"])
    assert rc == 0
    return out


@pytest.mark.loss_curves
def test_ldm_train_writes_both_stages_and_a_loadable_pipeline(trained):
    pipe_dir = trained / "stage_b" / "pipeline"
    assert json.loads((pipe_dir / "model_index.json").read_text())["_class_name"] == "LatentDiffusionPipeline"
    # every component loads with plain diffusers classes
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae")
    unet = UNet2DModel.from_pretrained(pipe_dir / "unet")
    assert unet.config.in_channels == vae.config.latent_channels == 4
    assert unet.config.sample_size == 32 // 8
    # the VAE in the pipeline carries Stage A's measured scale times the demo's input scale
    stats = json.loads((trained / "stage_a" / "vae" / "latent_stats.json").read_text())
    input_scale = load_config(LDMConfig, "configs/demo.yaml").stage_b.diffusion.input_scale
    assert vae.config.scaling_factor == pytest.approx(stats["scaling_factor"] * input_scale)
    for name in ("samples_step0000002.png", "samples_final.png", "loss_curves.png"):
        assert (trained / "stage_b" / "images" / name).is_file()


def test_generate_and_eval_samples_commands(trained, tmp_path):
    out = tmp_path / "samples"
    rc = main(["generate", "--model", str(trained / "stage_b" / "pipeline"), "--num-images", "5", "--steps", "2",
               "--scheduler", "ddim", "--seed", "3", "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    pngs = sorted(out.glob("image_*.png"))
    assert len(pngs) == 5 and (out / "grid.png").is_file()
    assert Image.open(pngs[0]).size == (32, 32)
    # same seed, other batch size: the same images
    again = tmp_path / "again"
    main(["generate", "--model", str(trained / "stage_b" / "pipeline"), "--num-images", "5", "--steps", "2",
          "--scheduler", "ddim", "--seed", "3", "--batch-size", "5", "--out", str(again)])
    for a, b in zip(pngs, sorted(again.glob("image_*.png"))):
        diff = np.abs(np.asarray(Image.open(a), dtype=int) - np.asarray(Image.open(b), dtype=int))
        assert diff.max() <= 1
    assert main(["eval-samples", "--dataset", "builtin:shapes", str(out)]) == 0


def _stage_b_cfg(tmp_path, *extra):
    return load_config(StageBConfig, None, [o.replace("stage_b.", "") for o in STAGE_B] +
                       [f"data.latent_cache_dir={tmp_path / 'cache'}", "sampling.sample_every=1000", *extra])


def test_stage_b_resume_matches_uninterrupted(trained, tmp_path):
    vae = trained / "stage_a" / "vae"
    full, part = tmp_path / "full", tmp_path / "part"
    train_unet(_stage_b_cfg(tmp_path, "train.max_steps=6", "train.lr_schedule=constant"), vae, "builtin:shapes", full)
    train_unet(_stage_b_cfg(tmp_path, "train.max_steps=3", "train.lr_schedule=constant"), vae, "builtin:shapes", part)
    train_unet(_stage_b_cfg(tmp_path, "train.max_steps=6", "train.lr_schedule=constant"), vae, "builtin:shapes", part,
               resume="latest")
    a = UNet2DModel.from_pretrained(full / "pipeline" / "unet").state_dict()
    b = UNet2DModel.from_pretrained(part / "pipeline" / "unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vae_without_measured_scale_is_measured_and_recorded(trained, tmp_path, caplog):
    vae_dir = tmp_path / "foreign_vae"
    shutil.copytree(trained / "stage_a" / "vae", vae_dir)
    (vae_dir / "latent_stats.json").unlink()  # like a VAE folder from elsewhere
    out = tmp_path / "run"
    train_unet(_stage_b_cfg(tmp_path, "train.max_steps=1", "train.latent_stats_images=16"), vae_dir,
               "builtin:shapes", out)
    assert "no measured latent scale" in caplog.text
    info = json.loads((out / "metrics.json").read_text())["latent_scale"]
    assert info["source"] == "measured"
    saved = AutoencoderKL.from_pretrained(out / "pipeline" / "vae")
    assert saved.config.scaling_factor == pytest.approx(info["scaling_factor"])


def test_input_scale_multiplies_the_measured_scale_in_the_saved_pipeline_only(trained, tmp_path):
    vae_dir = trained / "stage_a" / "vae"
    measured = json.loads((vae_dir / "latent_stats.json").read_text())["scaling_factor"]
    out = tmp_path / "run"
    train_unet(_stage_b_cfg(tmp_path, "train.max_steps=1", "diffusion.input_scale=2.5"), vae_dir, "builtin:shapes", out)
    info = json.loads((out / "metrics.json").read_text())["latent_scale"]
    assert info["input_scale"] == 2.5 and info["scaling_factor"] == pytest.approx(measured)
    assert info["trained_scaling_factor"] == pytest.approx(2.5 * measured)
    # The pipeline divides by what the U-Net was trained on; the autoencoder's own folder is untouched.
    assert AutoencoderKL.from_pretrained(out / "pipeline" / "vae").config.scaling_factor == pytest.approx(2.5 * measured)
    assert AutoencoderKL.from_pretrained(vae_dir).config.scaling_factor == pytest.approx(measured)


def test_mismatched_unet_and_vae_is_a_clear_error(trained, tmp_path, capsys):
    rc = main(["train-unet", "--vae", str(trained / "stage_a" / "vae"), "--data", "builtin:shapes",
               "--out", str(tmp_path / "r"), "model.preset=unet-tiny", "data.resolution=36",
               f"data.latent_cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a multiple of the VAE's downsampling factor f=8" in err
    assert "Encoding latents" not in err  # refused before any work


def test_cli_reports_config_typos_without_a_traceback(tmp_path, capsys):
    rc = main(["train-vae", "--data", "builtin:shapes", "--out", str(tmp_path / "r"), "train.max_step=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "Unknown config key 'train.max_step'" in err and "max_steps" in err
    assert "Traceback" not in err


def test_cli_reports_a_missing_data_folder(tmp_path, capsys):
    rc = main(["train-vae", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
               "loss.lpips_trunk=random"])
    assert rc == 2 and str(tmp_path / "missing") in capsys.readouterr().err


def test_resuming_with_another_vae_is_refused_before_any_work(trained, tmp_path, capsys):
    from stage_a_vae.config import VAEModelConfig
    from stage_a_vae.architectures import build_autoencoder

    other = tmp_path / "vae8"
    build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", latent_channels=8)).save_pretrained(other)
    run = trained / "stage_b"
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    rc = main(["train-unet", "--config", str(run / "config.yaml"), "--vae", str(other), "--data", "builtin:shapes",
               "--out", str(run), "--resume", "latest", f"data.latent_cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "started with another --vae" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints


def test_built_stage_b_trains_the_unet_on_the_mse_of_its_noise_prediction():
    import copy

    from stage_b_diffusion.networks import build_stage_b
    from stage_b_diffusion.objective import diffusion_loss

    cfg = load_config(StageBConfig, None, ["model.preset=unet-tiny", "data.resolution=32", "ema.enabled=false",
                                         "train.lr_warmup_steps=0"])
    nets = build_stage_b(cfg, latent_channels=4, latent_size=4)
    assert nets.ema is None and nets.unet.config.in_channels == 4 and nets.unet.config.sample_size == 4
    # The initial weights follow from train.seed alone.
    again = build_stage_b(cfg, latent_channels=4, latent_size=4).unet.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in nets.unet.state_dict().items())
    before = copy.deepcopy(nets.unet)
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    # The step as stage_b_diffusion/train.py writes it, less Accelerate and clipping.
    loss, logs = diffusion_loss(nets.unet, latents, nets.noise_scheduler, cfg.diffusion, torch.Generator().manual_seed(7))
    loss.backward()
    nets.optimizer.step()

    # DDPM's objective written out (Ho et al. 2020, eq. 14): the noise first, then the timesteps, from the generator.
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (3,), generator=generator)
    alpha_bar = nets.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        expected = (before(noisy, t).sample - noise).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert logs["loss"] == loss.detach() and logs["t_mean"] == t.float().mean()
    changed = [name for name, p in nets.unet.named_parameters() if not torch.equal(p, before.get_parameter(name))]
    assert len(changed) > 0.9 * len(list(nets.unet.parameters()))


@pytest.mark.loss_curves
def test_sample_scores_are_logged_during_training_and_change_nothing_else(trained, tmp_path):
    """sampling.metrics_every: SWD beside its floor and the shapes' validity in metrics.json, TensorBoard and
    the curves picture, with their cost; the trained weights are those of the same run without them."""
    from safetensors.torch import load_file

    common = [f"--vae={trained / 'stage_a' / 'vae'}", "--data=builtin:shapes", *(o.removeprefix("stage_b.") for o in STAGE_B),
              "sampling.metrics_images=8", f"data.latent_cache_dir={tmp_path / 'cache'}", "ema.enabled=false"]
    assert main(["train-unet", "--config", "unet/unet-small", f"--out={tmp_path / 'with'}", *common,
                 "sampling.metrics_every=2"]) == 0
    assert main(["train-unet", "--config", "unet/unet-small", f"--out={tmp_path / 'without'}", *common]) == 0
    history = json.loads((tmp_path / "with" / "metrics.json").read_text())["history"]
    scored = [row for row in history if "swd" in row]
    assert [row["step"] for row in scored] == [2, 4]
    for row in scored:
        assert row["swd"] > 0 and row["swd_floor"] > 0 and 0 <= row["valid"] <= 1 and row["metrics_seconds"] > 0
    assert len({row["swd_floor"] for row in scored}) == 1  # the floor is computed once, on fixed real images
    assert not any("swd" in row for row in json.loads((tmp_path / "without" / "metrics.json").read_text())["history"])
    weights = [load_file(tmp_path / run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
               for run in ("with", "without")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "with" / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
    assert "samples/swd" in events.Tags()["scalars"] and "samples/swd_floor" in events.Tags()["scalars"]
    assert (tmp_path / "with" / "images" / "loss_curves.png").is_file()
