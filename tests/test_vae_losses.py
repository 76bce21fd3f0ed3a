"""Stage A loss: LDM's formula recomputed independently, the discriminator switch, the PatchGAN, and LPIPS
loading from a local file."""

import logging
import math
from pathlib import Path

import lpips
import pytest
import torch
import torchvision
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ldm_core.config.settings import ConfigError
from ldm_core.models.pretrained import VGG16_FILE, MissingWeightsError
from stage_a_vae.config import VAELossConfig, VAEModelConfig
from stage_a_vae.discriminator import NLayerDiscriminator, build_discriminator
from stage_a_vae.losses import LPIPSWithDiscriminatorLoss
from ldm_core.models.pretrained import load_lpips_trunk
from stage_a_vae.perceptual import build_lpips
from stage_a_vae.architectures import build_autoencoder

DISC_START = 5


@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(0)
    return build_lpips("random")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_autoencoder(VAEModelConfig(preset="kl-f8-tiny"))


def small_cfg(**overrides):
    values = dict(perceptual_weight=0.7, kl_weight=1e-2, logvar_init=0.3, disc_start=DISC_START,
                  disc_weight=0.5, disc_factor=0.8, disc_channels=8, disc_num_layers=2)
    values.update(overrides)
    return VAELossConfig(**values)


def make_loss(cfg, perceptual, seed=0):
    torch.manual_seed(seed)
    return LPIPSWithDiscriminatorLoss(cfg, perceptual, build_discriminator(cfg))


def encode_decode(vae, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=g)
    return x, posterior, z, vae.decode(z).sample


class CountingDiscriminator(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.inner(images)


# --------------------------------------------------------------------------------------------------
# The autoencoder loss against the formula written out


def expected_autoencoder_loss(cfg, perceptual, disc, vae, x, z, posterior, step):
    """LDM's L_AE computed from scratch on a fresh decoder graph: explicit per-image sums over C,H,W."""
    x_hat = vae.decode(z).sample
    n, c, h, w = x.shape
    lv = torch.tensor(cfg.logvar_init)
    p = perceptual(x, x_hat).reshape(n)
    nll_total, rec_elems = 0.0, 0.0
    for i in range(n):
        pix = (x[i] - x_hat[i]).abs() if cfg.reconstruction == "l1" else (x[i] - x_hat[i]) ** 2
        rec_sum = pix.sum() + cfg.perceptual_weight * p[i] * (c * h * w)  # LPIPS counted at every pixel
        rec_elems = rec_elems + rec_sum
        nll_total = nll_total + rec_sum / torch.exp(lv) + lv * (c * h * w)
    nll_loss = nll_total / n
    mean, logvar = posterior.mean, posterior.logvar
    kl = sum(0.5 * (mean[i] ** 2 + logvar[i].exp() - 1.0 - logvar[i]).sum() for i in range(n)) / n
    total = nll_loss + cfg.kl_weight * kl
    g_loss = d_weight = torch.tensor(0.0)
    if step >= cfg.disc_start:
        g_loss = -disc(x_hat).mean()
        last = vae.decoder.conv_out.weight
        gn = torch.autograd.grad(nll_loss, last, retain_graph=True)[0]
        gg = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        d_weight = (gn.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4).detach() * cfg.disc_weight
        total = total + d_weight * cfg.disc_factor * g_loss
    return total, dict(nll=nll_loss, kl=kl, g_loss=g_loss, d_weight=d_weight, rec=rec_elems / x.numel())


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
@pytest.mark.parametrize("step", [0, DISC_START])
def test_autoencoder_loss_matches_the_ldm_formula(vae, lpips_random, reconstruction, step):
    cfg = small_cfg(reconstruction=reconstruction)
    loss_fn = make_loss(cfg, lpips_random)
    x, posterior, z, x_hat = encode_decode(vae)
    last = vae.decoder.conv_out.weight
    loss, logs = loss_fn.autoencoder_loss(x, x_hat, posterior, step, last)
    expected, parts = expected_autoencoder_loss(cfg, lpips_random, loss_fn.discriminator, vae, x, z,
                                                posterior, step)

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for key in ("nll", "kl", "g_loss", "d_weight", "rec"):
        torch.testing.assert_close(logs[key], parts[key].detach(), rtol=1e-5, atol=1e-7)
    assert logs["total"].item() == pytest.approx(loss.item())
    assert logs["disc_factor"].item() == pytest.approx(0.8 if step >= DISC_START else 0.0)
    if step >= DISC_START:
        assert parts["d_weight"] > 0 and parts["g_loss"] != 0  # the GAN term is really in play

    # Same gradients through every term (float32 sums in a different order: tolerance relative to scale).
    params = [last, vae.encoder.conv_in.weight]
    got = torch.autograd.grad(loss, params, retain_graph=True)  # the encoder graph is shared
    want = torch.autograd.grad(expected, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_l2_warmup_uses_squared_error_until_its_last_step_then_the_configured_term(vae, lpips_random):
    warm = make_loss(small_cfg(reconstruction="l1", l2_warmup_steps=5), lpips_random)
    x, posterior, z, x_hat = encode_decode(vae)
    last = vae.decoder.conv_out.weight
    for step, equivalent in ((0, "l2"), (4, "l2"), (5, "l1"), (DISC_START, "l1")):
        reference = make_loss(small_cfg(reconstruction=equivalent), lpips_random)
        reference.discriminator = warm.discriminator
        got, _ = warm.autoencoder_loss(x, x_hat, posterior, step, last)
        want, _ = reference.autoencoder_loss(x, x_hat, posterior, step, last)
        torch.testing.assert_close(got, want)
    assert warm.pixel_loss(4) == "l2" and warm.pixel_loss(5) == "l1"


def test_closed_form_kl_agrees_with_monte_carlo():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 4, 2, 2, generator=g)
    logvar = torch.rand(2, 4, 2, 2, generator=g) * 3 - 2
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    loss_fn = make_loss(small_cfg(perceptual_weight=0.0), None)
    x = torch.zeros(2, 3, 16, 16)
    _, logs = loss_fn.autoencoder_loss(x, x, posterior, 0, torch.zeros(1, requires_grad=True))

    # KL(q || N(0, I)) = E_q[log q(z) - log p(z)], summed over C,H,W and averaged over the batch.
    q = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(0.0, 1.0)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(dim=(2, 3, 4)).mean(dim=0).mean()
    assert logs["kl"].item() > 1.0
    assert logs["kl"].item() == pytest.approx(mc.item(), rel=0.02)


def test_discriminator_is_never_run_before_disc_start(vae):
    cfg = small_cfg(perceptual_weight=0.0)
    counting = CountingDiscriminator(build_discriminator(cfg))
    loss_fn = LPIPSWithDiscriminatorLoss(cfg, None, counting)
    x, posterior, _, x_hat = encode_decode(vae)
    last = vae.decoder.conv_out.weight
    for step in range(DISC_START):
        assert not loss_fn.discriminator_active(step)
        _, logs = loss_fn.autoencoder_loss(x, x_hat, posterior, step, last)
        assert logs["g_loss"].item() == 0.0 and logs["d_weight"].item() == 0.0
        with pytest.raises(RuntimeError, match="disc_start=5"):
            loss_fn.discriminator_loss(x, x_hat, step)
    assert counting.calls == 0

    assert loss_fn.discriminator_active(DISC_START)
    loss_fn.autoencoder_loss(x, x_hat, posterior, DISC_START, last)
    assert counting.calls == 1
    loss_fn.discriminator_loss(x, x_hat, DISC_START)
    assert counting.calls == 3

    off = LPIPSWithDiscriminatorLoss(small_cfg(perceptual_weight=0.0, disc_factor=0.0), None, counting)
    off.autoencoder_loss(x, x_hat, posterior, 10**6, last)
    assert not off.discriminator_active(10**6) and counting.calls == 3


# --------------------------------------------------------------------------------------------------
# The discriminator loss


class FirstChannelLogits(nn.Module):
    """A stand-in discriminator whose logits are the first channel of its input, times a weight."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images):
        return images[:, :1] * self.scale


def _images_with_first_channel(values):
    images = torch.zeros(len(values), 3, 1, 1)
    images[:, 0, 0, 0] = torch.tensor(values)
    return images


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_by_hand(kind):
    real, fake = [2.0, 0.5, -1.0, 0.0], [-3.0, 0.2, 1.5, -0.5]
    cfg = small_cfg(perceptual_weight=0.0, disc_loss=kind, disc_factor=0.8)
    loss_fn = LPIPSWithDiscriminatorLoss(cfg, None, FirstChannelLogits())
    d_loss, logs = loss_fn.discriminator_loss(_images_with_first_channel(real), _images_with_first_channel(fake),
                                              DISC_START)
    if kind == "hinge":
        real_term = sum(max(0.0, 1 - r) for r in real) / 4
        fake_term = sum(max(0.0, 1 + f) for f in fake) / 4
    else:
        real_term = sum(math.log1p(math.exp(-r)) for r in real) / 4
        fake_term = sum(math.log1p(math.exp(f)) for f in fake) / 4
    assert d_loss.item() == pytest.approx(0.8 * 0.5 * (real_term + fake_term), rel=1e-6)
    assert logs["d_loss"].item() == pytest.approx(d_loss.item())
    assert logs["logits_real"].item() == pytest.approx(sum(real) / 4)
    assert logs["logits_fake"].item() == pytest.approx(sum(fake) / 4)


def test_discriminator_loss_does_not_reach_the_reconstructions():
    cfg = small_cfg(perceptual_weight=0.0)
    loss_fn = make_loss(cfg, None)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    d_loss, _ = loss_fn.discriminator_loss(x, x_hat, DISC_START)
    (grad_x_hat,) = torch.autograd.grad(d_loss, [x_hat], retain_graph=True, allow_unused=True)
    assert grad_x_hat is None
    grads = torch.autograd.grad(d_loss, list(loss_fn.discriminator.parameters()))
    assert all(torch.isfinite(gr).all() for gr in grads) and any(gr.abs().sum() > 0 for gr in grads)


# --------------------------------------------------------------------------------------------------
# logvar, precision, and guards


def test_logvar_is_frozen_by_default_and_learns_when_asked(vae):
    x, posterior, _, x_hat = encode_decode(vae)
    x_hat = x_hat.detach()
    frozen = make_loss(small_cfg(perceptual_weight=0.0), None)
    assert not frozen.logvar.requires_grad and frozen.logvar.item() == pytest.approx(0.3)
    assert not any(p is frozen.logvar for p in frozen.parameters() if p.requires_grad)

    learned = make_loss(small_cfg(perceptual_weight=0.0, learn_logvar=True), None)
    assert learned.logvar.requires_grad
    loss, _ = learned.autoencoder_loss(x, x_hat, posterior.__class__(posterior.parameters.detach()), 0,
                                       vae.decoder.conv_out.weight)
    (grad,) = torch.autograd.grad(loss, [learned.logvar])
    # d/dlv [sum(rec)/N * exp(-lv) + lv*C*H*W] = -sum(rec)/N * exp(-lv) + C*H*W
    rec_per_image = (x - x_hat).abs().sum() / 2
    expected = -rec_per_image * math.exp(-0.3) + 3 * 16 * 16
    assert grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bf16_autocast_keeps_lpips_and_the_loss_in_fp32(vae, lpips_random):
    seen = []

    def record(module, args, output):
        seen.append((args[0].dtype, args[1].dtype, output.dtype, torch.is_autocast_enabled("cpu")))

    handle = lpips_random.register_forward_hook(record)
    try:
        cfg = small_cfg()
        loss_fn = make_loss(cfg, lpips_random)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x, posterior, _, x_hat = encode_decode(vae)
            loss, logs = loss_fn.autoencoder_loss(x, x_hat, posterior, DISC_START, vae.decoder.conv_out.weight)
            d_loss, _ = loss_fn.discriminator_loss(x, x_hat, DISC_START)
    finally:
        handle.remove()
    assert x_hat.dtype == torch.bfloat16  # the decoder really ran in bf16
    assert seen == [(torch.float32, torch.float32, torch.float32, False)]
    assert loss.dtype == torch.float32 and d_loss.dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in logs.values()) and torch.isfinite(d_loss)
    assert logs["d_weight"].item() > 0
    loss.backward()
    assert torch.isfinite(vae.decoder.conv_out.weight.grad).all()
    vae.zero_grad(set_to_none=True)


def test_perceptual_module_is_required_when_weighted_and_stays_in_eval(lpips_random):
    with pytest.raises(ValueError, match="perceptual_weight=0.7"):
        make_loss(small_cfg(), None)
    loss_fn = make_loss(small_cfg(), lpips_random).train()
    assert loss_fn.training and loss_fn.discriminator.training
    assert not loss_fn.perceptual.training  # LPIPS' dropout stays off


# --------------------------------------------------------------------------------------------------
# PatchGAN discriminator


def test_patchgan_layout_matches_pix2pix():
    disc = NLayerDiscriminator(norm="batch")
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 64), (64, 128), (128, 256), (256, 512),
                                                               (512, 1)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    # Biases only where no BatchNorm follows (taming's use_bias).
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in disc.modules()) == 3
    slopes = {m.negative_slope for m in disc.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.2}
    # taming's weights_init: N(0, 0.02) convolutions, N(1, 0.02) norm scales.
    big = convs[3].weight
    assert abs(big.mean().item()) < 1e-3 and big.std().item() == pytest.approx(0.02, rel=0.02)
    norm = [m for m in disc.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    assert norm.weight.mean().item() == pytest.approx(1.0, abs=0.005)
    assert norm.weight.std().item() == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize("norm, norm_type", [("group", nn.GroupNorm), ("batch", nn.BatchNorm2d),
                                             ("sync_batch", nn.SyncBatchNorm), ("instance", nn.InstanceNorm2d)])
def test_patchgan_norms_and_output_shape(norm, norm_type):
    torch.manual_seed(0)
    disc = NLayerDiscriminator(channels=8, norm=norm)
    assert sum(isinstance(m, norm_type) for m in disc.modules()) == 3
    out = disc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1, 6, 6)  # H/8 - 2 patches per side


def test_groupnorm_discriminator_judges_each_image_independently_of_the_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    group = NLayerDiscriminator(channels=8, norm="group").train()
    torch.testing.assert_close(group(x)[:1], group(x[:1]), rtol=1e-5, atol=1e-6)
    batch = NLayerDiscriminator(channels=8, norm="batch").train()
    assert not torch.allclose(batch(x)[:1], batch(x[:2])[:1], atol=1e-4)


def test_patchgan_rejects_unknown_norm():
    with pytest.raises(ValueError, match="group, batch, sync_batch, instance"):
        NLayerDiscriminator(norm="layer")


# --------------------------------------------------------------------------------------------------
# LPIPS loading


def test_missing_vgg_weights_say_which_file_and_where(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        build_lpips("vgg")
    message = str(err.value)
    assert VGG16_FILE in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "loss.lpips_weights" in message
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        build_lpips("vgg", str(tmp_path / "nowhere.pth"))


def test_vgg_weights_load_from_a_local_file_into_every_trunk_layer(monkeypatch, tmp_path, lpips_random):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(123)
    state = torchvision.models.vgg16(weights=None).state_dict()  # torchvision's own key layout
    path = tmp_path / "hub" / "checkpoints" / VGG16_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)

    module = build_lpips("vgg")  # found in torch hub's cache
    trunk = module.net.state_dict()
    assert len(trunk) == 26  # 13 convolutions, weight and bias
    for name, tensor in trunk.items():
        index, kind = name.split(".")[1:]
        assert torch.equal(tensor, state[f"features.{index}.{kind}"]), name
    random_trunk = lpips_random.net.state_dict()
    assert all(not torch.equal(trunk[k], random_trunk[k]) for k in trunk if k.endswith("weight"))

    # The calibrated linear heads come from the lpips package itself.
    heads = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu",
                       weights_only=True)
    assert torch.equal(module.lin0.model[1].weight, heads["lin0.model.1.weight"])
    assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_a_wrong_state_dict_is_rejected_without_loading(lpips_random):
    before = lpips_random.net.slice1[0].weight.clone()
    with pytest.raises(ValueError, match=r"features\.0\.weight"):
        load_lpips_trunk(lpips_random, {"classifier.0.weight": torch.zeros(1)})
    assert torch.equal(lpips_random.net.slice1[0].weight, before)


def test_random_trunk_is_announced_and_bad_trunk_options_are_errors(caplog):
    with caplog.at_level(logging.WARNING, logger="stage_a_vae.perceptual"):
        module = build_lpips("random")
    assert "RANDOMLY INITIALISED" in caplog.text
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    with pytest.raises(ConfigError, match="vgg, random"):
        build_lpips("alex")
    with pytest.raises(ConfigError, match="lpips_trunk=random"):
        build_lpips("random", "/some/vgg16-397923af.pth")
