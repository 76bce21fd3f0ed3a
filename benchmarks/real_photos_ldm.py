"""Stage B on photographs: a latent diffusion model on the photo autoencoder's latents of the wallpaper photographs.

    python -m benchmarks.real_photos_ldm --photos-run runs/bench/real_photos --out runs/bench/real_photos_ldm
    make bench-photos-ldm

`--photos-run` is a finished `make bench-photos` folder: its training copies of the photographs (`photos/`) and
its autoencoder (`without_gan/vae`). From each training photograph `--crops` / (number of photographs)
squares of side 128 to 512 px are cut at random places and brought to 128 px (a downscale of 1x to 4x of the
512 px copies), the Stage B dataset; the autoencoder turns each into a 16x16x4 latent once (the latent cache).
Stage B trains `configs/unet/unet-photo.yaml` on them with its samples scored every `sampling.metrics_every`
steps against held-out crops (SWD beside its floor, evaluation/training_scores.py). At the end, `--num-samples`
samples are scored against crops of the photographs the autoencoder never saw (the held-out wallpapers of
benchmarks/photo_test_set.py), beside the floor of as many real crops of them, and drawn beside real crops
and the autoencoder's reconstructions of them (OUT/samples_beside_real.png).

Writes OUT/crops/ (the training crops), OUT/stage_b/ (the run), OUT/samples/, OUT/heldout_crops/,
OUT/summary.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import photo_corpus
from benchmarks.photo_test_set import held_out_files, random_crop

RESOLUTION = 128
RECIPE = "unet/unet-photo.yaml"


def cut_crops(photos: list[Path], out: Path, count: int, seed: int, size: int = RESOLUTION) -> int:
    """`count` squares of side size to 4 * size from the photographs, in turn, brought to size x size px."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = []
    for path in photos:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
    for k in range(count):
        crop = random_crop(images[k % len(images)], rng, size, 4 * size)
        Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC).save(out / f"crop_{k:06d}.png")
    return count


def downscaled_copies(paths: list[Path], out: Path, short_side: int) -> list[Path]:
    """PNG copies of the images in `out`, brought down (never up) to a shorter side of `short_side` px."""
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = short_side / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
            copy = out / f"{path.stem}.png"
            image.save(copy)
            copies.append(copy)
    return copies


def figure(samples: np.ndarray, real: np.ndarray, reconstructed: np.ndarray, out: Path, columns: int = 8) -> Path:
    """Three bands of `columns` images: samples, real held-out crops, the autoencoder's reconstructions of them."""
    side, gap = samples.shape[-1], 4
    bands = [samples[:columns], real[:columns], reconstructed[:columns]]
    canvas = Image.new("RGB", (columns * (side + gap) - gap, 3 * side + 4 * gap), "white")
    for r, band in enumerate(bands):  # a double gap between the bands
        for c, image in enumerate(band):
            canvas.paste(Image.fromarray(image.transpose(1, 2, 0)), (c * (side + gap), r * (side + 2 * gap)))
    canvas.save(out)
    return out


def main(argv=None) -> int:
    import torch

    from evaluation.eval_samples import sample_scores, score_line
    from ldm_core.config.preset_files import config_path
    from ldm_core.config.settings import load_config
    from ldm_core.image_values import to_model_input, to_uint8
    from ldm_core.training.accelerator import cpu_description
    from stage_b_diffusion.config import StageBConfig
    from workflows.generate import generate_images
    from workflows.train_unet import train_unet

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos-run", type=Path, default=Path("runs/bench/real_photos"))
    parser.add_argument("--corpus", type=Path, default=photo_corpus.DEFAULT_OUT)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/real_photos_ldm"))
    parser.add_argument("--crops", type=int, default=8192, help="training crops (default: %(default)s)")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Stage B config overrides")
    args = parser.parse_args(argv)

    vae = args.photos_run / "without_gan" / "vae"
    photos = sorted((args.photos_run / "photos").glob("*.png"))
    if not (vae / "config.json").is_file() or not photos:
        print(f"error: {args.photos_run} is not a finished `make bench-photos` folder (no without_gan/vae or photos/); "
              f"run make bench-photos first.", file=sys.stderr)
        return 2
    started = time.monotonic()
    cut_crops(photos, args.out / "crops", args.crops, seed=0)
    cfg = load_config(StageBConfig, config_path(RECIPE), [f"data.resolution={RESOLUTION}", *args.overrides])
    clock = time.monotonic()
    run = train_unet(cfg, vae, str(args.out / "crops"), args.out / "stage_b",
                     resume="latest" if (args.out / "stage_b").exists() else None)
    train_seconds = time.monotonic() - clock

    # Crops of photographs neither stage saw: the final score's reference and the figure's real rows.
    corpus = args.corpus.expanduser()
    held_out = [corpus / f for f in held_out_files(photo_corpus.load_manifest(corpus), "photo")]
    copies = downscaled_copies(held_out, args.out / "heldout_photos", 8 * 64)
    cut_crops(copies, args.out / "heldout_crops", 2 * args.num_samples, seed=1)

    from pipelines.latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(run / "pipeline")
    generate_images(pipe, args.num_samples, seed=0, batch_size=32, num_inference_steps=cfg.sampling.num_inference_steps,
                    out_dir=args.out / "samples", overwrite=True)
    scores = sample_scores(args.out / "samples", str(args.out / "heldout_crops"), num_reference=args.num_samples)
    samples = np.stack([np.asarray(Image.open(p)).transpose(2, 0, 1)
                        for p in sorted((args.out / "samples").glob("image_*.png"))])
    real = np.stack([np.asarray(Image.open(p)).transpose(2, 0, 1)
                     for p in sorted((args.out / "heldout_crops").glob("*.png"))[:8]])
    with torch.no_grad():
        x = to_model_input(torch.from_numpy(real))
        recon = to_uint8(pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample).numpy()
    picture = figure(samples, real, recon, args.out / "samples_beside_real.png")
    history = json.loads((run / "metrics.json").read_text())["history"]
    summary = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "train_seconds": round(train_seconds, 1),
               "wall_seconds": round(time.monotonic() - started, 1), "steps": cfg.train.max_steps,
               "crops": args.crops, "scores": scores,
               "curve": [{k: r[k] for k in ("step", "swd", "swd_floor", "metrics_seconds") if k in r}
                         for r in history if "swd" in r],
               "figure": str(picture), "curves_picture": str(run / "images" / "loss_curves.png"),
               "command": " ".join(["python -m benchmarks.real_photos_ldm", *(argv or sys.argv[1:])])}
    lines = [score_line("SWD x1e3", scores["swd"], 1), score_line("FID", scores["fid"], 2)]
    summary["text"] = "\n".join(lines)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.md").write_text(summary["text"] + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "scores"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
