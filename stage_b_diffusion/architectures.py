"""Named latent U-Net architectures (diffusers `UNet2DModel`), built to fit the autoencoder's latents.

A config's `model.preset` names one; a YAML preset in configs/ is a file of settings that may name one.
An architecture is a dict of `UNet2DModel` keyword arguments without the three that belong to the VAE
(`in_channels`, `out_channels`, `sample_size`): `build_unet` adds those from the autoencoder, so a
U-Net can never be built for latents it will not see.

`unet-ldm-kl8` is LDM's unconditional KL-8 U-Net (CompVis/latent-diffusion:
configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml, `ldm.modules.diffusionmodules.openaimodel.UNetModel`)
written in diffusers terms:

| LDM (openaimodel)                      | diffusers UNet2DModel                                            |
|----------------------------------------|------------------------------------------------------------------|
| model_channels 192, mult [1,2,2,4,4]   | block_out_channels (192, 384, 384, 768, 768)                     |
| num_res_blocks 2                       | layers_per_block 2 (up blocks get 2 + 1, as in LDM)              |
| attention_resolutions [1,2,4,8]        | Attn*Block2D at the levels with downsampling ds = 1, 2, 4, 8;    |
|                                        | the 5th level (ds 16) has plain DownBlock2D / UpBlock2D          |
| num_heads 8 (fixed head count)         | attention_head_dim 24 = 192 / 8: 8 heads at the first level; a   |
|                                        | diffusers U-Net has one head *width*, so deeper levels get 16/32 |
|                                        | heads of width 24 (same weights and parameter count, only the    |
|                                        | split of the attention into heads differs)                       |
| use_scale_shift_norm True              | resnet_time_scale_shift "scale_shift"                            |
| resblock_updown True                   | downsample_type / upsample_type "resnet"                         |
| GroupNorm32 in every attention block   | attn_norm_num_groups 32 (diffusers drops the mid-block attention |
|                                        | norm under scale_shift unless this is set)                       |
| time embedding 4 * 192, cos first      | time_embed_dim 4 * block_out_channels[0], flip_sin_to_cos True   |
| upsampling ResBlock of the 2x2 level   | ResnetUpsampleBlock2D (UpBlock2D would use a conv upsampler)     |

Built this way the diffusers U-Net has exactly the parameter count of LDM's UNetModel with that config
(294,966,916).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffusers import UNet2DModel

from ldm_core.models.autoencoder_folders import vae_downsampling_factor
from ldm_core.config.architectures import architecture_kwargs
from ldm_core.config.settings import ConfigError

if TYPE_CHECKING:
    from stage_b_diffusion.config import UNetModelConfig

UNET_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Unit tests only: a few thousand parameters, one attention level.
    "unet-tiny": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # A 2-core CPU on 8x8x4 latents (64 px images, f=8): three resolutions 8 -> 4 -> 2, self-attention
    # only at 2x2 (and in the mid block) where it costs almost nothing. 6.5M parameters, half the step time
    # of (64, 128, 256) (docs/performance.md).
    "unet-small": dict(
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=32,
    ),
    # LDM KL-8 unconditional U-Net (see the mapping table in the module docstring); 32x32x4 latents.
    "unet-ldm-kl8": dict(
        block_out_channels=(192, 384, 384, 768, 768),
        down_block_types=("AttnDownBlock2D",) * 4 + ("DownBlock2D",),
        up_block_types=("ResnetUpsampleBlock2D",) + ("AttnUpBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        attn_norm_num_groups=32,
        attention_head_dim=24,
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
    ),
}


def build_unet(model_cfg: "UNetModelConfig", *, latent_channels: int, latent_size: int) -> UNet2DModel:
    """Build the latent U-Net of architecture `model_cfg.preset` for `latent_channels` x `latent_size`^2 latents.

    Parameters:
        model_cfg: architecture name plus optional `block_out_channels` / `layers_per_block` / `norm_num_groups`
            overrides and `num_classes` (> 0 adds `num_classes + 1` class embeddings; the last id is the null class
            used for classifier-free guidance).
        latent_channels: the VAE's `latent_channels` (U-Net in and out channels).
        latent_size: resolution / f, the latent height and width (U-Net `sample_size`).

    Raises ConfigError for an unknown architecture, an override that does not fit it, or a latent size
    the U-Net's downsampling cannot divide.
    """
    kwargs = architecture_kwargs(model_cfg, UNET_ARCHITECTURES)
    levels = len(kwargs["block_out_channels"])
    factor = 2 ** (levels - 1)
    if latent_size <= 0 or latent_size % factor:
        raise ConfigError(
            f"Latent size {latent_size} cannot be halved {levels - 1} times by U-Net preset "
            f"{model_cfg.preset!r}: it must be a multiple of {factor}. Change data.resolution (latent size "
            f"= resolution / f) or pick a preset with fewer levels.")
    if latent_channels <= 0:
        raise ConfigError(f"latent_channels={latent_channels} must be positive.")
    if model_cfg.num_classes > 0:
        # class_embed_type None + num_class_embeds -> nn.Embedding summed with the time embedding.
        kwargs["num_class_embeds"] = model_cfg.num_classes + 1
    return UNet2DModel(in_channels=latent_channels, out_channels=latent_channels, sample_size=latent_size,
                       **kwargs)


def check_unet_matches_vae(unet: UNet2DModel, vae, resolution: int) -> None:
    """Raise ValueError, naming both shapes, unless `unet` denoises exactly the latents `vae` gives at `resolution`."""
    f = vae_downsampling_factor(vae)
    if resolution % f:
        lower, upper = max(f, resolution - resolution % f), resolution - resolution % f + f
        raise ValueError(f"Resolution {resolution} is not a multiple of the VAE's downsampling factor f={f}. "
                         f"Set data.resolution to a multiple of {f} (e.g. {lower} or {upper}).")
    c, s = int(vae.config.latent_channels), resolution // f
    sample_size = unet.config.sample_size
    unet_hw = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
    cin, cout = unet.config.in_channels, unet.config.out_channels
    if cin != c or cout != c or unet_hw != (s, s):
        raise ValueError(
            f"U-Net expects {cin}x{unet_hw[0]}x{unet_hw[1]} latents (in_channels={cin}, out_channels={cout}, "
            f"sample_size={sample_size}) but the VAE at resolution {resolution} gives {c}x{s}x{s} latents "
            f"(latent_channels={c}, f={f}). Train the U-Net on this VAE's latents or use the matching VAE.")


def count_parameters(model) -> int:
    """Number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())
