"""`ldm inspect-vae`: a report on a KL autoencoder's latent space, ours or published, before Stage B is trained on it.

    ldm inspect-vae --vae runs/demo/stage_a/vae --data builtin:shapes --out runs/inspect
    ldm inspect-vae --vae stabilityai/sd-vae-ft-mse --data ./photos --resolution 256 --out runs/inspect-sd

Reads `--num-images` images of `--data` (for builtin:shapes, shapes the demo's training never saw), encodes
them, and writes OUT/report.md, OUT/report.json and the pictures: interpolation strips (linear and spherical in
the normalised latent space), the latents' 2-D map (PCA, coloured by label where the data has labels), the
decoder's PSNR under latent noise and each channel's statistics. The measures are in evaluation/latent_space.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from evaluation import latent_space as L
from evaluation.report import printable_name
from ldm_core.atomic_files import write_atomic
from ldm_core.data.sources import open_image_source
from ldm_core.data.streaming import iter_image_batches
from ldm_core.models.autoencoder_folders import load_frozen_vae, vae_downsampling_factor
from ldm_core.models.hub import AUTOENCODER, describe_model_source, resolve_model_argument
from ldm_core.models.latent_scale import scale_latents, unscale_latents

INTERPOLATION_PAIRS = 4


def read_images(data: str, resolution: int, count: int, seed: int) -> tuple[torch.Tensor, list]:
    """`count` images of `data` at `resolution` (uint8), and their labels' names (None where there are none)."""
    images, labels = [], []
    source = open_image_source(data, shapes_count=count, shapes_seed=seed)
    names = source.class_names
    for indices, batch, _, _ in iter_image_batches(data, resolution, 64, limit=count, shapes_count=count,
                                                   shapes_seed=seed):
        images.append(torch.from_numpy(batch))
        labels += [names[int(source.labels[i])] if source.labels is not None and names else None for i in indices]
    return torch.cat(images), labels


def inspect(vae, images: torch.Tensor, labels: list, seed: int = 0) -> dict:
    """Every measure of evaluation/latent_space.py for `images`; returns the report and the pictures' data."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = L.posteriors(vae, images)
    normalisation = L.implied_normalisation(mean, std, generator, vae.config)
    scale = normalisation["config_scaling_factor"]
    pairs = [(2 * k, 2 * k + 1) for k in range(min(INTERPOLATION_PAIRS, len(images) // 2))]
    paths = L.interpolations(vae, mean, pairs, lambda z: scale_latents(z, vae.config),
                             lambda z: unscale_latents(z, vae.config))
    report = {
        "images": len(images), "resolution": images.shape[-1], "latent_shape": list(mean.shape[1:]),
        "factor": vae_downsampling_factor(vae),
        "channels": L.channel_statistics(mean, std, generator),
        "normalisation": normalisation,
        "decoder_under_noise": L.decoder_under_noise(vae, images, mean, scale, generator),
        "equivariance_psnr": L.equivariance(vae, images, mean),
        "spectra": L.spectra(images, mean),
        "interpolation_evenness": paths["evenness"],
        "pca_explained_variance": L.explained_variance(mean),
    }
    return {"report": report, "paths": paths, "pca": L.pca_2d(mean), "labels": labels}


def report_markdown(report: dict, source: str, data: str) -> str:
    n = report["normalisation"]
    shift = "none" if n["config_shift_factor"] is None else f"{n['config_shift_factor']:.4f}"
    lines = [f"# Latent space of {source}", "",
             f"{report['images']} images of {data} at {report['resolution']} px; latents "
             f"{' x '.join(map(str, report['latent_shape']))} (f={report['factor']}).", "",
             "## Normalisation", "",
             f"- scaling_factor: {n['implied_scaling_factor']:.5f} implied by these images (1/std of the posterior "
             f"samples, LDM's scale_by_std), {n['config_scaling_factor']:.5f} in config.json",
             f"- shift_factor: {n['implied_shift_factor']:+.4f} implied (their mean), {shift} in config.json", "",
             "## Channels", "",
             "| channel | mean | std | posterior std | posterior std / spread | KL per position |",
             "|---|---|---|---|---|---|"]
    for c in report["channels"]:
        ratio = "n/a" if c["posterior_over_spread"] is None else f"{c['posterior_over_spread']:.3f}"
        lines.append(f"| {c['channel']} | {c['mean']:+.3f} | {c['std']:.3f} | {c['posterior_std']:.4f} | {ratio} | "
                     f"{c['kl_per_position']:.3f} |")
    lines += ["", "A posterior std near the channel's spread means the channel says little about the image; the KL "
              "is what the loss charges per position.", "", "## The decoder under latent noise", "",
              "| noise std (unit-variance latents) | PSNR (dB) |", "|---|---|"]
    lines += [f"| {r['sigma']:g} | {r['psnr']:.2f} |" for r in report["decoder_under_noise"]]
    eq = report["equivariance_psnr"]
    lines += ["", "## Equivariance (PSNR of decode(T(z)) against T(x))", "", "| T | PSNR (dB) |", "|---|---|"]
    lines += [f"| {name.replace('_', ' ')} | {value:.2f} |" for name, value in eq.items()]
    sp, ev = report["spectra"], report["interpolation_evenness"]
    lines += ["", "## Spectra and paths", "",
              f"- share of energy in the upper half of frequencies: latents {sp['latents_hf_share']:.3f}, images at "
              f"the latents' size {sp['images_hf_share']:.3f}",
              f"- evenness of interpolation paths (coefficient of variation of the step sizes; 0 is even): linear "
              f"{ev['linear']:.3f}, spherical {ev['spherical']:.3f}",
              f"- the first two principal components hold {report['pca_explained_variance']:.1%} of the latents' "
              f"variance (pca.png)", "", "![interpolations](interpolations.png) ![pca](pca.png)", ""]
    return "\n".join(lines)


def save_pictures(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [strip for kind in ("linear", "spherical") for strip in result["paths"][kind]]
    if rows:
        tiles = np.concatenate([np.concatenate(list(strip.permute(0, 2, 3, 1).numpy()), axis=1) for strip in rows])
        Image.fromarray(tiles).save(out / "interpolations.png")
    fig, ax = plt.subplots(figsize=(4.5, 4))
    points, labels = result["pca"], result["labels"]
    names = sorted({label for label in labels if label is not None})
    for name in names or [None]:
        chosen = [i for i, label in enumerate(labels) if label == name]
        ax.scatter(points[chosen, 0], points[chosen, 1], s=6, label=name)
    if names:
        ax.legend(fontsize=7)
    ax.set_title("latents, first two principal components", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "pca.png", dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", required=True, help="a Stage A run or vae/ folder, any diffusers AutoencoderKL folder, "
                                                     "or a Hugging Face Hub id")
    parser.add_argument("--data", required=True, help="images to inspect it on (any --data spec)")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json and the pictures")
    parser.add_argument("--resolution", type=int, default=None, help="default: the autoencoder's sample_size")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1, help="builtin:shapes seed (default 1: not the training set's 0)")


def main(args: argparse.Namespace) -> int:
    if args.num_images < 2:
        raise ValueError("--num-images must be at least 2.")
    folder = resolve_model_argument(args.vae, kind=AUTOENCODER, option="--vae")
    vae, vae_dir = load_frozen_vae(folder)
    resolution = args.resolution or int(vae.config.sample_size)
    if resolution % vae_downsampling_factor(vae):
        raise ValueError(f"--resolution {resolution} must be divisible by the autoencoder's factor "
                         f"{vae_downsampling_factor(vae)}.")
    started = time.monotonic()
    images, labels = read_images(args.data, resolution, args.num_images, args.seed)
    result = inspect(vae, images, labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = describe_model_source(vae_dir)
    report = {**result["report"], "vae": source, "data": args.data,
              "seconds": round(time.monotonic() - started, 1)}
    save_pictures(result, out)
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    write_atomic(out / "report.md", report_markdown(report, source, args.data))
    print(report_markdown(report, printable_name(source), args.data))
    print(f"Written: {printable_name(out / 'report.md')}")
    return 0
