"""`ldm train`: Stage A, then Stage B on its frozen autoencoder, then the saved pipeline.

The run folder holds `stage_a/` (with `vae/`), `stage_b/` (with `pipeline/`), and `pipeline` is the
folder to give to `ldm generate --model`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Optional

from ldm_core.training.accelerator import check_mixed_precision, check_trackers
from ldm_core.training.checkpoints import LATEST, CheckpointError, check_resumable
from ldm_core.config.settings import load_config
from ldm_core.models.hub import AUTOENCODER, resolve_model_argument
from stage_a_vae.train import train_vae
from workflows.arguments import add_training_args
from workflows.config import LDMConfig
from workflows.train_unet import VAE_HELP, train_unet

logger = logging.getLogger("ldm.train")


def train_both_stages(cfg: LDMConfig, data: str, out: str | Path, vae: Optional[str] = None,
                      resume: Optional[str] = None) -> dict:
    """Run both stages into `out`; `vae` (an AutoencoderKL folder) skips Stage A.

    Returns the output paths (`vae`, `pipeline`, `stage_b`) and `seconds`, each stage's wall time in this
    process ({"stage_a", "stage_b"}; a resumed stage counts only what it ran now)."""
    out = Path(out)
    seconds = {}
    if vae is None:
        started = time.monotonic()
        stage_a_dir = train_vae(cfg.stage_a, data, out / "stage_a", resume=resume)
        seconds["stage_a"] = round(time.monotonic() - started, 1)
        vae = str(stage_a_dir / "vae")
    else:
        logger.info("Skipping Stage A: using the autoencoder in %s", vae)
    started = time.monotonic()
    stage_b_dir = train_unet(cfg.stage_b, vae, data, out / "stage_b", resume=resume)
    seconds["stage_b"] = round(time.monotonic() - started, 1)
    return {"vae": Path(vae), "pipeline": stage_b_dir / "pipeline", "stage_b": stage_b_dir, "seconds": seconds}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Stage A, then Stage B on its frozen VAE, then the pipeline. Overrides take the stage "
                          "prefix: stage_a.train.max_steps=500 stage_b.train.lr=1e-4.")
    parser.add_argument("--vae", help=f"skip Stage A and use {VAE_HELP}")
    add_training_args(parser, "configs/demo.yaml")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(LDMConfig, args.config, args.overrides)
    vae = str(resolve_model_argument(args.vae, kind=AUTOENCODER, option="--vae")) if args.vae else None
    if args.resume and args.resume != LATEST:
        # One checkpoint folder belongs to one stage; `ldm train` resumes each stage from its own.
        raise CheckpointError(f"--resume {args.resume}: `ldm train` resumes both stages, each from its own "
                              f"checkpoints; use --resume latest (or resume one stage with train-vae / "
                              f"train-unet and that stage's checkpoint folder).")
    # Both stages are checked now, so a Stage B mismatch does not surface only after Stage A has run.
    check_mixed_precision(cfg.stage_a.train, "stage_a.train.mixed_precision")
    check_mixed_precision(cfg.stage_b.train, "stage_b.train.mixed_precision")
    check_trackers(cfg.stage_a.train, "stage_a.train.report_to")
    check_trackers(cfg.stage_b.train, "stage_b.train.report_to")
    if vae is None:
        check_resumable(Path(args.out) / "stage_a", args.resume, cfg.stage_a.model_fingerprint())
    check_resumable(Path(args.out) / "stage_b", args.resume, cfg.stage_b.model_fingerprint())
    paths = train_both_stages(cfg, args.data, args.out, vae=vae, resume=args.resume)
    print(f"Done. Generate with: ldm generate --model {paths['pipeline']} --num-images 16 --out samples")
    return 0
