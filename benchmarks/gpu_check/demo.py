"""Section: `ldm demo` (both stages of `make demo`): its wall time and the quality figures of its summary,
beside the CPU figures docs/demo.md publishes (benchmarks/gpu_check/references.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.gpu_check.references import cpu_demo_figures
from benchmarks.gpu_check.runner import Runner

SUMMARY_KEYS = ("val_psnr", "val_ssim", "heldout_psnr", "bicubic_psnr", "reconstructions_valid", "scaling_factor")


def _stage_metrics(folder: Path) -> Optional[dict[str, Any]]:
    """Steps, mean step time and final validation of one finished stage (its metrics.json)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    times = [row["step_time"] for row in metrics.get("history", []) if "step_time" in row]
    return {"steps": metrics.get("steps"), "mean_step_s": sum(times) / len(times) if times else None,
            "validation": metrics.get("validation")}


def subprocess_env() -> dict[str, str]:
    """The environment of this check's subprocesses: one thread each in tiny CPU mode, like this process."""
    env = dict(os.environ)
    if torch.get_num_threads() == 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_demo(r: Runner, cmd: list[str], results: dict[str, Any]) -> None:
    if r.plan.demo_in_process:  # its output goes to this process's
        from workflows.cli import main as ldm_main

        results["returncode"] = ldm_main(cmd[3:])
        return
    log = r.out / "demo.log"
    timeout = max(1.0, r.time_left() - 2)
    results.update(log=str(log), timeout_s=round(timeout, 1))
    with open(log, "w") as fh:
        try:
            results["returncode"] = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                                   env=subprocess_env()).returncode
        except subprocess.TimeoutExpired:
            results["error"] = f"cut after {timeout:.0f} s (the budget); the stages that finished are below"


def _summary(path: Path) -> dict[str, Any]:
    s = json.loads(path.read_text())
    return {"wall_minutes": s["wall_minutes"], "training_minutes": s["training_minutes"],
            **{k: s["stage_a"][k] for k in SUMMARY_KEYS},
            "stage_b_final_loss": s["stage_b"]["final_loss"], "samples_validity": s["samples"]["validity"],
            "samples_class_histogram": s["samples"]["class_histogram"],
            "samples_plain_diffusers_validity": s["samples_plain_diffusers"]["validity"], "sampler": s["sampler"]}


def section_demo(r: Runner) -> dict[str, Any]:
    demo_dir = r.out / "demo"
    # A finished demo folder is only printed again by `ldm demo`: start from an empty one.
    shutil.rmtree(demo_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "workflows.cli", "demo", "--out", str(demo_dir), *r.plan.demo_overrides]
    results: dict[str, Any] = {"command": " ".join(cmd)}
    start = time.monotonic()
    _run_demo(r, cmd, results)
    results["wall_s"] = time.monotonic() - start
    results["stage_a"] = _stage_metrics(demo_dir / "stage_a")
    results["stage_b"] = _stage_metrics(demo_dir / "stage_b")
    if (demo_dir / "summary.json").is_file():
        results["summary"] = _summary(demo_dir / "summary.json")
    elif "error" not in results:
        results["error"] = (f"`ldm demo` exited {results.get('returncode')} without a summary"
                            + (f"; see {results['log']}" if "log" in results else ""))
    # The published CPU demo, read from docs/demo.md; the tiny demo trains 2 steps, so it is not comparable.
    results["cpu_reference"] = {**cpu_demo_figures(), "comparable": r.plan.name == "full"}
    return results
