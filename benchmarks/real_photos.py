"""Real photographs end to end: train an autoencoder on Debian's wallpaper photographs, then `ldm bench-recon`
on crops of photographs it never saw, at 64 and 128 px, beside the bicubic-f8 row.

    python -m benchmarks.real_photos --out runs/bench/real_photos              # make bench-photos
    python -m benchmarks.real_photos --out runs/bench/real_photos --compare-gan   # make bench-photos-gan
    python -m benchmarks.real_photos --out OUT --photos DIR train.max_steps=2000   # any folder, any override

- Training photographs: the photographs of the corpus that `benchmarks/photo_corpus.py` builds from
  Debian's wallpaper packages (`--corpus`, built when missing; `--kinds photo,render` adds the renders)
  plus three colour photographs that ship inside scikit-image (astronaut, rocket, stereo_motorcycle).
  Or any folder with `--photos DIR`.
- Crops that hold detail: each training photograph is first brought to a shorter side of `--zoom` x R px
  (8 x 64 = 512, antialiased bicubic; never enlarged), a speed-up only, since the crop then draws the
  side of its square log-uniformly between R px and the whole shorter side (`data.crop=random_scaled`,
  `data.crop_min_scale=1/zoom^2`): each crop shows its part of the scene at a downscale of 1x to 8x
  (relative to 512 px), so every octave of zoom is as likely, from the native texture of a 5,000 px
  photograph down to the whole scene in R px.
- Held-out photographs: `chelsea` (a cat) and `coffee` from scikit-image. Test crops are squares of
  side R to min(4R, the shorter side) at random places (seed 0), which bench-recon brings to R px: a
  downscale of 1x to 4x of these already small photographs (451x300, 600x400).
- The recipe is `configs/vae/kl-f8-photo.yaml`, whose comments give its reasons.
- `--compare-gan` trains the recipe twice for the same steps: without the discriminator (the run of
  plain `make bench-photos`, kept when it has finished in the same --out), and with it switched on at
  `--gan-start`, 3/4 of the steps by default (LDM's hinge loss and adaptive weight). The second run's autoencoder at
  `--gan-start` is exported too (the "before" row), and bench-recon compares the three; the discriminator's
  mean logits and the adaptive weight over the run are in its metrics.json and loss_curves.png.

Writes OUT/photos (the training copies), OUT/test{R} (the crops), OUT/<run>/ (each training run),
OUT/bench{R} (bench-recon's results), OUT/summary.json and OUT/summary.md (the tables, the commands, the
machine), and with --compare-gan OUT/gan_zoom.png (crops at 4x: original, without, with the GAN).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from benchmarks import photo_corpus

TEST_PHOTOS = ("chelsea", "coffee")
SKIMAGE_TRAIN = ("astronaut", "rocket", "stereo_motorcycle")
RECIPE = "vae/kl-f8-photo.yaml"
NEVER = 10 ** 9


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


def downscale_to(image: Image.Image, short_side: int) -> Image.Image:
    """`image` with its shorter side brought to `short_side` px (antialiased bicubic); never enlarged."""
    scale = short_side / min(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def prepare_training_photos(sources: Sequence[Path], folder: Path, short_side: int,
                            skimage_names: Sequence[str] = SKIMAGE_TRAIN) -> list[str]:
    """Write each source photograph (and the named scikit-image ones) to `folder` as PNG, downscaled to a
    shorter side of `short_side` px. A file that does not decode is left out with one line."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    written = []
    for path in sources:
        try:
            with Image.open(path) as image:
                photo = downscale_to(image.convert("RGB"), short_side)
        except Exception as err:  # noqa: BLE001 - any decoder error: the photograph is left out
            print(f"skipped {path}: cannot be decoded ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        name = f"{path.parent.name}__{path.stem}"
        photo.save(folder / f"{name}.png")
        written.append(name)
    for name in skimage_names:
        downscale_to(Image.fromarray(load_photo(name)), short_side).save(folder / f"skimage__{name}.png")
        written.append(f"skimage__{name}")
    return written


def export_test_crops(folder: Path, count: int, resolution: int, seed: int = 0,
                      names: Sequence[str] = TEST_PHOTOS) -> int:
    """`count` square crops of the held-out photographs, of side R to min(4R, shorter side), in turn."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = [load_photo(name) for name in names]
    for k in range(count):
        image = photos[k % len(photos)]
        h, w = image.shape[:2]
        side = int(rng.integers(resolution, min(4 * resolution, h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        Image.fromarray(image[top:top + side, left:left + side]).save(folder / f"{names[k % len(photos)]}_{k:04d}.png")
    return count


def corpus_sources(corpus: Path, kinds: Sequence[str]) -> list[Path]:
    """The corpus's files of the given kinds; the corpus is built first when it has no manifest."""
    corpus = corpus.expanduser()
    if not (corpus / "manifest.json").is_file():
        print(f"building the photo corpus in {corpus} (python -m benchmarks.photo_corpus)")
        photo_corpus.build_corpus(corpus)
    chosen = [corpus / row["file"] for row in photo_corpus.load_manifest(corpus) if row["kind"] in kinds]
    if not chosen:
        raise photo_corpus.CorpusError(f"the corpus in {corpus} has no image of kind {', '.join(kinds)}.")
    return chosen


def recipe_config(steps: Optional[int], zoom: int, gan_start: Optional[int], overrides: Sequence[str]):
    """The recipe with this benchmark's step count (None: the recipe's), crop range and discriminator start."""
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from stage_a_vae.config import StageAConfig

    return load_config(StageAConfig, config_path(RECIPE), [
        *([f"train.max_steps={steps}", f"train.checkpoint_every={steps}"] if steps else []),
        # The recipe crops with data.crop=random_scaled; its smallest side follows --zoom.
        f"loss.disc_start={NEVER if gan_start is None else gan_start}", f"data.crop_min_scale={1 / zoom ** 2}",
        *overrides])


def train(cfg, photos: Path, run: Path) -> float:
    """Train one run, continue an interrupted one, or keep a finished one (0 s); returns its wall seconds."""
    from stage_a_vae.train import train_vae

    metrics = run / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text())["steps"] >= cfg.train.max_steps:
        print(f"{run} has finished its {cfg.train.max_steps} steps; kept")
        return 0.0
    start = time.monotonic()
    train_vae(cfg, str(photos), run, resume="latest" if run.exists() else None)
    return time.monotonic() - start


def train_with_snapshot(cfg, photos: Path, run: Path, snapshot_step: int, snapshot: Path) -> float:
    """Train to `snapshot_step`, keep the exported autoencoder at that step in `snapshot`, then resume to the
    config's max_steps (a constant learning rate after warm-up makes the two legs one run)."""
    import dataclasses

    first = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=snapshot_step))
    seconds = 0.0
    if not (snapshot / "config.json").is_file():
        seconds += train(first, photos, run)
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(run / "vae", snapshot)
    return seconds + train(cfg, photos, run)


def reconstructors(vaes: dict[str, Path]) -> list:
    """bench-recon's reconstructor of each autoencoder, labelled with its name instead of its folder's."""
    from evaluation.reconstructors import VAEReconstructor

    models = []
    for name, folder in vaes.items():
        model = VAEReconstructor(folder)
        model.name = name
        models.append(model)
    return models


def benchmark(vaes: dict[str, Path], test: Path, resolution: int, out: Path) -> dict:
    """bench-recon of the named autoencoders on the test crops; returns its results."""
    from evaluation.bench_recon import run_bench_recon

    if out.exists():  # results of an earlier run are replaced
        shutil.rmtree(out)
    return run_bench_recon(reconstructors(vaes), str(test), resolution, out_dir=out, metrics=("psnr", "ssim"),
                           progress=False)


def table(results_by_resolution: dict[int, dict]) -> str:
    """One Markdown table: every model at every resolution, with bicubic-f8's margin."""
    lines = ["| crops | model | PSNR ± std (dB) | vs bicubic-f8 | SSIM ± std | HF kept | chroma kept |",
             "|---|---|---|---|---|---|---|"]
    for resolution, results in results_by_resolution.items():
        bicubic = next(m for m in results["models"] if m["name"].startswith("bicubic"))["metrics"]["psnr"]["mean"]
        for model in results["models"]:
            psnr, ssim, kept = model["metrics"]["psnr"], model["metrics"]["ssim"], model["kept"]
            lines.append(f"| {resolution} px, n={psnr['n']} | {model['name']} | {psnr['mean']:.2f} ± {psnr['std']:.2f} "
                         f"| {psnr['mean'] - bicubic:+.2f} | {ssim['mean']:.3f} ± {ssim['std']:.3f} "
                         f"| {_ratio(kept['hf_power'])} | {_ratio(kept['chroma'])} |")
    return "\n".join(lines)


def _ratio(kept: dict) -> str:
    return "n/a" if kept["ratio"] is None else f"{kept['ratio']:.3f}"


def zoom_figure(test: Path, resolution: int, vaes: dict[str, Path], out: Path, count: int = 4, zoom: int = 4) -> Path:
    """Test crops at `zoom`x (nearest neighbour): original, then each autoencoder's reconstruction, side by side."""
    import torch

    from ldm_core.data.image_files import list_image_files, pil_to_chw, resize_center_crop
    from ldm_core.image_values import to_model_input, to_uint8

    files = list_image_files(test)
    picks = [files[int(i)] for i in np.linspace(0, len(files) - 1, count)]
    ref = torch.from_numpy(np.stack([pil_to_chw(resize_center_crop(Image.open(p).convert("RGB"), resolution))
                                     for p in picks]))
    columns = [ref]
    with torch.no_grad():
        for model in reconstructors(vaes):  # bench-recon's reconstruction: posterior mode, fp32, uint8
            model.load(torch.device("cpu"))
            columns.append(to_uint8(model.reconstruct(to_model_input(ref), range(count))[0].float()))
            model.unload()
    tiles = [[Image.fromarray(col[i].permute(1, 2, 0).numpy()).resize((resolution * zoom,) * 2, Image.Resampling.NEAREST)
              for col in columns] for i in range(count)]
    side, gap = resolution * zoom, 4
    canvas = Image.new("RGB", (len(columns) * (side + gap) - gap, count * (side + gap) - gap), "white")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas.paste(tile, (c * (side + gap), r * (side + gap)))
    canvas.save(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/real_photos"))
    parser.add_argument("--corpus", type=Path, default=photo_corpus.DEFAULT_OUT,
                        help="photo corpus folder, built when it has no manifest (default: %(default)s)")
    parser.add_argument("--kinds", default="photo", help="corpus kinds to train on: photo, render (default: %(default)s)")
    parser.add_argument("--photos", type=Path, default=None, help="train on this folder instead of the corpus")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's train.max_steps")
    parser.add_argument("--zoom", type=int, default=8, help="largest downscale of a training crop (default: %(default)s)")
    parser.add_argument("--compare-gan", action="store_true", help="also train with the discriminator and compare")
    parser.add_argument("--gan-start", type=int, default=None, help="with --compare-gan; default: at 3/4 of the steps")
    parser.add_argument("--test-crops", default="64:512,128:256", help="resolution:count pairs (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="further Stage A config overrides")
    args = parser.parse_args(argv)

    from ldm_core.training.accelerator import cpu_description
    from ldm_core.config.settings import ConfigError

    try:
        cfg = recipe_config(None, args.zoom, None, args.overrides)
        steps = args.steps or cfg.train.max_steps
        sources = (sorted(p for p in args.photos.expanduser().rglob("*") if p.is_file()) if args.photos
                   else corpus_sources(args.corpus, tuple(args.kinds.split(","))))
    except (photo_corpus.CorpusError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resolution = cfg.data.resolution
    photos = args.out / "photos"
    names = prepare_training_photos(sources, photos, args.zoom * resolution)
    tests = {int(r): int(n) for r, n in (pair.split(":") for pair in args.test_crops.split(","))}
    for r, n in tests.items():
        export_test_crops(args.out / f"test{r}", n, r)

    gan_start = args.gan_start or steps * 3 // 4
    no_gan = recipe_config(steps, args.zoom, None, args.overrides)
    seconds = {"without_gan": train(no_gan, photos, args.out / "without_gan")}
    vaes = {"without-gan": args.out / "without_gan" / "vae"}
    if args.compare_gan:
        with_gan = recipe_config(steps, args.zoom, gan_start, args.overrides)
        before = args.out / "with_gan_before"
        seconds["with_gan"] = train_with_snapshot(with_gan, photos, args.out / "with_gan", gan_start, before)
        vaes = {**vaes, f"with-gan-at-{gan_start}": before, "with-gan": args.out / "with_gan" / "vae"}
    results = {r: benchmark(vaes, args.out / f"test{r}", r, args.out / f"bench{r}") for r in tests}
    summary = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "training_photos": names,
               "steps": steps, "zoom": args.zoom, "gan_start": gan_start if args.compare_gan else None,
               "train_seconds": seconds, "overrides": args.overrides,
               "command": " ".join(["python -m benchmarks.real_photos", *(argv or sys.argv[1:])]),
               "table_markdown": table(results)}
    if args.compare_gan:
        smallest = min(tests)
        summary["zoom_figure"] = str(zoom_figure(args.out / f"test{smallest}", smallest, vaes, args.out / "gan_zoom.png"))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.md").write_text(summary["table_markdown"] + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("table_markdown", "training_photos")}, indent=2))
    print(summary["table_markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
