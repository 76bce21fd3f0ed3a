"""Does the sample metric rank what a person ranks? SWD against the exact shapes scorer, on the demo's Stage B.

    python -m benchmarks.sample_metric_rank --run runs/demo/stage_b --steps 1000,2000,4000,7000 --out runs/bench

For each checkpoint of a Stage B run on builtin:shapes (its `checkpoints/step-N`, loaded into the run's saved
pipeline), `--num-images` samples are drawn from fixed noise (image i from seed and i, DPM-Solver++), and
scored twice: the share of valid shapes by the exact scorer (evaluation/shapes_score.py), and the sliced
Wasserstein distance to held-out shapes (evaluation/swd.py) beside its floor (as many other real shapes).
The Spearman rank correlation over the checkpoints says whether the metric orders them as the validity does
(-1: the lower the distance, the more valid shapes). Then the same two scores for real shapes blurred and
shifted in colour by growing amounts, where the order is known. Writes OUT/sample_metric_rank.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.shapes_score import score_images
from evaluation.swd import descriptors_of, swd
from ldm_core.data.image_files import SHAPES_COLOUR_SETS
from ldm_core.data.shapes import make_shapes
from ldm_core.randomness import image_generator


def real_shapes(count: int, seed: int) -> torch.Tensor:
    images, _, _ = make_shapes(count, seed, 64, SHAPES_COLOUR_SETS["builtin:shapes"])
    return torch.from_numpy(images)


def batches(images: torch.Tensor, size: int = 128):
    return (images[i:i + size] for i in range(0, len(images), size))


def score(images: torch.Tensor, reference, floor: float) -> dict:
    """Validity by the exact scorer, and SWD against the reference's descriptors."""
    distance = swd(descriptors_of(batches(images)), reference)
    return {"valid": float(score_images(images.numpy())["validity"]), "swd": distance["mean"],
            "swd_levels": distance["levels"], "swd_floor": floor}


def sample_checkpoint(pipe, checkpoint: Path, count: int, steps: int, seed: int) -> torch.Tensor:
    """`count` samples of the pipeline with the checkpoint's U-Net weights, uint8 (N, 3, 64, 64)."""
    from ldm_core.training.checkpoints import load_checkpoint

    pipe.unet.load_state_dict(load_checkpoint(checkpoint).models["unet"])
    out = []
    for start in range(0, count, 64):
        n = min(64, count - start)
        images = pipe(batch_size=n, num_inference_steps=steps, output_type="pt",
                      generator=[image_generator(seed, i) for i in range(start, start + n)]).images
        out.append((images * 255).round().to(torch.uint8))
    return torch.cat(out)


def main(argv=None) -> int:
    from scipy.stats import spearmanr

    from ldm_core.training.accelerator import cpu_description
    from pipelines.latent_diffusion import LatentDiffusionPipeline
    from stage_b_diffusion.noise_schedule import make_sampler

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo/stage_b"), help="a Stage B run on builtin:shapes")
    parser.add_argument("--steps", default="1000,2000,4000,7000", help="checkpoints to score")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--sampler-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)

    started = time.monotonic()
    n = args.num_images
    # The reference: held-out shapes (seed 1, as the demo's benchmarks); the floor: other real shapes (seed 2).
    reference = descriptors_of(batches(real_shapes(n, 1)))
    floor = swd(descriptors_of(batches(real_shapes(n, 2))), reference)["mean"]

    pipe = LatentDiffusionPipeline.from_pretrained(args.run / "pipeline")
    pipe.scheduler = make_sampler("dpmsolver++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    checkpoints = {}
    for step in (int(s) for s in args.steps.split(",")):
        samples = sample_checkpoint(pipe, args.run / "checkpoints" / f"step-{step:07d}", n, args.sampler_steps, args.seed)
        checkpoints[step] = score(samples, reference, floor)
        print(step, {k: v for k, v in checkpoints[step].items() if k != "swd_levels"}, flush=True)
    valid = [c["valid"] for c in checkpoints.values()]
    # Undefined (None) when either list is constant, as in a run too short for any valid sample.
    rank = spearmanr([c["swd"] for c in checkpoints.values()], valid).statistic if len(set(valid)) > 1 else None
    rank = None if rank is None or np.isnan(rank) else float(rank)

    real = real_shapes(n, 3)
    known = {"real": score(real, reference, floor)}
    for k in (2, 4):
        soft = F.interpolate(F.avg_pool2d(real.float(), k), size=64, mode="bilinear").round().clamp(0, 255)
        known[f"blurred {k}x"] = score(soft.to(torch.uint8), reference, floor)
    for shift in (10, 30):
        known[f"colours +{shift} levels"] = score((real.int() + shift).clamp(0, 255).to(torch.uint8), reference, floor)

    lines = [f"| checkpoint | valid (exact scorer, n={n}) | SWD x1e3 (floor {floor:.1f}) | SWD at 64 / 32 / 16 px |",
             "|---|---|---|---|"]
    for step, c in checkpoints.items():
        levels = " / ".join(f"{v:.1f}" for v in c["swd_levels"].values())
        lines.append(f"| {step} | {c['valid']:.1%} | {c['swd']:.1f} | {levels} |")
    shown = "undefined (the validity is the same at every checkpoint)" if rank is None else f"{rank:+.2f}"
    lines += ["", f"Spearman rank correlation of SWD and validity over the checkpoints: {shown}", "",
              "| real shapes | valid | SWD x1e3 | SWD at 64 / 32 / 16 px |", "|---|---|---|---|"]
    for name, c in known.items():
        levels = " / ".join(f"{v:.1f}" for v in c["swd_levels"].values())
        lines.append(f"| {name} | {c['valid']:.1%} | {c['swd']:.1f} | {levels} |")
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "run": str(args.run),
              "num_images": n, "sampler": f"dpmsolver++ {args.sampler_steps} steps, seed {args.seed}",
              "floor": floor, "checkpoints": checkpoints, "spearman": rank, "known": known,
              "seconds": round(time.monotonic() - started, 1),
              "command": "python -m benchmarks.sample_metric_rank " + " ".join(argv or __import__("sys").argv[1:]),
              "table_markdown": "\n".join(lines)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sample_metric_rank.json").write_text(json.dumps(result, indent=2))
    (args.out / "sample_metric_rank.md").write_text(result["table_markdown"] + "\n")
    print(result["table_markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
