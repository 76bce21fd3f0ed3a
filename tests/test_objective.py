"""Noise schedule, samplers and the diffusion loss, checked against independent computations."""

import types

import numpy as np
import pytest
import torch

from stage_b_diffusion.config import DiffusionConfig
from stage_b_diffusion.noise_schedule import SAMPLERS, build_noise_scheduler, make_sampler, sampler_name
from stage_b_diffusion.objective import diffusion_loss, drop_class_labels, min_snr_weights


class RecordingUNet(torch.nn.Module):
    """Stands in for the U-Net: records its inputs and returns a fixed function of them."""

    def forward(self, sample, timestep, class_labels=None):
        self.sample, self.timestep, self.class_labels = sample.clone(), timestep.clone(), class_labels
        return types.SimpleNamespace(sample=0.5 * sample + 0.1)


def alphas_bar(beta_start=0.0015, beta_end=0.0155, steps=1000):
    # CompVis make_beta_schedule("linear"), written out independently in float64.
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas))


def test_training_scheduler_uses_compvis_linear_betas_without_clipping():
    sched = build_noise_scheduler(DiffusionConfig())
    assert sched.config.clip_sample is False and sched.config.thresholding is False
    betas = sched.betas.double()
    assert betas[0].item() == pytest.approx(0.0015, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.0155, rel=1e-6)
    expected = torch.linspace(0.0015 ** 0.5, 0.0155 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(betas, expected, rtol=1e-6, atol=0)
    # diffusers' own "linear" is a plain linspace, a different schedule.
    plain = build_noise_scheduler(DiffusionConfig(beta_schedule="linear")).betas.double()
    assert (plain - expected).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_keeps_the_training_schedule_and_runs(name):
    base = build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction"))
    sampler = make_sampler(name, base)
    assert sampler.config.prediction_type == "v_prediction"
    assert sampler.config.get("clip_sample", False) is False
    assert sampler.config.get("thresholding", False) is False
    torch.testing.assert_close(sampler.alphas_cumprod, base.alphas_cumprod)
    assert sampler_name(sampler) == name
    sampler.set_timesteps(2)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sampler.init_noise_sigma
    for t in sampler.timesteps:
        model_out = 0.1 * sampler.scale_model_input(x, t)
        x = sampler.step(model_out, t, x).prev_sample
    assert torch.isfinite(x).all()


def test_unknown_sampler_lists_names():
    with pytest.raises(ValueError) as err:
        make_sampler("lms", build_noise_scheduler(DiffusionConfig()))
    assert all(name in str(err.value) for name in SAMPLERS)


def replay(seed, shape, steps=1000, offset=0.0):
    """The noise and timesteps diffusion_loss must draw from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    if offset > 0:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=g)
    t = torch.randint(0, steps, (shape[0],), generator=g)
    return noise, t


def test_epsilon_target_noisy_input_and_loss():
    cfg = DiffusionConfig()
    sched = build_noise_scheduler(cfg)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    unet = RecordingUNet()
    labels = torch.tensor([0, 1, 2, 1])
    loss, logs = diffusion_loss(unet, x0, sched, cfg, torch.Generator().manual_seed(7), class_labels=labels)
    noise, t = replay(7, x0.shape)
    assert torch.equal(unet.timestep, t) and unet.class_labels is labels
    ab = alphas_bar()[t].view(-1, 1, 1, 1)
    expected_noisy = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float()
    torch.testing.assert_close(unet.sample, expected_noisy, rtol=1e-5, atol=1e-5)
    pred = 0.5 * expected_noisy + 0.1
    assert loss.item() == pytest.approx(torch.mean((pred - noise) ** 2).item(), rel=1e-5)
    assert logs["t_mean"].item() == pytest.approx(t.float().mean().item())


def test_v_prediction_target():
    cfg = DiffusionConfig(prediction_type="v_prediction")
    sched = build_noise_scheduler(cfg)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    loss, _ = diffusion_loss(RecordingUNet(), x0, sched, cfg, torch.Generator().manual_seed(3))
    noise, t = replay(3, x0.shape)
    ab = alphas_bar()[t].view(-1, 1, 1, 1)
    noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0  # Salimans & Ho 2022
    expected = torch.mean((0.5 * noisy + 0.1 - v) ** 2).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(prediction_type):
    cfg = DiffusionConfig(prediction_type=prediction_type, snr_gamma=5.0)
    sched = build_noise_scheduler(cfg)
    x0 = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    loss, _ = diffusion_loss(RecordingUNet(), x0, sched, cfg, torch.Generator().manual_seed(5))
    noise, t = replay(5, x0.shape)
    ab = alphas_bar()[t]
    snr = ab / (1 - ab)
    weight = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    abv = ab.view(-1, 1, 1, 1)
    noisy = abv.sqrt() * x0 + (1 - abv).sqrt() * noise
    target = noise if prediction_type == "epsilon" else abv.sqrt() * noise - (1 - abv).sqrt() * x0
    per_sample = ((0.5 * noisy + 0.1 - target) ** 2).mean(dim=(1, 2, 3))
    assert loss.item() == pytest.approx((weight * per_sample).mean().item(), rel=1e-5)
    # The batch holds low-noise steps (SNR > gamma) for epsilon and high-noise ones for v: weights really vary.
    assert (weight <= 1).all() and weight.min() < 0.99


def test_min_snr_epsilon_weight_is_finite_at_zero_terminal_snr():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0155,
                          rescale_betas_zero_snr=True)
    w = min_snr_weights(sched, torch.tensor([0, 500, 999]), 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[-1].item() == 1.0


def test_offset_noise_is_per_sample_and_channel():
    cfg = DiffusionConfig(noise_offset=0.1)
    sched = build_noise_scheduler(cfg)
    x0 = torch.zeros(2, 4, 8, 8)
    unet = RecordingUNet()
    diffusion_loss(unet, x0, sched, cfg, torch.Generator().manual_seed(9))
    noise, t = replay(9, x0.shape, offset=0.1)
    ab = alphas_bar()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(unet.sample, ((1 - ab).sqrt() * noise).float(), rtol=1e-5, atol=1e-6)
    # Without the offset draw the replay differs: the (B, C, 1, 1) term is really there.
    plain, _ = replay(9, x0.shape)
    assert not torch.allclose(noise, plain)
    assert torch.allclose((noise - plain).std(dim=(2, 3)), torch.zeros(2, 4), atol=1e-6)


def test_loss_is_reproducible_from_the_generator_state():
    cfg = DiffusionConfig()
    sched = build_noise_scheduler(cfg)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(11)
    diffusion_loss(RecordingUNet(), x0, sched, cfg, g)
    state = g.get_state()
    second, _ = diffusion_loss(RecordingUNet(), x0, sched, cfg, g)
    g2 = torch.Generator()
    g2.set_state(state)
    resumed, _ = diffusion_loss(RecordingUNet(), x0, sched, cfg, g2)
    assert second.item() == resumed.item()


def test_scheduler_and_config_prediction_types_must_agree():
    sched = build_noise_scheduler(DiffusionConfig())
    with pytest.raises(ValueError, match="same DiffusionConfig"):
        diffusion_loss(RecordingUNet(), torch.zeros(1, 4, 8, 8), sched, DiffusionConfig(prediction_type="v_prediction"),
                       torch.Generator().manual_seed(0))


def test_class_dropout_uses_the_null_class():
    labels = torch.arange(1000) % 3
    dropped = drop_class_labels(labels, 3, 0.25, torch.Generator().manual_seed(0))
    changed = dropped != labels
    assert (dropped[changed] == 3).all()
    assert 0.2 < changed.float().mean().item() < 0.3
    assert torch.equal(drop_class_labels(labels, 3, 0.0, torch.Generator()), labels)
