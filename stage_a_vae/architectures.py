"""Named `AutoencoderKL` architectures and the factory that builds one from a `VAEModelConfig`.

A config's `model.preset` names one; a YAML preset in configs/ is a file of settings that may name one.
Every architecture is a KL autoencoder with downsampling factor f=8 and 4 latent channels, the shape of
Stable Diffusion's first stage, so a latent of a 256x256 image is 4x32x32 whichever architecture made it.

- ``kl-f8``: Stable Diffusion's autoencoder exactly (CompVis latent-diffusion
  ``configs/autoencoder/autoencoder_kl_32x32x4.yaml``; in diffusers terms
  ``AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2)``), 83,653,863 parameters.
- ``kl-f8-small``: the same topology, narrower and shallower (3.9M parameters), sized so that a 2-core CPU
  trains it on 64x64 images in minutes (its step time: docs/performance.md).
- ``kl-f8-mini``: 0.94M parameters, widths (16, 32, 64, 64), one normalisation group, no mid-block
  attention: the demo's autoencoder for 64x64 images on a CPU (its step time: docs/demo-speed.md).
- ``kl-f8-tiny``: a 0.25M-parameter model for unit tests.

``scaling_factor`` is SD's 0.18215 only as a placeholder: it belongs to SD's VAE and must be measured again
(1 / std of the latents, LDM's ``scale_by_std``) for every autoencoder trained here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from ldm_core.models.autoencoder_folders import downsampling_factor
from ldm_core.config.architectures import architecture_kwargs
from ldm_core.config.settings import ConfigError

if TYPE_CHECKING:
    from stage_a_vae.config import VAEModelConfig

# SD's value; replaced by the measured 1/std(z) once a model has been trained
# (CompVis/latent-diffusion: ldm/models/diffusion/ddpm.py, `scale_by_std`).
PLACEHOLDER_SCALING_FACTOR = 0.18215


def _kl_f8_architecture(block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int,
                  sample_size: int, mid_block_attention: bool = True) -> dict:
    """AutoencoderKL keyword arguments for an f=8, 4-channel KL autoencoder of the given width."""
    num_blocks = len(block_out_channels)
    return dict(
        mid_block_add_attention=mid_block_attention,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=PLACEHOLDER_SCALING_FACTOR,
    )


VAE_ARCHITECTURES: dict[str, dict] = {
    "kl-f8": _kl_f8_architecture((128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=256),
    "kl-f8-small": _kl_f8_architecture((32, 64, 128, 128), layers_per_block=1, norm_num_groups=16, sample_size=64),
    # The demo's autoencoder: a quarter of kl-f8-small's width, one GroupNorm group (a LayerNorm over
    # channels and pixels) and no mid-block attention; docs/stage-a-fast-start.md has the measurements.
    "kl-f8-mini": _kl_f8_architecture((16, 32, 64, 64), layers_per_block=1, norm_num_groups=1, sample_size=64,
                                      mid_block_attention=False),
    "kl-f8-tiny": _kl_f8_architecture((8, 16, 32, 32), layers_per_block=1, norm_num_groups=4, sample_size=32),
}


def build_autoencoder(model_cfg: "VAEModelConfig") -> AutoencoderKL:
    """Build a randomly initialised `AutoencoderKL` from a named architecture plus the config's overrides.

    Parameters:
        model_cfg (`VAEModelConfig`):
            ``preset`` names an entry of `VAE_ARCHITECTURES`; ``block_out_channels``, ``layers_per_block`` and
            ``norm_num_groups`` replace its values when not None (ldm_core/config/architectures.py), and the
            block types follow the number of levels; ``latent_channels`` is always
            taken from the config; ``downsample_factor`` is the factor the user expects, checked against
            the architecture.

    Returns:
        A diffusers `AutoencoderKL` whose config alone describes it (it saves and loads with
        `save_pretrained` / `from_pretrained`).

    Raises:
        ConfigError: unknown architecture, a downsampling factor that does not match the number of blocks, or
            widths that the group normalisation cannot divide.
    """
    kwargs = architecture_kwargs(model_cfg, VAE_ARCHITECTURES, ("DownEncoderBlock2D", "UpDecoderBlock2D"))
    if model_cfg.mid_block_attention is not None:
        kwargs["mid_block_add_attention"] = bool(model_cfg.mid_block_attention)
    if model_cfg.latent_channels < 1:
        raise ConfigError(f"model.latent_channels={model_cfg.latent_channels} must be 1 or more.")
    kwargs["latent_channels"] = int(model_cfg.latent_channels)

    factor = downsampling_factor(kwargs["block_out_channels"])
    if factor != model_cfg.downsample_factor:
        raise ConfigError(
            f"model.downsample_factor={model_cfg.downsample_factor} does not match the architecture: "
            f"{len(kwargs['block_out_channels'])} blocks (block_out_channels="
            f"{list(kwargs['block_out_channels'])}) downsample by f={factor}. Set model.downsample_factor="
            f"{factor} or give block_out_channels with log2(f)+1 entries.")

    vae = AutoencoderKL(**kwargs)
    if model_cfg.pretrained:  # a fine-tune starts from trained weights, not from the initialisation below
        start_from_pretrained(vae, model_cfg.pretrained)
        return vae
    if model_cfg.zero_init_residual:
        zero_init_residual_branches(vae)
    if model_cfg.posterior_logvar_init is not None:
        init_posterior_logvar(vae, model_cfg.posterior_logvar_init)
    return vae


# The config keys that define an AutoencoderKL's computation (not its scale, shift or nominal image size).
ARCHITECTURE_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                     "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "mid_block_add_attention",
                     "use_quant_conv", "use_post_quant_conv")


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


@torch.no_grad()
def start_from_pretrained(vae: AutoencoderKL, source: str) -> None:
    """Copy the weights of the autoencoder `source` names (a folder here, or a Hub id fetched on first use,
    ldm_core/models/hub.py) into `vae`, whose architecture must have exactly its tensors.

    Raises:
        ConfigError: the two architectures differ (the message names the first tensor that does not fit).
        FileNotFoundError, HubError, ModelFolderError: `source` cannot be had or is not an AutoencoderKL.
    """
    from ldm_core.models.autoencoder_folders import load_frozen_vae
    from ldm_core.models.hub import AUTOENCODER, resolve_model_argument

    folder = resolve_model_argument(source, kind=AUTOENCODER, option="model.pretrained")
    trained, _ = load_frozen_vae(folder)
    hint = (f"Set model.preset (and its overrides) to that autoencoder's architecture ({folder}/config.json).")
    for key in ARCHITECTURE_KEYS:  # keys without tensors of their own (norm groups, activation) count too
        if key in trained.config and list(_as_list(trained.config[key])) != list(_as_list(vae.config[key])):
            raise ConfigError(f"model.pretrained={source} does not fit the architecture the config builds: "
                              f"{key} is {trained.config[key]} there and {vae.config[key]} here. {hint}")
    ours, theirs = vae.state_dict(), trained.state_dict()
    for name in sorted(set(ours) | set(theirs)):
        if name not in theirs or name not in ours or ours[name].shape != theirs[name].shape:
            have = tuple(theirs[name].shape) if name in theirs else "no such tensor"
            want = tuple(ours[name].shape) if name in ours else "no such tensor"
            raise ConfigError(f"model.pretrained={source} does not fit the architecture the config builds: "
                              f"{name} is {have} there and {want} here. {hint}")
    vae.load_state_dict(theirs)
    vae.register_to_config(scaling_factor=trained.config.scaling_factor)


@torch.no_grad()
def zero_init_residual_branches(model: torch.nn.Module) -> int:
    """Zero the last layer of every residual branch, so each block starts as its shortcut; returns how many.

    A diffusers `ResnetBlock2D` computes shortcut(x) + conv2(...); an `Attention` block adds to_out(...)
    to its input (residual_connection=True in the autoencoder's mid block).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            last = module.conv2
        elif isinstance(module, Attention) and module.residual_connection:
            last = module.to_out[0]
        else:
            continue
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
        count += 1
    return count


@torch.no_grad()
def init_posterior_logvar(vae: AutoencoderKL, logvar: float) -> None:
    """Start every latent's posterior log-variance at `logvar`.

    The encoder's last convolution outputs the posterior mean and log-variance stacked along channels
    (`DiagonalGaussianDistribution`); its log-variance half gets zero weights and bias `logvar`. The quant
    conv (a 1x1 convolution mixing both halves) then passes the log-variance through unchanged and keeps
    it out of the mean, which would otherwise receive a constant offset of `logvar` times random weights.
    """
    latent = vae.config.latent_channels
    conv = vae.encoder.conv_out
    conv.weight[latent:].zero_()
    conv.bias[latent:].fill_(float(logvar))
    quant = getattr(vae, "quant_conv", None)
    if quant is not None:
        quant.weight[latent:].zero_()
        quant.weight[latent:, latent:, 0, 0] = torch.eye(latent)
        quant.bias[latent:].zero_()
        quant.weight[:latent, latent:].zero_()


__all__ = ["VAE_ARCHITECTURES", "PLACEHOLDER_SCALING_FACTOR", "build_autoencoder", "init_posterior_logvar",
           "start_from_pretrained", "zero_init_residual_branches"]
