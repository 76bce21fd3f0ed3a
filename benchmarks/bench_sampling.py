"""Sampling speed and quality: DDPM 1000 steps (the reference) against the fast samplers, on one model.

    python -m benchmarks.bench_sampling --pipeline runs/demo/stage_b/pipeline --out runs/bench

Every sampler draws the same images (image i from seed (0, i)) through `generate_images`, the code
behind `ldm generate`, with the U-Net and the batched VAE decode included in the time; the folder is
then scored by the exact shapes scorer behind `ldm eval-samples --dataset builtin:shapes`. A short
untimed call first warms up each sampler.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import machine_description, markdown_table, pick_device, write_results

# (sampler, steps): DDPM at its training length is the reference every other row is compared with.
SAMPLER_PLAN = [("ddpm", 1000), ("ddim", 50), ("dpmsolver++", 50), ("dpmsolver++", 20), ("unipc", 20),
                ("dpmsolver++", 10)]


def run(pipeline_path: Path, out: Path, num_images: int, batch_size: int, device: str) -> list[dict]:
    from evaluation.shapes_score import score_folder
    from workflows.generate import generate_images
    from pipelines.latent_diffusion import LatentDiffusionPipeline
    from stage_b_diffusion.noise_schedule import make_sampler

    if not (pipeline_path / "model_index.json").is_file():
        raise SystemExit(f"No pipeline at {pipeline_path}. Train the demo model first (`make demo`), or pass "
                         f"--pipeline RUN/pipeline of a model trained on builtin:shapes.")
    dev = pick_device(device)
    pipe = LatentDiffusionPipeline.from_pretrained(pipeline_path).to(dev)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.scheduler.config
    rows = []
    for name, steps in SAMPLER_PLAN:
        pipe.scheduler = make_sampler(name, base)
        with tempfile.TemporaryDirectory() as tmp:
            generate_images(pipe, 2, seed=1, batch_size=2, num_inference_steps=min(steps, 5), out_dir=tmp)
        folder = out / "samples" / f"{name}-{steps}"
        start = time.perf_counter()
        generate_images(pipe, num_images, seed=0, batch_size=batch_size, num_inference_steps=steps, out_dir=folder,
                        overwrite=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        scores = score_folder(folder)
        rows.append({"sampler": name, "steps": steps, "images_per_s": num_images / seconds, "seconds": seconds,
                     "validity": scores["validity"], "folder": str(folder)})
        print(f"{name} {steps} steps: {num_images / seconds:.2f} images/s, validity {scores['validity']:.1%}",
              flush=True)
    reference = rows[0]
    for row in rows:
        row["speedup"] = row["images_per_s"] / reference["images_per_s"]
        row["validity_pct"] = 100 * row["validity"]
        row["validity_minus_ddpm_points"] = 100 * (row["validity"] - reference["validity"])
    table = markdown_table(rows, [("sampler", "sampler"), ("steps", "steps"), ("images_per_s", "images/s"),
                                  ("speedup", "x DDPM-1000"), ("validity_pct", "validity %"),
                                  ("validity_minus_ddpm_points", "validity - DDPM (points)")])
    notes = (f"\n\n{num_images} images per sampler, batch {batch_size}, model {pipeline_path}; machine: "
             f"{machine_description(dev)}. Validity is the exact shapes score (`ldm eval-samples --dataset "
             f"builtin:shapes`); the sample folders are under {out / 'samples'}.")
    write_results(out, "sampling", table + notes, {"rows": rows, "pipeline": str(pipeline_path),
                                                    "num_images": num_images, "machine": machine_description(dev)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=Path("runs/demo/stage_b/pipeline"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    run(args.pipeline, args.out, args.num_images, args.batch_size, args.device)


if __name__ == "__main__":
    main()
