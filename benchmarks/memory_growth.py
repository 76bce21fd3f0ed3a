"""Does a long training run leak? Resident memory (RSS) after 200 and after 2000 tiny steps of each stage.

    python -m benchmarks.memory_growth --out bench-results/memory_growth.json [--steps 2000 --early 200]

Each stage trains a tiny model on builtin:shapes (16 px, batch 2, one CPU thread) for `--steps`
optimizer steps with the normal loop: logging every 10 steps (metric history, TensorBoard),
checkpoints every 250, the NaN policy and signal handling active. RSS is sampled at the end of steps
`--early` and `--steps`, after `gc.collect()`, by hooking the loop's once-per-step time-budget check
(`TimeBudget.stops_at`), so nothing in the loop itself changes. The growth between the two samples is
what a leak would show; the part that is expected (metric history rows) is counted and printed too.
Prints a Markdown table and writes the numbers as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil
import torch

from ldm_core.config.settings import load_config
from ldm_core.training.stopping import TimeBudget

SMOKE_A, SMOKE_B = "vae/kl-f8-smoke", "unet/unet-smoke"  # the shipped seconds-long presets, made long here
STAGE_A = ["loss.disc_start=100", "train.log_every=10", "train.validate_every=100000", "train.checkpoint_every=250",
           "train.progress_bar=false"]
STAGE_B = ["train.log_every=10", "train.checkpoint_every=250", "train.progress_bar=false",
           "sampling.sample_every=100000"]


class RSSProbe:
    """Samples this process's RSS at chosen steps through `TimeBudget.stops_at` (called once per step)."""

    def __init__(self, at_steps: set[int]):
        self.at_steps, self.samples = at_steps, {}
        self._original = TimeBudget.stops_at

    def __enter__(self):
        probe = self

        def stops_at(budget, step, max_steps):
            if step in probe.at_steps:
                gc.collect()
                probe.samples[step] = psutil.Process().memory_info().rss
            return probe._original(budget, step, max_steps)

        TimeBudget.stops_at = stops_at
        return self

    def __exit__(self, *exc):
        TimeBudget.stops_at = self._original
        return False


def _tiny_vae_folder(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(4, 4, 8, 8), layers_per_block=1, norm_num_groups=2, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(path)
    return path


def measure(stage: str, steps: int, early: int, root: Path) -> dict:
    """Train one stage for `steps` steps and return RSS at `early` and `steps` (bytes, MiB, growth)."""
    overrides = [f"train.max_steps={steps}"]
    start = time.perf_counter()
    with RSSProbe({early, steps}) as probe:
        if stage == "A":
            from stage_a_vae.config import StageAConfig
            from stage_a_vae.train import train_vae

            train_vae(load_config(StageAConfig, SMOKE_A, STAGE_A + overrides), "builtin:shapes", root / "stage_a")
        else:
            from stage_b_diffusion.config import StageBConfig
            from workflows.train_unet import train_unet

            cfg = load_config(StageBConfig, SMOKE_B, STAGE_B + overrides + [f"data.latent_cache_dir={root / 'cache'}"])
            train_unet(cfg, _tiny_vae_folder(root / "vae"), "builtin:shapes", root / "stage_b")
    seconds = time.perf_counter() - start
    a, b = probe.samples[early], probe.samples[steps]
    rows = json.loads((root / f"stage_{stage.lower()}" / "metrics.json").read_text())["history"]
    return {"stage": stage, "steps": steps, "early_step": early, "rss_early_mib": a / 2 ** 20,
            "rss_final_mib": b / 2 ** 20, "growth_mib": (b - a) / 2 ** 20,
            "growth_per_1000_steps_kib": (b - a) / 1024 / (steps - early) * 1000,
            "history_rows": len(rows), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--early", type=int, default=200)
    parser.add_argument("--stages", default="A,B")
    args = parser.parse_args()
    if not 0 < args.early < args.steps:
        parser.error("--early must be between 0 and --steps")
    torch.set_num_threads(1)  # a 2-core machine shared with other work: one thread is faster and stable
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            root = Path(tmp) / stage
            root.mkdir()
            results.append(measure(stage.strip(), args.steps, args.early, root))
    print(f"| stage | RSS at step {args.early} (MiB) | RSS at step {args.steps} (MiB) | growth (MiB) "
          f"| per 1000 steps (KiB) | history rows | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['stage']} | {r['rss_early_mib']:.1f} | {r['rss_final_mib']:.1f} | {r['growth_mib']:+.2f} "
              f"| {r['growth_per_1000_steps_kib']:+.0f} | {r['history_rows']} | {r['seconds']:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "torch": torch.__version__, "platform": platform.platform(),
                               "threads": torch.get_num_threads(), "pid": os.getpid()}, indent=2))


if __name__ == "__main__":
    main()
