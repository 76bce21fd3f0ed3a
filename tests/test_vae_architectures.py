"""Autoencoder architectures: SD's exact kl-f8, the CPU-sized ones, and the factory's validation."""

import pytest
import torch

from ldm_core.config.settings import ConfigError
from stage_a_vae.config import VAEModelConfig
from ldm_core.models.autoencoder_folders import vae_downsampling_factor as downsample_factor
from stage_a_vae.architectures import VAE_ARCHITECTURES, build_autoencoder


def test_kl_f8_is_stable_diffusions_autoencoder():
    # Built on the meta device: the architecture and parameter count, without allocating 84M weights.
    with torch.device("meta"):
        vae = build_autoencoder(VAEModelConfig(preset="kl-f8"))
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
    assert vae.config.layers_per_block == 2
    assert list(vae.config.down_block_types) == ["DownEncoderBlock2D"] * 4
    assert list(vae.config.up_block_types) == ["UpDecoderBlock2D"] * 4
    assert vae.config.scaling_factor == pytest.approx(0.18215)


@pytest.mark.parametrize("name", sorted(VAE_ARCHITECTURES))
def test_every_architecture_is_f8_with_four_latent_channels(name):
    with torch.device("meta"):
        vae = build_autoencoder(VAEModelConfig(preset=name))
    assert downsample_factor(vae) == 8
    assert vae.config.latent_channels == 4


@pytest.mark.parametrize("name", ["kl-f8-tiny", "kl-f8-small"])
def test_small_architectures_encode_to_h_over_8_and_decode_back(name):
    torch.manual_seed(0)
    vae = build_autoencoder(VAEModelConfig(preset=name))
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.mode()).sample
    assert posterior.mean.shape == (2, 4, 4, 6)
    assert y.shape == x.shape


def test_overrides_are_applied_and_the_architecture_table_is_not_mutated():
    before = {k: dict(v) for k, v in VAE_ARCHITECTURES.items()}
    cfg = VAEModelConfig(preset="kl-f8-tiny", block_out_channels=[8, 16, 16, 32], layers_per_block=2,
                         norm_num_groups=8, latent_channels=3)
    vae = build_autoencoder(cfg)
    assert tuple(vae.config.block_out_channels) == (8, 16, 16, 32)
    assert vae.config.layers_per_block == 2
    assert vae.config.norm_num_groups == 8
    assert vae.config.latent_channels == 3
    assert vae.encoder.conv_out.out_channels == 6  # mean and log-variance for 3 channels
    assert VAE_ARCHITECTURES == before


def test_fewer_blocks_give_a_smaller_factor_when_the_config_expects_it():
    vae = build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", block_out_channels=[8, 16, 32],
                                           downsample_factor=4))
    assert downsample_factor(vae) == 4
    assert len(vae.config.down_block_types) == 3 and len(vae.config.up_block_types) == 3
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mode()
    assert z.shape == (1, 4, 4, 4)


def test_mismatched_downsample_factor_names_both_factors():
    with pytest.raises(ConfigError, match=r"downsample_factor=4.*f=8"):
        build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", downsample_factor=4))
    with pytest.raises(ConfigError, match=r"downsample_factor=8.*f=4"):
        build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", block_out_channels=[8, 16, 32]))


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        build_autoencoder(VAEModelConfig(preset="kl-f16"))
    for name in VAE_ARCHITECTURES:
        assert name in str(err.value)


def test_norm_groups_that_do_not_divide_the_widths_are_rejected():
    with pytest.raises(ConfigError, match=r"norm_num_groups=3"):
        build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", norm_num_groups=3))


def test_posterior_logvar_init_sets_the_starting_std_through_the_quant_conv():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    default = build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", posterior_logvar_init=None))
    with torch.no_grad():
        assert default.encode(x).latent_dist.std.mean() > 0.3  # diffusers' init: std of order 1
    torch.manual_seed(0)
    vae = build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", posterior_logvar_init=-6.0))
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
    torch.testing.assert_close(posterior.logvar, torch.full_like(posterior.logvar, -6.0))
    # The mean still reads the image, and not the log-variance half.
    assert posterior.mean.std() > 0.05
    assert torch.count_nonzero(vae.quant_conv.weight[:4, 4:]) == 0


def test_mid_block_attention_can_be_switched_off():
    with torch.device("meta"):
        with_attention = build_autoencoder(VAEModelConfig(preset="kl-f8-tiny"))
        without = build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", mid_block_attention=False))
    assert with_attention.decoder.mid_block.attentions[0] is not None
    assert without.decoder.mid_block.attentions[0] is None and without.encoder.mid_block.attentions[0] is None
    assert without.config.mid_block_add_attention is False


def test_zero_init_residual_makes_every_block_its_shortcut():
    torch.manual_seed(0)
    vae = build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", zero_init_residual=True))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    from diffusers.models.resnet import ResnetBlock2D

    blocks = [m for m in vae.modules() if isinstance(m, ResnetBlock2D)]
    assert len(blocks) == sum(1 for _ in vae.modules() if isinstance(_, ResnetBlock2D)) > 10
    with torch.no_grad():
        for block in blocks:
            h = torch.randn(1, block.in_channels, 8, 8)
            shortcut = block.conv_shortcut(h) if block.conv_shortcut is not None else h
            torch.testing.assert_close(block(h, None), shortcut / block.output_scale_factor)
        y = vae(x).sample
    assert y.shape == x.shape and torch.isfinite(y).all() and y.std() > 0  # the signal still flows through
    default = build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", zero_init_residual=False))
    assert all(m.conv2.weight.abs().sum() > 0 for m in default.modules() if isinstance(m, ResnetBlock2D))


@pytest.fixture
def trained_tiny(tmp_path):
    """A kl-f8-tiny folder with weights unlike any initialisation (no zero branches) and its own scale."""
    torch.manual_seed(3)
    vae = build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", zero_init_residual=False, posterior_logvar_init=None))
    vae.register_to_config(scaling_factor=1.7)
    vae.save_pretrained(tmp_path / "vae")
    return vae, tmp_path / "vae"


def test_pretrained_starts_from_every_weight_and_the_scale_of_that_autoencoder(trained_tiny):
    source, folder = trained_tiny
    torch.manual_seed(0)  # the seed a run sets: it must not matter
    vae = build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", pretrained=str(folder)))
    theirs = source.state_dict()
    assert vae.state_dict().keys() == theirs.keys()
    assert all(torch.equal(t, theirs[name]) for name, t in vae.state_dict().items())
    assert vae.config.scaling_factor == pytest.approx(1.7)


@pytest.mark.parametrize("overrides, named", [({"preset": "kl-f8-mini"}, "block_out_channels"),
                                              ({"preset": "kl-f8-tiny", "norm_num_groups": 8}, "norm_num_groups"),
                                              ({"preset": "kl-f8-tiny", "mid_block_attention": False},
                                               "mid_block_add_attention")])
def test_pretrained_of_another_architecture_is_refused_naming_what_differs(trained_tiny, overrides, named):
    _, folder = trained_tiny
    with pytest.raises(ConfigError, match=rf"model.pretrained=.*{named}.*Set model.preset"):
        build_autoencoder(VAEModelConfig(pretrained=str(folder), **overrides))


def test_pretrained_that_is_not_there_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        build_autoencoder(VAEModelConfig(preset="kl-f8-tiny", pretrained=str(tmp_path / "nothing" / "here")))
