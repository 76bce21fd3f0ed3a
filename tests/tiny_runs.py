"""What the tests of stopping, resuming and run folders share: a tiny run of each stage, a tiny autoencoder
for Stage B, and the `ldm` command's exit code and message.

STAGE_A and STAGE_B are key=value overrides of a 16 px run on builtin:shapes (24 images, batch 2, no EMA)
that checkpoints only when a test says so; a test adds its own steps and schedule after them.
"""

from __future__ import annotations

from pathlib import Path

STAGE_A = ["model.preset=kl-f8-tiny", "model.block_out_channels=[4,4,8,8]", "model.norm_num_groups=2",
           "data.resolution=16", "data.shapes_count=24", "data.val_count=4", "loss.lpips_trunk=random",
           "loss.perceptual_weight=0", "loss.disc_start=2", "loss.disc_channels=4", "loss.disc_num_layers=2",
           "train.batch_size=2", "train.log_every=1", "train.validate_every=1000", "train.checkpoint_every=1000",
           "train.progress_bar=false", "train.latent_stats_images=4", "ema.enabled=false"]
STAGE_B = ["model.preset=unet-tiny", "data.resolution=16", "data.shapes_count=24", "data.val_count=4",
           "train.batch_size=2", "train.log_every=1", "train.checkpoint_every=1000", "train.progress_bar=false",
           "train.latent_stats_images=4", "sampling.sample_every=1000", "sampling.grid_images=2",
           "sampling.num_inference_steps=1", "ema.enabled=false"]


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
