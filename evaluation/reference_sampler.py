"""An independent check of a saved pipeline: plain diffusers models and a hand-written DPM-Solver++(2M).

`sample_saved_pipeline` reads a pipeline folder as any diffusers user would (`AutoencoderKL` and
`UNet2DModel` from their subfolders, the noise schedule from `scheduler/scheduler_config.json`) and
samples it with its own DPM-Solver++(2M) loop (Lu et al. 2022, "DPM-Solver++", Algorithm 2), written here
from the paper instead of calling a diffusers scheduler. Images generated this way agree with
`LatentDiffusionPipeline` under diffusers' `DPMSolverMultistepScheduler` (tests/test_pipeline.py), so a
model scored through the pipeline is the model a plain-diffusers user gets.

Schedule (DDPM, Ho et al. 2020): alpha_bar_t = prod_{s<=t} (1 - beta_s); the marginal is
x_t = alpha_t x_0 + sigma_t eps with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), and
lambda_t = log(alpha_t / sigma_t). With the data prediction D_i = (x_{t_i} - sigma_{t_i} eps) / alpha_{t_i}
and h_i = lambda_{t_i} - lambda_{t_{i-1}}, one 2M step is

    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) D',
    D' = (1 + 1 / (2 r)) D_{i-1} - 1 / (2 r) D_{i-2},  r = h_{i-1} / h_i  (first step: D' = D_{i-1}),

and the last step goes to sigma = 0, where the update is the data prediction itself.

A class-conditional U-Net (diffusers `num_class_embeds` = K + 1, the last id the null class) is sampled
with classifier-free guidance (Ho & Salimans 2022, eq. 6 written for the noise prediction):
eps = eps(x, null) + w (eps(x, c) - eps(x, null)), w = 1 being the plain conditional model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel

from ldm_core.models.latent_scale import unscale_latents
from ldm_core.sampling import DEFAULT_SAMPLING_STEPS


def alphas_cumprod_from_config(config: dict) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1 from a diffusers scheduler config's betas (float64).

    Supports the schedules Stage B trains with: `linear` (a plain linspace of betas), `scaled_linear`
    (CompVis "linear": linspace of sqrt(beta), squared) and `squaredcos_cap_v2` (Nichol & Dhariwal 2021,
    eq. 17, betas capped at 0.999).
    """
    steps, start, end = int(config["num_train_timesteps"]), float(config["beta_start"]), float(config["beta_end"])
    kind = config["beta_schedule"]
    if kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)],
                             dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not one this sampler knows (linear, scaled_linear, "
                         f"squaredcos_cap_v2).")
    return torch.cumprod(1.0 - betas, dim=0)


def sampling_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "trailing") -> np.ndarray:
    """The training timesteps a `num_steps` sampler visits, highest first (Lin et al. 2023, Table 2).

    "trailing" starts at T-1 and steps down by T/n; "linspace" spreads n+1 points over [0, T-1] and drops
    the last (0); "leading" takes multiples of T // n.
    """
    total = int(num_train_timesteps)
    if spacing == "trailing":
        steps = np.round(np.arange(total, 0, -total / num_steps)) - 1
    elif spacing == "linspace":
        steps = np.linspace(0, total - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        steps = (np.arange(0, num_steps) * (total // num_steps))[::-1]
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not trailing, linspace or leading.")
    return steps.astype(np.int64)


def guided_prediction(unet: UNet2DModel, x: torch.Tensor, t: int, class_labels: Optional[torch.Tensor],
                      guidance_scale: float) -> torch.Tensor:
    """The U-Net's output at (x, t): unconditional, conditional on `class_labels`, or guided (module docstring)."""
    if class_labels is None:
        return unet(x, t).sample
    if guidance_scale == 1.0:
        return unet(x, t, class_labels=class_labels).sample
    null = torch.full_like(class_labels, unet.config.num_class_embeds - 1)
    cond = unet(x, t, class_labels=class_labels).sample
    uncond = unet(x, t, class_labels=null).sample
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def dpm_solver_pp_2m(unet: UNet2DModel, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                     timesteps: np.ndarray, prediction_type: str = "epsilon",
                     class_labels: Optional[torch.Tensor] = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Denoise `noise` ~ N(0, I) with DPM-Solver++(2M), one step per timestep; returns the latents.

    `class_labels` (B,) ids for a class-conditional U-Net, with `guidance_scale` w (module docstring).
    The final step lands on sigma = 0 with a first-order update.
    """
    alpha = alphas_cumprod.sqrt()
    sigma = (1 - alphas_cumprod).sqrt()
    lam = torch.log(alpha) - torch.log(sigma)
    x = noise.double()
    previous_d, previous_h = None, None
    for i, t in enumerate(timesteps):
        out = guided_prediction(unet, x.to(noise.dtype), int(t), class_labels, guidance_scale).double()
        if prediction_type == "epsilon":
            d = (x - sigma[t] * out) / alpha[t]
        elif prediction_type == "v_prediction":
            d = alpha[t] * x - sigma[t] * out
        else:
            raise ValueError(f"prediction_type {prediction_type!r} is not epsilon or v_prediction.")
        if i == len(timesteps) - 1:  # to sigma = 0: the data prediction itself
            x = d
            break
        s = timesteps[i + 1]
        h = lam[s] - lam[t]
        if previous_d is None:
            d_used = d
        else:
            r = previous_h / h
            d_used = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * previous_d
        x = (sigma[s] / sigma[t]) * x - alpha[s] * torch.expm1(-h) * d_used
        previous_d, previous_h = d, h
    return x.to(noise.dtype)


@torch.no_grad()
def sample_saved_pipeline(folder: Union[str, Path], noise: torch.Tensor, num_steps: int = DEFAULT_SAMPLING_STEPS,
                          class_labels: Optional[torch.Tensor] = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from a saved pipeline folder, through plain diffusers.

    Parameters:
        folder: a `LatentDiffusionPipeline.save_pretrained` folder (model_index.json, vae/, unet/, scheduler/).
        noise: the starting latents ~ N(0, I), (B, C, h, w) for the U-Net.
        num_steps: DPM-Solver++(2M) steps.
        class_labels: (B,) class ids; required for a class-conditional U-Net, refused for an unconditional one.
        guidance_scale: classifier-free guidance weight for a class-conditional U-Net (1 = none).
    """
    folder = Path(folder)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True).eval()
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True).eval()
    conditional = unet.config.num_class_embeds is not None
    if conditional != (class_labels is not None):
        raise ValueError(f"{folder} holds a {'class-conditional' if conditional else 'unconditional'} U-Net: "
                         f"{'give' if conditional else 'give no'} class_labels.")
    if not conditional and guidance_scale != 1.0:
        raise ValueError(f"guidance_scale {guidance_scale:g} needs a class-conditional U-Net; {folder} holds an "
                         f"unconditional one.")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    timesteps = sampling_timesteps(config["num_train_timesteps"], num_steps,
                                   config.get("timestep_spacing", "linspace"))
    latents = dpm_solver_pp_2m(unet, noise, alphas_cumprod_from_config(config), timesteps,
                               config.get("prediction_type", "epsilon"), class_labels, guidance_scale)
    images = [vae.decode(unscale_latents(chunk, vae.config)).sample for chunk in latents.split(16)]
    return (torch.cat(images).float().clamp(-1, 1) + 1) / 2


__all__ = ["alphas_cumprod_from_config", "sampling_timesteps", "guided_prediction", "dpm_solver_pp_2m",
           "sample_saved_pipeline"]
