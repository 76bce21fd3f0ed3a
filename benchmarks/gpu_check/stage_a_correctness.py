"""Section: Stage A trains correctly under mixed precision. `train_vae` itself (as `ldm train-vae` runs it) on
configs/vae/kl-f8.yaml (kl-f8, 256 px) for a few dozen steps under bf16 and under fp16 (Accelerate's autocast
and grad scaler; fp16 only on CUDA), the discriminator switched on halfway; the checks read the run
(benchmarks/gpu_check/trainer_runs.py) and the exported vae/:

- every step ran and every logged loss is finite;
- parameters, optimizer and EMA states are still fp32 in both checkpoints;
- before disc_start no discriminator loss is logged and its Adam holds no state (it was never stepped);
  after it, every step logs one, and the discriminator's weights change;
- the autoencoder's weights change between the two checkpoints;
- the adaptive weight is finite and positive (how often it sits at its clamp is recorded: at this
  initialisation it does so in fp32 too, where the discriminator's gradient at the last layer is
  1e4 times smaller than the reconstruction's);
- the networks' convolutions ran in the precision asked for (a forward hook on the real run);
- the exported vae/ loads with `AutoencoderKL.from_pretrained` and reconstructs held-out shapes finitely;
  the largest activation of every encoder/decoder block (there, under the same autocast) and of every
  convolution during training stays below fp16's 65,504. That limit matters under bf16 too: it says whether
  this autoencoder could run in fp16 at all (SD-XL's VAE overflows there: madebyollin/sdxl-vae-fp16-fix,
  diffusers' AutoencoderKL `force_upcast`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check import plans
from benchmarks.gpu_check.runner import FP16_MAX, Runner, autocast, check, free_memory, images
from benchmarks.gpu_check.trainer_runs import (DTYPES, FinishedRun, TrainingConvOutputs, autocast_check, fp32_check,
                                               fresh_folder, precisions, ran_and_finite_check, read_run,
                                               run_overrides, scaler_check, scaler_record, updated_check,
                                               weights_differ)


class ActivationPeaks:
    """Forward hooks on every block of the encoder and decoder: the largest |activation| and its dtype."""

    BLOCKS = ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_out")

    def __init__(self, vae):
        self.peaks: dict[str, float] = {}
        self.dtypes: dict[str, str] = {}
        self.handles = []
        for part in ("encoder", "decoder"):
            for name, child in getattr(vae, part).named_children():
                if name not in self.BLOCKS:
                    continue
                blocks = enumerate(child) if isinstance(child, torch.nn.ModuleList) else [(None, child)]
                for i, block in blocks:
                    label = f"{part}.{name}" + ("" if i is None else f".{i}")
                    self.handles.append(block.register_forward_hook(self._hook(label)))

    def _hook(self, label: str):
        def hook(module, inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            value = float(t.detach().abs().amax())
            value = value if math.isfinite(value) else math.inf
            self.peaks[label] = max(self.peaks.get(label, 0.0), value)
            self.dtypes[label] = str(t.dtype).replace("torch.", "")
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def exported_vae_record(r: Runner, folder: Path, label: str, resolution: int) -> dict[str, Any]:
    """Load the exported vae/ as a user would and reconstruct held-out shapes under the run's autocast."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder).to(r.device).eval()
    peaks = ActivationPeaks(vae)
    x = images(r.plan.correctness_val, resolution, r.device)
    try:
        with torch.inference_mode(), autocast(r.device, DTYPES[label]):
            recon = vae(x, sample_posterior=False).sample
    finally:
        peaks.remove()
    finite = bool(torch.isfinite(recon).all())
    del vae
    return {"reconstruction_finite": finite, "activation_peaks": peaks.peaks, "activation_dtypes": peaks.dtypes}


def _discriminator_checks(label: str, run: FinishedRun, disc_start: int) -> list[dict]:
    # A row's `step` is counted after its update: the update of optimizer step s is logged as s + 1.
    before = [row for row in run.rows if row["step"] <= disc_start]
    after = [row for row in run.rows if row["step"] > disc_start]
    at_start = next((c for c in run.checkpoints if c.step == disc_start), None)
    last = run.checkpoints[-1]
    d_state = {c.step: len(c.state["opt_d"]["state"]) for c in run.checkpoints}
    changed = at_start is not None and weights_differ(at_start.models["discriminator"], last.models["discriminator"])
    d_weights = [row.get("d_weight") for row in after]
    return [
        check(f"{label}: no discriminator loss or optimizer step before disc_start",
              bool(before) and at_start is not None and d_state[disc_start] == 0
              and all("d_loss" not in row for row in before),
              {"rows": len(before), "with_d_loss": sum("d_loss" in row for row in before),
               "discriminator_adam_tensors_by_checkpoint": d_state}),
        check(f"{label}: discriminator trained after disc_start", bool(after) and changed and d_state[last.step] > 0
              and all("d_loss" in row for row in after),
              {"rows": len(after), "with_d_loss": sum("d_loss" in row for row in after),
               "weights_changed": changed, "discriminator_adam_tensors_by_checkpoint": d_state}),
        check(f"{label}: adaptive weight finite and positive after disc_start",
              bool(d_weights) and all(w is not None and math.isfinite(w) and w > 0 for w in d_weights), d_weights),
    ]


def _activation_check(label: str, exported: dict, watched: dict) -> dict[str, Any]:
    peaks = exported["activation_peaks"]
    top = max(peaks, key=peaks.get) if peaks else None
    ok = bool(peaks) and all(v < FP16_MAX for v in peaks.values()) and watched["largest"] < FP16_MAX
    return check(f"{label}: largest activation of every encoder/decoder block below fp16's 65,504", ok,
                 {"exported_vae_largest": f"{top} {peaks.get(top, 0.0):.4g}",
                  "training_convolutions_largest": f"{watched['largest']:.4g}"})


def _precision_record(r: Runner, cfg, label: str, folder: Path, watched: dict) -> tuple[dict, list]:
    steps, disc_start = r.plan.correctness_steps, cfg.loss.disc_start
    run = read_run(folder, "rec")
    exported = exported_vae_record(r, folder / "vae", label, cfg.data.resolution)
    scaler = scaler_record(run) if label == "fp16" else None
    skipped_after = scaler["skipped_steps"].get(run.checkpoints[-1].step) if scaler else None
    clamp = 1e4 * cfg.loss.disc_weight  # the adaptive weight's clamp (taming's calculate_adaptive_weight)
    checks = [ran_and_finite_check(label, "train_vae", run, steps), fp32_check(label, run),
              *_discriminator_checks(label, run, disc_start),
              updated_check(label, "the autoencoder's weights", "vae", run, skipped_after),
              autocast_check(label, watched), _activation_check(label, exported, watched),
              check(f"{label}: the exported vae/ loads and reconstructs held-out shapes finitely",
                    exported["reconstruction_finite"], str(folder / "vae"))]
    if scaler:
        checks.append(scaler_check(run, scaler))
    d_weights = [row["d_weight"] for row in run.rows if "d_weight" in row]
    peak = max(exported["activation_peaks"].values(), default=0.0)
    result = {"run": str(folder), "steps": run.rows, "training_convolutions": watched, **exported,
              "d_weight_clamp": clamp, "d_weight_at_clamp": sum(w >= clamp for w in d_weights),
              "scaler": scaler, "fp16_headroom": FP16_MAX / peak if peak > 0 else None}
    return result, checks


def section_stage_a_correctness(r: Runner) -> dict[str, Any]:
    from stage_a_vae.train import train_vae

    plan = r.plan
    disc_start = plan.correctness_steps // 2
    trunk, reported = plans.lpips_trunk_here(plans.stage_a_config(plan).loss)
    results: dict[str, Any] = {"trainer": "stage_a_vae.train.train_vae", "batch": plan.correctness_batch,
                               "disc_start": disc_start, "steps": plan.correctness_steps, "lpips_trunk": reported,
                               "precisions": {}}
    checks: list[dict] = []
    for label, unavailable in precisions(r.device):
        if unavailable:
            checks.append(check(f"{label}: train_vae ran", False, unavailable, skipped=True))
            continue
        cfg = plans.stage_a_config(plan, (*run_overrides(plan, label), f"loss.disc_start={disc_start}",
                                          f"loss.lpips_trunk={trunk}"))
        results.update(preset=cfg.model.preset, resolution=cfg.data.resolution)
        folder = fresh_folder(r.out / "correctness" / f"stage_a_{label}")
        try:
            with TrainingConvOutputs() as watched:
                train_vae(cfg, plans.SHAPES, folder)
            results["precisions"][label], found = _precision_record(r, cfg, label, folder, watched.summary())
            checks += found
            r.ctx.setdefault("correctness_vae", folder / "vae")  # Stage B's correctness runs on it
        except Exception as err:  # recorded; the other precision still runs
            checks.append(check(f"{label}: train_vae ran", False, f"{type(err).__name__}: {err}"[:500]))
        free_memory(r.device)
    results["checks"] = checks
    return results
