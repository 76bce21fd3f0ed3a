"""`ldm train-vae`: Stage A from the command line."""

from __future__ import annotations

import argparse

from ldm_core.config.settings import load_config
from stage_a_vae.config import StageAConfig
from stage_a_vae.train import train_vae
from workflows.arguments import add_training_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train an AutoencoderKL with LDM's loss (L1 + LPIPS + PatchGAN + KL). Writes OUT/vae/ (loads "
                          "with diffusers.AutoencoderKL.from_pretrained), OUT/config.yaml, OUT/metrics.json, "
                          "OUT/images/ and OUT/checkpoints/.")
    add_training_args(parser, "configs/vae/kl-f8-small.yaml")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(StageAConfig, args.config, args.overrides)
    run = train_vae(cfg, args.data, args.out, args.resume)
    print(f"Stage A done: {run / 'vae'}")
    return 0
