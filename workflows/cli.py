"""The `ldm` command.

    ldm train-vae   --config configs/vae/kl-f8-small.yaml --data DIR|builtin:shapes --out RUN [key=value ...]
    ldm train-unet  --config configs/unet/unet-small.yaml --vae RUN/vae --data ... --out RUN [key=value ...]
    ldm train       --config configs/demo.yaml --data ... --out RUN [--vae DIR] [key=value ...]
    ldm generate    --model RUN/pipeline --num-images N --steps S --scheduler NAME --seed S --out DIR [--overwrite]
    ldm eval-samples --dataset builtin:shapes DIR
    ldm bench-recon --vae A [--vae B ...] --data DIR --resolution R
    ldm inspect-vae --vae A --data DIR --out DIR
    ldm push        RUN/pipeline org/name
    ldm demo        [--out DIR]

A model argument (--vae, --model) is a local folder or a Hugging Face Hub id (org/name[@revision][/subfolder])
fetched on first use (ldm_core/models/hub.py); --data hf:org/name[:split] names a Hub dataset.

Every training command takes `key=value` overrides after its flags (for example
`train.max_steps=2000 loss.kl_weight=1e-6`); `ldm <command> --help` lists the flags.

Every command is a module with `add_arguments(parser)` and `main(args) -> exit code`, listed in
`COMMANDS`; a module is imported only when its command runs (or when the parser is built for --help).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

DEBUG_ENV = "LDM_DEBUG"

# name -> (module, one-line help), in the order `ldm --help` lists them.
COMMANDS = {
    "train-vae": ("workflows.train_vae", "Stage A: train the KL autoencoder"),
    "train-unet": ("workflows.train_unet", "Stage B: train the latent U-Net on a frozen autoencoder"),
    "train": ("workflows.train_all", "both stages and the saved pipeline in one run"),
    "demo": ("workflows.demo", "the whole job on builtin:shapes (what `make demo` runs)"),
    "generate": ("workflows.generate", "generate images from noise with a saved pipeline"),
    "eval-samples": ("evaluation.eval_samples", "score generated images (validity/coverage on builtin:shapes, FID)"),
    "bench-recon": ("evaluation.bench_recon", "benchmark reconstruction fidelity of KL autoencoders"),
    "inspect-vae": ("evaluation.inspect_vae", "report on a KL autoencoder's latent space: channels, scale, noise, "
                                              "equivariance, spectra, interpolations"),
    "push": ("workflows.push", "upload a saved autoencoder or pipeline, with its model card, to the Hugging Face Hub"),
}


def _user_errors() -> tuple[type, ...]:
    from ldm_core.training.checkpoints import CheckpointError
    from ldm_core.config.settings import ConfigError
    from ldm_core.data.image_files import DataError
    from ldm_core.models.pretrained import MissingWeightsError, WeightsFileError
    from ldm_core.training.run_folder import RunFolderError

    # OSError covers folders that cannot be created or written (a path under a file, no permission, a
    # full disk): the user fixes those, so they get a message, not a traceback.
    return (ConfigError, DataError, MissingWeightsError, WeightsFileError, CheckpointError, RunFolderError,
            FloatingPointError, OSError, ValueError)


def _message(err: BaseException) -> str:
    """One line for the user; a bare OSError gets the path and what to check."""
    if isinstance(err, OSError) and err.strerror and err.filename and str(err).startswith("[Errno"):
        return (f"{err.strerror}: {err.filename}. Check that the path is right and that its folder can be "
                f"written, or choose another one.")
    return " ".join(str(err).split()) or type(err).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm", description="Two-stage latent diffusion: train a KL autoencoder (Stage A), a latent U-Net "
                                "(Stage B), generate images, and benchmark reconstructions.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with `ldm demo`. Run `ldm COMMAND --help` for a command's options.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (for bug reports; or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
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
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"ldm {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._module).main(args) or 0)


def run() -> None:
    """The `ldm` executable: run `main` and exit with its status (see `exit_process` for a multi-process run)."""
    code = main()
    from ldm_core.training.accelerator import exit_process

    exit_process(code)


if __name__ == "__main__":
    run()
