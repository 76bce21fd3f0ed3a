"""The Accelerator a run uses: device, mixed precision, gradient accumulation, trackers, processes."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from ldm_core.config.settings import REPORT_TO, ConfigError, TrainConfig

logger = logging.getLogger("ldm.train")


def cpu_only() -> bool:
    """Whether Accelerate must be told `cpu=True`: no CUDA, or the launcher asked for the CPU.

    Without CUDA, Accelerate joins the processes of a multi-process launch (gloo, MULTI_CPU) only when
    asked for the CPU; otherwise every process would run alone, unaware of the others.
    """
    from accelerate.utils import parse_flag_from_env

    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def check_mixed_precision(train_cfg: TrainConfig, key: str = "train.mixed_precision") -> None:
    """Refuse a precision this machine cannot run (before any work): Accelerate would run fp16 on a CPU as
    fp32 while the run records fp16."""
    if train_cfg.mixed_precision == "fp16" and cpu_only():
        raise ConfigError(f"{key}=fp16 needs a CUDA GPU, and none is in use here. Use {key}=no (or bf16 on a "
                          f"CPU with AVX512-BF16 or AMX).")


def check_trackers(train_cfg: TrainConfig, key: str = "train.report_to") -> list[str]:
    """The trackers `train.report_to` names, refused before any work when one cannot run here."""
    trackers = REPORT_TO[train_cfg.report_to]
    if "wandb" in trackers:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"{key}={train_cfg.report_to} needs the wandb package: pip install wandb (or "
                              f"pip install 'two-stage-ldm[wandb]'), or choose {key}=tensorboard.")
    return trackers


def make_accelerator(train_cfg: TrainConfig, run_dir: Path, *, log: bool = True):
    """An Accelerator with mixed precision, gradient accumulation and the trackers of `train.report_to`
    logging into the run (TensorBoard into RUN/logs/, Weights & Biases into RUN/logs/wandb/)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # Accelerate keeps one process-wide state; `ldm train` runs two stages (possibly with different
    # precisions or accumulation) in one process, so the previous stage's settings are dropped here.
    # The distributed process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs"))
    trackers = check_trackers(train_cfg) if log else []
    accelerator = Accelerator(cpu=cpu_only(), mixed_precision=train_cfg.mixed_precision,
                              gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
                              log_with=trackers or None, project_config=project)
    if accelerator.device.type == "cpu" and train_cfg.mixed_precision == "bf16" and not cpu_has_native_bf16():
        logger.warning("train.mixed_precision=bf16 on a CPU without AVX512-BF16 or AMX: bf16 convolutions are "
                       "emulated there and run many times slower than fp32 (docs/performance.md). Use "
                       "train.mixed_precision=no on this machine.")
    return accelerator


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off.

    torch's own detection (`torch.cpu._is_avx512_bf16_supported`, which moved there from `torch._C._cpu`)
    first; where neither exists, the kernel's CPU flags (Linux)."""
    for module in (getattr(torch, "cpu", None), getattr(torch._C, "_cpu", None)):
        avx512_bf16 = getattr(module, "_is_avx512_bf16_supported", None)
        amx = getattr(module, "_is_amx_tile_supported", None)
        if avx512_bf16 is not None and amx is not None:
            return bool(avx512_bf16() or amx())
    flags = cpu_info()["flags"]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_info() -> dict:
    """The CPU's model name (as `lscpu` prints it) and flags, from the kernel's /proc/cpuinfo (Linux; elsewhere
    the platform's processor string and no flags)."""
    import platform

    info = {"model": platform.processor() or platform.machine(), "flags": frozenset()}
    try:
        with open("/proc/cpuinfo") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    info["model"] = value.strip()
                elif key.strip() == "flags":
                    info["flags"] = frozenset(value.split())
                    break  # the model name comes first in each processor's block
    except OSError:
        pass
    return info


def cpu_description() -> dict:
    """The CPU's model name, core count and the vector extensions that decide its fp32 and bf16 speed."""
    info = cpu_info()
    flags = info["flags"]
    return {"model": info["model"], "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags}


def apply_memory_format(module: torch.nn.Module, train_cfg: TrainConfig) -> torch.nn.Module:
    """Store conv weights channels-last (NHWC) when `train.channels_last`; inputs follow through the first conv.

    oneDNN on CPU and cuDNN on tensor-core GPUs pick faster convolution kernels for NHWC; the values are
    the same (tests/test_fast_paths.py).
    """
    if train_cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def end_run(accelerator) -> None:
    """Close the trackers but keep the process group (`Accelerator.end_training` would destroy it): `ldm train`
    runs Stage B in the same processes, and `exit_process` ends them."""
    for tracker in accelerator.trackers:
        tracker.finish()


def exit_process(code: int) -> NoReturn:
    """End the process with exit status `code`; in a multi-process run, without the interpreter's teardown.

    With gloo, a collective's worker thread may still be releasing tensors while the interpreter tears
    down, which aborts an otherwise successful process (SIGABRT, "terminate called without an active
    exception"); destroying the process group does not stop those threads once DDP has held it. Every
    file a command writes is closed when it returns, so flush the logs and streams and leave
    (docs/performance.md, "Small measurements behind defaults").
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
