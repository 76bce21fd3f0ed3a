"""Stage A configuration: the autoencoder, its LDM loss, and its training loop.

Defaults follow CompVis latent-diffusion `configs/autoencoder/autoencoder_kl_32x32x4.yaml` and
`ldm/modules/losses/contperceptual.py` except where a comment says why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ldm_core.config.architectures import check_architecture
from ldm_core.config.settings import (ADDED_AT_DEFAULT, FINGERPRINTED, LR_SCHEDULES, RESUMABLE, ConfigError, DataConfig,
                                      EMAConfig, TrainConfig, _require, check_relative_path, fingerprint,
                                      fingerprint_parts, redefault)


@dataclass
class VAEModelConfig:
    """A named `AutoencoderKL` architecture (`VAE_ARCHITECTURES`, stage_a_vae/architectures.py) plus optional
    overrides (ldm_core/config/architectures.py)."""

    # The architecture's name; the key keeps the name `preset`, which saved run configs and fingerprints carry.
    preset: str = "kl-f8-small"
    # None keeps the architecture's value.
    block_out_channels: Optional[List[int]] = None
    layers_per_block: Optional[int] = None
    norm_num_groups: Optional[int] = None
    # Self-attention in the encoder's and decoder's middle block (diffusers `mid_block_add_attention`).
    mid_block_attention: Optional[bool] = None
    # Initial log-variance of the posterior: the log-variance half of the encoder's last convolution
    # starts with zero weights and this bias, so every latent starts with std exp(value / 2) (0.05 for
    # -6). None keeps diffusers' initialisation, under which the std starts near 1, as large as the
    # latents' signal, so the decoder first learns from noise.
    posterior_logvar_init: Optional[float] = -6.0
    # Start every residual block (and attention block) as the identity: the last convolution of each
    # residual branch starts at zero (Goyal et al. 2017, "zero-gamma"; Zhang et al. 2019, Fixup), so the
    # untrained autoencoder is a shallow network of its shortcut, sampling and in/out convolutions.
    zero_init_residual: bool = True
    latent_channels: int = 4
    # Downsampling factor the user expects; it must equal 2 ** (number of blocks - 1).
    downsample_factor: int = 8
    # Fine-tune instead of training from scratch: the weights of this AutoencoderKL (a Stage A run or vae/
    # folder, any diffusers AutoencoderKL folder, or a Hub id fetched on first use) replace the initial ones.
    # The architecture is still the preset's (plus overrides) and must match that model's tensors exactly;
    # EQ-VAE (Kouzelis et al. 2025) is such a fine-tune of a trained autoencoder.
    pretrained: Optional[str] = field(default=None, metadata=ADDED_AT_DEFAULT)

    def __post_init__(self) -> None:
        from stage_a_vae.architectures import VAE_ARCHITECTURES  # that module builds models; config stays light

        check_architecture(self, VAE_ARCHITECTURES)
        _require(self.latent_channels > 0, "model.latent_channels", self.latent_channels, "a positive integer")
        _require(self.downsample_factor > 0, "model.downsample_factor", self.downsample_factor, "a positive integer")


@dataclass
class VAELossConfig:
    """LDM's `LPIPSWithDiscriminator`, term for term (CompVis/latent-diffusion: ldm/modules/losses/contperceptual.py)."""

    reconstruction: str = "l1"  # l1 | l2 (pixel term, summed over C,H,W then averaged over the batch)
    # Squared error instead of `reconstruction` for the first N optimizer steps (0: LDM's loss throughout).
    l2_warmup_steps: int = 0
    perceptual_weight: float = 1.0
    # vgg: LPIPS with the pretrained VGG16 trunk (a local file is required, see docs/commands.md);
    # random: a randomly initialised trunk, only for demos and tests, and recorded as such.
    lpips_trunk: str = "vgg"
    lpips_weights: Optional[str] = None  # path to torchvision's vgg16-397923af.pth
    kl_weight: float = 1e-6
    logvar_init: float = 0.0
    learn_logvar: bool = False  # LDM never optimises logvar; sgm makes it optional
    disc_start: int = 50001  # optimizer step at which the discriminator switches on
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: str = "hinge"  # hinge | vanilla
    disc_num_layers: int = 3
    disc_channels: int = 64
    # BatchNorm (LDM's default) misbehaves under DDP; GroupNorm is rank-independent.
    disc_norm: str = "group"  # group | batch | sync_batch | instance
    # Latent-space regularisers for Stage B's sake (stage_a_vae/latent_regularisers.py), off by default:
    # none | scale (Skorokhodov et al. 2025: decode the 2x-downscaled latent against the downscaled image) |
    # eqvae (Kouzelis et al. 2025: resize by U[0.25, 0.97] and turn by 1-3 quarter turns, latent and image alike),
    # on `equivariance_share` of the steps; `latent_noise` tau: the decoder sees z + tau U(0,1) std(z) eps.
    equivariance: str = field(default="none", metadata=ADDED_AT_DEFAULT)
    equivariance_share: float = field(default=0.5, metadata=ADDED_AT_DEFAULT)
    latent_noise: float = field(default=0.0, metadata=ADDED_AT_DEFAULT)

    def __post_init__(self) -> None:
        _require(self.reconstruction in ("l1", "l2"), "loss.reconstruction", self.reconstruction, "l1 or l2")
        _require(self.lpips_trunk in ("vgg", "random"), "loss.lpips_trunk", self.lpips_trunk, "vgg or random")
        _require(self.disc_loss in ("hinge", "vanilla"), "loss.disc_loss", self.disc_loss, "hinge or vanilla")
        _require(self.disc_norm in ("group", "batch", "sync_batch", "instance"), "loss.disc_norm",
                 self.disc_norm, "one of group, batch, sync_batch, instance")
        for key in ("perceptual_weight", "kl_weight", "disc_weight", "disc_factor"):
            _require(getattr(self, key) >= 0, f"loss.{key}", getattr(self, key), "0 or more")
        _require(self.disc_start >= 0, "loss.disc_start", self.disc_start, "0 or more")
        _require(self.equivariance in ("none", "scale", "eqvae"), "loss.equivariance", self.equivariance,
                 "none, scale or eqvae")
        _require(0.0 <= self.equivariance_share <= 1.0, "loss.equivariance_share", self.equivariance_share, "in [0, 1]")
        _require(self.latent_noise >= 0, "loss.latent_noise", self.latent_noise, "0 or more")
        _require(self.l2_warmup_steps >= 0, "loss.l2_warmup_steps", self.l2_warmup_steps, "0 or more")
        for key in ("disc_num_layers", "disc_channels"):
            _require(getattr(self, key) > 0, f"loss.{key}", getattr(self, key), "a positive integer")


@dataclass
class VAEDataConfig(DataConfig):
    # A folder dataset's decoded uint8 images are kept here as .npy, so later runs on the same files skip
    # the decode (keyed by the files' paths, sizes and times and the resolution). Unset: decoded in memory
    # by every run. A relative path lies inside the run folder (see `resolve_run_path`); an absolute one
    # is a cache shared by runs.
    image_cache_dir: Optional[str] = field(default=None, metadata=RESUMABLE)
    # Put each training image's RGB channels in a random order (ldm_core/data/step_batches.py `shuffle_channels`), so
    # a small dataset shows the autoencoder every hue instead of a palette. Validation images are not shuffled.
    channel_shuffle: bool = False
    # The share of training images shown at another exposure and contrast, clipped (ldm_core/data/step_batches.py
    # `reexpose`), so a few photographs of mid-tones do not leave black, white and flat skies unlearned. 0: off.
    reexpose: float = 0.0
    # The share of training images whose colours are pushed away from grey (or towards it) and clipped
    # (`resaturate`), so the edges and corners of the RGB cube are not left unlearned. 0: off.
    resaturate: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_cache_dir is not None:
            check_relative_path("data.image_cache_dir", self.image_cache_dir)
        _require(0.0 <= self.reexpose <= 1.0, "data.reexpose", self.reexpose, "in [0, 1]")
        _require(0.0 <= self.resaturate <= 1.0, "data.resaturate", self.resaturate, "in [0, 1]")


@dataclass
class VAETrainConfig(TrainConfig):
    # LDM: Adam betas (0.5, 0.9) for both the autoencoder and the discriminator.
    adam_beta1: float = redefault(TrainConfig, "adam_beta1", 0.5)
    adam_beta2: float = redefault(TrainConfig, "adam_beta2", 0.9)
    # The discriminator's learning rate; None: `lr` (read it as `disc_learning_rate`).
    disc_lr: Optional[float] = field(default=None, metadata=RESUMABLE)
    # The discriminator's Adam betas; None: the autoencoder's. A recipe may give the autoencoder other
    # betas and keep LDM's (0.5, 0.9) for the adversarial game.
    disc_adam_beta1: Optional[float] = None
    disc_adam_beta2: Optional[float] = None
    # The discriminator's learning-rate schedule; None: the autoencoder's `lr_schedule`. LDM keeps both rates
    # constant; under a decaying schedule a late `disc_start` leaves the discriminator almost no rate to learn with.
    disc_lr_schedule: Optional[str] = field(default=None, metadata=RESUMABLE)

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.disc_lr is None or self.disc_lr > 0, "train.disc_lr", self.disc_lr, "a positive number or null")
        _require(self.disc_lr_schedule in (None, *LR_SCHEDULES), "train.disc_lr_schedule", self.disc_lr_schedule,
                 f"one of {', '.join(LR_SCHEDULES)}, or null")
        for key in ("disc_adam_beta1", "disc_adam_beta2"):
            value = getattr(self, key)
            _require(value is None or 0 <= value < 1, f"train.{key}", value, "a number in [0, 1) or null")

    @property
    def disc_learning_rate(self) -> float:
        """The discriminator's learning rate: `disc_lr` where set, else the autoencoder's `lr`."""
        return self.lr if self.disc_lr is None else self.disc_lr

    @property
    def disc_schedule(self) -> str:
        """The discriminator's learning-rate schedule: `disc_lr_schedule` where set, else `lr_schedule`."""
        return self.lr_schedule if self.disc_lr_schedule is None else self.disc_lr_schedule

    @property
    def disc_betas(self) -> tuple[float, float]:
        """The discriminator's Adam betas: its own where set, else the autoencoder's."""
        return (self.adam_beta1 if self.disc_adam_beta1 is None else self.disc_adam_beta1,
                self.adam_beta2 if self.disc_adam_beta2 is None else self.disc_adam_beta2)


@dataclass
class StageAConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig, metadata=FINGERPRINTED)
    loss: VAELossConfig = field(default_factory=VAELossConfig, metadata=FINGERPRINTED)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    train: VAETrainConfig = field(default_factory=VAETrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)

    def model_fingerprint(self) -> str:
        """Hash of what a Stage A checkpoint's tensors depend on (the fields marked FINGERPRINTED: model,
        loss, data.resolution); a checkpoint is only resumed by a config with the same fingerprint."""
        return fingerprint(*fingerprint_parts(self))

    def __post_init__(self) -> None:
        f = self.model.downsample_factor
        if self.data.resolution % f:
            raise ConfigError(f"data.resolution={self.data.resolution} is not divisible by the autoencoder's "
                              f"downsampling factor f={f}; pick a multiple of {f}.")
