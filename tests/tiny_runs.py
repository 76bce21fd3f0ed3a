"""What the tests of stopping, resuming and run folders share: a tiny run of each stage, a tiny autoencoder
for Stage B, and the `ldm` command's exit code and message.

STAGE_A and STAGE_B are key=value overrides of the shipped presets SMOKE_A and SMOKE_B (16 px runs on
builtin:shapes, batch 2): 24 images, no EMA, logged every step, checkpoints only when a test says so; a
test adds its own steps and schedule after them.
"""

from __future__ import annotations

from pathlib import Path

SMOKE_A, SMOKE_B = "vae/kl-f8-smoke", "unet/unet-smoke"  # the shipped seconds-long presets
STAGE_A = ["data.shapes_count=24", "loss.disc_start=2", "train.log_every=1", "train.validate_every=1000",
           "train.checkpoint_every=1000", "train.progress_bar=false", "ema.enabled=false"]
STAGE_B = ["data.shapes_count=24", "train.log_every=1", "train.checkpoint_every=1000", "train.progress_bar=false",
           "sampling.sample_every=1000", "sampling.num_inference_steps=1", "ema.enabled=false"]


def save_tiny_vae(path: Path) -> Path:
    """A random AutoencoderKL (4 latent channels, f=8, the same weights every time) saved to `path`, as
    Stage B's --vae."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(4, 4, 8, 8), layers_per_block=1, norm_num_groups=2, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(path)
    return path


def run_cli(capsys, argv):
    """(exit code, stderr) of `ldm argv`."""
    from workflows.cli import main

    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err
