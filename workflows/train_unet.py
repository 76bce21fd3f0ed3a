"""`ldm train-unet`: Stage B with the project's pipeline class, from Python or the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from evaluation.training_scores import SampleScorer
from ldm_core.config.settings import load_config
from ldm_core.data.image_files import BUILTIN_SHAPES
from ldm_core.models.hub import AUTOENCODER, resolve_model_argument
from pipelines.latent_diffusion import LatentDiffusionPipeline
from stage_b_diffusion import train as stage_b
from stage_b_diffusion.config import StageBConfig
from workflows.arguments import add_training_args


def train_unet(cfg: StageBConfig, vae_path: str | Path, data: str, out: str | Path,
               resume: Optional[str] = None) -> Path:
    """Stage B (`stage_b_diffusion.train.train_unet`) saving a `LatentDiffusionPipeline` in `out/pipeline/`, its
    samples scored during training by `evaluation.training_scores.SampleScorer` (`sampling.metrics_every`)."""
    return stage_b.train_unet(cfg, vae_path, data, out, resume, build_pipeline=LatentDiffusionPipeline,
                              build_sample_scorer=_sample_scorer)


def _sample_scorer(held_out, training_images, data: str) -> SampleScorer:
    return SampleScorer(held_out, training_images, exact_shapes=str(data).startswith(BUILTIN_SHAPES))


VAE_HELP = ("the frozen autoencoder: a Stage A run or vae/ folder, any diffusers AutoencoderKL folder, or a Hugging "
            "Face Hub id fetched on first use (org/name[@revision][/subfolder], e.g. stabilityai/sd-vae-ft-mse)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train a UNet2DModel on the scaled latents of a frozen AutoencoderKL. Writes OUT/pipeline/ "
                          "(a LatentDiffusionPipeline) and the same run files as train-vae.")
    parser.add_argument("--vae", required=True, help=VAE_HELP)
    add_training_args(parser, "configs/unet/unet-small.yaml")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(StageBConfig, args.config, args.overrides)
    vae = resolve_model_argument(args.vae, kind=AUTOENCODER, option="--vae")
    run = train_unet(cfg, vae, args.data, args.out, args.resume)
    print(f"Stage B done: {run / 'pipeline'}")
    return 0
