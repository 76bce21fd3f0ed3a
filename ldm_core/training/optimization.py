"""Optimizers, learning-rate schedules and gradient clipping, shared by both stages.

Several processes (`accelerate launch`): each process draws `train.batch_size` images per micro-step,
DDP averages the gradients, so one optimizer step sees a global batch of
`batch_size x processes x gradient_accumulation_steps` images and applies `train.lr` unchanged (no
automatic scaling by the number of processes, unlike LDM's `scale_lr`). The LR schedules are stepped
once per optimizer step by the loops, not by Accelerate, so their shape does not depend on the
number of processes.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ldm_core.config.settings import TrainConfig


def make_adam(params: Iterable[torch.nn.Parameter], train_cfg: TrainConfig, *, lr: float,
              decoupled_weight_decay: bool = False,
              betas: Optional[tuple[float, float]] = None) -> torch.optim.Optimizer:
    """Adam (LDM's Stage A optimizer) or AdamW (Stage B), with fused kernels when `train.fused_optimizer`.

    The fused kernel updates every parameter in one pass instead of a loop of small ops per tensor, and
    computes the same update (tests/test_fast_paths.py; the time it saves: docs/performance.md). torch has fused Adam for CPU and CUDA; elsewhere it falls back.
    `betas` defaults to (train.adam_beta1, train.adam_beta2).
    """
    params = list(params)
    devices = {p.device.type for p in params}
    fused = train_cfg.fused_optimizer and devices <= {"cpu", "cuda"}
    cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    return cls(params, lr=lr, betas=betas or (train_cfg.adam_beta1, train_cfg.adam_beta2),
               weight_decay=train_cfg.weight_decay, fused=fused or None)



def make_lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, schedule: Optional[str] = None):
    """Linear warm-up then constant, cosine or linear decay (diffusers.optimization.get_scheduler); `schedule`
    replaces `train_cfg.lr_schedule` (Stage A's discriminator may have its own)."""
    from diffusers.optimization import get_scheduler

    schedule = train_cfg.lr_schedule if schedule is None else schedule
    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[schedule]
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=train_cfg.lr_warmup_steps,
                         num_training_steps=train_cfg.max_steps)


def clip_gradients(accelerator, parameters, max_norm: float) -> float:
    """Clip to `max_norm` (0 = no clipping) and return the pre-clip gradient norm for logging."""
    return float(accelerator.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf")))



def drop_gradients(*optimizers) -> None:
    """Clear the gradients of a skipped step (Accelerate's wrapped `zero_grad` only acts on sync steps)."""
    for opt in optimizers:
        getattr(opt, "optimizer", opt).zero_grad(set_to_none=True)

