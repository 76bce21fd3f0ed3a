"""The Stage A objective: LDM's `LPIPSWithDiscriminator`, term for term (CompVis/latent-diffusion: ldm/modules/losses/contperceptual.py).

Reference: CompVis/latent-diffusion ``ldm/modules/losses/contperceptual.py`` with the GAN helpers of
CompVis/taming-transformers ``taming/modules/losses/vqperceptual.py``::

    rec      = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)      (or (x - x_hat)^2 for l2, and
                                                                       during loss.l2_warmup_steps)
    nll_loss = sum_{c,h,w}(rec / exp(logvar) + logvar) / N
    kl_loss  = sum_{c,h,w} KL(q(z|x) || N(0, I)) / N
    g_loss   = -mean(D(x_hat))
    d_weight = disc_weight * clamp(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, 1e4)   W: decoder's last layer
    L_AE     = nll_loss + kl_weight * kl_loss + d_weight * disc_factor * g_loss
    L_D      = disc_factor * hinge_or_vanilla(D(x), D(x_hat.detach()))

The sums over C, H, W are what make ``kl_weight = 1e-6`` the right size: a mean-reduced pixel term would
make the same KL weight C*H*W times stronger.

Departures from LDM, each deliberate:
- Before ``disc_start`` (or with ``disc_factor = 0``) the discriminator is not run at all, nor is the
  adaptive weight computed; LDM computes both and multiplies them by zero.
- All loss arithmetic is in fp32 and LPIPS runs with autocast disabled: its feature normalisation and
  the adaptive weight's gradient norms overflow or underflow in fp16/bf16.
- The LPIPS module is held in eval mode even when the loss is put in train mode, so the dropout inside its
  linear heads never acts on the loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from stage_a_vae.config import VAELossConfig
from stage_a_vae.discriminator import build_discriminator
from stage_a_vae.perceptual import build_lpips


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss: 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss: 0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x_hat))))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


class LPIPSWithDiscriminatorLoss(nn.Module):
    """Reconstruction + perceptual + KL + adaptive-weight PatchGAN loss of a KL autoencoder.

    Parameters:
        cfg (`VAELossConfig`): weights and switches; see stage_a_vae/config.py.
        perceptual (`nn.Module`, *optional*): maps two ``(N, 3, H, W)`` images in [-1, 1] to a distance of
            shape ``(N, 1, 1, 1)``, normally `stage_a_vae.perceptual.build_lpips`. May be None only when
            ``cfg.perceptual_weight == 0``.
        discriminator (`nn.Module`): maps images to patch logits. Pass the object the discriminator's
            optimizer steps (the DDP-wrapped one when training distributed), since this loss calls it.

    ``logvar`` is a scalar `nn.Parameter` initialised to ``cfg.logvar_init``; it only learns when
    ``cfg.learn_logvar`` (LDM never optimises it, so there ``nll == rec``). Add it to the autoencoder's
    optimizer when it learns.
    """

    def __init__(self, cfg: VAELossConfig, perceptual: Optional[nn.Module], discriminator: nn.Module):
        super().__init__()
        if perceptual is None and cfg.perceptual_weight > 0:
            raise ValueError(f"loss.perceptual_weight={cfg.perceptual_weight} needs a perceptual module "
                             f"(stage_a_vae.perceptual.build_lpips); pass one or set loss.perceptual_weight=0.")
        if cfg.disc_loss not in _D_LOSSES:
            raise ValueError(f"loss.disc_loss={cfg.disc_loss!r}; choose one of {', '.join(_D_LOSSES)}.")
        self.cfg = cfg
        self.perceptual = perceptual
        self.discriminator = discriminator
        self.logvar = nn.Parameter(torch.full((), float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)
        self._d_loss_fn = _D_LOSSES[cfg.disc_loss]
        if self.perceptual is not None:
            self.perceptual.eval()

    def train(self, mode: bool = True) -> "LPIPSWithDiscriminatorLoss":
        super().train(mode)
        # LPIPS is a fixed metric: its linear heads contain dropout that must never be active.
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    def pixel_loss(self, global_step: int) -> str:
        """The pixel term at this step: squared error during ``l2_warmup_steps``, then ``reconstruction``.

        L1's gradient is a sign: on images that are mostly background it pulls a decoder that cannot yet
        place a shape towards drawing none (the per-pixel median), while squared error weighs each pixel
        by its error (docs/stage-a-fast-start.md).
        """
        return "l2" if global_step < self.cfg.l2_warmup_steps else self.cfg.reconstruction

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN terms are on at this optimizer step (LDM's hard switch at ``disc_start``)."""
        return global_step >= self.cfg.disc_start and self.cfg.disc_factor > 0

    # ----------------------------------------------------------------------------------------------
    # Autoencoder (generator) step

    def autoencoder_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                         posterior: DiagonalGaussianDistribution, global_step: int,
                         last_layer: torch.Tensor, discriminator: Optional[nn.Module] = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss ``L_AE`` and detached scalars to log.

        Parameters:
            inputs (`torch.Tensor`): images ``(N, 3, H, W)`` in [-1, 1].
            reconstructions (`torch.Tensor`): the decoder's output for them, still attached to the graph.
            posterior (`DiagonalGaussianDistribution`): ``vae.encode(inputs).latent_dist``.
            global_step (`int`): optimizer steps taken so far; decides whether the GAN terms are on.
            last_layer (`torch.Tensor`): the decoder's last weight (``vae.decoder.conv_out.weight``), used
                for the adaptive GAN weight.
            discriminator (`nn.Module`, *optional*): the module to score reconstructions with, when it is not
                the one given at construction (e.g. the unwrapped module while a DDP wrapper trains it).

        Returns:
            ``(loss, logs)`` with logs ``total, rec, p_loss, nll, kl, g_loss, d_weight, disc_factor, logvar``.
        """
        if inputs.shape != reconstructions.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} "
                             f"must have the same shape.")
        device_type = inputs.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = inputs.float()
            x_hat = reconstructions.float()
            diff = x - x_hat
            rec = diff.abs() if self.pixel_loss(global_step) == "l1" else diff.pow(2)
            if self.cfg.perceptual_weight > 0:
                p_loss = self.perceptual(x.contiguous(), x_hat.contiguous()).float()
                rec = rec + self.cfg.perceptual_weight * p_loss  # (N,1,1,1) broadcast to every pixel
            else:
                p_loss = torch.zeros((), device=x.device)
            logvar = self.logvar.float()
            nll = rec / torch.exp(logvar) + logvar
            batch = x.shape[0]
            nll_loss = nll.sum() / batch

            # diffusers' KL sums over (C, H, W) per sample; recomputed from fp32 parameters so that a
            # bf16 encoder output does not make the sum of thousands of terms coarse.
            kl = DiagonalGaussianDistribution(posterior.parameters.float()).kl()
            kl_loss = kl.sum() / batch
            loss = nll_loss + self.cfg.kl_weight * kl_loss

        zero = torch.zeros((), device=x.device)
        g_loss, d_weight, disc_factor = zero, zero, 0.0
        if self.discriminator_active(global_step):
            # The discriminator network may run under the caller's autocast; its logits are read in fp32.
            logits_fake = (discriminator or self.discriminator)(reconstructions.contiguous()).float()
            g_loss = -logits_fake.mean()
            disc_factor = float(self.cfg.disc_factor)
            d_weight = self._adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + d_weight * disc_factor * g_loss

        logs = {
            "total": loss.detach(),
            "rec": rec.detach().mean(),
            "p_loss": p_loss.detach().mean(),
            "nll": nll_loss.detach(),
            "kl": kl_loss.detach(),
            "g_loss": g_loss.detach(),
            "d_weight": d_weight.detach(),
            "disc_factor": torch.tensor(disc_factor),
            "logvar": self.logvar.detach().clone(),
        }
        return loss, logs

    def _adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                         last_layer: torch.Tensor) -> torch.Tensor:
        """Balance the GAN term against reconstruction by their gradient norms at the decoder's last layer
        (Esser et al. 2021, eq. 7; taming's `calculate_adaptive_weight`)."""
        if not torch.is_grad_enabled():
            # Evaluation without a graph: there are no gradients to compare, and nothing is trained.
            return torch.zeros((), device=nll_loss.device)
        if not last_layer.requires_grad:
            raise ValueError("last_layer must be a trainable decoder weight (vae.decoder.conv_out.weight); "
                             "the adaptive GAN weight is computed from gradients with respect to it.")
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        with torch.autocast(device_type=nll_loss.device.type, enabled=False):
            d_weight = torch.linalg.vector_norm(nll_grads.float()) / (
                torch.linalg.vector_norm(g_grads.float()) + 1e-4)
            d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
        return d_weight * self.cfg.disc_weight

    # ----------------------------------------------------------------------------------------------
    # Discriminator step

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           discriminator: Optional[nn.Module] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss ``L_D`` (hinge or vanilla) times ``disc_factor``, and logs.

        Only meaningful while `discriminator_active(global_step)`; calling it earlier raises, because the
        discriminator is deliberately never run before ``disc_start``. The reconstructions are detached
        here, so this loss never sends gradients into the autoencoder.

        Returns:
            ``(d_loss, logs)`` with logs ``d_loss, logits_real, logits_fake``.
        """
        if not self.discriminator_active(global_step):
            raise RuntimeError(
                f"discriminator_loss was called at step {global_step}, but the discriminator is off until "
                f"loss.disc_start={self.cfg.disc_start} (disc_factor={self.cfg.disc_factor}); check "
                f"discriminator_active(step) first.")
        discriminator = discriminator or self.discriminator
        logits_real = discriminator(inputs.detach().contiguous()).float()
        logits_fake = discriminator(reconstructions.detach().contiguous()).float()
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            d_loss = self.cfg.disc_factor * self._d_loss_fn(logits_real, logits_fake)
        logs = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, logs

    @classmethod
    def from_config(cls, cfg: VAELossConfig) -> "LPIPSWithDiscriminatorLoss":
        """Build the loss with the LPIPS module and discriminator that ``cfg`` describes."""
        perceptual = build_lpips(cfg.lpips_trunk, cfg.lpips_weights) if cfg.perceptual_weight > 0 else None
        return cls(cfg, perceptual, build_discriminator(cfg))


__all__ = ["LPIPSWithDiscriminatorLoss", "hinge_d_loss", "vanilla_d_loss"]
