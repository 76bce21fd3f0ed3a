"""Each speed option computes what the plain path computes, within the tolerance of its precision.

Covered elsewhere: the latent cache equals encoding every batch (test_latent_cache), the discriminator is
never run before `disc_start` while the loss keeps LDM's value (test_vae_losses), batched VAE decoding
equals decoding one slice at a time (test_pipeline).
"""

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ldm_core.config.settings import TrainConfig
from ldm_core.training.accelerator import apply_memory_format, cpu_has_native_bf16
from ldm_core.training.optimization import make_adam
from ldm_core.training.step_timer import StepTimer
from stage_a_vae.config import VAEModelConfig
from stage_a_vae.architectures import build_autoencoder
from stage_b_diffusion.config import UNetModelConfig
from stage_b_diffusion.architectures import build_unet


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_autoencoder(VAEModelConfig(preset="kl-f8-tiny"))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=4, latent_size=8)


def _optimizer_steps(model, optimizer, steps=3):
    """Apply `steps` updates from fixed gradients (no forward pass, so only the optimizer differs)."""
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_adam_makes_the_same_updates_as_the_loop_implementation(vae, decoupled):
    results = []
    for fused in (False, True):
        model = copy.deepcopy(vae)
        cfg = TrainConfig(fused_optimizer=fused, weight_decay=0.01)
        optimizer = make_adam(model.parameters(), cfg, lr=1e-3, decoupled_weight_decay=decoupled)
        assert bool(optimizer.defaults.get("fused")) is fused
        assert isinstance(optimizer, torch.optim.AdamW if decoupled else torch.optim.Adam)
        results.append(_optimizer_steps(model, optimizer))
    moved = max((a - b).abs().max() for a, b in zip(results[0], vae.parameters()))
    assert moved > 1e-3  # three steps of lr 1e-3 moved the weights
    for plain, fused in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


def test_channels_last_gives_the_same_outputs_and_gradients(vae):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    outputs = []
    for channels_last in (False, True):
        model = apply_memory_format(copy.deepcopy(vae), TrainConfig(channels_last=channels_last))
        conv = model.encoder.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) is channels_last
        out = model(x).sample
        out.square().mean().backward()
        outputs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = outputs
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


def test_bf16_autocast_matches_fp32_within_bf16_precision(vae, unet):
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1, 250, 500, 999])
    ref_img, ref_eps = vae(x).sample, unet(latents, t).sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, eps = vae(x).sample.float(), unet(latents, t).sample.float()
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); errors compound over a few dozen layers.
    for fast, ref in ((img, ref_img), (eps, ref_eps)):
        rel = (fast - ref).norm() / ref.norm()
        assert rel < 0.03, f"relative error {rel:.4f}"
        assert torch.corrcoef(torch.stack([fast.flatten(), ref.flatten()]))[0, 1] > 0.999


def test_sdpa_attention_is_the_default_and_equals_the_explicit_softmax(unet):
    processors = [m.processor for m in unet.modules() if hasattr(m, "processor")]
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        fast = unet(latents, t).sample
        plain_unet = copy.deepcopy(unet)
        for module in plain_unet.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(AttnProcessor())
        plain = plain_unet(latents, t).sample
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), None)
    except OSError:
        return None


def test_native_bf16_detection_agrees_with_the_kernels_cpu_flags():
    # The bf16 warning and the precision advice of docs/demo.md rest on this answer; torch has moved its private
    # detection between releases, and a detection that always said "no" warned on every bf16 CPU.
    flags = _cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_step_timer_averages_and_resets():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        timer.start()
        sum(range(20000))
        timer.stop()
    mean = timer.mean_and_reset()
    assert mean > 0 and timer.count == 0 and timer.total == 0.0
    assert timer.mean_and_reset() == 0.0  # nothing timed since the reset


def test_foreach_ema_tracks_the_same_average_as_the_loop(unet):
    from diffusers.training_utils import EMAModel

    from ldm_core.config.settings import EMAConfig
    from ldm_core.training.ema import make_ema

    model = copy.deepcopy(unet)
    fast = make_ema(model, EMAConfig(decay=0.9))
    assert fast.foreach
    plain = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=fast.use_ema_warmup, inv_gamma=fast.inv_gamma,
                     power=fast.power, foreach=False)
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        fast.step(model.parameters())
        plain.step(model.parameters())
    assert any(not torch.equal(s, p) for s, p in zip(fast.shadow_params, model.parameters()))  # it averages
    for a, b in zip(fast.shadow_params, plain.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
