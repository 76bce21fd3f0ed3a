"""benchmarks/latent_noise.py: the posterior's std it reports is the one the autoencoder's encoder gives."""

import torch
from diffusers import AutoencoderKL

from benchmarks import latent_noise
from ldm_core.data.shapes import make_shapes
from stage_a_vae.architectures import VAE_ARCHITECTURES


def test_posterior_std_is_the_encoders_median_std_in_unit_variance_units(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(**{**VAE_ARCHITECTURES["kl-f8-tiny"], "scaling_factor": 2.5})
    vae.save_pretrained(tmp_path / "vae")

    result = latent_noise.run(tmp_path / "vae", num_images=4, seed=1)

    images, _, _ = make_shapes(4, 1, size=64)
    with torch.no_grad():
        std = vae.encode(torch.from_numpy(images).float() / 127.5 - 1).latent_dist.std
    assert abs(result["posterior_std"] - 2.5 * float(std.median())) < 1e-4 * result["posterior_std"]
    assert [row["sigma"] for row in result["rows"]] == list(latent_noise.SIGMAS)
