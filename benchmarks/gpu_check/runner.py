"""The run: sections in order, the time guard, the JSON rewritten after every section, timed rows."""

from __future__ import annotations

import argparse
import gc
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.gpu_check.plans import Plan
from benchmarks.gpu_check.references import REFERENCE_FIGURES
from benchmarks.harness import count_flops, matmul_peak_flops, peak_memory_mib, seconds_per_call
from ldm_core.training.run_folder import write_json

FP16_MAX = 65504.0  # the largest finite IEEE 754 binary16 value


def check(name: str, ok: bool, detail: Any = "", skipped: bool = False) -> dict[str, Any]:
    entry = {"name": name, "ok": bool(ok), "detail": detail}
    if skipped:
        entry["skipped"] = True
    return entry


class Runner:
    def __init__(self, args: argparse.Namespace, plan: Plan, device: torch.device, sections: list[str]):
        self.args, self.plan, self.device, self.sections = args, plan, device, sections
        self.out = Path(args.out)
        self.started = time.monotonic()
        self.ctx: dict[str, Any] = {}  # values later sections reuse (the measured bf16 peak, Stage A's vae/)
        self.report: dict[str, Any] = {
            "script": "benchmarks/gpu_check", "mode": plan.name, "device": str(device),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget_s,
            "argv": list(args.argv), "anchors": REFERENCE_FIGURES, "complete": False,
            "sections": {name: {"status": "pending"} for name in sections}}

    def time_left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def reserve_after(self, name: str) -> float:
        """What the requested sections after `name` need at least: a section does not eat their time."""
        later = self.sections[self.sections.index(name) + 1:]
        return sum(self.plan.min_s.get(s, 0.0) for s in later
                   if self.report["sections"][s]["status"] == "pending")

    def affords(self, name: str, seconds: float) -> bool:
        return self.time_left() - self.reserve_after(name) >= seconds

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 2)
        write_json(self.out / "gpu_check.json", self.report)  # temp file + os.replace

    def run(self, name: str, fn: Callable[["Runner"], dict]) -> None:
        entry = self.report["sections"][name]
        need = self.plan.min_s.get(name, 0.0)
        # A section runs when it fits; inside it, timed rows also leave the later sections their minimum.
        if self.time_left() <= 0 or self.time_left() < need:
            entry.update(status="skipped", reason=f"{max(self.time_left(), 0):.0f} s left of --budget-s "
                                                  f"{self.args.budget_s:g}; this section needs at least {need:g} s")
            self.write()
            return
        start = time.monotonic()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            results = fn(self)
            error = results.pop("error", None)
            entry.update(status="error" if error else "ok", results=results)
            if error:
                entry["error"] = error
        except Exception as err:  # recorded; the next section still runs
            entry.update(status="error", error=f"{type(err).__name__}: {err}",
                         traceback=traceback.format_exc(limit=8)[-4000:])
        entry["seconds"] = round(time.monotonic() - start, 2)
        print(f"[gpu_check] {name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        free_memory(self.device)
        self.write()

    def bf16_peak(self) -> float:
        """The bf16 matmul FLOP/s of the limits section, measured now if that section did not run."""
        if "bf16_peak_flops" not in self.ctx:
            self.ctx["bf16_peak_flops"] = matmul_peak_flops(self.device, torch.bfloat16, size=self.plan.matmul_size,
                                                            seconds=self.plan.matmul_seconds)
        return self.ctx["bf16_peak_flops"]


def free_memory(device: torch.device) -> None:
    # Only the GPU's cached blocks between sections matter; on a CPU a full collection costs 0.2 s and frees
    # nothing the next section needs.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32)


def measure(r: Runner, step: Callable[[], Any], batch: int, *, flops: Optional[int] = None,
            warmup: Optional[int] = None, iters: Optional[int] = None, **labels) -> dict[str, Any]:
    """Time `step` and return its row: seconds, images/s, FLOPs (counted on one call unless given),
    achieved FLOP/s over the bf16 matmul peak, peak memory. A row that fails (out of memory, say) is
    recorded with its error and the section goes on."""
    row: dict[str, Any] = {**labels, "batch": batch}
    try:
        reset_peak(r.device)
        if flops is None:
            flops = count_flops(step)  # also the first (warm-up) call
        step_s = seconds_per_call(step, r.device, warmup=r.plan.warmup if warmup is None else warmup,
                                  iters=iters or r.plan.iters)
    except Exception as err:
        free_memory(r.device)
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        return row
    peak = r.bf16_peak()
    row.update(step_s=step_s, images_per_s=batch / step_s, flops_per_step=flops,
               achieved_tflops=flops / step_s / 1e12, bf16_peak_tflops=peak / 1e12,
               utilisation=flops / step_s / peak, **peak_memory_mib(r.device))
    return row


def skipped_row(reason: str, batch: int, **labels) -> dict[str, Any]:
    return {**labels, "batch": batch, "skipped": reason}


def images(count: int, size: int, device: torch.device) -> torch.Tensor:
    """`count` builtin:shapes images at `size` px in [-1, 1] (real edges and flat colours, not noise)."""
    from ldm_core.image_values import to_model_input
    from ldm_core.data.shapes import make_shapes

    pixels, _, _ = make_shapes(count, 0, size=size)
    return to_model_input(torch.from_numpy(pixels).to(device))
