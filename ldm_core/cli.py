"""The `ldm` command.

    ldm train-vae   --config configs/vae/kl-f8-small.yaml --data DIR|builtin:shapes --out RUN [key=value ...]
    ldm train-unet  --config configs/unet/unet-small.yaml --vae RUN/vae --data ... --out RUN [key=value ...]
    ldm train       --config configs/demo.yaml --data ... --out RUN [--vae DIR] [key=value ...]
    ldm generate    --model RUN/pipeline --num-images N --steps S --scheduler NAME --seed S --out DIR
    ldm eval-samples --dataset builtin:shapes DIR
    ldm bench-recon --vae A [--vae B ...] --data DIR --resolution R
    ldm demo        [--out DIR]

Every training command takes `key=value` overrides after its flags (for example
`train.max_steps=2000 loss.kl_weight=1e-6`); `ldm <command> --help` lists the flags.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

# Commands implemented in their own modules: name -> (module, one-line help).
_MODULE_COMMANDS = {
    "generate": ("pipelines.generate", "generate images from noise with a saved pipeline"),
    "eval-samples": ("evaluation.eval_samples", "score generated images (validity/coverage on builtin:shapes, FID)"),
    "bench-recon": ("evaluation.bench_recon", "benchmark reconstruction fidelity of KL autoencoders"),
}



def _user_errors() -> tuple[type, ...]:
    from ldm_core.checkpoint import CheckpointError
    from ldm_core.config import ConfigError
    from ldm_core.data import DataError
    from ldm_core.pretrained import MissingWeightsError
    from ldm_core.training import RunFolderError

    # OSError covers folders that cannot be created or written (a path under a file, no permission, a
    # full disk): the user fixes those, so they get a message, not a traceback.
    return (ConfigError, DataError, MissingWeightsError, CheckpointError, RunFolderError, FloatingPointError,
            OSError, ValueError)


def _message(err: BaseException) -> str:
    """One line for the user; a bare OSError gets the path and what to check."""
    if isinstance(err, OSError) and err.strerror and err.filename and str(err).startswith("[Errno"):
        return (f"{err.strerror}: {err.filename}. Check that the path is right and that its folder can be "
                f"written, or choose another one.")
    return " ".join(str(err).split()) or type(err).__name__


def _add_training_args(p: argparse.ArgumentParser, config_example: str) -> None:
    p.add_argument("--config", help=f"YAML preset, e.g. {config_example} (defaults are used for keys it omits)")
    p.add_argument("--data", required=True, help="image folder (searched recursively) or builtin:shapes")
    p.add_argument("--out", required=True, help="run folder to create (checkpoints, weights, images, metrics)")
    p.add_argument("--resume", help="continue a run: 'latest' or a checkpoint folder RUN/checkpoints/step-NNNNNNN")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=2000")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm", description="Two-stage latent diffusion: train a KL autoencoder (Stage A), a latent U-Net "
                                "(Stage B), generate images, and benchmark reconstructions.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with `ldm demo`. Run `ldm COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-vae", help="Stage A: train the KL autoencoder",
                       description="Train an AutoencoderKL with LDM's loss (L1 + LPIPS + PatchGAN + KL). Writes "
                                   "OUT/vae/ (loads with diffusers.AutoencoderKL.from_pretrained), OUT/config.yaml, "
                                   "OUT/metrics.json, OUT/images/ and OUT/checkpoints/.")
    _add_training_args(p, "configs/vae/kl-f8-small.yaml")

    p = sub.add_parser("train-unet", help="Stage B: train the latent U-Net on a frozen autoencoder",
                       description="Train a UNet2DModel on the scaled latents of a frozen AutoencoderKL. Writes "
                                   "OUT/pipeline/ (a LatentDiffusionPipeline) and the same run files as train-vae.")
    p.add_argument("--vae", required=True, help="a Stage A vae/ folder or any diffusers AutoencoderKL folder")
    _add_training_args(p, "configs/unet/unet-small.yaml")

    p = sub.add_parser("train", help="both stages and the saved pipeline in one run",
                       description="Stage A, then Stage B on its frozen VAE, then the pipeline. Overrides take the "
                                   "stage prefix: stage_a.train.max_steps=500 stage_b.train.lr=1e-4.")
    p.add_argument("--vae", help="use this AutoencoderKL folder and skip Stage A")
    _add_training_args(p, "configs/demo.yaml")

    p = sub.add_parser("demo", help="the whole job on builtin:shapes (what `make demo` runs)",
                       description="Train both stages on builtin:shapes with the small presets, generate 64 images, "
                                   "score them, benchmark the VAE's reconstructions, and print a summary.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of configs/demo.yaml")

    for name, (module, help_text) in _MODULE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "accelerate", "PIL", "matplotlib", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        return _dispatch(args)
    except KeyboardInterrupt as err:  # a TrainingInterrupted says where its checkpoint went
        print(str(err) or "Interrupted. Resume a training run with the same command plus --resume latest.",
              file=sys.stderr)
        return 130
    except _user_errors() as err:  # a message for the user, not a traceback
        print(f"ldm {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from ldm_core.config import load_config

    if getattr(args, "_module", None):
        return int(importlib.import_module(args._module).main(args) or 0)
    if args.command == "train-vae":
        from stage_a_vae.config import StageAConfig
        from stage_a_vae.train import train_vae

        cfg = load_config(StageAConfig, args.config, args.overrides)
        run = train_vae(cfg, args.data, args.out, args.resume)
        print(f"Stage A done: {run / 'vae'}")
    elif args.command == "train-unet":
        from stage_b_diffusion.config import StageBConfig
        from stage_b_diffusion.train import train_unet

        cfg = load_config(StageBConfig, args.config, args.overrides)
        run = train_unet(cfg, args.vae, args.data, args.out, args.resume)
        print(f"Stage B done: {run / 'pipeline'}")
    elif args.command == "train":
        from ldm_core.checkpoint import LATEST, CheckpointError, check_resumable
        from pipelines.config import LDMConfig
        from pipelines.train_all import train_both_stages

        cfg = load_config(LDMConfig, args.config, args.overrides)
        if args.resume and args.resume != LATEST:
            # One checkpoint folder belongs to one stage; `ldm train` resumes each stage from its own.
            raise CheckpointError(f"--resume {args.resume}: `ldm train` resumes both stages, each from its own "
                                  f"checkpoints; use --resume latest (or resume one stage with train-vae / "
                                  f"train-unet and that stage's checkpoint folder).")
        # Both stages are checked now, so a Stage B mismatch does not surface only after Stage A has run.
        if args.vae is None:
            check_resumable(Path(args.out) / "stage_a", args.resume, cfg.stage_a.model_fingerprint())
        check_resumable(Path(args.out) / "stage_b", args.resume, cfg.stage_b.model_fingerprint())
        paths = train_both_stages(cfg, args.data, args.out, vae=args.vae, resume=args.resume)
        print(f"Done. Generate with: ldm generate --model {paths['pipeline']} --num-images 16 --out samples")
    elif args.command == "demo":
        from pipelines.demo import run_demo

        run_demo(Path(args.out), args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
