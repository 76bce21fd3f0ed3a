"""Sections 1 and 2: what the machine is (GPU, versions, TF32 settings) and what it can do (matmul, copy)."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import torch

from benchmarks.gpu_check.references import REFERENCE_FIGURES
from benchmarks.gpu_check.runner import Runner
from benchmarks.harness import machine_description, matmul_peak_flops, seconds_per_call


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
