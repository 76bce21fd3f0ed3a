"""Do memory and start-up stay flat as the dataset grows, and can the loader keep ahead of the trainer?

    python -m benchmarks.bench_data --out runs/bench                  # 2,000 and 20,000 images, ~30 min on 2 cores
    python -m benchmarks.bench_data --out runs/bench --sizes 500,2000 --steps 50     # a quick look

Makes a folder of photo-like 256x256 JPEGs (smooth colour fields, edges and grain; no download) and
WebDataset shards of the same files (webdataset's `ShardWriter`, 1,000 a shard), then for each format
and size, each in a fresh process:
- the loader alone: `TrainingImages` streaming random-resized 64 px crops through 2 DataLoader workers,
  images/s over 100 batches of 8 (after the first);
- `train-vae` (kl-f8-mini, batch 8, streamed random-resized crops, `--steps` steps): peak RSS of the
  training process, seconds from the start of the run to the end of its first step (data set-up, models,
  the step-0 validation, the first batch) and the trainer's images/s after it (run_info.json `timing`);
- `train-unet` on that VAE (unet-tiny, `--steps` steps): the same figures; its start-up includes encoding
  every image into the latent cache once, so it is measured again with the cache already built.
Writes OUT/bench_data.{md,json}; docs/data.md carries the latest table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import markdown_table, peak_rss_mib, run_isolated, write_results

RESOLUTION = 64
PHOTO_SIZE = 256
PER_SHARD = 1000


BASE_PICTURES = 1000  # distinct scenes; every image is one of them shifted, mirrored and recoloured


@functools.lru_cache(maxsize=BASE_PICTURES)
def _scene(index: int, size: int) -> np.ndarray:
    """(size, size, 3) float32 in [0, 1]: a low-frequency colour field and a few objects with soft and
    hard edges."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 2 * np.pi)]
            image[..., c] += rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    image += rng.uniform(0.3, 0.7, 3)
    for _ in range(rng.integers(2, 6)):
        cx, cy, rx, ry = rng.uniform(0, 1, 2).tolist() + rng.uniform(0.05, 0.3, 2).tolist()
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        mask = np.clip((1 - inside) * rng.uniform(3, 40), 0, 1)[..., None]
        image = image * (1 - mask) + mask * rng.uniform(0, 1, 3)
    return image


def photo_like(index: int, size: int = PHOTO_SIZE) -> np.ndarray:
    """An (size, size, 3) uint8 picture with what photographs have: smooth gradients, objects with soft
    and hard edges, and sensor-like grain. Deterministic in `index`; image i shows scene i mod
    BASE_PICTURES, circularly shifted, maybe mirrored, its channels permuted, with its own grain."""
    rng = np.random.default_rng([index, 1])
    image = np.roll(_scene(index % BASE_PICTURES, size), tuple(rng.integers(0, size, 2)), axis=(0, 1))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = image[..., rng.permutation(3)] + rng.normal(0, 0.02, image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_folder(folder: Path, count: int) -> list[Path]:
    from PIL import Image
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:06d}.jpg" for i in range(count)]
    for i, path in enumerate(tqdm(paths, desc=f"writing {count} photos", unit="img")):
        if not path.exists():
            Image.fromarray(photo_like(i)).save(path, quality=90)
    return paths


def make_shards(paths: list[Path], folder: Path) -> str:
    """The files as WebDataset shards in the folder's order; returns the brace pattern."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    count = -(-len(paths) // PER_SHARD)
    pattern = str(folder / f"train-{{000000..{count - 1:06d}}}.tar")
    if not (folder / f"train-{count - 1:06d}.tar").exists():
        with webdataset.ShardWriter(str(folder / "train-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
            for path in paths:
                sink.write({"__key__": path.stem, "jpg": path.read_bytes()})
    return pattern


def subset_folder(paths: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = folder / path.name
        if not target.exists():
            os.link(path, target)


# ---- workers: each runs in its own process, so peak RSS is its own -----------------------------------


def _peaks() -> dict:
    # The training process alone: DataLoader workers are forked from it, so their RSS counts the pages they
    # share with it and says little about what they add.
    return {"peak_rss_mib": peak_rss_mib()}


def loader_worker(data: str, batches: int) -> dict:
    import torch

    from ldm_core.data.step_batches import StepBatches
    from ldm_core.config.settings import DataConfig
    from ldm_core.data.training_images import TrainingImages

    started = time.monotonic()
    cfg = DataConfig(resolution=RESOLUTION, crop="random_resized", loader="stream", num_workers=2)
    images = TrainingImages(data, cfg, lambda idx, flip: StepBatches(idx, 8, 1, 0, seed=0, flip=flip), seed=0,
                            progress=False)
    images.batch(0, torch.device("cpu"))
    first = time.monotonic()
    for step in range(1, batches + 1):
        images.batch(step, torch.device("cpu"))
    rate = batches * 8 / (time.monotonic() - first)
    images.close()
    return {"loader_images_per_s": rate, "loader_first_batch_s": first - started, **_peaks()}


def stage_worker(stage: str, data: str, out: str, steps: int, vae: str, cache: str) -> dict:
    from ldm_core.config.settings import load_config

    common = [f"train.max_steps={steps}", "train.progress_bar=false", f"train.checkpoint_every={steps}",
              f"data.resolution={RESOLUTION}", "data.loader=stream", "data.num_workers=2"]
    if stage == "A":
        from stage_a_vae.config import StageAConfig
        from stage_a_vae.train import train_vae

        cfg = load_config(StageAConfig, None, common + [
            "model.preset=kl-f8-mini", "train.batch_size=8", "data.crop=random_resized",
            f"train.validate_every={steps}", "loss.perceptual_weight=0", "loss.disc_start=100000",
            "train.latent_stats_images=64"])
        run = train_vae(cfg, data, out)
    else:
        from stage_b_diffusion.config import StageBConfig
        from workflows.train_unet import train_unet

        cfg = load_config(StageBConfig, None, common + [
            "model.preset=unet-tiny", "train.batch_size=32", f"sampling.sample_every={steps * 10}",
            "sampling.grid_images=4", f"data.latent_cache_dir={cache}", "train.latent_stats_images=64"])
        run = train_unet(cfg, vae, data, out)
    info = json.loads((Path(run) / "run_info.json").read_text())
    return {**info["timing"], "loader": info["dataset"]["loader"], **_peaks()}


def _worker_main(args) -> None:
    if args.worker == "loader":
        result = loader_worker(args.data, args.batches)
    else:
        result = stage_worker(args.worker, args.data, args.run, args.steps, args.vae, args.cache)
    Path(args.result).write_text(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--work", type=Path, default=None, help="where the images are made (default: a temporary folder)")
    parser.add_argument("--sizes", default="2000,20000")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", type=int, default=100)
    # worker mode (internal)
    parser.add_argument("--worker", default=None)
    parser.add_argument("--result", default=None)
    parser.add_argument("--data", default=None)
    parser.add_argument("--run", default=None)
    parser.add_argument("--vae", default="")
    parser.add_argument("--cache", default="")
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main(args)

    import torch

    from benchmarks.harness import machine_description

    sizes = sorted(int(s) for s in args.sizes.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        paths = make_folder(work / "photos", max(sizes))
        rows = []
        for size in sizes:
            folder = work / f"folder-{size}"
            subset_folder(paths[:size], folder)
            sources = {"folder": str(folder), "webdataset": make_shards(paths[:size], work / f"shards-{size}")}
            for kind, data in sources.items():
                print(f"[{kind}, {size} images]", flush=True)
                base = work / "runs" / f"{kind}-{size}"
                loader = run_isolated("benchmarks.bench_data", ["--worker", "loader", "--data", data,
                                                                "--batches", str(args.batches)])
                common = ["--data", data, "--steps", str(args.steps)]
                a = run_isolated("benchmarks.bench_data", ["--worker", "A", "--run", str(base / "a"), *common],
                                 timeout_s=3600)
                vae = str(base / "a" / "vae")
                cache = str(base / "cache")
                b = run_isolated("benchmarks.bench_data", ["--worker", "B", "--run", str(base / "b"), "--vae", vae,
                                                           "--cache", cache, *common], timeout_s=3600)
                b_cached = run_isolated("benchmarks.bench_data", ["--worker", "B", "--run", str(base / "b2"),
                                                                  "--vae", vae, "--cache", cache, *common],
                                        timeout_s=3600)
                for stage, result in (("A", a), ("B", b), ("B, cache built", b_cached)):
                    rows.append({"format": kind, "images": size, "stage": stage,
                                 "peak_rss_mib": result["peak_rss_mib"],
                                 "first_step_s": result.get("seconds_to_first_step"),
                                 "trainer_images_per_s": result.get("images_per_second"),
                                 "loader_images_per_s": loader["loader_images_per_s"] if stage == "A" else None,
                                 "loader_over_trainer": (loader["loader_images_per_s"] / result["images_per_second"]
                                                         if stage == "A" and result.get("images_per_second") else None)})
                columns = [("format", "format"), ("images", "images"), ("stage", "stage"),
                           ("peak_rss_mib", "peak RSS (MiB)"),
                           ("first_step_s", "start to first step (s)"),
                           ("trainer_images_per_s", "trainer images/s"), ("loader_images_per_s", "loader alone images/s"),
                           ("loader_over_trainer", "loader / trainer")]
                header = (f"Streaming input, {PHOTO_SIZE} px JPEGs cropped to {RESOLUTION} px, {args.steps} steps, "
                          f"{machine_description(torch.device('cpu'))}.\n\n")
                write_results(args.out, "bench_data", header + markdown_table(rows, columns),
                              {"rows": rows, "steps": args.steps, "sizes": sizes})


if __name__ == "__main__":
    main()
