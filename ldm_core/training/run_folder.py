"""The run folder: created once, never silently overwritten, and the files every run writes into it."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ldm_core.atomic_files import write_atomic
from ldm_core.config.settings import resumable_keys, save_config


class RunFolderError(RuntimeError):
    """The output folder cannot be used; the message says what to do."""


LOCK_FILE = ".lock"
RESUMES_FILE = "resumes.json"

# Locks this process holds, by run folder: a run that ended with an exception in this process (a test,
# a notebook) must not lock its own resume out.
_HELD_LOCKS: dict[str, Any] = {}


def _forget_inherited_locks() -> None:
    """In a process forked from a run (a DataLoader worker, say): close its copies of the run's lock files.

    An flock belongs to the open file shared by every copy of the descriptor, so a forked child that kept
    its copy would hold the folder after the run itself was killed, until the child noticed and exited.
    Closing the copy (never unlocking it) leaves the lock with the run's own process.
    """
    for handle in _HELD_LOCKS.values():
        handle.close()
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_forget_inherited_locks)


def lock_run_dir(run_dir: Path) -> None:
    """Own `run_dir` until `unlock_run_dir` or the process exits: a second run on the same folder is refused.

    An `fcntl.flock` on RUN/.lock: the kernel drops it when its process dies, however it dies, so a
    killed run never holds the folder. Only the main process of a multi-process launch (RANK 0) locks.
    """
    import fcntl

    key = str(run_dir.resolve())
    if key in _HELD_LOCKS or int(os.environ.get("RANK", "0")) != 0:
        return
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(f"{run_dir} is in use by a run that is still going ({owner}). Wait for it to "
                             f"finish, stop it, or choose another --out folder.") from None
    _HELD_LOCKS[key] = handle


def _record_lock_owner(run_dir: Path) -> None:
    """Write who holds the lock into it, for the message a second run gets (only once the run is accepted,
    so a refused command leaves the folder as it found it)."""
    handle = _HELD_LOCKS.get(str(run_dir.resolve()))
    if handle is not None:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()


def unlock_run_dir(run_dir: Path) -> None:
    """Give up the lock `lock_run_dir` took (closing the file releases the flock)."""
    handle = _HELD_LOCKS.pop(str(Path(run_dir).resolve()), None)
    if handle is not None:
        handle.close()


def config_changes(old: dict, new: dict, prefix: str = "", defaults: Optional[dict] = None) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every value that differs between two nested config dicts. A key the old
    config does not have (a setting added since it was saved) is no change when the new value is its
    default in `defaults`."""
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        default = (defaults or {}).get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, f"{prefix}{key}.", default if isinstance(default, dict) else None))
        elif key not in old and defaults is not None and key in defaults and b == default:
            continue
        elif a != b:
            changes[f"{prefix}{key}"] = (a, b)
    return changes


def check_resume_changes(run_dir: Path, config: Any) -> dict[str, tuple[Any, Any]]:
    """What the resumed run changes against the run's saved config.yaml; refuses what may not change
    (every key not marked RESUMABLE on its config field, ldm_core/config/settings.py).

    Returns the accepted changes (recorded by the caller in RUN/resumes.json).
    """
    import dataclasses

    import yaml

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return {}
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise RunFolderError(f"{saved} cannot be read ({err}); it records how the run was started. Restore it "
                             f"or start a new run in another --out folder.") from None
    # Compared as save_config writes it, so both sides went through the same YAML round trip.
    def as_saved(value):
        return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(value), sort_keys=False))

    changes = config_changes(old, as_saved(config), defaults=as_saved(type(config)()))
    resumable = resumable_keys(type(config))
    refused = {k: v for k, v in changes.items() if not k.startswith(resumable)}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        allowed = ", ".join(k + "*" if k.endswith(".") else k for k in resumable)
        raise RunFolderError(f"--resume would change what defines the run in {run_dir}: {listed}. Resume with the "
                             f"values in {saved}, or start a new run in another --out folder. On resume only "
                             f"these may change: {allowed}.")
    return changes


def prepare_run_dir(out: str | Path, config: Any, resume: Optional[str]) -> tuple[Path, Optional[Path], dict]:
    """Create and lock the run folder, refuse to overwrite a finished or running one, check the checkpoint
    to resume and what the resumed run changes (before anything is written, see `check_resumable` and
    `check_resume_changes`), save the resolved config.

    Returns the run folder, the checkpoint to resume from (None for a fresh run) and the accepted config
    changes of a resume. `config` is a stage config with `model_fingerprint()`.
    """
    from ldm_core.training.checkpoints import check_resumable

    run_dir = Path(out)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # one per process: ranks probe the same folder at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"Cannot write to the output folder {run_dir}: {err.strerror}. "
                             f"Choose another --out folder or fix its permissions.") from None
    lock_run_dir(run_dir)
    try:
        has_checkpoints = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*"))
        if has_checkpoints and not resume:
            raise RunFolderError(f"{run_dir} already holds checkpoints of an earlier run. Continue it with "
                                 f"--resume latest, or choose a new --out folder.")
        checkpoint = check_resumable(run_dir, resume, config.model_fingerprint())
        changes = check_resume_changes(run_dir, config) if checkpoint is not None else {}
    except BaseException:
        unlock_run_dir(run_dir)
        raise
    _record_lock_owner(run_dir)
    save_config(config, run_dir / "config.yaml")
    return run_dir, checkpoint, changes


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
    """Write `data` as indented JSON (str() of what JSON cannot hold), replacing `path` atomically: a
    reader of metrics.json or run_info.json sees the previous version or the new one, never half of one."""
    write_atomic(path, json.dumps(data, indent=2, default=str))

