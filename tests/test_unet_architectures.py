"""Latent U-Net architectures: shapes from the VAE, class embeddings, LDM KL-8 mapping, and clear errors."""

import pytest
import torch
from diffusers import AutoencoderKL

from ldm_core.config.settings import ConfigError
from stage_b_diffusion.config import UNetModelConfig
from stage_b_diffusion.architectures import UNET_ARCHITECTURES, build_unet, check_unet_matches_vae, count_parameters


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
                         latent_channels=latent_channels, layers_per_block=1, sample_size=64)


def test_architectures_exist():
    assert {"unet-tiny", "unet-small", "unet-ldm-kl8"} <= set(UNET_ARCHITECTURES)
    for kwargs in UNET_ARCHITECTURES.values():
        assert not {"in_channels", "out_channels", "sample_size"} & set(kwargs)


def test_shapes_come_from_the_vae_and_forward_keeps_them():
    torch.manual_seed(0)
    unet = build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=8, latent_size=16)
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (8, 8, 16)
    assert unet.class_embedding is None
    out = unet(torch.randn(2, 8, 16, 16), torch.tensor([3, 900])).sample
    assert out.shape == (2, 8, 16, 16)


def test_unet_small_runs_on_8x8x4_latents():
    torch.manual_seed(0)
    unet = build_unet(UNetModelConfig(preset="unet-small"), latent_channels=4, latent_size=8)
    with torch.no_grad():
        assert unet(torch.randn(2, 4, 8, 8), 10).sample.shape == (2, 4, 8, 8)
    # Attention only at the lowest resolution (last down level, first up level).
    assert unet.config.down_block_types[-1].startswith("Attn")
    assert not any(t.startswith("Attn") for t in unet.config.down_block_types[:-1])


def test_class_conditional_unet_has_a_null_class():
    torch.manual_seed(0)
    unet = build_unet(UNetModelConfig(preset="unet-tiny", num_classes=3), latent_channels=4, latent_size=8)
    assert unet.config.num_class_embeds == 4
    assert isinstance(unet.class_embedding, torch.nn.Embedding) and unet.class_embedding.num_embeddings == 4
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = unet(x, 5, class_labels=torch.tensor([0, 0])).sample
        b = unet(x, 5, class_labels=torch.tensor([0, 3])).sample
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_ldm_kl8_architecture_matches_ldm_parameter_count():
    # CompVis openaimodel.UNetModel with configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml has
    # 294,966,916 parameters; the diffusers mapping must reproduce the same weights exactly.
    with torch.device("meta"):
        unet = build_unet(UNetModelConfig(preset="unet-ldm-kl8"), latent_channels=4, latent_size=32)
    assert count_parameters(unet) == 294_966_916
    assert unet.config.block_out_channels == (192, 384, 384, 768, 768)
    assert unet.config.resnet_time_scale_shift == "scale_shift"


def test_overrides_apply_and_wrong_length_is_rejected():
    torch.manual_seed(0)
    unet = build_unet(UNetModelConfig(preset="unet-tiny", block_out_channels=[8, 24], layers_per_block=2),
                      latent_channels=4, latent_size=8)
    assert tuple(unet.config.block_out_channels) == (8, 24) and unet.config.layers_per_block == 2
    with pytest.raises(ConfigError, match="has 3 entries but preset 'unet-tiny' has 2 levels"):
        build_unet(UNetModelConfig(preset="unet-tiny", block_out_channels=[8, 16, 32]),
                   latent_channels=4, latent_size=8)
    with pytest.raises(ConfigError, match="multiples of norm_num_groups=8"):
        build_unet(UNetModelConfig(preset="unet-tiny", block_out_channels=[8, 20]), latent_channels=4, latent_size=8)


def test_unknown_architecture_lists_them():
    with pytest.raises(ConfigError) as err:
        build_unet(UNetModelConfig(preset="unet-huge"), latent_channels=4, latent_size=8)
    for name in UNET_ARCHITECTURES:
        assert name in str(err.value)


def test_latent_size_must_divide_by_the_downsampling():
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_unet(UNetModelConfig(preset="unet-small"), latent_channels=4, latent_size=6)


def test_unet_vae_mismatch_names_both_shapes():
    vae = tiny_vae(latent_channels=8)
    torch.manual_seed(0)
    unet = build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=4, latent_size=8)
    with pytest.raises(ValueError) as err:
        check_unet_matches_vae(unet, vae, 64)
    msg = str(err.value)
    assert "U-Net expects 4x8x8 latents" in msg and "gives 8x8x8 latents" in msg and "latent_channels=8, f=8" in msg
    # Same channels but the wrong resolution.
    with pytest.raises(ValueError, match="gives 8x16x16 latents"):
        check_unet_matches_vae(build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=8, latent_size=8),
                               vae, 128)
    check_unet_matches_vae(build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=8, latent_size=8), vae, 64)


def test_out_channels_must_match_too():
    vae = tiny_vae(latent_channels=4)
    unet = build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=4, latent_size=8)
    unet.register_to_config(out_channels=8)
    with pytest.raises(ValueError, match="out_channels=8"):
        check_unet_matches_vae(unet, vae, 64)


def test_norm_groups_override_reaches_every_group_norm():
    unet = build_unet(UNetModelConfig(preset="unet-small", block_out_channels=[32, 64, 64], norm_num_groups=8),
                      latent_channels=4, latent_size=8)
    groups = {m.num_groups for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8} and unet.config.norm_num_groups == 8
    with pytest.raises(ConfigError, match="multiples of norm_num_groups=3"):
        build_unet(UNetModelConfig(preset="unet-small", norm_num_groups=3), latent_channels=4, latent_size=8)
    with pytest.raises(ConfigError, match="model.norm_num_groups=0"):
        UNetModelConfig(norm_num_groups=0)


def test_both_stages_apply_overrides_through_one_helper():
    from ldm_core.config.architectures import architecture_kwargs
    from stage_a_vae.architectures import VAE_ARCHITECTURES
    from stage_a_vae.config import VAEModelConfig

    vae = architecture_kwargs(VAEModelConfig(preset="kl-f8-tiny", block_out_channels=[8, 16, 32], downsample_factor=4),
                              VAE_ARCHITECTURES, ("DownEncoderBlock2D", "UpDecoderBlock2D"))
    assert vae["block_out_channels"] == (8, 16, 32) and vae["down_block_types"] == ("DownEncoderBlock2D",) * 3
    unet = architecture_kwargs(UNetModelConfig(preset="unet-tiny", layers_per_block=3), UNET_ARCHITECTURES)
    assert unet["layers_per_block"] == 3 and UNET_ARCHITECTURES["unet-tiny"]["layers_per_block"] == 1
    with pytest.raises(ConfigError, match="multiples of norm_num_groups=3"):
        architecture_kwargs(VAEModelConfig(preset="kl-f8-tiny", norm_num_groups=3), VAE_ARCHITECTURES)
