"""Where a training step's time goes: the real trainer's steps under `torch.profiler`, by op family.

    python -m benchmarks.profile_steps --out runs/bench                 # the demo's two stages, ~2 min
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.profile_steps --out runs/bench/avx2

Each stage runs in its own process: `train_vae` / `train_unet` with `configs/demo.yaml`'s stage config (plus
any `stage_a.` / `stage_b.` overrides given after the options), `--warmup` steps untimed, one step under
`torch.utils.flop_counter` (matmul and convolution FLOPs, forward and backward), then `--steps` steps
under the profiler. Every CPU op's self time is put in one family: inside the data loader's `batch`,
the EMA's `step` or the optimizer's `step` / `zero_grad` (their profiler ranges) by that range, otherwise
by the op's name (convolution forward and backward, GroupNorm, attention, matmul, element-wise and the
rest). "Python and framework" is the wall time of the steps minus the ops' self times on the main thread:
the interpreter, module calls, autograd's bookkeeping, the progress bar and the logs.

The achieved GFLOP/s are set against this machine's own ceiling, a 2048x2048 fp32 matmul measured in the
same process (`benchmarks.harness.matmul_peak_flops`). docs/demo-speed.md has the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (around_steps, counted_step_flops, machine_description, markdown_table, matmul_peak_flops,
                                run_isolated, write_results)

WORKER = "benchmarks.profile_steps"
NEVER = 10 ** 9  # a step count no run reaches: validation, sampling and checkpoints stay off

# (family, substrings of an op's name), first match wins; the ranges are matched before any name.
RANGES = (("data", "ldm.data.batch"), ("EMA", "ldm.ema.step"), ("optimizer", "Optimizer.step"),
          ("optimizer", "Optimizer.zero_grad"))
FAMILIES = (
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("convolution", "conv2d")),
    ("GroupNorm", ("group_norm",)),
    ("attention", ("scaled_dot_product", "attention", "bmm", "softmax")),
    ("matmul (linear)", ("addmm", "aten::mm", "linear")),
    ("upsample / pad", ("upsample", "pad")),
    ("element-wise", ("add", "mul", "sub", "div", "silu", "sigmoid", "exp", "abs", "pow", "sqrt", "neg", "clamp",
                      "where", "lerp", "copy_", "fill_", "zero_", "randn", "normal_", "mean", "sum", "norm")),
)
FAMILY_ORDER = ("conv forward", "conv backward", "GroupNorm", "attention", "matmul (linear)", "upsample / pad",
                "element-wise", "other ops", "optimizer", "EMA", "data", "Python and framework")


def stage_config(stage: str, steps: int, overrides: list[str]):
    """The demo's config of one stage ("a" or "b") for `steps` steps with nothing periodic."""
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from workflows.config import LDMConfig

    common = [f"train.max_steps={steps}", "train.log_every=1", f"train.checkpoint_every={NEVER}",
              "train.progress_bar=false", "train.latent_stats_images=8", f"train.validate_every={NEVER}"]
    common += ["data.val_count=8"] if stage == "a" else [f"sampling.sample_every={NEVER}", "sampling.grid_images=1",
                                                         "sampling.num_inference_steps=1"]
    section = "stage_a" if stage == "a" else "stage_b"
    own = [o[len(section) + 1:] for o in overrides if o.startswith(section + ".")]
    cfg = load_config(LDMConfig, config_path("demo.yaml"), [f"{section}.{o}" for o in common + own])
    return cfg.stage_a if stage == "a" else cfg.stage_b


def family_of(event) -> str:
    """The family of one profiler event: its enclosing range's, else its name's."""
    parent = event
    while parent is not None:
        for family, prefix in RANGES:
            if parent.name.startswith(prefix):
                return family
        parent = parent.cpu_parent
    name = event.name
    for family, parts in FAMILIES:
        if any(part in name for part in parts):
            return family
    return "other ops"


@contextlib.contextmanager
def _annotated(cls, method: str, label: str):
    """Wrap `cls.method` in a profiler range named `label` for the duration of the context."""
    original = getattr(cls, method)

    def wrapped(self, *args, **kwargs):
        with torch.profiler.record_function(label):
            return original(self, *args, **kwargs)

    setattr(cls, method, wrapped)
    try:
        yield
    finally:
        setattr(cls, method, original)


def _profiled_steps(first: int, steps: int, record: dict):
    """Steps `first` to `first + steps - 1` (from 0) of the real trainer under the profiler (`around_steps`);
    fills `record` with the profile and their wall time."""

    def before(i):
        if i == first:
            record["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            record["profiler"].start()
            record["started"] = time.perf_counter()

    def after(i):
        if i == first + steps - 1:
            record["seconds"] = time.perf_counter() - record["started"]
            record["profiler"].stop()

    return around_steps(before, after)


def worker(args) -> dict[str, Any]:
    from diffusers.training_utils import EMAModel

    from ldm_core.data.training_images import TrainingImages

    total = args.warmup + 1 + args.steps
    cfg = stage_config(args.stage, total, args.overrides)
    record: dict = {}
    with tempfile.TemporaryDirectory() as tmp, _annotated(TrainingImages, "batch", "ldm.data.batch"), \
            _annotated(EMAModel, "step", "ldm.ema.step"), counted_step_flops(args.warmup) as flops, \
            _profiled_steps(args.warmup + 1, args.steps, record):
        tmp = Path(tmp)
        if args.stage == "a":
            from stage_a_vae.train import train_vae

            train_vae(cfg, "builtin:shapes", tmp / "run")
        else:
            from stage_a_vae.architectures import build_autoencoder
            from workflows.train_unet import train_unet

            torch.manual_seed(0)  # a step's speed does not depend on the autoencoder's weights
            build_autoencoder(stage_config("a", 1, []).model).save_pretrained(tmp / "vae")
            train_unet(cfg, tmp / "vae", "builtin:shapes", tmp / "run")
    # The profiler's window is the `steps` steps' timers, first start to last stop, so its wall time covers
    # exactly those steps plus the loop's bookkeeping between them.
    seconds_per_step = record["seconds"] / args.steps
    by_family = {name: 0.0 for name in FAMILY_ORDER}
    ops_us = 0.0
    main_thread = _main_thread(record["profiler"])
    for event in record["profiler"].events():
        if event.device_type != torch.autograd.DeviceType.CPU or event.thread != main_thread:
            continue
        if event.name.startswith(("ldm.", "Optimizer.", "ProfilerStep")):
            continue  # ranges: their ops are counted, not the range itself
        own = self_us(event)
        by_family[family_of(event)] += own
        ops_us += own
    by_family = {k: v / 1e6 / args.steps for k, v in by_family.items()}
    by_family["Python and framework"] = max(seconds_per_step - ops_us / 1e6 / args.steps, 0.0)
    peak = matmul_peak_flops(torch.device("cpu"), torch.float32, seconds=args.peak_seconds)
    return {"stage": args.stage, "batch": cfg.train.batch_size, "resolution": cfg.data.resolution,
            "seconds_per_step": seconds_per_step, "family_seconds": by_family, "flops_per_step": flops["flops"],
            "achieved_gflops": flops["flops"] / seconds_per_step / 1e9, "matmul_peak_gflops": peak / 1e9,
            "threads": torch.get_num_threads(), "overrides": args.overrides}


def self_us(event) -> float:
    """An event's own time in microseconds: its span less its direct children's spans.

    The same number as the event's `self_cpu_time_total`, which re-sums every subtree on each call.
    """
    return event.time_range.elapsed_us() - sum(child.time_range.elapsed_us() for child in event.cpu_children)


def _main_thread(profiler) -> int:
    """The thread that ran the steps: the one whose ops took the most time."""
    totals: dict[int, float] = {}
    for event in profiler.events():
        totals[event.thread] = totals.get(event.thread, 0.0) + self_us(event)
    return max(totals, key=totals.get)


def run(out: Path, warmup: int, steps: int, overrides: list[str], peak_seconds: float = 2.0,
        isolate: bool = True) -> dict[str, Any]:
    """Profile both stages and write the table. `isolate=False` runs the workers in this process (the tests:
    the same code without two interpreter starts; the timings then share the process with whatever ran before)."""
    results = {}
    for stage in ("a", "b"):
        if isolate:
            results[stage] = run_isolated(WORKER, ["--stage", stage, "--warmup", str(warmup), "--steps", str(steps),
                                                   "--peak-seconds", str(peak_seconds), *overrides])
        else:
            results[stage] = worker(argparse.Namespace(stage=stage, warmup=warmup, steps=steps,
                                                       peak_seconds=peak_seconds, overrides=overrides))
    rows = []
    for family in FAMILY_ORDER:
        row = {"family": family}
        for stage, result in results.items():
            seconds = result["family_seconds"][family]
            row[f"{stage}_ms"] = 1000 * seconds
            row[f"{stage}_share"] = f"{seconds / result['seconds_per_step']:.0%}"
        rows.append(row)
    rows.append({"family": "**step**", **{f"{s}_ms": 1000 * r["seconds_per_step"] for s, r in results.items()},
                 **{f"{s}_share": "100%" for s in results}})
    table = markdown_table(rows, [("family", "op family"), ("a_ms", "Stage A ms"), ("a_share", "share"),
                                  ("b_ms", "Stage B ms"), ("b_share", "share")])
    lines = [table, ""]
    for stage, r in results.items():
        lines.append(f"- Stage {stage.upper()} (batch {r['batch']}, {r['resolution']} px): "
                     f"{r['flops_per_step'] / 1e9:.2f} GFLOP per step, {r['achieved_gflops']:.1f} GFLOP/s achieved, "
                     f"{r['achieved_gflops'] / r['matmul_peak_gflops']:.0%} of this machine's fp32 matmul "
                     f"({r['matmul_peak_gflops']:.0f} GFLOP/s)")
    from ldm_core.training.accelerator import cpu_description

    lines.append(f"\n{machine_description(torch.device('cpu'))}; {cpu_description()}; mean of {steps} profiled steps "
                 f"after {warmup} + 1; overrides: {' '.join(overrides) or 'none'}.")
    data = {"stages": results, "cpu": cpu_description(), "warmup": warmup, "steps": steps, "overrides": overrides}
    write_results(out, "profile_steps", "\n".join(lines), data)
    print("\n".join(lines))
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak-seconds", type=float, default=2.0,
                        help="how long to time the fp32 matmul that gives the machine's ceiling (default 2)")
    # Worker mode (one stage in a fresh process):
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=["a", "b"], help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    if args.result is not None:
        args.result.write_text(json.dumps(worker(args)))
        return
    run(args.out, args.warmup, args.steps, overrides, args.peak_seconds)


if __name__ == "__main__":
    main()
