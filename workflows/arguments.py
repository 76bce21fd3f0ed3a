"""Command-line flags that several `ldm` commands share."""

from __future__ import annotations

import argparse


def add_training_args(parser: argparse.ArgumentParser, config_example: str) -> None:
    """--config, --data, --out, --resume and the trailing key=value overrides of every training command."""
    parser.add_argument("--config", help=f"a YAML file, or a shipped preset by name, e.g. {config_example} "
                        f"(defaults are used for keys it omits)")
    parser.add_argument("--data", required=True, help="image folder (searched recursively) or builtin:shapes")
    parser.add_argument("--out", required=True, help="run folder to create (checkpoints, weights, images, metrics)")
    parser.add_argument("--resume", help="continue a run: 'latest' or a checkpoint folder RUN/checkpoints/step-NNNNNNN")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=2000")
