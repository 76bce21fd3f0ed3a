"""The latent diffusion training objective: DDPM's simple loss on scaled latents.

Ho et al. 2020 (eq. 14): draw t ~ U{0..T-1} and eps ~ N(0, I), form
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps and regress the U-Net output on eps (or on the
velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, Salimans & Ho 2022). The diffusers
scheduler supplies `add_noise` and `get_velocity`, so training and sampling share one set of betas.

All randomness comes from one `torch.Generator` passed in by the caller, so a resumed run that restores
the generator draws exactly the same noise and timesteps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor

if TYPE_CHECKING:
    from stage_b_diffusion.config import DiffusionConfig


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", eq. 10 and its v-prediction form).

    epsilon: min(SNR, gamma) / SNR;  v_prediction: min(SNR, gamma) / (SNR + 1).
    With a zero-terminal-SNR schedule SNR(T-1) = 0; the epsilon weight's limit there is 1, which
    `clamp(gamma / SNR, max=1)` gives without dividing 0 by 0.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)
    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1.0)
    raise ValueError(f"Unknown prediction_type {prediction_type!r}: use epsilon or v_prediction.")


def diffusion_loss(unet, latents: torch.Tensor, noise_scheduler, cfg: "DiffusionConfig",
                   generator: torch.Generator, class_labels: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch of the DDPM objective on (already scaled) latents.

    Parameters:
        unet: the noise (or velocity) predictor, called as `unet(noisy, t, class_labels=...).sample`.
        latents: scaled latents x_0, shape (B, C, h, w).
        noise_scheduler: the training `DDPMScheduler` (betas, `add_noise`, `get_velocity`).
        cfg: `prediction_type`, `snr_gamma` (> 0 enables Min-SNR weighting), `noise_offset` (> 0 adds
            `noise_offset * N(0, 1)` per sample and channel, shape (B, C, 1, 1), to the noise).
        generator: the only source of randomness; drawn in this order: noise, offset noise, timesteps.
        class_labels: (B,) int64 class ids for a class-conditional U-Net, else None.

    Returns the scalar loss and logs {"loss", "t_mean"} (detached).
    """
    b = latents.shape[0]
    device = latents.device
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if cfg.noise_offset > 0:
        # Offset noise: a per-channel constant shift lets the model change an image's mean brightness.
        offset = randn_tensor((b, latents.shape[1], 1, 1), generator=generator, device=device, dtype=latents.dtype)
        noise = noise + cfg.noise_offset * offset
    num_steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_steps, (b,), generator=generator, device=generator.device).to(device)

    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type != cfg.prediction_type:
        raise ValueError(f"The noise scheduler predicts {prediction_type!r} but the config asks for "
                         f"{cfg.prediction_type!r}; build the scheduler from the same DiffusionConfig.")
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}: use epsilon or v_prediction.")

    pred = unet(noisy, timesteps, class_labels=class_labels).sample
    # The squared error in fp32 even under mixed precision, averaged per sample over C, h, w.
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    if cfg.snr_gamma > 0:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, cfg.snr_gamma, prediction_type)
    loss = per_sample.mean()
    logs = {"loss": loss.detach(), "t_mean": timesteps.float().mean()}
    return loss, logs


def drop_class_labels(class_labels: torch.Tensor, null_class: int, probability: float,
                      generator: torch.Generator) -> torch.Tensor:
    """Replace each label by `null_class` with `probability`, so one U-Net also learns the unconditional
    prediction that classifier-free guidance needs (Ho & Salimans 2022, Algorithm 1)."""
    if probability <= 0:
        return class_labels
    drop = torch.rand(class_labels.shape, generator=generator, device=generator.device).to(class_labels.device)
    return torch.where(drop < probability, torch.full_like(class_labels, null_class), class_labels)
