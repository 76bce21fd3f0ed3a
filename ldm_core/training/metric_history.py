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

    def save_curves(self, path: Path, keys: Iterable[str | tuple[str, ...]], title: str) -> None:
        """Plot each key against step as a PNG, one panel per key; a tuple of keys shares a panel (a score and
        its floor), each with its line and a legend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [tuple(k for k in ((key,) if isinstance(key, str) else key) if any(k in r for r in self.rows))
                  for key in keys]
        panels = [panel for panel in panels if panel]
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for key in panel:
                pts = [(r["step"], r[key]) for r in self.rows if key in r and math.isfinite(r[key])]
                if pts:
                    ax.plot(*zip(*pts), lw=1, marker="o" if len(pts) < 30 else None, ms=3, label=key)
            if len(panel) > 1:
                ax.legend(fontsize=7)
            ax.set_title(" / ".join(panel), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

