"""Stage B configuration: the latent U-Net, the DDPM objective, sampling during training.

Defaults follow LDM's KL-8 unconditional config (`configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml`)
for the noise schedule; see stage_b_diffusion/noise_schedule.py for the CompVis/diffusers naming trap on betas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ldm_core.config.architectures import check_architecture
from ldm_core.config.settings import (FINGERPRINTED, RESUMABLE, ConfigError, DataConfig, EMAConfig, TrainConfig,
                                      _require, check_relative_path, fingerprint, fingerprint_parts, redefault)
from ldm_core.sampling import DEFAULT_SAMPLING_STEPS, check_sampling_arguments


@dataclass
class UNetModelConfig:
    """A named `UNet2DModel` architecture (`UNET_ARCHITECTURES`, stage_b_diffusion/architectures.py) plus
    optional overrides (ldm_core/config/architectures.py).

    Input/output channels and sample size are not set here: they come from the VAE.
    """

    # The architecture's name; the key keeps the name `preset`, which saved run configs and fingerprints carry.
    preset: str = "unet-small"
    block_out_channels: Optional[List[int]] = None
    layers_per_block: Optional[int] = None
    # GroupNorm groups of every resnet and attention block (null: the architecture's). With as many groups as
    # channels a GroupNorm removes each channel's spatial mean, the level that carries a flat colour.
    norm_num_groups: Optional[int] = None
    # Class conditioning: 0 = unconditional. With N classes the U-Net gets N + 1 embeddings, the last
    # one being the "null" class used for classifier-free guidance.
    num_classes: int = 0
    class_dropout: float = 0.1

    def __post_init__(self) -> None:
        from stage_b_diffusion.architectures import UNET_ARCHITECTURES  # that module builds models; config stays light

        check_architecture(self, UNET_ARCHITECTURES)
        _require(self.num_classes >= 0, "model.num_classes", self.num_classes, "0 or more")
        _require(0.0 <= self.class_dropout < 1.0, "model.class_dropout", self.class_dropout, "in [0, 1)")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    # CompVis "linear" = linspace(sqrt(start), sqrt(end))**2 = diffusers "scaled_linear".
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0155
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    snr_gamma: float = 0.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off, 5 recommended
    noise_offset: float = 0.0  # offset noise strength; 0 = off
    latent_sampling: str = "sample"  # sample: z = mean + std * eps each epoch; mode: z = mean
    # The standard deviation of the latents the U-Net sees (Chen 2023's input scaling b; LDM: 1). b > 1
    # raises every timestep's SNR by b^2, for latents so small that the schedule destroys their detail
    # early (docs/demo.md). The saved pipeline's VAE config carries scaling_factor * b.
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        _require(self.beta_schedule in ("scaled_linear", "linear", "squaredcos_cap_v2"),
                 "diffusion.beta_schedule", self.beta_schedule, "scaled_linear, linear or squaredcos_cap_v2")
        _require(self.prediction_type in ("epsilon", "v_prediction"), "diffusion.prediction_type",
                 self.prediction_type, "epsilon or v_prediction")
        _require(self.latent_sampling in ("sample", "mode"), "diffusion.latent_sampling",
                 self.latent_sampling, "sample or mode")
        _require(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start/beta_end",
                 (self.beta_start, self.beta_end), "0 < beta_start < beta_end < 1")
        _require(self.snr_gamma >= 0, "diffusion.snr_gamma", self.snr_gamma, "0 or more")
        _require(self.input_scale > 0, "diffusion.input_scale", self.input_scale, "a positive number")
        _require(self.noise_offset >= 0, "diffusion.noise_offset", self.noise_offset, "0 or more")
        _require(self.num_train_timesteps > 0, "diffusion.num_train_timesteps", self.num_train_timesteps,
                 "a positive integer")


def check_sampling(section: str, scheduler: str, seed: int) -> None:
    """The sampler settings every sampling section shares: a known sampler, a seed >= 0."""
    from stage_b_diffusion.noise_schedule import SAMPLERS  # imports diffusers' schedulers only when checked

    _require(scheduler in SAMPLERS, f"{section}.scheduler", scheduler, f"one of {', '.join(SAMPLERS)}")
    _require(seed >= 0, f"{section}.seed", seed, "0 or more")


def check_sampling_settings(section: str, *, num_inference_steps: int, num_train_timesteps: int, timesteps_key: str,
                            guidance_scale: float = 1.0, conditional: bool = True, classes_key: str = "") -> None:
    """A section's steps (and guidance) against the model the config trains, by the rules the pipeline
    applies when it samples (`ldm_core.sampling.check_sampling_arguments`), as a ConfigError naming the keys.

    `timesteps_key` and `classes_key` name the keys that set the bounds, e.g. "diffusion.num_train_timesteps"
    and "stage_b.model.num_classes > 0".
    """
    names = {"num_inference_steps": f"{section}.num_inference_steps", "guidance_scale": f"{section}.guidance_scale",
             "num_train_timesteps": timesteps_key, **({"conditional": classes_key} if classes_key else {})}
    try:
        check_sampling_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 num_train_timesteps=num_train_timesteps, conditional=conditional, names=names)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@dataclass
class SamplingConfig:
    """Sample grids drawn from the EMA weights during training, with a fixed seed, and sample scores."""

    scheduler: str = "dpmsolver++"
    num_inference_steps: int = DEFAULT_SAMPLING_STEPS  # at most diffusion.num_train_timesteps (StageBConfig)
    grid_images: int = 16
    sample_every: int = 500
    seed: int = 0
    # Every `metrics_every` steps (0: never), `metrics_images` samples from fixed noise are scored against
    # held-out images: SWD beside its floor, and on builtin:shapes the exact scorer's validity
    # (evaluation/training_scores.py). Its cost is logged as metrics_seconds.
    metrics_every: int = 0
    metrics_images: int = 64

    def __post_init__(self) -> None:
        check_sampling("sampling", self.scheduler, self.seed)
        _require(self.grid_images > 0, "sampling.grid_images", self.grid_images, "a positive integer")
        _require(self.sample_every > 0, "sampling.sample_every", self.sample_every, "a positive integer")
        _require(self.metrics_every >= 0, "sampling.metrics_every", self.metrics_every, "0 (off) or a positive integer")
        _require(self.metrics_images >= 2, "sampling.metrics_images", self.metrics_images, "a whole number of at least 2")


@dataclass
class UNetDataConfig(DataConfig):
    # The frozen VAE's posteriors of the training images (mean and std, encoded once). The file name
    # carries a hash of the VAE, the images and the flip setting, so stale latents are never read. A
    # relative path lies inside the run folder (the default: RUN/latents); an absolute one is a cache
    # shared by runs, which then skip the encoding (delete its files to reclaim the space).
    latent_cache_dir: str = field(default="latents", metadata=RESUMABLE)
    # How the cache stores mean and std: float32, float16 or bfloat16 (half the disk and page cache;
    # docs/data.md has what it costs in precision), and how many images a shard holds.
    latent_cache_dtype: str = "float32"
    latent_shard_size: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check_relative_path("data.latent_cache_dir", self.latent_cache_dir)
        _require(self.latent_cache_dtype in ("float32", "float16", "bfloat16"), "data.latent_cache_dtype",
                 self.latent_cache_dtype, "float32, float16 or bfloat16")
        _require(self.latent_shard_size > 0, "data.latent_shard_size", self.latent_shard_size, "a positive integer")
        # Each image is encoded once, so a random crop would be one fixed crop: say so instead.
        _require(self.crop == "center", "data.crop", self.crop,
                 "center for Stage B (its latent cache encodes each image once, centre-cropped)")


@dataclass
class UNetTrainConfig(TrainConfig):
    lr: float = redefault(TrainConfig, "lr", 2e-4)
    lr_warmup_steps: int = redefault(TrainConfig, "lr_warmup_steps", 100)


@dataclass
class StageBConfig:
    model: UNetModelConfig = field(default_factory=UNetModelConfig, metadata=FINGERPRINTED)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig, metadata=FINGERPRINTED)
    data: UNetDataConfig = field(default_factory=UNetDataConfig)
    train: UNetTrainConfig = field(default_factory=UNetTrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    # Sampling during training only draws grids: every key of it may change on resume.
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata=RESUMABLE)

    def __post_init__(self) -> None:
        check_sampling_settings("sampling", num_inference_steps=self.sampling.num_inference_steps,
                                num_train_timesteps=self.diffusion.num_train_timesteps,
                                timesteps_key="diffusion.num_train_timesteps")

    def model_fingerprint(self) -> str:
        """Hash of what a Stage B checkpoint's tensors depend on (the fields marked FINGERPRINTED: model,
        diffusion, data.resolution); a checkpoint is only resumed by a config with the same fingerprint."""
        return fingerprint(*fingerprint_parts(self))
