"""Section: Stage A's speed. Images/s at three batches, eager and channels-last, torch.compile in a worker
with a time limit, the time split between autoencoder, LPIPS and discriminator, against LDM's step as written."""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import replace
from typing import Any, Optional

import torch

from benchmarks.gpu_check import plans
from benchmarks.gpu_check.references import REFERENCE_FIGURES
from benchmarks.gpu_check.runner import Runner, autocast as _autocast, free_memory, images, measure, skipped_row
from benchmarks.gpu_check.stage_a_parts import build_perceptual, build_stage_a, stage_a_step
from benchmarks.harness import count_flops, peak_memory_mib, pick_device, run_isolated, seconds_per_call, synchronize

WORKER = "benchmarks.gpu_check"  # run as `python -m benchmarks.gpu_check --worker compile-stage-a`


def _stage_a_row(r: Runner, cfg, perceptual, x: torch.Tensor, *, path: str, phase: str, precision: str,
                 channels_last: bool = False, ldm: bool = False, flops: Optional[int] = None) -> dict[str, Any]:
    from benchmarks.reference_loops import ldm_stage_a_step

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    labels = dict(path=path, phase=phase, precision=precision,
                  memory_format="channels_last" if channels_last else "contiguous")
    try:
        p = build_stage_a(cfg, perceptual, r.device, channels_last=channels_last, ldm_optimizers=ldm)
    except torch.OutOfMemoryError as err:
        return {**labels, "batch": len(x), "error": f"out of memory: {str(err).splitlines()[0]}"}
    generator = torch.Generator(r.device).manual_seed(0)
    step_index = cfg.loss.disc_start if phase == "after disc_start" else 0
    if ldm:
        def step():
            with _autocast(r.device, dtype):
                ldm_stage_a_step(p.vae, p.discriminator, perceptual, cfg.loss, p.opt_ae, p.opt_d, x, step_index)
    else:
        def step():
            stage_a_step(p, x, step_index, dtype, generator)
    row = measure(r, step, len(x), flops=flops, **labels)
    del p
    free_memory(r.device)
    return row


def _compile_row(r: Runner, batch: int) -> dict[str, Any]:
    """torch.compile of the autoencoder in its own process, so a compile that takes too long is cut."""
    labels = dict(path="ours", phase="after disc_start", precision="bf16", memory_format="contiguous",
                  compiled=r.args.compile_backend)
    want = {"on": True, "off": False, "auto": r.plan.compile_default}[r.args.compile]
    if not want:
        return skipped_row("--compile off" if r.args.compile == "off" else
                            "tiny mode: compiling even the tiny autoencoder costs seconds to minutes on a CPU "
                            "(docs/performance.md); --compile on runs it", batch, **labels)
    timeout = min(r.args.compile_timeout_s, r.time_left() - r.reserve_after("stage_a_speed"))
    if timeout < 10:
        return skipped_row(f"{timeout:.0f} s of the budget left for it", batch, **labels)
    args = ["--worker", "compile-stage-a", "--device", str(r.device), "--compile-backend", r.args.compile_backend,
            *(["--tiny"] if r.plan.name == "tiny" else [])]
    try:
        result = run_isolated(WORKER, args, timeout_s=timeout)
    except subprocess.TimeoutExpired:
        return {**labels, "batch": batch, "error": f"did not compile and time its steps within {timeout:.0f} s"}
    except RuntimeError as err:
        return {**labels, "batch": batch, "error": str(err)}
    peak = r.bf16_peak()
    return {**labels, **result, "images_per_s": batch / result["step_s"],
            "achieved_tflops": result["flops_per_step"] / result["step_s"] / 1e12, "bf16_peak_tflops": peak / 1e12,
            "utilisation": result["flops_per_step"] / result["step_s"] / peak}


def worker_compile_stage_a(args: argparse.Namespace) -> dict[str, Any]:
    plan = plans.TINY if args.tiny else plans.FULL
    dev = pick_device(args.device)
    if plan.name == "tiny" and dev.type == "cpu":
        torch.set_num_threads(1)  # as main does in tiny CPU mode
    cfg = plans.stage_a_config(plan, ("loss.disc_start=1",))
    perceptual, _ = build_perceptual(cfg.loss, dev)
    x = images(plan.a_split_batch, cfg.data.resolution, dev)
    p = build_stage_a(cfg, perceptual, dev)
    generator = torch.Generator(dev).manual_seed(0)
    flops = count_flops(lambda: stage_a_step(p, x, 1, torch.bfloat16, generator))  # eager: what the step computes
    p.model = torch.compile(p.model, backend=args.compile_backend)
    start = time.perf_counter()
    stage_a_step(p, x, 1, torch.bfloat16, generator)
    synchronize(dev)
    compile_s = time.perf_counter() - start
    step_s = seconds_per_call(lambda: stage_a_step(p, x, 1, torch.bfloat16, generator), dev,
                              warmup=plan.warmup, iters=plan.iters)
    return {"batch": len(x), "compile_s": compile_s, "step_s": step_s, "flops_per_step": flops,
            **peak_memory_mib(dev)}


def section_stage_a_speed(r: Runner) -> dict[str, Any]:
    plan = r.plan
    cfg = plans.stage_a_config(plan, ("loss.disc_start=1",))  # step 0 is before disc_start, step 1 after
    no_lpips = replace(cfg, loss=replace(cfg.loss, perceptual_weight=0.0))
    perceptual, trunk = build_perceptual(cfg.loss, r.device)
    pictures = images(max(plan.a_batches + (plan.a_split_batch,)), cfg.data.resolution, r.device)
    rows, flops_at = [], {}

    def row(x, config=cfg, **kw):
        if r.affords("stage_a_speed", plan.row_s):
            result = _stage_a_row(r, config, perceptual, x, **kw)
        else:
            result = skipped_row("budget", len(x), **{k: v for k, v in kw.items() if isinstance(v, str)})
        rows.append(result)
        return result

    for batch in plan.a_batches:
        for channels_last in (False, True):
            got = row(pictures[:batch], path="ours", phase="after disc_start", precision="bf16",
                      channels_last=channels_last, flops=flops_at.get(batch))
            flops_at.setdefault(batch, got.get("flops_per_step"))
    x = pictures[:plan.a_split_batch]
    full = next((w for w in rows if w["batch"] == len(x) and w.get("memory_format") == "contiguous"), None) \
        or row(x, path="ours", phase="after disc_start", precision="bf16")
    ae = row(x, path="ours: autoencoder only (no LPIPS)", phase="before disc_start", precision="bf16", config=no_lpips)
    before = row(x, path="ours", phase="before disc_start", precision="bf16")
    ldm32 = row(x, path="LDM as written", phase="any step", precision="fp32", ldm=True)
    ldm16 = row(x, path="LDM as written, under bf16 autocast", phase="any step", precision="bf16", ldm=True)
    rows.append(_compile_row(r, len(x)))

    def s(w):
        return w.get("step_s") if w else None

    results: dict[str, Any] = {"preset": cfg.model.preset, "resolution": cfg.data.resolution, "lpips_trunk": trunk,
                               "rows": rows}
    if all(s(w) for w in (full, ae, before)):
        # Differential timing: LPIPS = (autoencoder + LPIPS) - autoencoder, discriminator = full - both. The
        # discriminator's share holds the GAN term, the adaptive weight's two gradients and its own update.
        split = {"autoencoder_s": s(ae), "lpips_s": s(before) - s(ae), "discriminator_s": s(full) - s(before)}
        results["time_split"] = {**split, **{k.replace("_s", "_fraction"): v / s(full) for k, v in split.items()},
                                 "batch": len(x)}
    results["vs_ldm"] = {f"ours_{a}_over_{b}": s(ref) / s(ours) for a, ours in (("after", full), ("before", before))
                         for b, ref in (("ldm_fp32", ldm32), ("ldm_bf16", ldm16)) if s(ours) and s(ref)}
    results["anchors"] = [REFERENCE_FIGURES["conv_utilisation"]]
    return results
