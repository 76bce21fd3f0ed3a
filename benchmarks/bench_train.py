"""Training throughput, utilisation and memory: our trainers against the reference loops, side by side.

    python -m benchmarks.bench_train --out runs/bench            # both stages
    python -m benchmarks.bench_train --out runs/bench --stage a  # Stage A only

Every path runs in its own process (peak memory is per path). "Ours" is the real trainer
(`train_vae` / `train_unet`) with its shipped config (`configs/vae/kl-f8-small.yaml`,
`configs/unet/unet-small.yaml`), timed by its own `step_time` log (the steps alone, no validation or
checkpoints); the references are `benchmarks/reference_loops.py`. Images/s is the global batch divided
by the mean step time after warm-up. FLOPs per step are counted by `torch.utils.flop_counter`: for our
trainers on one optimizer step of the trainer itself, after the timed ones (exactly one training step,
whatever the trainer does in it: `benchmarks.harness.counted_step_flops`), for the references on one call
of their step.
Utilisation divides achieved FLOP/s by this machine's large-matmul FLOP/s in the path's precision,
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (count_flops, counted_step_flops, machine_description, markdown_table,
                                matmul_peak_flops, peak_memory_mib, pick_device, run_isolated, seconds_per_call,
                                write_results)
from ldm_core.image_values import to_model_input

WORKER = "benchmarks.bench_train"
NEVER = 10 ** 9  # a step count no benchmark reaches: validation/checkpoints off, discriminator never on


# ---------------------------------------------------------------------------------------------------
# Our trainers


def _stage_a_config(disc_on: bool, steps: int, images: int, resolution: int | None = None):
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from stage_a_vae.config import StageAConfig

    return load_config(StageAConfig, config_path("vae/kl-f8-small.yaml"), [
        "loss.lpips_trunk=random",  # same LPIPS cost as VGG; the pretrained file is not needed to time it
        f"loss.disc_start={0 if disc_on else NEVER}", f"train.max_steps={steps}", "train.time_budget_minutes=0",
        "train.log_every=1", f"train.validate_every={NEVER}", f"train.checkpoint_every={NEVER}",
        "train.latent_stats_images=8", "data.val_count=8", f"data.shapes_count={images}",
        "train.progress_bar=false", "train.lr_warmup_steps=0", *_resolution(resolution)])


def _stage_b_config(steps: int, images: int, cache_dir: str | None = None, resolution: int | None = None):
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from stage_b_diffusion.config import StageBConfig

    return load_config(StageBConfig, config_path("unet/unet-small.yaml"), [
        f"train.max_steps={steps}", "train.time_budget_minutes=0", "train.log_every=1",
        f"train.checkpoint_every={NEVER}", f"sampling.sample_every={NEVER}", "sampling.grid_images=1",
        "sampling.num_inference_steps=1", "train.latent_stats_images=8", f"data.shapes_count={images}",
        "train.progress_bar=false", "train.lr_warmup_steps=0",
        *([f"data.latent_cache_dir={cache_dir}"] if cache_dir is not None else []), *_resolution(resolution)])


def _resolution(resolution: int | None) -> list[str]:
    """The shipped config's image size unless a test asks for smaller images (`--resolution`)."""
    return [] if resolution is None else [f"data.resolution={resolution}"]


def _random_vae(folder: Path) -> Path:
    """A kl-f8-small VAE with fixed random weights: speed does not depend on what the weights are."""
    from stage_a_vae.config import VAEModelConfig
    from stage_a_vae.architectures import build_autoencoder

    torch.manual_seed(0)
    build_autoencoder(VAEModelConfig(preset="kl-f8-small")).save_pretrained(folder)
    return folder


def _run_ours(stage: str, disc_on: bool, steps: int, images: int, tmp: Path,
              resolution: int | None = None) -> dict[str, Any]:
    """Run the real trainer for `steps` and return its config and metrics.json."""
    if stage == "a":
        from stage_a_vae.train import train_vae

        cfg = _stage_a_config(disc_on, steps, images, resolution)
        run = train_vae(cfg, "builtin:shapes", tmp / f"a{steps}")
    else:
        from workflows.train_unet import train_unet

        cfg = _stage_b_config(steps, images, str(tmp / "cache"), resolution)
        run = train_unet(cfg, _random_vae(tmp / "vae"), "builtin:shapes", tmp / f"b{steps}")
    return {"cfg": cfg, "metrics": json.loads((run / "metrics.json").read_text())}


def worker_ours(args) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result: dict[str, Any] = {}
        if args.stage == "b":  # the one-time latent encoding, reported next to the step rate
            import time

            from ldm_core.data.step_batches import train_val_split
            from ldm_core.data.in_memory import load_dataset
            from stage_b_diffusion.latent_cache import load_or_build_latent_cache
            from ldm_core.models.autoencoder_folders import load_frozen_vae

            cfg = _stage_b_config(1, args.images, str(tmp / "cache"), args.resolution)
            vae, _ = load_frozen_vae(_random_vae(tmp / "vae"))
            data = load_dataset("builtin:shapes", cfg.data.resolution, shapes_count=args.images, progress=False)
            train_idx, _ = train_val_split(len(data), cfg.data.val_count, cfg.data.split_seed)
            start = time.perf_counter()
            load_or_build_latent_cache(vae, data.images[train_idx], flip=cfg.data.flip, cache_dir=tmp / "cache",
                                       progress=False)
            result["cache_build_s"] = time.perf_counter() - start
            result["cache_images"] = int(len(train_idx))
        # One step more than are timed: the last one runs under the FLOP counter, which slows it.
        with counted_step_flops(args.warmup + args.iters) as flops:
            run = _run_ours(args.stage, args.disc_on, args.warmup + args.iters + 1, args.images, tmp,
                            args.resolution)
        times = [r["step_time"] for r in run["metrics"]["history"] if "step_time" in r]
        times = times[args.warmup:args.warmup + args.iters]
        tc = run["cfg"].train
        result.update(step_s=sum(times) / len(times), batch=tc.batch_size, precision=tc.mixed_precision,
                      resolution=run["cfg"].data.resolution, flops_per_step=flops["flops"],
                      **peak_memory_mib(pick_device(args.device)))
        return result


# ---------------------------------------------------------------------------------------------------
# The references


def worker_reference(args) -> dict[str, Any]:
    from benchmarks.reference_loops import ldm_stage_a_step, text_to_image_stage_b_step
    from ldm_core.data.in_memory import load_dataset

    device = pick_device(args.device)
    torch.manual_seed(0)
    cfg = (_stage_a_config(args.disc_on, 1, args.images, args.resolution) if args.stage == "a" else
           _stage_b_config(1, args.images, resolution=args.resolution))  # the reference encodes every batch: no cache
    data = load_dataset("builtin:shapes", cfg.data.resolution, shapes_count=args.images, progress=False)
    if args.stage == "a":
        from stage_a_vae.networks import build_stage_a

        lc, tc = cfg.loss, cfg.train
        nets = build_stage_a(cfg, device)  # the trainer's networks; the optimizers below are LDM's
        vae, disc = nets.vae.to(device), nets.discriminator.to(device)
        lpips = nets.loss_fn.perceptual.requires_grad_(False)
        opt_ae = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(0.5, 0.9))
        global_step = lc.disc_start if args.disc_on else 0

        def step(i=[0]):
            x = _batch(data.images, i, tc.batch_size, device)
            ldm_stage_a_step(vae, disc, lpips, lc, opt_ae, opt_d, x, global_step)
    else:
        from stage_b_diffusion.noise_schedule import build_noise_scheduler
        from stage_b_diffusion.architectures import build_unet
        from ldm_core.models.autoencoder_folders import load_frozen_vae

        with tempfile.TemporaryDirectory() as tmp:
            vae, _ = load_frozen_vae(_random_vae(Path(tmp) / "vae"))
        tc = cfg.train
        vae = vae.to(device)
        unet = build_unet(cfg.model, latent_channels=4, latent_size=cfg.data.resolution // 8).to(device)
        scheduler = build_noise_scheduler(cfg.diffusion)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=tc.lr)
        generator = torch.Generator(device).manual_seed(0)

        def step(i=[0]):
            x = _batch(data.images, i, tc.batch_size, device)
            text_to_image_stage_b_step(vae, unet, scheduler, optimizer, x, generator)

    result = {"flops_per_step": count_flops(step), "batch": tc.batch_size, "precision": "no",
              "resolution": cfg.data.resolution}
    result["step_s"] = seconds_per_call(step, device, warmup=args.warmup, iters=args.iters)
    result.update(peak_memory_mib(device))
    return result


def _batch(images, counter: list, batch_size: int, device) -> torch.Tensor:
    """The next batch of the uint8 dataset as [-1, 1] floats (the same decoding our trainers do)."""
    start = (counter[0] * batch_size) % (len(images) - batch_size)
    counter[0] += 1
    x = torch.from_numpy(images[start:start + batch_size].copy()).to(device)
    return to_model_input(x)


# ---------------------------------------------------------------------------------------------------
# Orchestration


def run(stages: str, out: Path, device: str, iters: int, warmup: int) -> dict[str, Any]:
    dev = pick_device(device)
    peaks = {"no": matmul_peak_flops(dev, torch.float32), "bf16": matmul_peak_flops(dev, torch.bfloat16)}
    rows, common = [], ["--device", device, "--iters", str(iters), "--warmup", str(warmup)]
    plan = []
    if "a" in stages:
        plan += [("A", "before disc_start", "a", False, 256), ("A", "after disc_start", "a", True, 256)]
    if "b" in stages:
        plan += [("B", "", "b", False, 512)]
    for stage_name, phase, stage, disc_on, images in plan:
        args = common + ["--stage", stage, "--images", str(images)] + (["--disc-on"] if disc_on else [])
        ours = run_isolated(WORKER, ["--path", "ours", *args])
        ref = run_isolated(WORKER, ["--path", "reference", *args])
        ref_name = "LDM as written, fp32" if stage == "a" else "diffusers text-to-image, fp32"
        for name, r in (("ours", ours), (ref_name, ref)):
            ips = r["batch"] / r["step_s"]
            flops_per_s = r["flops_per_step"] / r["step_s"]
            rows.append({"stage": stage_name, "phase": phase, "path": name, "precision": r["precision"],
                         "images_per_s": ips, "speedup": None, "gflop_per_step": r["flops_per_step"] / 1e9,
                         "achieved_gflops": flops_per_s / 1e9, "utilisation": flops_per_s / peaks[r["precision"]],
                         "peak_rss_mib": r["peak_rss_mib"], "peak_gpu_mib": r.get("peak_gpu_mib"),
                         "cache_build_s": r.get("cache_build_s"), "cache_images": r.get("cache_images")})
        rows[-2]["speedup"] = rows[-2]["images_per_s"] / rows[-1]["images_per_s"]
    table = markdown_table(rows, [
        ("stage", "stage"), ("phase", "phase"), ("path", "path"), ("precision", "precision"),
        ("images_per_s", "images/s"), ("speedup", "ours / reference"), ("gflop_per_step", "GFLOP/step"),
        ("achieved_gflops", "GFLOP/s"), ("utilisation", "of matmul peak"), ("peak_rss_mib", "peak RSS MiB")])
    notes = (f"\n\nMachine: {machine_description(dev)}. Matmul peak (2048x2048): fp32 {peaks['no'] / 1e9:.0f} "
             f"GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s. {warmup} warm-up + {iters} timed steps per path.")
    cache = [r for r in rows if r["cache_build_s"] is not None]
    if cache:
        notes += (f" Our Stage B encodes the training set once before training (latent cache): "
                  f"{cache[0]['cache_build_s']:.1f} s for {cache[0]['cache_images']} images, not included in images/s.")
    write_results(out, "train", table + notes, {"rows": rows, "matmul_peak_flops": peaks,
                                                 "machine": machine_description(dev)})
    return {"rows": rows, "peaks": peaks}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--stage", default="ab", help="a, b or ab")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=3)
    # worker-only arguments
    parser.add_argument("--path", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--disc-on", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)  # tests: smaller images than shipped
    args = parser.parse_args(argv)
    if args.path is None:
        run(args.stage, args.out, args.device, args.iters, args.warmup)
        return
    work = {"ours": worker_ours, "reference": worker_reference}[args.path]
    args.result.write_text(json.dumps(work(args)))


if __name__ == "__main__":
    main()
