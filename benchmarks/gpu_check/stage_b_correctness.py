"""Section: Stage B trains correctly under mixed precision. `train_unet` itself, with the pipeline class and
sample scorer `ldm train-unet` gives it (workflows/train_unet.py), on the autoencoder the Stage A section
exported (a freshly initialised one when that section did not run), under bf16 and fp16 (fp16 only on
CUDA). On a GPU the U-Net is configs/unet/unet-ldm-kl8.yaml's layout at half its width (benchmarks/gpu_check/
plans.py says why). The checks read the run (benchmarks/gpu_check/trainer_runs.py): every step ran with a
finite loss; weights, optimizer and EMA states still fp32; the U-Net's weights changed between the two
checkpoints; its convolutions ran in the precision asked for; the exported pipeline/ loads with
`LatentDiffusionPipeline.from_pretrained` and samples finite images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check import plans
from benchmarks.gpu_check.runner import Runner, check, free_memory
from benchmarks.gpu_check.trainer_runs import (TrainingConvOutputs, autocast_check, fp32_check, fresh_folder,
                                               precisions, ran_and_finite_check, read_run, run_overrides,
                                               scaler_check, scaler_record, updated_check)


def autoencoder_folder(r: Runner) -> tuple[Path, str]:
    """The frozen autoencoder: Stage A's correctness export, else a freshly initialised kl-f8 saved as a folder."""
    from stage_a_vae.architectures import build_autoencoder

    exported = r.ctx.get("correctness_vae")
    if exported is not None and Path(exported).is_dir():
        return Path(exported), "the stage_a_correctness section's export"
    folder = fresh_folder(r.out / "correctness" / "initial_vae")
    torch.manual_seed(0)
    build_autoencoder(plans.stage_a_config(r.plan).model).save_pretrained(folder)
    return folder, "a freshly initialised autoencoder (stage_a_correctness did not export one)"


def pipeline_record(r: Runner, folder: Path) -> dict[str, Any]:
    """Load the exported pipeline as a user would and draw one image in 2 steps."""
    from pipelines.latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(folder).to(r.device)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        image = pipe(batch_size=1, num_inference_steps=2, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images  # noise drawn on the CPU, as the trainer's
    finite = bool(torch.isfinite(torch.as_tensor(image)).all())
    del pipe
    return {"sample_finite": finite, "sample_shape": list(torch.as_tensor(image).shape)}


def _precision_record(r: Runner, label: str, folder: Path, watched: dict) -> tuple[dict, list]:
    run = read_run(folder, "loss")
    scaler = scaler_record(run) if label == "fp16" else None
    skipped_after = scaler["skipped_steps"].get(run.checkpoints[-1].step) if scaler else None
    sampled = pipeline_record(r, folder / "pipeline")
    checks = [ran_and_finite_check(label, "train_unet", run, r.plan.correctness_steps), fp32_check(label, run),
              updated_check(label, "the U-Net's weights", "unet", run, skipped_after),
              autocast_check(label, watched),
              check(f"{label}: the exported pipeline/ loads and samples finite images", sampled["sample_finite"],
                    {"pipeline": str(folder / "pipeline"), **sampled})]
    if scaler:
        checks.append(scaler_check(run, scaler))
    losses = [row["loss"] for row in run.rows]
    result = {"run": str(folder), "steps": run.rows, "training_convolutions": watched, "scaler": scaler,
              "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    return result, checks


def section_stage_b_correctness(r: Runner) -> dict[str, Any]:
    from workflows.train_unet import train_unet  # stage_b_diffusion.train.train_unet with the project's pipeline

    plan = r.plan
    vae, vae_source = autoencoder_folder(r)
    results: dict[str, Any] = {"trainer": "stage_b_diffusion.train.train_unet (workflows.train_unet)",
                               "autoencoder": vae_source, "batch": plan.correctness_batch,
                               "steps": plan.correctness_steps, "precisions": {}}
    checks: list[dict] = []
    for label, unavailable in precisions(r.device):
        if unavailable:
            checks.append(check(f"{label}: train_unet ran", False, unavailable, skipped=True))
            continue
        cfg = plans.stage_b_config(plan, (*plan.b_correctness_overrides, *run_overrides(plan, label),
                                          f"sampling.sample_every={plan.correctness_steps + 1}",
                                          "sampling.grid_images=2", "sampling.num_inference_steps=2"))
        results.update(preset=cfg.model.preset, block_out_channels=cfg.model.block_out_channels,
                       resolution=cfg.data.resolution)
        folder = fresh_folder(r.out / "correctness" / f"stage_b_{label}")
        try:
            with TrainingConvOutputs() as watched:
                train_unet(cfg, vae, plans.SHAPES, folder)
            results["precisions"][label], found = _precision_record(r, label, folder, watched.summary())
            checks += found
        except Exception as err:  # recorded; the other precision still runs
            checks.append(check(f"{label}: train_unet ran", False, f"{type(err).__name__}: {err}"[:500]))
        free_memory(r.device)
    results["checks"] = checks
    return results
