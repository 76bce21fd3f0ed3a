"""Stage A's latent regularisers (stage_a_vae/latent_regularisers.py): the image gets exactly the transform the
latent gets, the draws follow their settings, and off the step is the step of before."""

from __future__ import annotations

import pytest
import torch

from stage_a_vae.latent_regularisers import LatentTransform, draw_transform


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("size, turns", [(None, 1), (4, 0), (3, 2), (6, 3)])
def test_the_image_gets_exactly_the_latents_transform(size, turns):
    """With an autoencoder that is the identity (f = 1), decoding T(z) is T(x) to the bit."""
    x = torch.rand(2, 3, 8, 8)
    t = LatentTransform(size=size, turns=turns, factor=1)
    assert torch.equal(t.latent(x), t.image(x))
    # At f = 8 the image is resized to 8x the latent's size and turned alike.
    z, image = torch.rand(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    t8 = LatentTransform(size=size, turns=turns, factor=8)
    assert t8.image(image).shape[-1] == 8 * t8.latent(z).shape[-1]
    corner = torch.zeros(1, 1, 8, 8)
    corner[..., 0, 0] = 1  # where the top-left corner goes, in both
    big = torch.zeros(1, 1, 64, 64)
    big[..., :8, :8] = 1
    moved = LatentTransform(turns=turns, factor=8)
    small_at = moved.latent(corner)[0, 0].nonzero()[0] * 8
    big_at = moved.image(big)[0, 0].nonzero().min(dim=0).values
    assert torch.equal(small_at, big_at)


def test_the_draws_follow_the_settings():
    plain = [draw_transform("none", 0.5, 0.0, 8, 8, generator(k)) for k in range(50)]
    assert plain == [None] * 50
    scale = [draw_transform("scale", 0.5, 0.0, 8, 8, generator(k)) for k in range(400)]
    chosen = [t for t in scale if t is not None]
    assert 150 < len(chosen) < 250 and {t.size for t in chosen} == {4} and {t.turns for t in chosen} == {0}
    eq = [t for t in (draw_transform("eqvae", 1.0, 0.0, 8, 8, generator(k)) for k in range(400)) if t is not None]
    assert len(eq) == 400 and {t.turns for t in eq} == {1, 2, 3}
    assert min(t.size for t in eq) == 2 and max(t.size for t in eq) == 8  # round(8 * [0.25, 0.97])
    noisy = [draw_transform("none", 0.5, 0.3, 8, 8, generator(k)) for k in range(100)]
    assert all(t is not None and 0 <= t.noise <= 0.3 and t.size is None for t in noisy)


def test_latent_noise_is_relative_to_the_batchs_latent_std():
    z = torch.randn(64, 4, 8, 8) * 5
    noisy = LatentTransform(noise=0.2, generator=generator(3)).latent(z)
    assert float((noisy - z).std()) == pytest.approx(0.2 * float(z.std()), rel=0.05)


def test_off_the_training_step_is_unchanged(tmp_path):
    """The default config trains bit for bit as before the options existed; an option changes the weights."""
    from safetensors.torch import load_file

    from workflows.cli import main

    common = ["--config", "vae/kl-f8-mini", "--data", "builtin:shapes", "model.preset=kl-f8-tiny", "train.max_steps=3",
              "train.batch_size=2", "data.shapes_count=16", "data.val_count=2", "data.resolution=32",
              "train.latent_stats_images=4", "train.progress_bar=false", "train.validate_every=1000"]
    runs = {}
    for name, extra in (("a", []), ("b", []), ("eq", ["loss.equivariance=eqvae", "loss.equivariance_share=1.0"])):
        assert main(["train-vae", "--out", str(tmp_path / name), *common, *extra]) == 0
        runs[name] = load_file(tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["eq"][k]) for k in runs["a"])
