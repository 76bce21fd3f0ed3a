"""The training loops' speed options and their step timer.

Each option is a switch in `TrainConfig`, defaults chosen by measurement (`benchmarks/`, README
"Performance"), and each is tested to compute what the plain path computes (`tests/test_fast_paths.py`).
"""

from __future__ import annotations

import time
from typing import Iterable

import torch

from ldm_core.config import TrainConfig


def make_adam(params: Iterable[torch.nn.Parameter], train_cfg: TrainConfig, *, lr: float,
              decoupled_weight_decay: bool = False) -> torch.optim.Optimizer:
    """Adam (LDM's Stage A optimizer) or AdamW (Stage B), with fused kernels when `train.fused_optimizer`.

    The fused kernel updates every parameter in one pass instead of a loop of small ops per tensor; on
    a 2-core CPU it cuts the optimizer step of kl-f8-small from about 15 ms to 3 ms. It computes the same
    update (tests/test_fast_paths.py). torch has fused Adam for CPU and CUDA; elsewhere it falls back.
    """
    params = list(params)
    devices = {p.device.type for p in params}
    fused = train_cfg.fused_optimizer and devices <= {"cpu", "cuda"}
    cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    return cls(params, lr=lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
               weight_decay=train_cfg.weight_decay, fused=fused or None)


def apply_memory_format(module: torch.nn.Module, train_cfg: TrainConfig) -> torch.nn.Module:
    """Store conv weights channels-last (NHWC) when `train.channels_last`; inputs follow through the first conv.

    oneDNN on CPU and cuDNN on tensor-core GPUs pick faster convolution kernels for NHWC; the values are
    the same (tests/test_fast_paths.py).
    """
    if train_cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


class StepTimer:
    """Wall time of the training steps alone (no validation, sampling or checkpoint), for `step_time`.

    `start()` at the top of a step, `stop()` at its end; `mean_and_reset()` at a log point returns the
    mean seconds per step since the previous one. Time on an accelerator is asynchronous, so each
    `stop()` synchronises: the number is the step's real duration, not the time to queue it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.total, self.count, self._t0 = 0.0, 0, None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.total += time.perf_counter() - self._t0
        self.count += 1

    def mean_and_reset(self) -> float:
        mean = self.total / max(self.count, 1)
        self.total, self.count = 0.0, 0
        return mean
