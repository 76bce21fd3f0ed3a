"""One command for a GPU machine: what the machine is, what it can do, whether Stage A trains correctly under
mixed precision, and how fast both stages train and sample, against the references, in at most 8 minutes.

    make gpu-check                                              # = python -m benchmarks.gpu_check --out runs/gpu_check
    python -m benchmarks.gpu_check --tiny --out /tmp/gpu_check  # the same code on a CPU, tiny models (~15 s)
    python -m benchmarks.gpu_check --sections machine,limits,stage_a_correctness

Sections (each with its wall seconds and its results or an error; `--sections` picks some):

1. machine: GPU name, memory, power limit, torch / CUDA / cuDNN versions, TF32 settings.
2. limits: bf16 (and fp32) matmul FLOP/s at 8192^3, device-to-device copy bandwidth.
3. stage_a_correctness: `configs/vae/kl-f8.yaml` (kl-f8, 256 px) stepped by hand the way `train_vae` steps it,
   under bf16 autocast and under fp16 autocast with a grad scaler, `disc_start` after two steps. Checks: every
   loss finite, parameters still fp32, the discriminator's gradients absent before `disc_start` and present
   after, the autoencoder's gradients untouched by the discriminator step, the adaptive weight finite, the
   largest activation of every encoder/decoder block against fp16's 65,504.
4. stage_a_speed: images/s at batch 16/32/64, eager and channels-last (torch.compile in a subprocess with a
   time limit), the time split between autoencoder, LPIPS and discriminator, peak memory, utilisation, and
   LDM's step as written (`benchmarks/reference_loops.py`).
5. stage_b_speed: `configs/unet/unet-ldm-kl8.yaml` on 32x32x4 latents at batch 128/256/512 in bf16, against
   the diffusers text-to-image step.
6. sampling: U-Net forwards/s at batch 256 and VAE decodes at 256 px, bf16 against fp32; images/s of
   DPM-Solver++ at 20 steps end to end through `LatentDiffusionPipeline`.
7. demo: `ldm demo` (both stages of `make demo`) in a subprocess: wall time and the quality figures of its
   summary, beside the CPU figures of docs/demo.md.

`OUT/gpu_check.json` is rewritten (atomically) after every section, so a run that is cut keeps what it
measured; a section that raises is recorded and the next one runs. A section is skipped, with the reason,
when the time left in `--budget-s` (default 470) is below what it needs. Each check is recorded as
{name, ok, detail}; a skipped check also has "skipped": true. The process exits 1 if a check failed or a
section raised.

FLOPs are counted by `torch.utils.flop_counter` on one call of each timed step (as `benchmarks/bench_train.py`
counts the reference loops); utilisation is achieved FLOP/s over the bf16 matmul FLOP/s measured in section 2,
for every row whatever its precision. Models have random weights: speed does not depend on them, but the
activation peaks of section 3 are those of an untrained autoencoder (a trained one's are larger).

Without CUDA (or with `--tiny`) the same code runs tiny presets (kl-f8-tiny at 32 px, unet-tiny on 8x8 latents,
batches of 2, one timed step, a 2-step demo in this process), so everything that reaches the GPU has run before
(tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.harness import (count_flops, machine_description, markdown_table, matmul_peak_flops,
                                peak_memory_mib, pick_device, run_isolated, seconds_per_call, synchronize)
from ldm_core.training.run_folder import write_json

WORKER = "benchmarks.gpu_check"
FP16_MAX = 65504.0  # the largest finite IEEE 754 binary16 value
STAGE_A_PRESET = "vae/kl-f8.yaml"
STAGE_B_PRESET = "unet/unet-ldm-kl8.yaml"

# Printed beside the numbers; none of them was measured here.
REFERENCE_FIGURES = {
    "bf16_matmul": "a tuned bf16 matmul on an H100/H200 reaches about 790 TFLOP/s of the 989 nominal "
                   "(dense bf16, NVIDIA's H100 SXM datasheet)",
    "conv_utilisation": "conv U-Nets and autoencoders typically reach 20-35% of that matmul peak",
    "stage_b_images_per_s": "MosaicML trained the SD-2 U-Net (865M parameters, text-conditioned, larger than "
                            "unet-ldm-kl8) at about 137 images/s per A100 at 256 px on precomputed latents",
    "hbm_bandwidth": "H200: 4.8 TB/s HBM3e nominal (NVIDIA's H200 datasheet)",
}

# docs/demo.md, measured 2026-12-03 on a 2-core CPU (fp32): the figures a GPU demo is read against.
CPU_DEMO = {"wall_minutes": 19.2, "stage_a_minutes": 8.5, "stage_b_minutes": 10.0, "val_psnr": 32.54,
            "heldout_psnr": 32.49, "bicubic_psnr": 21.18, "reconstructions_valid": 1.0,
            "samples_validity": 0.930, "samples_plain_diffusers_validity": 0.930}

SECTION_NAMES = ("machine", "limits", "stage_a_correctness", "stage_a_speed", "stage_b_speed", "sampling", "demo")


# ---------------------------------------------------------------------------------------------------
# The two sizes: the GPU plan the issue asks for, and a tiny one for a CPU


@dataclass(frozen=True)
class Plan:
    name: str
    vae_overrides: tuple[str, ...]    # on configs/vae/kl-f8.yaml
    unet_overrides: tuple[str, ...]   # on configs/unet/unet-ldm-kl8.yaml
    correctness_batch: int
    correctness_steps: int            # disc_start is half of it
    a_batches: tuple[int, ...]
    a_split_batch: int                # the batch of the time split, the LDM rows and torch.compile
    b_batches: tuple[int, ...]
    b_reference_batch: int
    sample_batch: int
    decode_batch: int
    dpm_steps: int
    matmul_size: int
    matmul_seconds: float
    copy_mib: int
    warmup: int
    iters: int
    demo_overrides: tuple[str, ...]
    compile_default: bool
    # The time guard: the least a section (or one timed row) needs; a section is skipped below it.
    min_s: dict[str, float] = field(default_factory=dict)
    row_s: float = 0.0
    # Run `ldm demo` in this process (no interpreter start, no timeout) instead of as the user's command.
    demo_in_process: bool = False


def _tiny_demo_overrides() -> tuple[str, ...]:
    """Both stages of `ldm demo` for 2 steps on 32 px shapes with the unit-test presets (about 10 s here)."""
    common = ["data.resolution=32", "data.shapes_count=48", "data.val_count=8", "train.max_steps=2",
              "train.batch_size=4", "train.latent_stats_images=8", "train.progress_bar=false"]
    out = [f"{stage}.{o}" for stage in ("stage_a", "stage_b") for o in common]
    return tuple(out + ["stage_a.model.preset=kl-f8-tiny", "stage_b.model.preset=unet-tiny",
                        "stage_b.model.block_out_channels=null", "stage_b.sampling.grid_images=2",
                        "stage_b.sampling.num_inference_steps=2", "evaluation.num_images=4",
                        "evaluation.num_inference_steps=2", "evaluation.recon_images=8"])


FULL = Plan(name="full", vae_overrides=(), unet_overrides=(), correctness_batch=4, correctness_steps=4,
            a_batches=(16, 32, 64), a_split_batch=32, b_batches=(128, 256, 512), b_reference_batch=128,
            sample_batch=256, decode_batch=32, dpm_steps=20, matmul_size=8192, matmul_seconds=2.0,
            copy_mib=2048, warmup=2, iters=3, demo_overrides=(), compile_default=True,
            min_s={"machine": 0, "limits": 10, "stage_a_correctness": 20, "stage_a_speed": 45,
                   "stage_b_speed": 30, "sampling": 20, "demo": 120},
            row_s=6.0)
# Tiny: every code path at the least work that still runs it (two correctness steps are one before and one
# after disc_start; the FLOP count's call is the warm-up; 4 solver steps run its second-order updates).
TINY = Plan(name="tiny", vae_overrides=("model.preset=kl-f8-tiny", "data.resolution=32"),
            unet_overrides=("model.preset=unet-tiny", "data.resolution=64"), correctness_batch=2,
            correctness_steps=2, a_batches=(2,), a_split_batch=2, b_batches=(2, 4), b_reference_batch=2,
            sample_batch=2, decode_batch=2, dpm_steps=4, matmul_size=256, matmul_seconds=0.1, copy_mib=8,
            warmup=0, iters=1, demo_overrides=_tiny_demo_overrides(), compile_default=False, demo_in_process=True)


def stage_a_config(plan: Plan, extra: tuple[str, ...] = ()):
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from stage_a_vae.config import StageAConfig

    return load_config(StageAConfig, config_path(STAGE_A_PRESET), [*plan.vae_overrides, *extra])


def stage_b_config(plan: Plan):
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from stage_b_diffusion.config import StageBConfig

    return load_config(StageBConfig, config_path(STAGE_B_PRESET), list(plan.unet_overrides))


# ---------------------------------------------------------------------------------------------------
# The run: sections, time guard, the JSON after every section


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
        self.ctx: dict[str, Any] = {}  # values later sections reuse (the measured bf16 peak)
        self.report: dict[str, Any] = {
            "script": "benchmarks/gpu_check.py", "mode": plan.name, "device": str(device),
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
        """The bf16 matmul FLOP/s of section 2, measured now if that section did not run."""
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


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32)


def measure(r: Runner, step: Callable[[], Any], batch: int, *, flops: Optional[int] = None,
            warmup: Optional[int] = None, iters: Optional[int] = None, **labels) -> dict[str, Any]:
    """Time `step` and return its row: seconds, images/s, FLOPs (counted on one call unless given),
    achieved FLOP/s over the bf16 matmul peak, peak memory. A row that fails (out of memory, say) is
    recorded with its error and the section goes on."""
    row: dict[str, Any] = {**labels, "batch": batch}
    try:
        _reset_peak(r.device)
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


def _skipped_row(reason: str, batch: int, **labels) -> dict[str, Any]:
    return {**labels, "batch": batch, "skipped": reason}


# ---------------------------------------------------------------------------------------------------
# 1-2. The machine and its limits


def _tf32_settings() -> dict[str, Any]:
    settings = {"float32_matmul_precision": torch.get_float32_matmul_precision(),
                "cudnn_benchmark": torch.backends.cudnn.benchmark}
    for key, obj, attr in (("cuda_matmul_allow_tf32", torch.backends.cuda.matmul, "allow_tf32"),
                           ("cudnn_allow_tf32", torch.backends.cudnn, "allow_tf32"),
                           ("cuda_matmul_fp32_precision", torch.backends.cuda.matmul, "fp32_precision"),
                           ("cudnn_conv_fp32_precision", getattr(torch.backends.cudnn, "conv", None), "fp32_precision")):
        try:
            settings[key] = getattr(obj, attr)
        except (AttributeError, RuntimeError):
            pass  # newer torch has only one of the two APIs
    return settings


def _nvidia_smi(index: int) -> dict[str, Any]:
    """Power limit, clocks and driver from nvidia-smi (torch does not expose them)."""
    fields = ["name", "power.limit", "power.max_limit", "clocks.max.sm", "clocks.max.memory", "driver_version"]
    cmd = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    if "CUDA_VISIBLE_DEVICES" not in os.environ:  # otherwise torch's index is not nvidia-smi's
        cmd += ["-i", str(index)]
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as err:
        return {"nvidia_smi_error": f"{type(err).__name__}: {err}"}
    gpus = [dict(zip(fields, (v.strip() for v in line.split(",")))) for line in lines]
    return {"nvidia_smi": gpus[0] if len(gpus) == 1 else gpus}


def section_machine(r: Runner) -> dict[str, Any]:
    import accelerate
    import diffusers

    from ldm_core.training.accelerator import cpu_has_native_bf16

    dev = r.device
    info: dict[str, Any] = {
        "description": machine_description(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "tf32": _tf32_settings()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu_name=props.name, gpu_memory_gib=props.total_memory / 2 ** 30,
                    multiprocessors=props.multi_processor_count, compute_capability=f"{props.major}.{props.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported(), **_nvidia_smi(dev.index or 0))
    else:
        info.update(cpu=platform.processor() or platform.machine(), cpu_native_bf16=cpu_has_native_bf16())
    return info


def section_limits(r: Runner) -> dict[str, Any]:
    dev, plan = r.device, r.plan
    bf16 = matmul_peak_flops(dev, torch.bfloat16, size=plan.matmul_size, seconds=plan.matmul_seconds)
    r.ctx["bf16_peak_flops"] = bf16
    # fp32 with this process's TF32 settings (section 1): the ceiling of the fp32 reference rows.
    fp32 = matmul_peak_flops(dev, torch.float32, size=plan.matmul_size, seconds=plan.matmul_seconds)
    nbytes = plan.copy_mib * 2 ** 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_s = seconds_per_call(lambda: dst.copy_(src), dev, warmup=2, iters=20)
    del src, dst
    # Read plus write, as CUDA's bandwidthTest counts a device-to-device copy.
    copy_gbs = 2 * nbytes / copy_s / 1e9
    return {"matmul_size": plan.matmul_size, "bf16_matmul_tflops": bf16 / 1e12, "fp32_matmul_tflops": fp32 / 1e12,
            "copy_bytes": nbytes, "copy_s": copy_s, "copy_read_plus_write_gb_per_s": copy_gbs,
            "anchors": [REFERENCE_FIGURES["bf16_matmul"], REFERENCE_FIGURES["hbm_bandwidth"]]}


# ---------------------------------------------------------------------------------------------------
# Stage A: the models, and a step taken by hand the way train_vae takes it


@dataclass
class StageAParts:
    vae: Any
    discriminator: Any
    loss_fn: Any
    model: Any  # AutoencoderForTraining(vae), or its torch.compile
    opt_ae: Any
    opt_d: Any
    scaler: Any
    last_layer: torch.Tensor
    max_grad_norm: float


def build_perceptual(loss_cfg, device: torch.device) -> tuple[Any, str]:
    """LPIPS with the config's VGG trunk where its weights are on this machine, else a random trunk of the
    same cost (nothing is downloaded; the trunk used is reported)."""
    from ldm_core.models.pretrained import MissingWeightsError
    from stage_a_vae.perceptual import build_lpips

    try:
        return build_lpips(loss_cfg.lpips_trunk, loss_cfg.lpips_weights).to(device), loss_cfg.lpips_trunk
    except MissingWeightsError as err:
        return build_lpips("random").to(device), f"random (the VGG16 file is missing: {str(err)[:120]})"


def build_stage_a(cfg, perceptual, device: torch.device, *, channels_last: bool = False, fp16: bool = False,
                  ldm_optimizers: bool = False) -> StageAParts:
    """Our Stage A models, loss and optimizers as `train_vae` builds them (stage_a_vae/train.py, section 3),
    without Accelerate; with `ldm_optimizers` plain Adam(0.5, 0.9) for both, as LDM's `configure_optimizers`."""
    from ldm_core.training.accelerator import apply_memory_format
    from ldm_core.training.optimization import make_adam
    from stage_a_vae.discriminator import build_discriminator
    from stage_a_vae.losses import LPIPSWithDiscriminatorLoss
    from stage_a_vae.architectures import build_autoencoder
    from stage_a_vae.train import AutoencoderForTraining

    torch.manual_seed(0)
    tc, lc = replace(cfg.train, channels_last=channels_last), cfg.loss
    vae = apply_memory_format(build_autoencoder(cfg.model), tc).to(device)
    disc = apply_memory_format(build_discriminator(lc), tc).to(device)
    loss_fn = LPIPSWithDiscriminatorLoss(lc, perceptual if lc.perceptual_weight > 0 else None, disc).to(device)
    if ldm_optimizers:
        opt_ae = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    else:
        trained = list(vae.parameters()) + ([loss_fn.logvar] if lc.learn_logvar else [])
        opt_ae = make_adam(trained, tc, lr=tc.lr)
        opt_d = make_adam(disc.parameters(), tc, lr=tc.disc_learning_rate, betas=tc.disc_betas)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    return StageAParts(vae, disc, loss_fn, AutoencoderForTraining(vae), opt_ae, opt_d, scaler,
                       vae.decoder.conv_out.weight, tc.max_grad_norm)


def _has_gradients(optimizer) -> bool:
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


def _same_bits(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Bit-for-bit equality, NaN and inf included (torch.equal calls two NaN gradients different)."""
    if a is None or b is None:
        return a is None and b is None
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def step_if_gradients(scaler, optimizer) -> bool:
    """Step `optimizer` through the scaler only when some parameter has a gradient. An optimizer without any
    (the discriminator's before disc_start) makes GradScaler.step raise "No inf checks were recorded for this
    optimizer" on the unfused path (nerfstudio-project/nerfstudio#1919 guards its optimizers the same way)."""
    if not _has_gradients(optimizer):
        return False
    scaler.step(optimizer)
    return True


def _unscale_and_clip(scaler, optimizer, max_norm: float) -> None:
    # Clipping needs true gradients: unscale first (a no-op without fp16). train_vae clips both updates.
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def stage_a_step(p: StageAParts, x: torch.Tensor, step: int, dtype: torch.dtype, generator, *,
                 inspect: bool = False) -> dict[str, Any]:
    """One optimizer step of Stage A (`autoencoder_micro_step` in stage_a_vae/train.py, applied by the loop in
    ldm_core/training/run.py) by hand: the autoencoder update, then, once the discriminator is on, its update
    on the detached reconstruction.

    As under Accelerate, the models run under autocast and the autoencoder's outputs come back in fp32
    (accelerate's `prepare_model` wraps forward in autocast and `convert_outputs_to_fp32`); the loss keeps
    its own arithmetic and LPIPS in fp32. One grad scaler serves both optimizers: each loss is scaled, each
    optimizer with gradients is stepped, and the scale is updated once per iteration (PyTorch's AMP
    examples, "Working with multiple models, losses, and optimizers"; accelerate#439 on Accelerate's shared
    scaler). With `inspect` it also returns what section 3 checks.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    device = x.device
    disc_on = p.loss_fn.discriminator_active(step)
    info: dict[str, Any] = {"step": step, "disc_on": disc_on}
    if disc_on:
        p.discriminator.requires_grad_(False)  # the autoencoder's update only scores with it
    with _autocast(device, dtype):
        recon, mean, logvar = (t.float() for t in p.model(x, generator))
        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
        ae_loss, logs = p.loss_fn.autoencoder_loss(x, recon, posterior, step, last_layer=p.last_layer,
                                                   discriminator=p.discriminator)
    p.scaler.scale(ae_loss).backward()
    _unscale_and_clip(p.scaler, p.opt_ae, p.max_grad_norm)
    if inspect:
        info["losses"] = {"ae_loss": ae_loss.detach(), **logs}
        info["disc_grads_after_ae_step"] = sum(q.grad is not None for q in p.discriminator.parameters())
    scale = float(p.scaler.get_scale()) if p.scaler.is_enabled() else None
    info["ae_stepped"] = step_if_gradients(p.scaler, p.opt_ae)
    if inspect:  # train_vae zeroes them here; kept, they show whether the discriminator's update adds to them
        ae_grads = [None if q.grad is None else q.grad.clone() for q in p.vae.parameters()]
    if disc_on:
        p.discriminator.requires_grad_(True)
        with _autocast(device, dtype):
            d_loss, d_logs = p.loss_fn.discriminator_loss(x, recon.detach(), step)
        p.scaler.scale(d_loss).backward()
        _unscale_and_clip(p.scaler, p.opt_d, p.max_grad_norm)
        if inspect:
            info["losses"].update(d_logs)  # d_loss, logits_real, logits_fake
            grads = [q.grad for q in p.discriminator.parameters() if q.grad is not None]
            info["disc_grads_after_d_step"] = len(grads)
            # Under fp16 an inf gradient is routine: the scaler skips that update and lowers the scale.
            info["disc_grads_finite"] = sum(bool(torch.isfinite(g).all()) for g in grads)
            info["ae_grads_unchanged_by_d_step"] = all(
                _same_bits(a, q.grad) for a, q in zip(ae_grads, p.vae.parameters()))
    info["d_stepped"] = step_if_gradients(p.scaler, p.opt_d)
    p.scaler.update()
    if scale is not None:
        info["scale"] = scale
        info["scaler_skipped_step"] = float(p.scaler.get_scale()) < scale  # an inf gradient halves the scale
    p.opt_ae.zero_grad(set_to_none=True)
    p.opt_d.zero_grad(set_to_none=True)
    if inspect:
        info["losses"] = {k: float(v) for k, v in info["losses"].items()}
        info["opt_d_state_tensors"] = len(p.opt_d.state)
    return info


class ActivationPeaks:
    """Forward hooks on every block of the encoder and decoder: the largest |activation| and its dtype."""

    BLOCKS = ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_out")

    def __init__(self, vae):
        self.peaks: dict[str, float] = {}
        self.dtypes: dict[str, str] = {}
        self.handles = []
        for part in ("encoder", "decoder"):
            for name, child in getattr(vae, part).named_children():
                if name not in self.BLOCKS:
                    continue
                blocks = enumerate(child) if isinstance(child, torch.nn.ModuleList) else [(None, child)]
                for i, block in blocks:
                    label = f"{part}.{name}" + ("" if i is None else f".{i}")
                    self.handles.append(block.register_forward_hook(self._hook(label)))

    def _hook(self, label: str):
        def hook(module, inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            value = float(t.detach().abs().amax())
            value = value if math.isfinite(value) else math.inf
            self.peaks[label] = max(self.peaks.get(label, 0.0), value)
            self.dtypes[label] = str(t.dtype).replace("torch.", "")
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _images(count: int, size: int, device: torch.device) -> torch.Tensor:
    """`count` builtin:shapes images at `size` px in [-1, 1] (real edges and flat colours, not noise)."""
    from ldm_core.image_values import to_model_input
    from ldm_core.data.shapes import make_shapes

    images, _, _ = make_shapes(count, 0, size=size)
    return to_model_input(torch.from_numpy(images).to(device))


# ---------------------------------------------------------------------------------------------------
# 3. Stage A correctness under bf16 and fp16


def _precision_checks(r: Runner, cfg, perceptual, x: torch.Tensor, label: str, dtype: torch.dtype) -> tuple[dict, list]:
    p = build_stage_a(cfg, perceptual, r.device, fp16=dtype is torch.float16)
    peaks = ActivationPeaks(p.vae)
    generator = torch.Generator(r.device).manual_seed(0)
    try:
        steps = [stage_a_step(p, x, s, dtype, generator, inspect=True) for s in range(r.plan.correctness_steps)]
    finally:
        peaks.remove()
    disc_start = cfg.loss.disc_start
    before = [s for s in steps if s["step"] < disc_start]
    after = [s for s in steps if s["step"] >= disc_start]
    n_disc = sum(1 for _ in p.discriminator.parameters())
    tensors = [*p.vae.parameters(), *p.discriminator.parameters(), p.loss_fn.logvar]
    states = [t for opt in (p.opt_ae, p.opt_d) for st in opt.state.values() for t in st.values()
              if torch.is_tensor(t) and t.is_floating_point()]
    not_fp32 = sorted({str(t.dtype) for t in tensors + states if t.dtype != torch.float32})
    bad_losses = [(s["step"], k, v) for s in steps for k, v in s["losses"].items() if not math.isfinite(v)]
    d_weights = [s["losses"]["d_weight"] for s in after]
    max_weight = 1e4 * cfg.loss.disc_weight  # the adaptive weight's clamp (taming's calculate_adaptive_weight)
    top = max(peaks.peaks, key=peaks.peaks.get)
    out_dtype = peaks.dtypes.get("decoder.conv_out")
    checks = [
        check(f"{label}: every loss finite", not bad_losses and bool(steps),
              bad_losses or f"{len(steps)} steps, {len(steps[0]['losses'])}+ terms each"),
        check(f"{label}: parameters and optimizer states still fp32", not not_fp32,
              not_fp32 or f"{len(tensors)} parameters, {len(states)} optimizer tensors"),
        check(f"{label}: no discriminator gradients or optimizer step before disc_start",
              bool(before) and all(s["disc_grads_after_ae_step"] == 0 and not s["d_stepped"]
                                   and s["opt_d_state_tensors"] == 0 for s in before),
              [{k: s[k] for k in ("step", "disc_grads_after_ae_step", "d_stepped", "opt_d_state_tensors")}
               for s in before]),
        check(f"{label}: discriminator gradients present and stepped after disc_start",
              bool(after) and all(s["disc_grads_after_d_step"] == n_disc and s["d_stepped"]
                                  and s["disc_grads_after_ae_step"] == 0 for s in after),
              [{k: s[k] for k in ("step", "disc_grads_after_ae_step", "disc_grads_after_d_step", "disc_grads_finite",
                                  "d_stepped")} for s in after] + [f"{n_disc} discriminator parameters"]),
        check(f"{label}: autoencoder gradients untouched by the discriminator step",
              bool(after) and all(s["ae_grads_unchanged_by_d_step"] for s in after),
              [s["ae_grads_unchanged_by_d_step"] for s in after]),
        check(f"{label}: adaptive weight finite and positive after disc_start",
              bool(d_weights) and all(math.isfinite(w) and w > 0 for w in d_weights), d_weights),
        check(f"{label}: adaptive weight below its clamp (a clamped weight means a gradient underflowed)",
              bool(d_weights) and all(w < max_weight for w in d_weights), {"d_weight": d_weights, "clamp": max_weight}),
        # The fp16 limit matters even under bf16: it says whether this autoencoder could run in fp16 at all
        # (SD-XL's VAE overflows there: madebyollin/sdxl-vae-fp16-fix, diffusers' AutoencoderKL `force_upcast`).
        check(f"{label}: largest activation of every encoder/decoder block below fp16's 65,504",
              all(v < FP16_MAX for v in peaks.peaks.values()), f"largest: {top} {peaks.peaks[top]:.4g}"),
        check(f"{label}: the autoencoder ran in {label} under autocast", out_dtype == str(dtype).replace("torch.", ""),
              f"decoder.conv_out output dtype {out_dtype}"),
    ]
    if dtype is torch.float16:
        checks.append(check("fp16: the grad scaler stepped exactly the optimizers with gradients",
                            all(s["d_stepped"] == s["disc_on"] and s["ae_stepped"] for s in steps),
                            [{k: s.get(k) for k in ("step", "ae_stepped", "d_stepped", "scale", "scaler_skipped_step")}
                             for s in steps]))
    skipped = [s["step"] for s in steps if s.get("scaler_skipped_step")]
    result = {"steps": steps, "activation_peaks": peaks.peaks, "activation_dtypes": peaks.dtypes,
              # An inf/NaN gradient makes the scaler skip that update and halve its scale: recorded, not a
              # failure. LDM's loss sums over C*H*W rather than averaging, so its gradients are C*H*W times
              # a mean loss's, and the scaler's 65,536 start is likely to overflow fp16 for the first steps.
              "scaler_skipped_steps": skipped if dtype is torch.float16 else None,
              "fp16_headroom": FP16_MAX / max(peaks.peaks.values()) if peaks.peaks[top] > 0 else None}
    return result, checks


def section_stage_a_correctness(r: Runner) -> dict[str, Any]:
    plan = r.plan
    disc_start = plan.correctness_steps // 2
    cfg = stage_a_config(plan, (f"loss.disc_start={disc_start}",))
    perceptual, trunk = build_perceptual(cfg.loss, r.device)
    x = _images(plan.correctness_batch, cfg.data.resolution, r.device)
    results: dict[str, Any] = {"preset": cfg.model.preset, "resolution": cfg.data.resolution,
                               "batch": plan.correctness_batch, "disc_start": disc_start,
                               "steps": plan.correctness_steps, "lpips_trunk": trunk, "precisions": {}}
    checks: list[dict] = []
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        try:
            results["precisions"][label], found = _precision_checks(r, cfg, perceptual, x, label, dtype)
            checks += found
        except Exception as err:
            # fp16 autocast lacks kernels on some CPUs: not a failure of the code under test there.
            on_cpu = (r.device.type == "cpu" and dtype is torch.float16
                      and (isinstance(err, NotImplementedError) or "Half" in str(err)))
            checks.append(check(f"{label}: Stage A steps ran", False, f"{type(err).__name__}: {err}"[:500],
                                skipped=on_cpu))
        free_memory(r.device)
    results["checks"] = checks
    return results


# ---------------------------------------------------------------------------------------------------
# 4. Stage A speed


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
        return _skipped_row("--compile off" if r.args.compile == "off" else
                            "tiny mode: compiling even the tiny autoencoder costs seconds to minutes on a CPU "
                            "(docs/performance.md); --compile on runs it", batch, **labels)
    timeout = min(r.args.compile_timeout_s, r.time_left() - r.reserve_after("stage_a_speed"))
    if timeout < 10:
        return _skipped_row(f"{timeout:.0f} s of the budget left for it", batch, **labels)
    args = ["--worker", "compile-stage-a", "--device", str(r.device), "--compile-backend", r.args.compile_backend,
            *(["--tiny"] if r.plan is TINY else [])]
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
    plan = TINY if args.tiny else FULL
    dev = pick_device(args.device)
    if plan is TINY and dev.type == "cpu":
        torch.set_num_threads(1)  # as main does in tiny CPU mode
    cfg = stage_a_config(plan, ("loss.disc_start=1",))
    perceptual, _ = build_perceptual(cfg.loss, dev)
    x = _images(plan.a_split_batch, cfg.data.resolution, dev)
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
    cfg = stage_a_config(plan, ("loss.disc_start=1",))  # step 0 is before disc_start, step 1 after
    no_lpips = replace(cfg, loss=replace(cfg.loss, perceptual_weight=0.0))
    perceptual, trunk = build_perceptual(cfg.loss, r.device)
    images = _images(max(plan.a_batches + (plan.a_split_batch,)), cfg.data.resolution, r.device)
    rows, flops_at = [], {}

    def row(x, config=cfg, **kw):
        if r.affords("stage_a_speed", plan.row_s):
            result = _stage_a_row(r, config, perceptual, x, **kw)
        else:
            result = _skipped_row("budget", len(x), **{k: v for k, v in kw.items() if isinstance(v, str)})
        rows.append(result)
        return result

    for batch in plan.a_batches:
        for channels_last in (False, True):
            got = row(images[:batch], path="ours", phase="after disc_start", precision="bf16",
                      channels_last=channels_last, flops=flops_at.get(batch))
            flops_at.setdefault(batch, got.get("flops_per_step"))
    x = images[:plan.a_split_batch]
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


# ---------------------------------------------------------------------------------------------------
# 5. Stage B speed


def section_stage_b_speed(r: Runner) -> dict[str, Any]:
    from benchmarks.reference_loops import text_to_image_stage_b_step
    from ldm_core.training.ema import make_ema
    from ldm_core.training.optimization import make_adam
    from stage_a_vae.architectures import build_autoencoder
    from stage_b_diffusion.noise_schedule import build_noise_scheduler
    from stage_b_diffusion.objective import diffusion_loss
    from stage_b_diffusion.architectures import build_unet, count_parameters

    plan, dev = r.plan, r.device
    cfg = stage_b_config(plan)
    tc, size = cfg.train, cfg.data.resolution // 8
    torch.manual_seed(0)
    unet = build_unet(cfg.model, latent_channels=4, latent_size=size).to(dev)
    scheduler = build_noise_scheduler(cfg.diffusion)
    optimizer = make_adam(unet.parameters(), tc, lr=tc.lr, decoupled_weight_decay=True)
    ema = make_ema(unet, cfg.ema)
    if ema is not None:
        ema.to(dev)
    generator = torch.Generator(dev).manual_seed(0)
    rows = []
    for batch in plan.b_batches:
        if not r.affords("stage_b_speed", plan.row_s):
            rows.append(_skipped_row("budget", batch, path="ours"))
            continue
        latents = torch.randn(batch, 4, size, size, device=dev)  # as drawn from the latent cache

        # Stage B's step (stage_b_diffusion/train.py: `noise_prediction_micro_step`) without Accelerate: the
        # loss under autocast, backward, clipping, fused AdamW, the EMA.
        def step():
            with _autocast(dev, torch.bfloat16):
                loss, _ = diffusion_loss(unet, latents, scheduler, cfg.diffusion, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(unet.parameters())

        rows.append(measure(r, step, batch, path="ours", precision="bf16"))
        optimizer.zero_grad(set_to_none=True)
        del latents
        free_memory(dev)
    del optimizer, ema
    free_memory(dev)

    # The diffusers text-to-image step: encode every batch through the frozen VAE, plain AdamW; under bf16
    # autocast, as that example runs with --mixed_precision=bf16.
    batch = plan.b_reference_batch
    if r.affords("stage_b_speed", plan.row_s):
        vae = build_autoencoder(stage_a_config(plan).model).to(dev).eval().requires_grad_(False)
        reference_opt = torch.optim.AdamW(unet.parameters(), lr=tc.lr)
        images = _images(batch, cfg.data.resolution, dev)

        def reference_step():
            with _autocast(dev, torch.bfloat16):
                text_to_image_stage_b_step(vae, unet, scheduler, reference_opt, images, generator)

        rows.append(measure(r, reference_step, batch, path="diffusers text-to-image", precision="bf16"))
        del vae, reference_opt, images
    else:
        rows.append(_skipped_row("budget", batch, path="diffusers text-to-image"))
    ours = next((w for w in rows if w["path"] == "ours" and w["batch"] == batch and "step_s" in w), None)
    ref = rows[-1] if "step_s" in rows[-1] else None
    return {"preset": cfg.model.preset, "parameters": count_parameters(unet), "latent_shape": [4, size, size],
            "rows": rows, "ours_over_text_to_image": ref["step_s"] / ours["step_s"] if ours and ref else None,
            "anchors": [REFERENCE_FIGURES["stage_b_images_per_s"], REFERENCE_FIGURES["conv_utilisation"]]}


# ---------------------------------------------------------------------------------------------------
# 6. Sampling


def section_sampling(r: Runner) -> dict[str, Any]:
    from pipelines.latent_diffusion import LatentDiffusionPipeline
    from stage_a_vae.architectures import build_autoencoder
    from stage_b_diffusion.noise_schedule import build_noise_scheduler, make_sampler
    from stage_b_diffusion.architectures import build_unet

    plan, dev = r.plan, r.device
    cfg = stage_b_config(plan)
    size = cfg.data.resolution // 8
    torch.manual_seed(0)
    models = {"fp32": (build_unet(cfg.model, latent_channels=4, latent_size=size).to(dev).eval(),
                       build_autoencoder(stage_a_config(plan).model).to(dev).eval())}
    models["bf16"] = tuple(copy.deepcopy(m).to(torch.bfloat16) for m in models["fp32"])  # bf16 weights, as inference runs
    sampler = make_sampler("dpmsolver++", build_noise_scheduler(cfg.diffusion))
    rows, checks = [], []
    for precision, (unet, vae) in models.items():
        dtype = unet.dtype
        noisy = torch.randn(plan.sample_batch, 4, size, size, device=dev, dtype=dtype)
        t = torch.full((plan.sample_batch,), 500, device=dev)
        z = torch.randn(plan.decode_batch, 4, size, size, device=dev, dtype=dtype)
        with torch.inference_mode():
            rows.append(measure(r, lambda: unet(noisy, t).sample, plan.sample_batch, what="U-Net forward",
                                precision=precision))
            decoded = vae.decode(z).sample
            checks.append(check(f"{precision}: VAE decode finite", bool(torch.isfinite(decoded).all()),
                                f"max |x| {float(decoded.abs().amax()):.3g}"))
            rows.append(measure(r, lambda: vae.decode(z).sample, plan.decode_batch, what="VAE decode",
                                precision=precision))
        pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=copy.deepcopy(sampler))
        pipe.set_progress_bar_config(disable=True)

        def sample(steps=plan.dpm_steps):
            return pipe(batch_size=plan.sample_batch, num_inference_steps=steps, output_type="pt",
                        generator=torch.Generator(dev).manual_seed(0), decode_batch_size=plan.decode_batch).images

        if r.affords("sampling", plan.row_s):
            sample(2)  # warm-up at the same batch; the FLOP count's call warms up the rest
            rows.append(measure(r, sample, plan.sample_batch, what=f"DPM-Solver++ {plan.dpm_steps} steps, end to end",
                                precision=precision, warmup=0, iters=1))
        else:
            rows.append(_skipped_row("budget", plan.sample_batch, what="DPM-Solver++ end to end", precision=precision))
        del noisy, z, decoded
        free_memory(dev)
    for row in rows:
        if "step_s" in row:
            row["calls_per_s"] = 1 / row["step_s"]
    by = {(w["what"], w["precision"]): w for w in rows if "step_s" in w}
    ratios = {what: by[what, "fp32"]["step_s"] / by[what, "bf16"]["step_s"]
              for what, _ in by if (what, "fp32") in by and (what, "bf16") in by}
    return {"image_size": cfg.data.resolution, "latent_shape": [4, size, size], "rows": rows,
            "bf16_speedup_over_fp32": ratios, "checks": checks}


# ---------------------------------------------------------------------------------------------------
# 7. The demo


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
    """The environment of this script's subprocesses: one thread each in tiny CPU mode, like this process."""
    env = dict(os.environ)
    if torch.get_num_threads() == 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def section_demo(r: Runner) -> dict[str, Any]:
    demo_dir = r.out / "demo"
    # A finished demo folder is only printed again by `ldm demo`: start from an empty one.
    shutil.rmtree(demo_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "workflows.cli", "demo", "--out", str(demo_dir), *r.plan.demo_overrides]
    results: dict[str, Any] = {"command": " ".join(cmd)}
    start = time.monotonic()
    if r.plan.demo_in_process:  # its output goes to this process's
        from workflows.cli import main as ldm_main

        results["returncode"] = ldm_main(cmd[3:])
    else:
        log = r.out / "demo.log"
        timeout = max(1.0, r.time_left() - 2)
        results.update(log=str(log), timeout_s=round(timeout, 1))
        with open(log, "w") as fh:
            try:
                results["returncode"] = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                                       env=subprocess_env()).returncode
            except subprocess.TimeoutExpired:
                results["error"] = f"cut after {timeout:.0f} s (the budget); the stages that finished are below"
    results["wall_s"] = time.monotonic() - start
    results["stage_a"] = _stage_metrics(demo_dir / "stage_a")
    results["stage_b"] = _stage_metrics(demo_dir / "stage_b")
    summary_path = demo_dir / "summary.json"
    if summary_path.is_file():
        s = json.loads(summary_path.read_text())
        results["summary"] = {
            "wall_minutes": s["wall_minutes"], "training_minutes": s["training_minutes"],
            **{k: s["stage_a"][k] for k in ("val_psnr", "val_ssim", "heldout_psnr", "bicubic_psnr",
                                            "reconstructions_valid", "scaling_factor")},
            "stage_b_final_loss": s["stage_b"]["final_loss"], "samples_validity": s["samples"]["validity"],
            "samples_class_histogram": s["samples"]["class_histogram"],
            "samples_plain_diffusers_validity": s["samples_plain_diffusers"]["validity"], "sampler": s["sampler"]}
    elif "error" not in results:
        results["error"] = (f"`ldm demo` exited {results.get('returncode')} without a summary"
                            + (f"; see {results['log']}" if "log" in results else ""))
    results["cpu_reference"] = (CPU_DEMO if r.plan is FULL else
                                "not comparable: tiny mode trains 2 steps of the unit-test presets")
    return results


SECTIONS: dict[str, Callable[[Runner], dict]] = {
    "machine": section_machine, "limits": section_limits, "stage_a_correctness": section_stage_a_correctness,
    "stage_a_speed": section_stage_a_speed, "stage_b_speed": section_stage_b_speed, "sampling": section_sampling,
    "demo": section_demo}


# ---------------------------------------------------------------------------------------------------
# The summary


def all_checks(report: dict) -> list[dict]:
    return [c for entry in report["sections"].values() for c in entry.get("results", {}).get("checks", [])]


def summary_markdown(report: dict) -> str:
    sections = {k: v.get("results", {}) for k, v in report["sections"].items()}
    rows: list[dict[str, Any]] = []
    limits = sections.get("limits", {})
    if "bf16_matmul_tflops" in limits:
        rows.append({"what": f"bf16 matmul {limits['matmul_size']}^3", "value": f"{limits['bf16_matmul_tflops']:.4g} TFLOP/s",
                     "anchor": "~790 of 989 TFLOP/s (H100/H200)"})
        rows.append({"what": "device-to-device copy (read + write)",
                     "value": f"{limits['copy_read_plus_write_gb_per_s']:.4g} GB/s", "anchor": "4,800 GB/s nominal (H200)"})
    for name, anchor in (("stage_a_speed", "20-35% (conv nets)"), ("stage_b_speed", "20-35%; SD-2 U-Net ~137 img/s/A100"),
                         ("sampling", "")):
        for w in sections.get(name, {}).get("rows", []):
            label = w.get("what") or f"{w.get('path')}, {w.get('phase', '')}".strip(", ")
            extra = ", ".join(str(w[k]) for k in ("memory_format", "compiled") if w.get(k) and w[k] != "contiguous")
            value = (f"{w['calls_per_s']:.4g} steps/s" if w.get("what") == "U-Net forward" and "calls_per_s" in w
                     else f"{w['images_per_s']:.4g} img/s" if "images_per_s" in w else
                     f"skipped: {w['skipped']}" if "skipped" in w else f"error: {w.get('error')}")
            if "compile_s" in w:
                value += f" (compile {w['compile_s']:.0f} s)"
            rows.append({"what": f"{name}: {label}" + (f" [{extra}]" if extra else ""), "precision": w.get("precision"),
                         "batch": w.get("batch"), "value": value, "utilisation": w.get("utilisation"),
                         "anchor": anchor})
    a = sections.get("stage_a_speed", {})
    for key, ratio in a.get("vs_ldm", {}).items():
        rows.append({"what": f"stage A speed-up, {key.replace('_', ' ')}", "value": f"{ratio:.3g}x"})
    if a.get("time_split"):
        t = a["time_split"]
        rows.append({"what": "stage A time split (autoencoder / LPIPS / discriminator)",
                     "value": f"{t['autoencoder_fraction']:.0%} / {t['lpips_fraction']:.0%} / {t['discriminator_fraction']:.0%}"})
    b = sections.get("stage_b_speed", {})
    if b.get("ours_over_text_to_image"):
        rows.append({"what": "stage B speed-up over diffusers text-to-image", "value": f"{b['ours_over_text_to_image']:.3g}x"})
    for what, ratio in sections.get("sampling", {}).get("bf16_speedup_over_fp32", {}).items():
        rows.append({"what": f"sampling: {what}, bf16 over fp32", "value": f"{ratio:.3g}x"})
    demo = sections.get("demo", {})
    if demo.get("summary"):
        d, cpu = demo["summary"], demo.get("cpu_reference")
        cpu = cpu if isinstance(cpu, dict) else {}
        rows.append({"what": "demo wall time", "value": f"{d['wall_minutes']:.3g} min",
                     "anchor": f"CPU {cpu['wall_minutes']} min" if cpu else ""})
        rows.append({"what": "demo held-out PSNR / samples valid",
                     "value": f"{d['heldout_psnr']:.4g} dB / {d['samples_validity']:.1%}",
                     "anchor": f"CPU {cpu['heldout_psnr']} dB / {cpu['samples_validity']:.1%}" if cpu else ""})
    checks = all_checks(report)
    failed = [c["name"] for c in checks if not c["ok"] and not c.get("skipped")]
    status = ", ".join(f"{k} {v['status']}" for k, v in report["sections"].items())
    table = markdown_table(rows, [("what", "measure"), ("precision", "precision"), ("batch", "batch"),
                                  ("value", "ours"), ("utilisation", "of bf16 matmul peak"), ("anchor", "anchor")])
    return (f"# gpu_check ({report['mode']}, {report['device']})\n\n{table}\n\n"
            f"Checks: {sum(c['ok'] for c in checks)} passed, {len(failed)} failed, "
            f"{sum(bool(c.get('skipped')) for c in checks)} skipped" + (f" (failed: {'; '.join(failed)})" if failed else "")
            + f". Sections: {status}.\n\nAnchors: " + " ".join(f"{v}." for v in REFERENCE_FIGURES.values()) + "\n")


# ---------------------------------------------------------------------------------------------------


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="writes OUT/gpu_check.json and .md")
    parser.add_argument("--tiny", action="store_true", help="tiny presets (automatic without CUDA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sections", default=",".join(SECTION_NAMES),
                        help=f"comma-separated subset of {','.join(SECTION_NAMES)}")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="the run's time from the start of main; 8 minutes less the interpreter's start")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="time torch.compile of the autoencoder (auto: on the GPU, not in tiny mode)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-timeout-s", type=float, default=90.0,
                        help="the compile worker's limit (import, build, compile, timed steps)")
    parser.add_argument("--worker", choices=["compile-stage-a"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.result.write_text(json.dumps(worker_compile_stage_a(args)))
        return 0
    device = pick_device(args.device)
    plan = TINY if args.tiny or device.type != "cuda" else FULL
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTION_NAMES]
    if unknown or not sections:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {', '.join(SECTION_NAMES)}")
    sections = [s for s in SECTION_NAMES if s in sections]  # always in the order
    threads = torch.get_num_threads()
    if plan is TINY and device.type == "cpu":
        # Tiny models gain nothing from a second thread, and next to another busy process OpenMP's barriers
        # cost far more than the work: a unet-tiny forward took 0.67 s on 2 threads, 4 ms on 1, on a 2-core
        # CPU shared with a training run. Restored below (a test calls main in its own process).
        torch.set_num_threads(1)
    try:
        runner = Runner(args, plan, device, sections)
        runner.write()
        for name in sections:
            runner.run(name, SECTIONS[name])
        runner.report["complete"] = True
        runner.write()
    finally:
        torch.set_num_threads(threads)
    text = summary_markdown(runner.report)
    (runner.out / "gpu_check.md").write_text(text)
    print(text, flush=True)
    failed = any(not c["ok"] and not c.get("skipped") for c in all_checks(runner.report))
    errored = any(v["status"] == "error" for v in runner.report["sections"].values())
    return 1 if failed or errored else 0


if __name__ == "__main__":
    sys.exit(main())
