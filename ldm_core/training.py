"""Plumbing shared by the Stage A and Stage B training loops.

Both loops are written top to bottom in their own `train.py`; what they share lives here: the run
folder, the Accelerator, learning-rate schedules, deterministic batches and random draws (so that a
resumed run continues exactly), EMA and the metric history. How a run stops (time budget, signals,
non-finite losses) is in `ldm_core/run_control.py`.

Several processes (`accelerate launch`): each process draws `train.batch_size` images per micro-step,
DDP averages the gradients, so one optimizer step sees a global batch of
`batch_size x processes x gradient_accumulation_steps` images and applies `train.lr` unchanged (no
automatic scaling by the number of processes, unlike LDM's `scale_lr`). The LR schedules are stepped
once per optimizer step by the loops, not by Accelerate, so their shape does not depend on the
number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from ldm_core.config import EMAConfig, TrainConfig, save_config

logger = logging.getLogger("ldm.train")


class RunFolderError(RuntimeError):
    """The output folder cannot be used; the message says what to do."""


def prepare_run_dir(out: str | Path, config: Any, resume: Optional[str]) -> tuple[Path, Optional[Path]]:
    """Create the run folder, refuse to overwrite a finished or running one, check the checkpoint to resume
    (before anything is written, see `check_resumable`), save the resolved config.

    Returns the run folder and the checkpoint to resume from (None for a fresh run). `config` is a stage
    config with `model_fingerprint()`.
    """
    from ldm_core.checkpoint import check_resumable

    run_dir = Path(out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # one per process: ranks probe the same folder at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"Cannot write to the output folder {run_dir}: {err.strerror}. "
                             f"Choose another --out folder or fix its permissions.") from None
    has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
    if has_checkpoints and not resume:
        raise RunFolderError(f"{run_dir} already holds checkpoints of an earlier run. Continue it with "
                             f"--resume latest, or choose a new --out folder.")
    checkpoint = check_resumable(run_dir, resume, config.model_fingerprint())
    save_config(config, run_dir / "config.yaml")
    return run_dir, checkpoint


def environment_info() -> dict[str, str]:
    """Library versions and machine facts saved with every run."""
    import accelerate
    import diffusers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "platform": platform.platform(),
            "cuda": torch.version.cuda or "none", "device_count": str(torch.cuda.device_count())}
    try:
        import lpips

        info["lpips"] = getattr(lpips, "__version__", "unknown")
    except ImportError:
        pass
    return info


def fingerprint(*sections: Any) -> str:
    """A short hash of the config sections that define a checkpoint's shapes and semantics."""
    blob = json.dumps([asdict(s) if hasattr(s, "__dataclass_fields__") else s for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cpu_only() -> bool:
    """Whether Accelerate must be told `cpu=True`: no CUDA, or the launcher asked for the CPU.

    Without CUDA, Accelerate joins the processes of a multi-process launch (gloo, MULTI_CPU) only when
    asked for the CPU; otherwise every process would run alone, unaware of the others.
    """
    from accelerate.utils import parse_flag_from_env

    return not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def make_accelerator(train_cfg: TrainConfig, run_dir: Path, *, log: bool = True):
    """An Accelerator with mixed precision, gradient accumulation and TensorBoard logging into the run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # Accelerate keeps one process-wide state; `ldm train` runs two stages (possibly with different
    # precisions or accumulation) in one process, so the previous stage's settings are dropped here.
    # The distributed process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs"))
    accelerator = Accelerator(cpu=cpu_only(), mixed_precision=train_cfg.mixed_precision,
                              gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
                              log_with="tensorboard" if log else None, project_config=project)
    if accelerator.device.type == "cpu" and train_cfg.mixed_precision == "bf16" and not cpu_has_native_bf16():
        logger.warning("train.mixed_precision=bf16 on a CPU without AVX512-BF16 or AMX: bf16 convolutions are "
                       "emulated there and ran about 20x slower than fp32 on a 2-core AVX2 CPU. Use "
                       "train.mixed_precision=no on this machine.")
    return accelerator


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    cpu = getattr(torch._C, "_cpu", None)
    return bool(cpu is not None and (getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                                     or getattr(cpu, "_is_amx_tile_supported", lambda: False)()))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig):
    """Linear warm-up then constant, cosine or linear decay (diffusers.optimization.get_scheduler)."""
    from diffusers.optimization import get_scheduler

    name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[train_cfg.lr_schedule]
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=train_cfg.lr_warmup_steps,
                         num_training_steps=train_cfg.max_steps)


def make_ema(model: torch.nn.Module, ema_cfg: EMAConfig):
    """diffusers `EMAModel` over `model`'s parameters, or None when EMA is off.

    `foreach` updates all shadow tensors in a few fused ops instead of a Python loop over them: 5 ms
    instead of 15 ms per step for unet-small on 2 CPU cores, the same values (tests/test_fast_paths.py).
    """
    if not ema_cfg.enabled:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=ema_cfg.decay, use_ema_warmup=ema_cfg.use_warmup,
                    inv_gamma=ema_cfg.inv_gamma, power=ema_cfg.power, foreach=True)


class StepBatches:
    """Batch indices as a pure function of the micro-step, so a resumed run sees the same data.

    Each epoch is a permutation seeded by (seed, epoch); the global batch of a micro-step is split
    over processes by rank. Flips are drawn from (seed, epoch, index), so augmentation resumes exactly too.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, world_size: int, rank: int, seed: int, flip: bool):
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.flip = flip
        global_batch = batch_size * world_size
        if len(self.indices) < global_batch:
            raise ValueError(f"The training split has {len(self.indices)} images, fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes). Use more images or a smaller "
                             f"train.batch_size.")
        self.steps_per_epoch = len(self.indices) // global_batch

    def __call__(self, micro_step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, within = divmod(micro_step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        start = within * self.batch_size * self.world_size + self.rank * self.batch_size
        chosen = order[start:start + self.batch_size]
        flips = np.random.default_rng([self.seed, epoch, 1]).random(len(self.indices))[chosen] < 0.5
        return self.indices[chosen], (flips if self.flip else np.zeros_like(flips))


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from numpy's SeedSequence(keys): independent streams for different
    keys (not consecutive integer seeds), reproducible on any machine."""
    if any(k < 0 for k in keys):
        raise ValueError(f"Seed keys must be non-negative, got {keys}.")
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2 ** 63 - 1))


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for every random draw of one micro-step on one process."""
    return seeded_generator(seed, step, rank, device=device)


def images_to_batch(images_uint8: np.ndarray, indices: np.ndarray, flips: np.ndarray,
                    device: torch.device) -> torch.Tensor:
    """Gather uint8 images, flip where asked, and map to [-1, 1] floats on `device`."""
    batch = torch.from_numpy(np.ascontiguousarray(images_uint8[indices])).to(device)
    if flips.any():
        mask = torch.from_numpy(flips).to(device)
        batch = torch.where(mask[:, None, None, None], batch.flip(-1), batch)
    return batch.float().div_(127.5).sub_(1.0)


def clip_gradients(accelerator, parameters, max_norm: float) -> float:
    """Clip to `max_norm` (0 = no clipping) and return the pre-clip gradient norm for logging."""
    return float(accelerator.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf")))


def record_scalars(accelerator, history: "MetricHistory", step: int, logs: dict, lr: float) -> dict[str, float]:
    """Log one step's scalars to TensorBoard and the history; returns them as floats."""
    scalars = {k: float(v) for k, v in logs.items()}
    scalars["lr"] = lr
    history.add(step, scalars)
    accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
    return scalars


class MetricHistory:
    """Scalars over training, kept for metrics.json and the loss-curve PNG."""

    def __init__(self, rows: Optional[list[dict]] = None):
        self.rows: list[dict] = list(rows or [])

    def add(self, step: int, values: dict[str, float]) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in values.items()}})

    def last(self, key: str) -> Optional[float]:
        for row in reversed(self.rows):
            if key in row:
                return row[key]
        return None

    def save_curves(self, path: Path, keys: Iterable[str], title: str) -> None:
        """Plot each key against step, one panel per key, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in keys if any(k in r for r in self.rows)]
        if not keys:
            return
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            pts = [(r["step"], r[key]) for r in self.rows if key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), lw=1)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


def shared_checkpoint_state(ema, accelerator, history: "MetricHistory") -> dict[str, Any]:
    """The parts of a checkpoint's training state both stages have: EMA, grad scaler, metric history."""
    state: dict[str, Any] = {"history": history.rows}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    return state


def restore_shared_state(state: dict[str, Any], ema, accelerator) -> "MetricHistory":
    """Load what `shared_checkpoint_state` saved; returns the metric history."""
    if ema is not None:
        ema.load_state_dict(state["ema"])
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    return MetricHistory(state["history"])
