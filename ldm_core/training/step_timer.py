"""Wall time of the training steps alone, for the `step_time` scalar."""

from __future__ import annotations

import time

import torch


class StepTimer:
    """Wall time of the training steps alone (no validation, sampling or checkpoint), for `step_time`.

    `start()` at the top of a step, `stop()` at its end; `mean_and_reset()` at a log point returns the
    mean seconds per step since the previous one. Time on an accelerator is asynchronous, so each
    `stop()` synchronises: the number is the step's real duration, not the time to queue it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.total, self.count, self._t0 = 0.0, 0, None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.total += time.perf_counter() - self._t0
        self.count += 1

    def mean_and_reset(self) -> float:
        mean = self.total / max(self.count, 1)
        self.total, self.count = 0.0, 0
        return mean



class Throughput:
    """Start-up time and images/s of a run's steps, for run_info.json's `timing`.

    Throughput is measured from the start of the second step, so the first (warm-up, the loader's start)
    is left out; periodic work (validation, checkpoints) is included. Call `step_starts()` at the top of
    every step and `timing()` after the last.

    Parameters:
        created: `time.monotonic()` when the run began (start-up is measured from it).
        images_per_step: images in one optimizer step, over all processes.
    """

    def __init__(self, created: float, images_per_step: int):
        self.created, self.images_per_step = created, images_per_step
        self.started, self.steady_from = 0, 0.0

    def step_starts(self) -> None:
        if self.started == 1:
            self.steady_from = time.monotonic()
        self.started += 1

    def timing(self) -> dict:
        """seconds_to_first_step, then steps and images_per_second; empty before the second step."""
        if self.started < 2:
            return {}
        seconds = time.monotonic() - self.steady_from
        return {"seconds_to_first_step": round(self.steady_from - self.created, 3), "steps": self.started,
                "images_per_second": round((self.started - 1) * self.images_per_step / seconds, 3),
                "note": "images/s over the steps after the first, periodic work included"}
