"""Plumbing shared by the Stage A and Stage B training loops.

Both loops are written top to bottom in their own `train.py`; what they share lives here: the run
folder, the Accelerator, learning-rate schedules, deterministic batches and random draws (so that a
resumed run continues exactly), EMA, the time budget, the metric history, the graceful stop on
SIGINT/SIGTERM and the policy for non-finite losses.

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
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

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
    return Accelerator(cpu=cpu_only(), mixed_precision=train_cfg.mixed_precision,
                       gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
                       log_with="tensorboard" if log else None, project_config=project)


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


class TimeBudget:
    """Stops training once `minutes` have passed (0 = unlimited)."""

    def __init__(self, minutes: float):
        self.minutes = minutes
        self.deadline = time.monotonic() + minutes * 60 if minutes > 0 else math.inf

    def exceeded(self) -> bool:
        return time.monotonic() >= self.deadline

    def stops_at(self, step: int, max_steps: int) -> bool:
        """True (with a log line) when the budget ends the run before `max_steps`."""
        if step < max_steps and self.exceeded():
            logger.warning("Time budget of %.1f min reached at step %d of %d; stopping.", self.minutes, step,
                           max_steps)
            return True
        return False


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


def _format_terms(losses: dict[str, Any]) -> str:
    return ", ".join(f"{k}={float(v.detach() if torch.is_tensor(v) else v):.4g}" for k, v in losses.items()
                     if not torch.is_tensor(v) or v.numel() == 1)


def _is_finite(value: Any) -> bool:
    if torch.is_tensor(value):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


_NONFINITE_ADVICE = ("The last checkpoint is intact; lower train.lr, use train.mixed_precision=no or bf16 instead "
                     "of fp16, and resume with --resume latest.")


def _any_process(flag: bool, accelerator) -> bool:
    """True when `flag` is true on any process (an all-reduce; every process must call it at the same point)."""
    if accelerator is None or accelerator.num_processes <= 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class NonFiniteLossPolicy:
    """What a NaN or inf loss (or gradient norm) does: `train.nonfinite_loss` = stop | skip.

    The check runs before `backward` / `optimizer.step`, so a bad value never reaches the weights and
    the last checkpoint stays the last good state. "stop" raises FloatingPointError naming the step and
    every loss term. "skip" drops the rest of that optimizer step (no further forward, backward or
    update; gradients cleared) and continues with the next batch, at most `max_skips` times per run
    (the count is saved in checkpoints); the next one stops the run.

    Under several processes every process takes the same decision (the flag is all-reduced), so a NaN
    on one rank cannot leave the others waiting in a gradient all-reduce.

    Parameters:
        mode: "stop" or "skip".
        max_skips: how many steps "skip" may drop in one run.
        skipped: steps already dropped (restored from a checkpoint).
    """

    def __init__(self, mode: str, max_skips: int, skipped: int = 0):
        if mode not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite_loss must be stop or skip, not {mode!r}.")
        self.mode, self.max_skips, self.skipped = mode, max_skips, skipped

    def ok(self, values: dict[str, Any], step: int, accelerator=None) -> bool:
        """True when every value is finite on every process; otherwise raise (stop) or return False (skip).

        Parameters:
            values: name -> scalar tensor or number (the loss and its logged terms).
            step: the optimizer step being computed (0-based), named in the message.
            accelerator: the run's Accelerator (None: single process).
        """
        local_bad = not all(_is_finite(v) for v in values.values())
        if not _any_process(local_bad, accelerator):
            return True
        terms = _format_terms(values) if local_bad else "finite here, non-finite on another process"
        if self.mode == "stop":
            raise FloatingPointError(f"Non-finite loss at step {step}: {terms}. {_NONFINITE_ADVICE} To skip such "
                                     f"steps instead, set train.nonfinite_loss=skip.")
        if self.skipped >= self.max_skips:
            raise FloatingPointError(
                f"Non-finite loss at step {step}: {terms}. {self.skipped} steps were already skipped "
                f"(train.max_nonfinite_skips={self.max_skips}), so the run stops. {_NONFINITE_ADVICE}")
        self.skipped += 1
        logger.warning("Non-finite loss at step %d: %s. Skipping this step (%d of at most %d, "
                       "train.max_nonfinite_skips).", step, terms, self.skipped, self.max_skips)
        return False


def drop_gradients(*optimizers) -> None:
    """Clear the gradients of a skipped step (Accelerate's wrapped `zero_grad` only acts on sync steps)."""
    for opt in optimizers:
        getattr(opt, "optimizer", opt).zero_grad(set_to_none=True)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; the message says how to resume.

    A KeyboardInterrupt, so `ldm train` does not go on to the next stage and callers that already
    handle Ctrl+C handle it.
    """


class GracefulStop:
    """Context manager: SIGINT and SIGTERM ask the training loop to stop at the next step boundary.

    The loop finishes the optimizer step it is in, writes a checkpoint and raises `TrainingInterrupted`.
    A second SIGINT aborts at once (plain KeyboardInterrupt; the last checkpoint is still intact).
    Handlers are installed only in the main thread and the previous ones are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame) -> None:
        # Only set a flag: the step in flight (and any checkpoint being written) must complete.
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, accelerator=None) -> bool:
        """True when any process received a stop signal; all processes agree, so they stop at the same step."""
        return _any_process(self.signum is not None, accelerator)

    def describe(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another process"


def interrupted(stop: GracefulStop, step: int, max_steps: int, checkpoint: Path) -> TrainingInterrupted:
    """The exception (and its log line) that ends a run stopped by a signal."""
    message = (f"Stopped by {stop.describe()} after step {step} of {max_steps}; checkpoint written to "
               f"{checkpoint}. Resume with the same command plus --resume latest.")
    logger.warning(message)
    return TrainingInterrupted(message)


def finish_step(step: int, max_steps: int, periodic: list[tuple[int, Callable[[], Any]]], write_checkpoint,
                stop: GracefulStop, budget: TimeBudget, accelerator, bar) -> bool:
    """What both loops do after each optimizer step: periodic work, then the signal and time-budget stops.

    Parameters:
        periodic: (every, action) pairs, e.g. validation and checkpoints, run when `step % every == 0`.
        write_checkpoint: writes the current state and returns its folder (used on a signal).
    Returns True when the time budget ends the run; raises TrainingInterrupted (after a checkpoint)
    on SIGINT/SIGTERM.
    """
    for every, action in periodic:
        if step % every == 0:
            action()
    if stop.requested(accelerator):
        bar.close()
        checkpoint = write_checkpoint()
        end_run(accelerator)
        raise interrupted(stop, step, max_steps, checkpoint)
    return budget.stops_at(step, max_steps)


def end_run(accelerator) -> None:
    """Close the trackers but keep the process group: `ldm train` runs Stage B in the same processes.

    (`Accelerator.end_training` would destroy the group.) It is destroyed when the process exits.
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    if accelerator.num_processes > 1 and not getattr(end_run, "_registered", False):
        import atexit

        from accelerate import PartialState

        atexit.register(PartialState().destroy_process_group)
        end_run._registered = True
