"""Stage A's networks and optimizers, built one way for the trainer, the benchmarks, the GPU check and the tests.

The order of construction is part of the result: under one `torch.manual_seed` the autoencoder is drawn
first, then the discriminator, then (with `loss.lpips_trunk=random`) the perceptual trunk, so a run's
initial weights follow from `train.seed` alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from diffusers import AutoencoderKL

from ldm_core.training.accelerator import apply_memory_format
from ldm_core.training.ema import make_ema
from ldm_core.training.optimization import make_adam, make_lr_scheduler
from stage_a_vae.architectures import build_autoencoder
from stage_a_vae.config import StageAConfig
from stage_a_vae.discriminator import NLayerDiscriminator, build_discriminator
from stage_a_vae.latent_regularisers import LatentTransform
from stage_a_vae.losses import LPIPSWithDiscriminatorLoss
from stage_a_vae.perceptual import build_lpips


class AutoencoderForTraining(torch.nn.Module):
    """Encode, sample the posterior, decode: one forward so DDP sees the whole autoencoder.

    Returns tensors only (reconstruction, posterior mean, posterior log-variance) because DDP looks for
    tensors in a module's output.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                transform: Optional[LatentTransform] = None):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        if transform is not None:  # stage_a_vae/latent_regularisers.py: the decoder sees T(z)
            z = transform.latent(z)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


@dataclass
class StageANetworks:
    """What Stage A trains and with what, before Accelerate prepares it.

    Parameters:
        vae: the autoencoder (exported at the end).
        discriminator: LDM's PatchGAN, active from `loss.disc_start`.
        loss_fn: LDM's loss (stage_a_vae/losses.py), holding the perceptual net and the learned log-variance.
        opt_ae, sched_ae: the autoencoder's Adam (with the log-variance when it is learned) and its schedule.
        opt_d, sched_d: the discriminator's.
        ema: the EMA of the autoencoder's weights, or None (`ema.enabled`).
    """

    vae: AutoencoderKL
    discriminator: NLayerDiscriminator
    loss_fn: LPIPSWithDiscriminatorLoss
    opt_ae: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_ae: Any
    sched_d: Any
    ema: Any


def build_stage_a(cfg: StageAConfig, device: torch.device | str = "cpu",
                  first_download: Callable[[], ContextManager] = contextlib.nullcontext,
                  perceptual: Optional[torch.nn.Module] = None) -> StageANetworks:
    """Stage A's networks, initialised from `train.seed`, with their optimizers, schedules and EMA; the
    loss (and its perceptual net) on `device`, the rest where Accelerate's `prepare` (or the caller) puts it.

    `first_download` wraps the perceptual net's construction, which may download its trunk on first use
    (the trainer passes `accelerator.main_process_first`, so it happens once, not once per process).
    `perceptual`: a perceptual net already built, used instead of building one (a benchmark timing many
    configurations builds it once).
    """
    tc, lc = cfg.train, cfg.loss
    torch.manual_seed(tc.seed)  # identical initial weights on every process
    vae = apply_memory_format(build_autoencoder(cfg.model), tc)
    discriminator = apply_memory_format(build_discriminator(lc), tc)
    if lc.perceptual_weight <= 0:
        perceptual = None
    elif perceptual is None:
        with first_download():
            perceptual = build_lpips(lc.lpips_trunk, lc.lpips_weights)
    loss_fn = LPIPSWithDiscriminatorLoss(lc, perceptual, discriminator).to(device)
    opt_ae = make_adam(list(vae.parameters()) + ([loss_fn.logvar] if lc.learn_logvar else []), tc, lr=tc.lr)
    opt_d = make_adam(discriminator.parameters(), tc, lr=tc.disc_learning_rate, betas=tc.disc_betas)
    sched_ae, sched_d = make_lr_scheduler(opt_ae, tc), make_lr_scheduler(opt_d, tc, schedule=tc.disc_schedule)
    return StageANetworks(vae, discriminator, loss_fn, opt_ae, opt_d, sched_ae, sched_d, make_ema(vae, cfg.ema))


__all__ = ["AutoencoderForTraining", "StageANetworks", "build_stage_a"]
