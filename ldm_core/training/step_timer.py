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

