"""Scalars over a run: logged to the trackers, kept for metrics.json and drawn as loss curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional


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

