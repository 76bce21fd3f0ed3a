"""How precise must Stage B's latents be? Decode unseen shapes' latents with added noise and score them.

    python -m benchmarks.latent_noise --vae runs/demo/stage_a/vae --out runs/bench

Each of `--num-images` shapes the autoencoder never saw (the demo's held-out generator seed) is encoded
to its posterior mean, scaled to unit variance with the VAE's own `scaling_factor` (the space a U-Net
with `diffusion.input_scale: 1` samples in), perturbed by independent Gaussian noise of standard
deviation sigma, decoded, and judged by the exact shapes scorer behind `ldm eval-samples`. sigma 0 is the
plain round trip. A decoder that stays valid under noise a sampler's error can reach is not what limits
the samples; one that breaks at small sigma asks Stage B for latents more precise than it can give.

Beside the table it gives the posterior's median std in the same units: the noise the decoder was trained
on (a KL autoencoder decodes z = mean + std * eps). With LDM's KL weight of 1e-6 it is tiny, so nothing in
Stage A teaches the decoder to tolerate a sampler's errors (docs/demo.md, "The KL weight").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.harness import markdown_table, write_results

SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.3)


@torch.no_grad()
def run(vae_path: Path, num_images: int, seed: int) -> dict:
    """{"rows": one row per sigma, "posterior_std": the posterior's median std in unit-variance units}."""
    from diffusers import AutoencoderKL

    from evaluation.shapes_score import score_images
    from ldm_core.image_values import to_uint8
    from ldm_core.models.latent_scale import iter_posteriors, scale_latents, unscale_latents
    from ldm_core.data.shapes import make_shapes

    vae = AutoencoderKL.from_pretrained(vae_path, use_safetensors=True).eval()
    images, labels, _ = make_shapes(num_images, seed, size=64)
    posteriors = list(iter_posteriors(vae, images))
    latents = scale_latents(torch.cat([mean for mean, _ in posteriors]), vae.config)
    posterior_std = float(torch.cat([std for _, std in posteriors]).median()) * vae.config.scaling_factor
    generator = torch.Generator().manual_seed(0)
    rows = []
    for sigma in SIGMAS:
        noisy = latents + sigma * torch.randn(latents.shape, generator=generator)
        decoded = torch.cat([to_uint8(vae.decode(unscale_latents(noisy[i:i + 32], vae.config)).sample)
                             for i in range(0, num_images, 32)])
        scores = score_images(decoded.numpy(), labels)
        rows.append({"sigma": sigma, "valid_percent": 100 * scores["validity"], "reasons": scores["reasons"]})
    return {"rows": rows, "posterior_std": posterior_std}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", type=Path, default=Path("runs/demo/stage_a/vae"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1, help="shapes generator seed (1: the demo's held-out set)")
    args = parser.parse_args()
    if not (args.vae / "config.json").is_file():
        raise SystemExit(f"No autoencoder at {args.vae}. Run `make demo` first or pass --vae RUN/vae.")
    result = run(args.vae, args.num_images, args.seed)
    table = markdown_table(result["rows"], [("sigma", "noise std (unit-variance latents)"), ("valid_percent", "valid %"),
                                            ("reasons", "why the others are invalid")])
    table += (f"\n\nThe posterior's median std in the same units (the noise the decoder was trained on): "
              f"{result['posterior_std']:.4f}")
    write_results(args.out, "latent_noise", table, {"vae": str(args.vae), "num_images": args.num_images, **result})


if __name__ == "__main__":
    main()
