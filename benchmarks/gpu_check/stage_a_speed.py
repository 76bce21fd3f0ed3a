"""Section: Stage A's speed. Images/s at three batches, eager and channels-last, torch.compile in a worker
with a time limit, the time split between autoencoder, LPIPS and discriminator, against LDM's step as written.

The timed step is Stage A's optimizer step as `train_vae` takes it (the autoencoder's update, then, once the
discriminator is on, its update on the detached reconstruction), without Accelerate and the run around it, so
that FLOPs can be counted on one call and batches changed freely. Whether the trainer itself is right under
mixed precision is the correctness section's business: that one runs `train_vae`.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from benchmarks.gpu_check import plans
from benchmarks.gpu_check.references import REFERENCE_FIGURES
from benchmarks.gpu_check.runner import Runner, autocast, free_memory, images, measure, skipped_row
from benchmarks.harness import count_flops, peak_memory_mib, pick_device, run_isolated, seconds_per_call, synchronize

WORKER = "benchmarks.gpu_check"  # run as `python -m benchmarks.gpu_check --worker compile-stage-a`


@dataclass
class StageAParts:
    vae: Any
    discriminator: Any
    loss_fn: Any
    model: Any  # AutoencoderForTraining(vae), or its torch.compile
    opt_ae: Any
    opt_d: Any
    last_layer: torch.Tensor
    max_grad_norm: float


def build_perceptual(loss_cfg, device: torch.device) -> tuple[Any, str]:
    """LPIPS with the config's trunk where its weights are on this machine, else a random trunk of the same cost."""
    from stage_a_vae.perceptual import build_lpips

    trunk, reported = plans.lpips_trunk_here(loss_cfg)
    return build_lpips(trunk, loss_cfg.lpips_weights if trunk == "vgg" else None).to(device), reported


def _forward_under_autocast(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Run `module`'s forward under autocast with fp32 outputs, as Accelerate's `prepare_model` makes a
    prepared model's (the trainer's discriminator, whether it scores or is trained)."""
    forward = module.forward

    def wrapped(*args, **kwargs):
        with autocast(device, dtype):
            return forward(*args, **kwargs).float()

    module.forward = wrapped


def build_timed_stage_a(cfg, perceptual, device: torch.device, dtype: torch.dtype, *, channels_last: bool = False,
                        ldm_optimizers: bool = False) -> StageAParts:
    """Stage A's models, loss and optimizers as `train_vae` builds them, without Accelerate but with its
    autocast on the discriminator; with `ldm_optimizers` plain Adam(0.5, 0.9) for both, as LDM's
    `configure_optimizers`."""
    from stage_a_vae.networks import AutoencoderForTraining, build_stage_a

    train = replace(cfg.train, channels_last=channels_last, seed=0)
    nets = build_stage_a(replace(cfg, train=train), device, perceptual=perceptual)
    tc, vae, disc, loss_fn = train, nets.vae.to(device), nets.discriminator.to(device), nets.loss_fn
    _forward_under_autocast(disc, device, dtype)
    opt_ae, opt_d = nets.opt_ae, nets.opt_d
    if ldm_optimizers:
        opt_ae = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    return StageAParts(vae, disc, loss_fn, AutoencoderForTraining(vae), opt_ae, opt_d, vae.decoder.conv_out.weight,
                       tc.max_grad_norm)


def _apply(optimizer, max_norm: float) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def stage_a_step(p: StageAParts, x: torch.Tensor, step: int, dtype: torch.dtype, generator) -> None:
    """One optimizer step of Stage A as `train_vae` takes it: the autoencoder under autocast with its outputs
    back in fp32 (what Accelerate's `prepare_model` does) and LDM's loss outside it (LPIPS in fp32); clipped;
    then, once the discriminator is on, its update on the detached reconstruction."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    disc_on = p.loss_fn.discriminator_active(step)
    if disc_on:
        p.discriminator.requires_grad_(False)  # the autoencoder's update only scores with it
    with autocast(x.device, dtype):
        recon, mean, logvar = (t.float() for t in p.model(x, generator))
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    ae_loss, _ = p.loss_fn.autoencoder_loss(x, recon, posterior, step, last_layer=p.last_layer,
                                            discriminator=p.discriminator)
    ae_loss.backward()
    _apply(p.opt_ae, p.max_grad_norm)
    if disc_on:
        p.discriminator.requires_grad_(True)
        d_loss, _ = p.loss_fn.discriminator_loss(x, recon.detach(), step)
        d_loss.backward()
        _apply(p.opt_d, p.max_grad_norm)


def _stage_a_row(r: Runner, cfg, perceptual, x: torch.Tensor, *, path: str, phase: str, precision: str,
                 channels_last: bool = False, ldm: bool = False, flops: Optional[int] = None) -> dict[str, Any]:
    from benchmarks.reference_loops import ldm_stage_a_step

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    labels = dict(path=path, phase=phase, precision=precision,
                  memory_format="channels_last" if channels_last else "contiguous")
    try:
        p = build_timed_stage_a(cfg, perceptual, r.device, dtype, channels_last=channels_last, ldm_optimizers=ldm)
    except torch.OutOfMemoryError as err:
        return {**labels, "batch": len(x), "error": f"out of memory: {str(err).splitlines()[0]}"}
    generator = torch.Generator(r.device).manual_seed(0)
    step_index = cfg.loss.disc_start if phase == "after disc_start" else 0
    if ldm:
        def step():
            with autocast(r.device, dtype):
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
    p = build_timed_stage_a(cfg, perceptual, dev, torch.bfloat16)
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


def _time_split_and_ratios(rows: list[dict], full, ae, before, ldm32, ldm16) -> dict[str, Any]:
    def s(w):
        return w.get("step_s") if w else None

    results: dict[str, Any] = {}
    if all(s(w) for w in (full, ae, before)):
        # Differential timing: LPIPS = (autoencoder + LPIPS) - autoencoder, discriminator = full - both. The
        # discriminator's share holds the GAN term, the adaptive weight's two gradients and its own update.
        split = {"autoencoder_s": s(ae), "lpips_s": s(before) - s(ae), "discriminator_s": s(full) - s(before)}
        results["time_split"] = {**split, **{k.replace("_s", "_fraction"): v / s(full) for k, v in split.items()},
                                 "batch": full["batch"]}
    results["vs_ldm"] = {f"ours_{a}_over_{b}": s(ref) / s(ours) for a, ours in (("after", full), ("before", before))
                         for b, ref in (("ldm_fp32", ldm32), ("ldm_bf16", ldm16)) if s(ours) and s(ref)}
    return results


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
    return {"preset": cfg.model.preset, "resolution": cfg.data.resolution, "lpips_trunk": trunk, "rows": rows,
            **_time_split_and_ratios(rows, full, ae, before, ldm32, ldm16),
            "anchors": [REFERENCE_FIGURES["conv_utilisation"]]}
