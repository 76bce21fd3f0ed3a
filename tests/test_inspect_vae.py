"""`ldm inspect-vae` (evaluation/latent_space.py, evaluation/inspect_vae.py) against autoencoders whose answers
are known: the identity, and an average-pool / nearest-upsample pair that commutes with rotations."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from evaluation import latent_space as L
from ldm_core.images.metrics import PSNR_CAP_DB


class KnownAutoencoder(torch.nn.Module):
    """encode: x (or its f x f average), posterior std `sigma`; decode: z (or its f x nearest enlargement)."""

    def __init__(self, factor: int = 1, sigma: float = 0.01, scaling_factor: float = 2.0):
        super().__init__()
        self.factor, self.sigma = factor, sigma
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, for the device
        self.config = SimpleNamespace(scaling_factor=scaling_factor, shift_factor=None, sample_size=32)

    def encode(self, x):
        mean = F.avg_pool2d(x, self.factor) if self.factor > 1 else x
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.full_like(mean, self.sigma)))

    def decode(self, z):
        return SimpleNamespace(sample=F.interpolate(z, scale_factor=self.factor, mode="nearest") if self.factor > 1 else z)


def images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, size // 4, size // 4), size=size, mode="bilinear")  # not pure noise
    return (smooth * 255).round().to(torch.uint8)


def test_the_identity_is_equivariant_and_its_paths_are_even():
    vae, x = KnownAutoencoder(), images()
    mean, std = L.posteriors(vae, x)
    eq = L.equivariance(vae, x, mean)
    assert eq["identity"] == eq["rotate_90"] == eq["rotate_180"] == eq["rotate_270"] == PSNR_CAP_DB
    assert eq["downscale_2x"] == PSNR_CAP_DB  # decode(down(z)) is down(x) when both are the identity
    spectra = L.spectra(x, mean)
    assert spectra["latents_hf_share"] == pytest.approx(spectra["images_hf_share"])
    paths = L.interpolations(vae, mean, [(0, 1)], lambda z: z, lambda z: z, steps=9)
    assert paths["evenness"]["linear"] < 0.05  # equal steps up to rounding to uint8
    assert torch.equal(paths["linear"][0][0], x[0]) and torch.equal(paths["linear"][0][-1], x[1])


def test_channel_statistics_and_kl_match_their_formulas():
    vae, x = KnownAutoencoder(sigma=0.1), images(16)
    mean, std = L.posteriors(vae, x)
    rows = L.channel_statistics(mean, std, torch.Generator().manual_seed(0))
    for c, row in enumerate(rows):
        mu = mean[:, c]
        expected_kl = 0.5 * (mu.square().mean() + 0.1 ** 2 - 1 - math.log(0.1 ** 2))
        assert row["kl_per_position"] == pytest.approx(float(expected_kl), rel=1e-5)
        assert row["posterior_std"] == pytest.approx(0.1)
        assert row["std"] == pytest.approx(float(mu.std()), rel=0.05)  # the spread, with its small noise
    norm = L.implied_normalisation(mean, std, torch.Generator().manual_seed(0), vae.config)
    assert norm["implied_shift_factor"] == pytest.approx(float(mean.mean()), abs=0.01)
    assert norm["config_scaling_factor"] == 2.0 and norm["config_shift_factor"] is None


def test_the_decoder_under_noise_loses_what_the_noise_costs():
    vae, x = KnownAutoencoder(scaling_factor=2.0), images(16)
    mean, _ = L.posteriors(vae, x)
    rows = L.decoder_under_noise(vae, x, mean, 2.0, torch.Generator().manual_seed(0), sigmas=(0.0, 0.2))
    assert rows[0]["psnr"] == PSNR_CAP_DB
    # Noise of std 0.2 in unit-variance units is 0.1 in [-1, 1], 12.75 levels: 10 log10(255^2 / 12.75^2) = 26.0 dB,
    # a little higher where clipping at black and white removes some of it.
    assert 25.5 < rows[1]["psnr"] < 27.5


def test_an_autoencoder_that_commutes_with_rotations_scores_them_as_its_round_trip():
    vae, x = KnownAutoencoder(factor=2), images()
    mean, _ = L.posteriors(vae, x)
    eq = L.equivariance(vae, x, mean)
    assert eq["identity"] < PSNR_CAP_DB  # an average-pool round trip loses detail
    for turns in (90, 180, 270):
        assert eq[f"rotate_{turns}"] == pytest.approx(eq["identity"], abs=1e-9)


def test_slerp_keeps_its_ends_and_the_norm_of_orthogonal_unit_vectors():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(L.slerp(a, b, 0.0), a) and torch.allclose(L.slerp(a, b, 1.0), b)
    assert float(L.slerp(a, b, 0.5).norm()) == pytest.approx(1.0)  # a linear path would give 0.707


def test_inspect_vae_writes_its_report(tmp_path, capsys):
    from diffusers import AutoencoderKL

    from workflows.cli import main

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1,
                  latent_channels=4, sample_size=64).save_pretrained(tmp_path / "vae")
    out = tmp_path / "report"
    assert main(["inspect-vae", "--vae", str(tmp_path / "vae"), "--data", "builtin:shapes", "--out", str(out),
                 "--num-images", "8"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["latent_shape"] == [4, 8, 8] and len(report["channels"]) == 4 and report["images"] == 8
    assert set(report["equivariance_psnr"]) == {"identity", "downscale_2x", "rotate_90", "rotate_180", "rotate_270"}
    assert (out / "interpolations.png").is_file() and (out / "pca.png").is_file()
    assert "## Normalisation" in (out / "report.md").read_text() and "scaling_factor" in capsys.readouterr().out
