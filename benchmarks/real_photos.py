"""Real photographs end to end: train an autoencoder on random crops of the photographs that ship inside
scikit-image, then `ldm bench-recon` on crops of photographs it never saw, beside the bicubic-f8 row.

    python -m benchmarks.real_photos --out runs/bench/real_photos --steps 1500   # kl-f8-mini (make bench-photos)
    python -m benchmarks.real_photos --out OUT --preset kl-f8-small model.norm_num_groups=1   # any Stage A override

- Training photographs (`--photos`): by default the six colour photographs bundled with scikit-image (no
  download) and four of its grayscale ones, repeated to RGB. Trained on the fourteen used before (nine
  of them grayscale, no stereo_motorcycle), the autoencoder learned to desaturate and scored 2 dB lower
  on the colour test photographs (README "Real photographs"). Streamed with `data.crop=random_resized`
  (`data.crop_min_scale`, default 0.02: from about native scale up to the whole photograph) and flips,
  so every step sees fresh 64 px crops.
- Held-out photographs: `chelsea` (a cat) and `coffee`; the test set is `--test-crops` random square
  crops of them, 64 to 256 px a side, which bench-recon brings to 64 px (resize + centre crop, the
  protocol of docs/reconstruction-protocol.md).
- The recipe: the demo's Stage A (configs/vae/kl-f8-mini.yaml), on `--preset` (default kl-f8-mini, which
  scored higher here than the wider kl-f8-small): squared error for the
  first 60% of the steps, then L1; LPIPS needs its pretrained trunk, which an offline machine does not
  have, and the discriminator is left out (it trades PSNR for sharpness).
Writes OUT/train (the run), OUT/test (the crops), OUT/bench (bench-recon's results) and prints its table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

HELD_OUT = ("chelsea", "coffee")
TRAIN = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle",
         "camera", "coins", "brick", "grass")


def load_photo(name: str) -> np.ndarray:
    """A photograph bundled with scikit-image as RGB uint8 (grayscale repeated; a stereo pair's left view)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left view, right view, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3].astype(np.uint8)


def export_training_photos(folder: Path, names: tuple[str, ...] = TRAIN) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        try:
            Image.fromarray(load_photo(name)).save(folder / f"{name}.png")
            written.append(name)
        except Exception as err:  # noqa: BLE001 - a photograph that would need a download is left out
            print(f"skipped {name}: {err}")
    return written


def export_test_crops(folder: Path, count: int, seed: int = 0) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [load_photo(name) for name in HELD_OUT]
    for k in range(count):
        image = photos[k % len(photos)]
        h, w = image.shape[:2]
        side = int(rng.integers(64, min(256, h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        Image.fromarray(image[top:top + side, left:left + side]).save(folder / f"{HELD_OUT[k % len(photos)]}_{k:03d}.png")
    return count


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/real_photos"))
    parser.add_argument("--preset", default="kl-f8-mini")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--test-crops", type=int, default=128)
    parser.add_argument("--min-scale", type=float, default=0.02)
    parser.add_argument("--photos", default=",".join(TRAIN),
                        help="comma-separated skimage.data names to train on (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="further Stage A config overrides, e.g. model.norm_num_groups=1")
    args = parser.parse_args(argv)

    from evaluation.bench_recon import run_bench_recon
    from ldm_core.config import load_config
    from ldm_core.preset_files import config_path
    from stage_a_vae.config import StageAConfig
    from stage_a_vae.train import train_vae

    names = export_training_photos(args.out / "photos", tuple(args.photos.split(",")))
    export_test_crops(args.out / "test", args.test_crops)
    warmup = int(0.6 * args.steps)
    cfg = load_config(StageAConfig, config_path("vae/kl-f8-mini.yaml"), [
        f"model.preset={args.preset}", f"train.max_steps={args.steps}", f"loss.l2_warmup_steps={warmup}",
        "loss.disc_start=1000000000", "data.crop=random_resized", f"data.crop_min_scale={args.min_scale}",
        "data.loader=stream", "data.val_count=2", f"train.checkpoint_every={args.steps}",
        f"train.validate_every={max(1, args.steps // 6)}", "train.latent_stats_images=64", *args.overrides])
    run = train_vae(cfg, str(args.out / "photos"), args.out / "train", resume="latest" if (args.out / "train").exists() else None)
    bench = args.out / "bench"
    if bench.exists():  # results of an earlier run are replaced
        import shutil

        shutil.rmtree(bench)
    results = run_bench_recon([str(run / "vae")], str(args.out / "test"), 64, out_dir=bench)
    print(json.dumps({"training_photos": names, "steps": args.steps, "preset": args.preset,
                      "overrides": args.overrides}, indent=2))
    print(results["table_markdown"])


if __name__ == "__main__":
    main()
