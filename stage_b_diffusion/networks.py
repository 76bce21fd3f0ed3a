"""Stage B's U-Net, noise schedule and optimizer, built one way for the trainer, the benchmarks, the GPU
check and the tests. The U-Net's shape comes from the frozen autoencoder (its latent channels and size)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ldm_core.training.accelerator import apply_memory_format
from ldm_core.training.ema import make_ema
from ldm_core.training.optimization import make_adam, make_lr_scheduler
from stage_b_diffusion.architectures import build_unet
from stage_b_diffusion.config import StageBConfig
from stage_b_diffusion.noise_schedule import build_noise_scheduler


@dataclass
class StageBNetworks:
    """What Stage B trains and with what, before Accelerate prepares it: the U-Net, the training noise
    schedule, AdamW (decoupled weight decay) and its LR schedule, and the EMA of the U-Net (or None)."""

    unet: UNet2DModel
    noise_scheduler: DDPMScheduler
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Any


def build_stage_b(cfg: StageBConfig, *, latent_channels: int, latent_size: int) -> StageBNetworks:
    """Stage B's networks for latents of `latent_channels` x `latent_size`^2, initialised from `train.seed`."""
    tc = cfg.train
    torch.manual_seed(tc.seed)  # identical initial weights on every process
    unet = apply_memory_format(build_unet(cfg.model, latent_channels=latent_channels, latent_size=latent_size), tc)
    optimizer = make_adam(unet.parameters(), tc, lr=tc.lr, decoupled_weight_decay=True)
    return StageBNetworks(unet, build_noise_scheduler(cfg.diffusion), optimizer, make_lr_scheduler(optimizer, tc),
                          make_ema(unet, cfg.ema))


__all__ = ["StageBNetworks", "build_stage_b"]
