"""The training noise schedule (diffusers `DDPMScheduler`) and the samplers built from it.

Naming trap (CompVis/latent-diffusion: ldm/models/diffusion/ddpm.py, `scale_by_std`): CompVis "linear" betas are `linspace(sqrt(beta_start), sqrt(beta_end),
T) ** 2` (`ldm/modules/diffusionmodules/util.py: make_beta_schedule`), which diffusers calls
`"scaled_linear"`; diffusers' own `"linear"` is a plain `linspace(beta_start, beta_end, T)`. LDM's KL-8
schedule (1000 steps, 0.0015 -> 0.0155) is therefore `beta_schedule="scaled_linear"` here.

Every sampler is built from the training scheduler's config, so the betas and the prediction type always
match what the U-Net learned. Sample clipping and dynamic thresholding stay off: they clamp the
predicted x0 to [-1, 1], which is right for pixels and wrong for latents (LDM: `clip_denoised=False`).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

if TYPE_CHECKING:
    from stage_b_diffusion.config import DiffusionConfig


def build_noise_scheduler(cfg: "DiffusionConfig") -> DDPMScheduler:
    """The DDPM forward process used for training (and the base config of every sampler).

    Parameters:
        cfg: `num_train_timesteps`, `beta_schedule`, `beta_start`, `beta_end`, `prediction_type`.
            Use `"scaled_linear"` for CompVis/LDM "linear" betas (see the module docstring).
    """
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        # DDPMScheduler defaults to clip_sample=True (x0 clamped to [-1, 1]): wrong for latents.
        clip_sample=False,
        thresholding=False,
        # Sampling starts at the last training step whatever the step count (Lin et al. 2023, Table 2).
        timestep_spacing="trailing",
    )


# name -> (scheduler class, keyword arguments on top of the training config).
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    # DPM-Solver++(2M), Lu et al. 2022: the usual choice for latent models at 15-25 steps.
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    # Stable Diffusion's PNDM setting: PLMS steps only, no Runge-Kutta warm-up.
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}

# Settings forced on every sampler where the class has them (see the module docstring).
_FORCED = {"clip_sample": False, "thresholding": False, "timestep_spacing": "trailing"}


def make_sampler(name: str, base_config) -> SchedulerMixin:
    """Build sampler `name` from a training scheduler's config (a scheduler or its `.config`).

    Betas, `num_train_timesteps` and `prediction_type` carry over; clipping and thresholding are off;
    timesteps are spaced "trailing" so the first step is the last training step.

    Raises ValueError listing the known names when `name` is unknown.
    """
    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}. Choose one of: {', '.join(SAMPLERS)}.")
    config = getattr(base_config, "config", base_config)
    cls, extra = SAMPLERS[name]
    accepted = inspect.signature(cls.__init__).parameters
    forced = {k: v for k, v in _FORCED.items() if k in accepted}
    return cls.from_config(config, **forced, **extra)


def sampler_name(scheduler: SchedulerMixin) -> str:
    """The `SAMPLERS` name of `scheduler` (the inverse of `make_sampler`), or its class name if none fits."""
    for name, (cls, extra) in SAMPLERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in extra.items()):
            return name
    return type(scheduler).__name__
