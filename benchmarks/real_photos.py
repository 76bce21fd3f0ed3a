"""Real photographs end to end: train an autoencoder on Debian's wallpaper photographs, then `ldm bench-recon` on
six kinds of image it never saw (benchmarks/photo_test_set.py), at 64 and 128 px, beside the bicubic-f8 row.

    python -m benchmarks.real_photos --out runs/bench/real_photos              # make bench-photos
    python -m benchmarks.real_photos --out runs/bench/real_photos --compare-gan   # make bench-photos-gan
    python -m benchmarks.real_photos --out OUT --photos DIR train.max_steps=2000   # any folder, any override

- Training photographs: the corpus's photographs (`benchmarks/photo_corpus.py`; `--corpus`, built when
  missing; `--kinds photo,render` adds renders) less those the test set holds out, plus three colour
  photographs that ship inside scikit-image (astronaut, rocket, stereo_motorcycle). Or any folder with
  `--photos DIR` (the test set then takes its held-out photographs and renders from the corpus if one is
  built, else only from scikit-image and generated images).
- Crops that hold detail: each training photograph is first brought to a shorter side of `--zoom` x R px
  (8 x 64 = 512, antialiased bicubic; never enlarged), a speed-up only, since the crop then draws the
  side of its square log-uniformly between R px and the whole shorter side (`data.crop=random_scaled`,
  `data.crop_min_scale=1/zoom^2`): each crop shows its part of the scene at a downscale of 1x to 8x
  (relative to 512 px), so every octave of zoom is as likely, from the native texture of a 5,000 px
  photograph down to the whole scene in R px.
- The test set: texture crops, whole photographs, smooth renders and gradients, dark and bright images,
  flat fields (benchmarks/photo_test_set.py). Per kind: PSNR and SSIM beside bicubic-f8; over every kind
  but the flat fields, PSNR on the outer 4-pixel ring against the interior; on the flat fields, the median
  and worst PSNR, the channel bias in levels, and what black and white come back as.
- The recipe is `configs/vae/kl-f8-photo.yaml`, whose comments give its reasons.
- `--compare-gan` trains the recipe twice for the same steps: without the discriminator (the run of
  plain `make bench-photos`, kept when it has finished in the same --out), and with it switched on at
  `--gan-start`, 3/4 of the steps by default (LDM's hinge loss and adaptive weight). The second run's autoencoder at
  `--gan-start` is exported too (the "before" row), and bench-recon compares the three; the discriminator's
  mean logits and the adaptive weight over the run are in its metrics.json and loss_curves.png.

Writes OUT/photos (the training copies), OUT/test{R}/<kind>/ (the test images), OUT/<run>/ (each training run),
OUT/bench{R} (bench-recon's results), OUT/summary.json and OUT/summary.md (the tables, the commands, the
machine), OUT/kinds.png (one image of each kind at 4x: original, bicubic-f8, each autoencoder), and with
--compare-gan OUT/gan_zoom.png (texture crops at 4x: original, without, with the GAN).
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
from benchmarks.photo_test_set import KINDS, build_test_set, flat_field_summary, gradient, load_photo, training_files

SKIMAGE_TRAIN = ("astronaut", "rocket", "stereo_motorcycle")
RECIPE = "vae/kl-f8-photo.yaml"
NEVER = 10 ** 9


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


def write_gradients(folder: Path, count: int, size: int, seed: int = 1000) -> list[str]:
    """`count` generated gradients of `size` px into `folder` (photo_test_set.gradient, another seed than the
    test's): blends between two colours, half of them drawn from the RGB cube's corners, so crops of them are
    near-flat fields anywhere in the cube, its saturated edges and black and white included."""
    rng = np.random.default_rng(seed)
    corners = np.array([[a, b, c] for a in (0, 255) for b in (0, 255) for c in (0, 255)])
    written = []
    for k in range(count):
        ends = [corners[rng.integers(0, 8)] if rng.random() < 0.5 else rng.integers(0, 256, 3) for _ in range(2)]
        Image.fromarray(gradient(rng, size, ends)).save(folder / f"gradient__{k:04d}.png")
        written.append(f"gradient__{k:04d}")
    return written


def corpus_sources(corpus: Path, kinds: Sequence[str]) -> list[Path]:
    """The corpus's training files of the given kinds; the corpus is built first when it has no manifest."""
    corpus = corpus.expanduser()
    if not (corpus / "manifest.json").is_file():
        print(f"building the photo corpus in {corpus} (python -m benchmarks.photo_corpus)")
        photo_corpus.build_corpus(corpus)
    return training_files(corpus, kinds)


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
    """bench-recon of the named autoencoders on every kind of the test set at once; returns its results."""
    from evaluation.bench_recon import run_bench_recon

    if out.exists():  # results of an earlier run are replaced
        shutil.rmtree(out)
    return run_bench_recon(reconstructors(vaes), str(test), resolution, out_dir=out, metrics=("psnr", "ssim"),
                           progress=False)


def kind_of(row: dict) -> str:
    """The kind of a bench-recon row, from its image's path inside the test folder (`<kind>/NNNN_x.png`)."""
    return row["name"].split("/")[0]


def per_kind(results: dict) -> dict:
    """Per model and kind: mean PSNR and SSIM, and n; per model: the border ring against the interior over
    every kind but the flat fields, and the flat-field summary."""
    out = {}
    for model in results["models"]:
        rows = model["rows"]
        kinds = {kind: [r for r in rows if kind_of(r) == kind] for kind in KINDS}
        textured = [r for r in rows if kind_of(r) != "flat" and r["psnr_border"] is not None]
        out[model["name"]] = {
            "kinds": {kind: {"psnr": float(np.mean([r["psnr"] for r in rs])), "ssim": float(np.mean([r["ssim"] for r in rs])),
                             "n": len(rs)} for kind, rs in kinds.items() if rs},
            "border": {"psnr_border": float(np.mean([r["psnr_border"] for r in textured])),
                       "psnr_interior": float(np.mean([r["psnr_interior"] for r in textured])), "n": len(textured)},
            "flat": flat_field_summary(kinds["flat"]) if kinds["flat"] else None}
    return out


def tables(summaries: dict[int, dict]) -> str:
    """The per-kind table, the border table and the flat-field table, in Markdown, for every resolution."""
    kind_rows = ["| kind | px | model | PSNR (dB) | vs bicubic-f8 | SSIM | vs bicubic-f8 |", "|---|---|---|---|---|---|---|"]
    border_rows = ["| px | model | border ring PSNR | interior PSNR | ring gap to bicubic-f8 | interior gap | "
                   "ring minus interior gap |", "|---|---|---|---|---|---|---|"]
    flat_rows = ["| px | model | median PSNR | worst PSNR | median / worst channel bias (levels) | black comes back as | "
                 "white comes back as |", "|---|---|---|---|---|---|---|"]
    for resolution, models in summaries.items():
        base = next(v for k, v in models.items() if k.startswith("bicubic"))
        for kind in KINDS:
            for name, entry in models.items():
                if kind not in entry["kinds"]:
                    continue
                m, b = entry["kinds"][kind], base["kinds"][kind]
                kind_rows.append(f"| {kind} (n={m['n']}) | {resolution} | {name} | {m['psnr']:.2f} | {m['psnr'] - b['psnr']:+.2f} "
                                 f"| {m['ssim']:.3f} | {m['ssim'] - b['ssim']:+.3f} |")
        for name, entry in models.items():
            e, b = entry["border"], base["border"]
            ring, inner = e["psnr_border"] - b["psnr_border"], e["psnr_interior"] - b["psnr_interior"]
            border_rows.append(f"| {resolution} | {name} | {e['psnr_border']:.2f} | {e['psnr_interior']:.2f} | {ring:+.2f} "
                               f"| {inner:+.2f} | {ring - inner:+.2f} |")
            f = entry["flat"]
            if f is not None:
                flat_rows.append(f"| {resolution} | {name} | {f['median_psnr']:.1f} | {f['worst_psnr']:.1f} | "
                                 f"{f['median_abs_bias']:.1f} / {f['worst_abs_bias']:.1f} | {_levels(f['black'])} | "
                                 f"{_levels(f['white'])} |")
    return "\n".join(kind_rows) + "\n\n" + "\n".join(border_rows) + "\n\n" + "\n".join(flat_rows)


def _levels(values) -> str:
    return "n/a" if values is None else "(" + ", ".join(f"{v:.0f}" for v in values) + ")"


def reconstruct_files(files: Sequence[Path], resolution: int, vaes: dict[str, Path]) -> list:
    """The files brought to R as bench-recon reads them, then bicubic-f8's and each autoencoder's
    reconstruction (posterior mode, fp32, uint8): a list of (label, uint8 (N, 3, R, R)) columns."""
    import torch

    from evaluation.reconstructors import BicubicReconstructor
    from ldm_core.data.image_files import pil_to_chw, resize_center_crop
    from ldm_core.image_values import to_model_input, to_uint8

    ref = torch.from_numpy(np.stack([pil_to_chw(resize_center_crop(Image.open(p).convert("RGB"), resolution))
                                     for p in files]))
    columns = [("original", ref)]
    with torch.no_grad():
        for model in [BicubicReconstructor(8), *reconstructors(vaes)]:
            model.load(torch.device("cpu"))
            columns.append((model.name, to_uint8(model.reconstruct(to_model_input(ref), range(len(files)))[0].float())))
            model.unload()
    return columns


def figure(columns: list, out: Path, zoom: int = 4, gap: int = 4) -> Path:
    """Images side by side at `zoom`x (nearest neighbour): one row per image, one column per source."""
    count, resolution = columns[0][1].shape[0], columns[0][1].shape[-1]
    side = resolution * zoom
    canvas = Image.new("RGB", (len(columns) * (side + gap) - gap, count * (side + gap) - gap), "white")
    for c, (_, images) in enumerate(columns):
        for r in range(count):
            tile = Image.fromarray(images[r].permute(1, 2, 0).numpy()).resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (c * (side + gap), r * (side + gap)))
    canvas.save(out)
    return out


def kinds_figure(test: Path, resolution: int, vaes: dict[str, Path], out: Path) -> Path:
    """Original / bicubic-f8 / each autoencoder for a texture crop, the whole photograph with the flattest sky (its
    top third), a night sky, a bright-field micrograph, a render, and black, white and pure blue fields."""
    def first(kind: str, *names: str) -> list[Path]:
        files = sorted((test / kind).glob("*.png"))
        chosen = [f for f in files if any(name in f.name for name in names)]
        return (chosen or files[len(files) // 3:])[:1]

    def flattest_sky(files: list[Path]) -> list[Path]:
        def sky(path: Path) -> float:
            with Image.open(path) as image:
                grey = np.asarray(image.convert("L"), dtype=np.float64)
            return float(grey[: grey.shape[0] // 3].std())

        return sorted(files, key=sky)[:1]

    picks = (first("texture", "") + flattest_sky(sorted((test / "whole").glob("*wallpaper*.png")) or
                                                 sorted((test / "whole").glob("*.png")))
             + first("dark", "hubble") + first("bright", "immunohistochemistry") + first("smooth", "render")
             + [f for name in ("0_0_0", "255_255_255", "0_0_255") for f in (test / "flat").glob(f"*flat_{name}.png")])
    return figure(reconstruct_files(picks, resolution, vaes), out)


def zoom_figure(test: Path, resolution: int, vaes: dict[str, Path], out: Path, count: int = 4) -> Path:
    """Texture crops at 4x: original, bicubic-f8, then each autoencoder's reconstruction, side by side."""
    files = sorted((test / "texture").glob("*.png"))
    picks = [files[int(i)] for i in np.linspace(0, len(files) - 1, count)]
    return figure(reconstruct_files(picks, resolution, vaes), out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/real_photos"))
    parser.add_argument("--corpus", type=Path, default=photo_corpus.DEFAULT_OUT,
                        help="photo corpus folder, built when it has no manifest (default: %(default)s)")
    parser.add_argument("--kinds", default="photo", help="corpus kinds to train on: photo, render (default: %(default)s)")
    parser.add_argument("--photos", type=Path, default=None, help="train on this folder instead of the corpus")
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's train.max_steps")
    parser.add_argument("--zoom", type=int, default=8, help="largest downscale of a training crop (default: %(default)s)")
    parser.add_argument("--gradients", type=int, default=0,
                        help="generated colour gradients to train on beside the photographs (default: %(default)s)")
    parser.add_argument("--compare-gan", action="store_true", help="also train with the discriminator and compare")
    parser.add_argument("--gan-start", type=int, default=None, help="with --compare-gan; default: at 3/4 of the steps")
    parser.add_argument("--test-sizes", default="64,128", help="test resolutions (default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=1.0,
                        help="share of the test set's crops to use, for quick runs (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="further Stage A config overrides")
    args = parser.parse_args(argv)

    from ldm_core.training.accelerator import cpu_description
    from ldm_core.config.settings import ConfigError

    corpus = args.corpus.expanduser()
    try:
        cfg = recipe_config(None, args.zoom, None, args.overrides)
        steps = args.steps or cfg.train.max_steps
        sources = (sorted(p for p in args.photos.expanduser().rglob("*") if p.is_file()) if args.photos
                   else corpus_sources(corpus, tuple(args.kinds.split(","))))
    except (photo_corpus.CorpusError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resolution = cfg.data.resolution
    photos = args.out / "photos"
    names = prepare_training_photos(sources, photos, args.zoom * resolution)
    names += write_gradients(photos, args.gradients, args.zoom * resolution)
    sizes = [int(r) for r in args.test_sizes.split(",")]
    with_corpus = corpus if (corpus / "manifest.json").is_file() else None
    test_counts = {r: build_test_set(args.out / f"test{r}", r, with_corpus, fraction=args.test_fraction) for r in sizes}

    gan_start = args.gan_start or steps * 3 // 4
    no_gan = recipe_config(steps, args.zoom, None, args.overrides)
    seconds = {"without_gan": train(no_gan, photos, args.out / "without_gan")}
    vaes = {"without-gan": args.out / "without_gan" / "vae"}
    if args.compare_gan:
        with_gan = recipe_config(steps, args.zoom, gan_start, args.overrides)
        before = args.out / "with_gan_before"
        seconds["with_gan"] = train_with_snapshot(with_gan, photos, args.out / "with_gan", gan_start, before)
        vaes = {**vaes, f"with-gan-at-{gan_start}": before, "with-gan": args.out / "with_gan" / "vae"}
    summaries = {r: per_kind(benchmark(vaes, args.out / f"test{r}", r, args.out / f"bench{r}")) for r in sizes}
    summary = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "training_photos": names,
               "test_counts": test_counts, "steps": steps, "zoom": args.zoom,
               "gan_start": gan_start if args.compare_gan else None, "train_seconds": seconds,
               "overrides": args.overrides, "per_kind": summaries,
               "command": " ".join(["python -m benchmarks.real_photos", *(argv or sys.argv[1:])]),
               "table_markdown": tables(summaries)}
    smallest = min(sizes)
    summary["kinds_figure"] = str(kinds_figure(args.out / f"test{smallest}", smallest, vaes, args.out / "kinds.png"))
    if args.compare_gan:
        summary["zoom_figure"] = str(zoom_figure(args.out / f"test{smallest}", smallest, vaes, args.out / "gan_zoom.png"))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.md").write_text(summary["table_markdown"] + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("table_markdown", "training_photos", "per_kind")},
                     indent=2))
    print(summary["table_markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
