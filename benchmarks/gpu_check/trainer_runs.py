"""What both correctness sections share: runs of the real trainers on tiny configs, watched from outside.

A correctness run is `train_vae` / `train_unet` itself, as `ldm train-vae` / `ldm train-unet` call them, under
`train.mixed_precision` bf16 or fp16 (Accelerate's autocast, and for fp16 its grad scaler). The checks read
what the run leaves: metrics.json's history (every step logged), the two checkpoints (halfway and at the
end: weights, optimizer states, the scaler's state), the exported folder; and, while it trains, torch's global
forward hook records the dtype and the largest value of every convolution output of the networks in training,
so that the precision the trainer ran in is observed rather than assumed.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from benchmarks.gpu_check.plans import Plan
from benchmarks.gpu_check.runner import check

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# torch.amp.GradScaler's default init_scale, which Accelerate's scaler keeps (the trainers pass no
# GradScalerKwargs); every skipped optimizer step halves it and 2,000 good ones in a row double it.
INITIAL_SCALE = 2.0 ** 16


def precisions(device: torch.device) -> list[tuple[str, Optional[str]]]:
    """The precisions to train under, each with the reason it cannot run here (None when it can)."""
    fp16_here = None if device.type == "cuda" else (
        "train.mixed_precision=fp16 needs CUDA: the trainers refuse it on a CPU, where Accelerate would run "
        "fp32 while the run records fp16 (ldm_core/training/accelerator.py, check_mixed_precision)")
    return [("bf16", None), ("fp16", fp16_here)]


def run_overrides(plan: Plan, precision: str) -> list[str]:
    """The settings of a correctness run, on top of the stage's preset: `plan.correctness_steps` steps,
    every one logged, a checkpoint halfway and one at the end (both kept), nothing else periodic, few images."""
    steps = plan.correctness_steps
    return [f"train.mixed_precision={precision}", f"train.max_steps={steps}",
            f"train.batch_size={plan.correctness_batch}", "train.log_every=1",
            f"train.checkpoint_every={steps // 2}", "train.keep_checkpoints=2", f"train.validate_every={steps + 1}",
            "train.lr_warmup_steps=0", "train.report_to=none", "train.progress_bar=false",
            f"train.latent_stats_images={plan.correctness_images - plan.correctness_val}",
            f"data.shapes_count={plan.correctness_images}", f"data.val_count={plan.correctness_val}"]


def fresh_folder(folder: Path) -> Path:
    """An empty place for a run: a run folder left by an earlier check would be refused without --resume."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


class TrainingConvOutputs:
    """While in effect: how many outputs of each dtype the convolutions of networks in training mode gave, and
    the largest |value| among them. LPIPS and validation run in eval mode and are not counted."""

    def __enter__(self) -> "TrainingConvOutputs":
        self.dtypes: Counter = Counter()
        self._peak: Optional[torch.Tensor] = None
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def _hook(self, module, inputs, output) -> None:
        if not (module.training and isinstance(module, torch.nn.Conv2d) and torch.is_tensor(output)):
            return
        self.dtypes[str(output.dtype).replace("torch.", "")] += 1
        peak = output.detach().abs().amax().float()  # stays on the device: no synchronisation per convolution
        self._peak = peak if self._peak is None else torch.maximum(self._peak, peak)

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def summary(self) -> dict[str, Any]:
        peak = float(self._peak) if self._peak is not None else 0.0
        return {"dtypes": dict(self.dtypes), "largest": peak if math.isfinite(peak) else math.inf}


@dataclass
class FinishedRun:
    """A trainer's run folder as the checks read it."""

    folder: Path
    metrics: dict
    rows: list[dict]        # metrics.json's history rows that hold `key` (one per optimizer step)
    checkpoints: list[Any]  # ldm_core.training.checkpoints.Checkpoint, oldest first


def read_run(folder: Path, key: str) -> FinishedRun:
    """Read metrics.json and every checkpoint, then delete the checkpoints: they exist only for these checks
    (a kl-f8 checkpoint with its Adam and EMA states is 1.3 GB)."""
    from ldm_core.training.checkpoints import list_checkpoints, load_checkpoint

    metrics = json.loads((folder / "metrics.json").read_text())
    checkpoints = [load_checkpoint(path) for path in list_checkpoints(folder / "checkpoints")]
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    rows = [row for row in metrics.get("history", []) if key in row]
    return FinishedRun(folder, metrics, rows, checkpoints)


def _float_tensors(value: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(value):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _float_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _float_tensors(item)


def weights_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def skipped_steps(scale_before: Optional[float], scale_after: Optional[float]) -> Optional[int]:
    """Optimizer steps the grad scaler skipped between two of its scales (each skip halves it; no growth
    happens within 2,000 steps)."""
    if not scale_before or not scale_after:
        return None
    return max(0, round(math.log2(scale_before / scale_after)))


def scaler_record(run: FinishedRun) -> dict[str, Any]:
    """The grad scaler's scale at each checkpoint and the steps it skipped before each (fp16 only)."""
    scales = [c.state.get("scaler", {}).get("scale") for c in run.checkpoints]
    previous = [INITIAL_SCALE] + scales[:-1]
    return {"scales": {c.step: s for c, s in zip(run.checkpoints, scales)},
            "skipped_steps": {c.step: skipped_steps(p, s) for c, p, s in zip(run.checkpoints, previous, scales)}}


def ran_and_finite_check(label: str, trainer: str, run: FinishedRun, steps: int) -> dict[str, Any]:
    """Every step ran and every logged value is finite; under fp16 an infinite grad_norm is the grad scaler's
    overflow, which skips that step by design, so it is counted rather than failed."""
    bad, overflows = [], 0
    for row in run.rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not math.isfinite(v):
                if k == "grad_norm" and label == "fp16":
                    overflows += 1
                else:
                    bad.append((row["step"], k, v))
    ran = run.metrics.get("steps") == steps and len(run.rows) == steps
    detail = bad or {"steps": run.metrics.get("steps"), "rows": len(run.rows), "stopped_early":
                     run.metrics.get("stopped_early"), "values_per_row": len(run.rows[0]) if run.rows else 0,
                     **({"overflowing_grad_norms": overflows} if label == "fp16" else {})}
    return check(f"{label}: {trainer} ran its {steps} steps and every logged loss is finite",
                 ran and not bad and not run.metrics.get("stopped_early"), detail)


def fp32_check(label: str, run: FinishedRun) -> dict[str, Any]:
    """Mixed precision computes in bf16/fp16 but keeps the weights, the optimizer's and the EMA's state in fp32."""
    tensors = [t for c in run.checkpoints for t in _float_tensors([c.models, {k: v for k, v in c.state.items()
                                                                               if k != "history"}])]
    not_fp32 = sorted({str(t.dtype) for t in tensors if t.dtype != torch.float32})
    return check(f"{label}: parameters and optimizer states still fp32", bool(tensors) and not not_fp32,
                 not_fp32 or f"{len(tensors)} tensors in {len(run.checkpoints)} checkpoints")


def updated_check(label: str, what: str, name: str, run: FinishedRun, skipped: Optional[int]) -> dict[str, Any]:
    """`name`'s weights changed between the two checkpoints. Under fp16, if the scaler skipped every step of
    that window, unchanged weights are what a correct trainer gives: reported as skipped, not failed."""
    first, last = run.checkpoints[0], run.checkpoints[-1]
    window = last.step - first.step
    title = f"{label}: {what} changed between steps {first.step} and {last.step}"
    counts = {"steps": window, **({} if skipped is None else {"skipped_by_the_grad_scaler": skipped})}
    if weights_differ(first.models[name], last.models[name]):
        return check(title, True, counts)
    if skipped is not None and skipped >= window:
        return check(title, False, f"unchanged: fp16 overflowed at every one of the {window} steps and the grad "
                                   f"scaler skipped them; more train.max_steps would show an update", skipped=True)
    return check(title, False, counts)


def autocast_check(label: str, watched: dict[str, Any]) -> dict[str, Any]:
    counts, dtype = watched["dtypes"], str(DTYPES[label]).replace("torch.", "")
    return check(f"{label}: the networks ran in {label} under Accelerate's autocast", counts.get(dtype, 0) > 0,
                 f"convolution outputs in training by dtype: {counts}")


def scaler_check(run: FinishedRun, record: dict[str, Any]) -> dict[str, Any]:
    scales = list(record["scales"].values())
    return check("fp16: Accelerate's grad scaler ran, its scale saved with every checkpoint",
                 bool(scales) and all(s is not None and 0 < s < math.inf for s in scales), record)
