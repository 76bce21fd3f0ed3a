"""The run folder: created once, never silently overwritten, and the files every run writes into it."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

import torch

from ldm_core.config import save_config


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


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)

