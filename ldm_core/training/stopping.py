"""How a training run stops: the time budget, SIGINT/SIGTERM, and NaN/inf losses.

Each stage's loop checks its losses with `TrainingRun.is_nonfinite` (ldm_core/training/run.py: `all_finite`,
then `NonFiniteLossPolicy.skip_or_stop`) before every backward, and `TrainingRun.steps` asks
`GracefulStop.requested` and `TimeBudget.ends_run` after every optimizer step. Under
several processes each decision is all-reduced, so every process stops (or skips) at the same step and
none is left waiting in a collective.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch


logger = logging.getLogger("ldm.train")


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

    def ends_run(self, step: int, max_steps: int, accelerator=None) -> bool:
        """`stops_at`, true on every process when true on any (their clocks differ), so all stop at one step."""
        return _any_process(self.stops_at(step, max_steps), accelerator)


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

    def skip_or_stop(self, values: dict[str, Any], step: int) -> None:
        """A non-finite value was found (here or on another process): raise (stop, or no skips left), or
        count the step as skipped. Every process calls it at the same step, so all take the same decision.

        Parameters:
            values: name -> scalar tensor or number (the loss and its logged terms), named in the message.
            step: the optimizer step being computed (0-based), named in the message.
        """
        local_bad = not all(_is_finite(v) for v in values.values())
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


def all_finite(values: dict[str, Any], accelerator=None) -> bool:
    """True when every value is finite on every process (an all-reduce under several processes: every
    process must call it at the same point)."""
    return not _any_process(not all(_is_finite(v) for v in values.values()), accelerator)


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
