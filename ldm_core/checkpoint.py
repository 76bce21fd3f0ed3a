"""Crash-safe training checkpoints.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding model weights as safetensors, the rest of
the training state (optimizers, LR schedulers, EMA, grad scaler) in `training_state.pt`, read back with
`torch.load(weights_only=True)`, and `meta.json`. It is written under a temporary name, flushed to disk
and renamed into place; the `latest` pointer is replaced last. A kill at any instant therefore leaves
the previous checkpoint loadable, and a half-written folder is never picked by `--resume latest`.

No random-number-generator state is stored: the trainers derive every random draw from (seed, step,
rank), and the data order from (seed, epoch), so the step counter alone restores them exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    models: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    meta: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(checkpoint_root: str | Path, step: int, models: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically, move `latest` to it, and delete all but the newest `keep`.

    Parameters:
        checkpoint_root: the run's `checkpoints/` folder.
        step: the optimizer step the state belongs to.
        models: name -> state dict of tensors, stored as `<name>.safetensors`.
        state: anything `torch.load(weights_only=True)` can read (tensors, numbers, strings, lists, dicts).
        meta: JSON-serialisable facts (config fingerprint, time), checked when resuming.
        keep: how many checkpoints to retain.
    """
    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensors in models.items():
        # safetensors refuses shared or non-contiguous storage; clone to plain tensors.
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_file(plain, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / STATE_FILE)
    with open(tmp / META_FILE, "w") as fh:
        json.dump({**meta, "step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, fh, indent=2)
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_latest(root, final.name)
    _apply_retention(root, keep)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def list_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _apply_retention(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(run_dir: str | Path, spec: Optional[str]) -> Optional[Path]:
    """Turn `--resume latest|PATH` into a checkpoint folder (None when there is nothing to resume).

    `latest` with no checkpoint yet starts fresh (so the same command can be re-run after a kill);
    an explicit path that does not exist is an error.
    """
    if not spec:
        return None
    root = Path(run_dir) / "checkpoints"
    if spec == LATEST:
        pointer = root / LATEST
        if pointer.is_file():
            candidate = root / pointer.read_text().strip()
            if (candidate / META_FILE).is_file():
                return candidate
        complete = list_checkpoints(root)
        return complete[-1] if complete else None
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"--resume {spec}: no such checkpoint. Use --resume latest, or one of: "
                              f"{', '.join(str(p) for p in list_checkpoints(root)) or '(none in ' + str(root) + ')'}")
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"--resume {spec}: {path} is not a complete checkpoint (no {META_FILE}); "
                              f"it may be a folder left by a killed run. Use --resume latest.")
    return path


def check_resumable(run_dir: str | Path, spec: Optional[str], expected_fingerprint: str) -> Optional[Path]:
    """The checkpoint `--resume spec` names, refused before anything in the run folder is touched when it
    is missing or was written by another model configuration. Returns None when not resuming."""
    checkpoint = resolve_resume(run_dir, spec)  # raises for a path that does not exist
    if checkpoint is None:
        return None
    try:
        found = json.loads((checkpoint / META_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--resume {spec}: cannot read {checkpoint / META_FILE} ({err}). Resume from "
                              f"another checkpoint or start a new --out folder.") from None
    if found != expected_fingerprint:
        raise CheckpointError(
            f"--resume {spec}: checkpoint {checkpoint} was written with a different model configuration "
            f"(fingerprint {found}; this run's is {expected_fingerprint}). Nothing was changed. Resume with "
            f"the run's own settings (see {Path(run_dir) / 'config.yaml'}) or train into a new --out folder.")
    return checkpoint


def load_checkpoint(path: str | Path, expected_fingerprint: Optional[str] = None) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`.

    `expected_fingerprint` is the fingerprint of the current run's model-defining config; a checkpoint
    from a different configuration is refused with both values in the message.
    """
    path = Path(path)
    with open(path / META_FILE) as fh:
        meta = json.load(fh)
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise CheckpointError(
            f"Checkpoint {path} was written by a run with a different model configuration "
            f"(its fingerprint {meta.get('fingerprint')}, this run's {expected_fingerprint}; see "
            f"{path / META_FILE} and the run's config.yaml). Resume with the same config, or start a new --out folder.")
    models = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return Checkpoint(path=path, step=int(meta["step"]), models=models, state=state, meta=meta)
