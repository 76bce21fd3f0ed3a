"""Crash-safe training checkpoints.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding model weights as safetensors, the rest of
the training state (optimizers, LR schedulers, EMA, grad scaler) in `training_state.pt`, read back with
`torch.load(weights_only=True)`, and `meta.json`, written last, which also records the size of every
other file. It is written under a temporary name, flushed to disk and renamed into place; the `latest`
pointer is replaced last. A kill at any instant therefore leaves the previous checkpoint loadable, and a
half-written folder is never picked by `--resume latest`.

What a kill cannot do, a disk can: a file cut short by a copy, a full disk or a failing drive. So a
checkpoint is checked before a run touches its folder (`check_resumable`): meta.json parses, every file it
lists exists with the size it was written with, the safetensors headers and the torch archive's zip
directory parse. `--resume latest` then falls back to the newest earlier checkpoint that passes, saying
which one was damaged and which one it used; an explicit damaged folder is refused with the previous good
one to use instead. A checkpoint larger than the free space is refused before it is written, and a disk
that fills up while it is written is reported as full; either way the previous checkpoint is intact.

No random-number-generator state is stored: the trainers derive every random draw from (seed, step,
rank), and the data order from (seed, epoch), so the step counter alone restores them exactly.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm_core.atomic_files import fsync_file, fsync_folder, leftover_temporaries, write_atomic

LATEST = "latest"
STATE_FILE = "training_state.pt"
META_FILE = "meta.json"
_STEP_NAME = re.compile(r"step-(\d+)")

logger = logging.getLogger("ldm.train")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written; the message says why and what to do."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    models: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    meta: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _step_of(name: str) -> Optional[int]:
    """The step a `step-N` folder name stands for (None for any other name). Parsed, not compared as
    text: step-10000000 comes after step-9999999 although it sorts before it."""
    match = _STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------- writing


def save_checkpoint(checkpoint_root: str | Path, step: int, models: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically, move `latest` to it, then apply retention (`_apply_retention`).

    Parameters:
        checkpoint_root: the run's `checkpoints/` folder.
        step: the optimizer step the state belongs to.
        models: name -> state dict of tensors, stored as `<name>.safetensors`.
        state: anything `torch.load(weights_only=True)` can read (tensors, numbers, strings, lists, dicts).
        meta: JSON-serialisable facts (config fingerprint, time), checked when resuming.
        keep: how many checkpoints to retain, the one written now included (at least that one is kept).

    A checkpoint that does not fit in the free space is refused before anything is written. A write that
    fails for the file system's reasons (a full disk, no permission) removes its temporary folder and
    raises CheckpointError saying what happened and which previous checkpoint is intact: nothing that
    existed before the call has been touched at that point.
    """
    root = Path(checkpoint_root)
    name = step_dir_name(step)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    previous = _latest_name(root)[0]
    if previous is None or not (root / previous).is_dir():
        previous = next((p.name for p in reversed(list_checkpoints(root))), None)
    need = _bytes_needed(models, state)
    free = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        free = shutil.disk_usage(root).free
        if free < need:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root))
        tmp.mkdir()
        for model_name, tensors in models.items():
            # safetensors refuses shared or non-contiguous storage; clone to plain tensors.
            plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
            save_file(plain, str(tmp / f"{model_name}.safetensors"))
        torch.save(state, tmp / STATE_FILE)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}  # checked by `_problems`
        with open(tmp / META_FILE, "w") as fh:
            json.dump({**meta, "step": step, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files},
                      fh, indent=2)
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_folder(tmp)
    except Exception as err:
        # torch.save and safetensors report a full disk without an errno, so the disk is measured instead:
        # the space that was there for this checkpoint has gone.
        full = _no_space(err) or (free is not None and _bytes_left(root) < need)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (full or isinstance(err, OSError)):  # a bug, not the file system's doing: as it was raised
            raise
        raise _write_failure(err, root, f"checkpoint {name}", previous, full, need, free) from err
    except BaseException:  # an interrupt: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_folder(root)
    try:
        _write_latest(root, final.name)
    except OSError as err:  # the checkpoint is complete; only the pointer to it could not be replaced
        raise _write_failure(err, root, f"the `{LATEST}` pointer to checkpoint {name}", previous, _no_space(err),
                             then=f"continue from {name}, which was written completely, with --resume {final}") from err
    _apply_retention(root, keep, current=final.name)
    return final


def _write_latest(root: Path, name: str) -> None:
    write_atomic(root / LATEST, name + "\n", fsync=True, sync_folder=True)


def _bytes_needed(models: dict[str, dict[str, torch.Tensor]], state: Any) -> int:
    """About how many bytes a checkpoint of these takes: the tensors' own bytes for the safetensors files
    (each is written as a plain copy), and for `training_state.pt` the whole storage of every distinct
    tensor, since `torch.save` writes a view's entire storage, once however many tensors share it."""
    total = sum(t.nelement() * t.element_size() for tensors in models.values() for t in tensors.values())
    seen: set[tuple[str, int]] = set()
    pending = [state]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            try:
                storage = item.untyped_storage()
                key = (str(item.device), storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
                total += item.nelement() * item.element_size()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return total


def _bytes_left(root: Path) -> int:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return 0


def _no_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def _format_mb(nbytes: int) -> str:
    mb = nbytes / 1e6
    if mb >= 10:
        return f"{mb:.0f} MB"
    return f"{mb:.1f} MB" if mb >= 1 else f"{mb:.2f} MB"


def _write_failure(err: BaseException, root: Path, what: str, previous: Optional[str], full: bool, need: int = 0,
                   free: Optional[int] = None,
                   then: str = "run the same command again with --resume latest") -> CheckpointError:
    """The one-line message for a write that failed for a reason the user fixes: a full disk (`full`), or
    any other OSError."""
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint existed"
    if full:
        space = f"need about {_format_mb(need)}, {_format_mb(free)} was free; " if need and free is not None else ""
        return CheckpointError(
            f"No space left on {root} while writing {what} ({space}{kept}). Free space there (older runs, or "
            f"checkpoints this run no longer needs), then {then}.")
    reason = f"{getattr(err, 'strerror', None) or err}" + (f" ({err.filename})" if getattr(err, "filename", None) else "")
    return CheckpointError(f"Cannot write {what} in {root}: {reason} ({kept}). Check that the folder can be "
                           f"written and its disk is healthy, then {then}.")


def list_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    """Complete checkpoints (folders `step-N` with a meta.json), oldest first by step (temporary folders
    and any other names are ignored)."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if _step_of(p.name) is not None and p.is_dir() and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: _step_of(p.name))


def _apply_retention(root: Path, keep: int, current: Optional[str] = None) -> None:
    """Keep the `keep` newest checkpoints by step up to `current`, the one just written (by default the
    one `latest` names), which is always kept, as is whatever `latest` names.

    Checkpoints with a higher step than `current` exist when a run was resumed from an older checkpoint
    (an explicit `--resume RUN/checkpoints/step-N`, or `--resume latest` falling back past a damaged one).
    They are the run's abandoned continuation, and they are deleted here, whatever `keep` is: the resumed
    run writes its own checkpoints under those same folder names as it reaches those steps, so keeping them
    would only leave a mix of two histories in which step order no longer means "later in this run", and
    step order is what retention, a lost `latest` pointer and the damaged-checkpoint fallback go by. They
    go only after the new checkpoint is complete and `latest` names it.
    `check_resumable` warns about them before the run starts, so they can be copied away first.
    """
    complete = list_checkpoints(root)
    pointed = _latest_name(root)[0]
    current = current or pointed or (complete[-1].name if complete else None)
    if current is not None:
        top = _step_of(current)
        line = [p for p in complete if _step_of(p.name) <= top]
        doomed = [p for p in complete if _step_of(p.name) > top] + line[:-max(1, keep)]
        for old in doomed:
            if old.name not in (current, pointed):
                shutil.rmtree(old, ignore_errors=True)
    # Left by a run killed mid-write (`.latest.tmp-<pid>` by versions before `write_atomic`).
    for stale in [*root.glob(".step-*.tmp-*"), *root.glob(f".{LATEST}.tmp-*"), *leftover_temporaries(root / LATEST)]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- checking


def _latest_name(root: Path) -> tuple[Optional[str], Optional[str]]:
    """(the checkpoint name `latest` holds, or None; what is wrong with the pointer, or None)."""
    pointer = root / LATEST
    if not pointer.exists():
        return None, None
    try:
        text = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"cannot read {pointer} ({err})"
    if _step_of(text) is None:
        return None, f"{pointer} does not hold a checkpoint name ({text[:60]!r})"
    return text, None


def _problems(path: Path) -> list[str]:
    """What is wrong with checkpoint folder `path`, one entry per file, each naming it (empty when it is
    fine). Cheap: reads meta.json, file sizes, safetensors headers (`safe_open` maps the file and parses
    only the header, which it checks against the file's length) and the zip directory at the end of
    `training_state.pt` (torch.save writes a zip archive); a truncated file fails at least one of these."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return [f"{meta_path} is missing (a folder left by a run killed while writing it, or a damaged copy)"]
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return [f"{meta_path} is not readable JSON ({err})"]
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool):
        return [f"{meta_path} does not hold a checkpoint's facts (no integer \"step\")"]
    problems, flagged = [], set()
    files = meta.get("files")  # absent in checkpoints written before sizes were recorded
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(k, str) and Path(k).name == k and isinstance(v, int) for k, v in files.items())):
        problems.append(f"{meta_path} has a malformed \"files\" entry")
        files = None
    expected = dict(files or {})
    expected.setdefault(STATE_FILE, None)
    for file_name, size in sorted(expected.items()):
        f = path / file_name
        if not f.is_file():
            problems.append(f"{f} is missing")
            flagged.add(f)
            continue
        actual = f.stat().st_size
        if size is not None and actual != size:
            how = "cut short" if actual < size else "replaced"
            problems.append(f"{f} is {actual} bytes but was written as {size} (the file was {how})")
            flagged.add(f)
        elif actual == 0:
            problems.append(f"{f} is empty")
            flagged.add(f)
    listed = {path / n for n in expected if n.endswith(".safetensors")}
    for f in sorted(listed | set(path.glob("*.safetensors"))):
        if f not in flagged:
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as err:  # SafetensorError, OSError
                problems.append(f"{f} is not a readable safetensors file ({_first_line(err)})")
    state = path / STATE_FILE
    if state not in flagged:
        try:
            with zipfile.ZipFile(state) as archive:
                complete = any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist())
            if not complete:
                problems.append(f"{state} is not a torch.save archive (it has no data.pkl)")
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            problems.append(f"{state} is not a complete torch.save archive ({err})")
    return problems


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error, cut at `limit` characters (torch's run on for several sentences)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit].rstrip() + "..."


def _previous_good(root: Path, below: Optional[int]) -> Optional[Path]:
    """The newest checkpoint in `root` with a step below `below` (any step when None) that passes `_problems`."""
    for candidate in reversed(list_checkpoints(root)):
        if (below is None or _step_of(candidate.name) < below) and not _problems(candidate):
            return candidate
    return None


def _instead(root: Path, below: Optional[int]) -> str:
    """The advice that ends a damaged-checkpoint message: the previous good checkpoint, or what to do without one."""
    good = _previous_good(root, below)
    if good is not None:
        return f"Resume from the previous good checkpoint instead: --resume {good}"
    return (f"No earlier checkpoint in {root} is usable: restore the run's checkpoints from a copy, or train "
            f"into a new --out folder.")


def resolve_resume(run_dir: str | Path, spec: Optional[str]) -> Optional[Path]:
    """Turn `--resume latest|PATH` into a checkpoint folder that passes the cheap checks of `_problems`
    (None when there is nothing to resume).

    `latest` with no checkpoint yet starts fresh (so the same command can be re-run after a kill). When the
    checkpoint `latest` names is damaged or missing, each one is reported as a warning and the newest earlier
    checkpoint that passes is used, with a warning naming it; when none passes, CheckpointError lists them.
    An explicit path that does not exist, is not a checkpoint or is damaged is an error naming the file, the
    problem and the previous good checkpoint.
    """
    if not spec:
        return None
    root = Path(run_dir) / "checkpoints"
    if spec == LATEST:
        return _resolve_latest(root)
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"--resume {spec}: no such checkpoint. Use --resume latest, or one of: "
                              f"{', '.join(str(p) for p in list_checkpoints(root)) or '(none in ' + str(root) + ')'}")
    below = _step_of(path.name)
    search = path.parent if list_checkpoints(path.parent) else root  # a copy outside the run: the run's own
    if not path.is_dir() or not (path / META_FILE).is_file():
        raise CheckpointError(f"--resume {spec}: {path} is not a complete checkpoint (no {META_FILE}); it may be "
                              f"a folder left by a killed run. Use --resume latest. {_instead(search, below)}")
    problems = _problems(path)
    if problems:
        raise CheckpointError(f"--resume {spec}: checkpoint {path} is damaged: {'; '.join(problems)}. Nothing was "
                              f"changed. {_instead(search, below)}")
    return path


def _resolve_latest(root: Path) -> Optional[Path]:
    name, pointer_problem = _latest_name(root)
    if pointer_problem:
        logger.warning("--resume latest: %s; using the newest checkpoint by step instead.", pointer_problem)
    complete = list_checkpoints(root)
    if name is None:
        candidates = list(reversed(complete))
    else:
        top = _step_of(name)
        candidates = [root / name] + [p for p in reversed(complete) if _step_of(p.name) < top]
        # Steps above the one `latest` names are left only when `latest` could not be moved (a full disk) or
        # a kill came before retention after a resume from an older checkpoint: the last resort, newest first.
        candidates += [p for p in reversed(complete) if _step_of(p.name) > top]
    if not any(c.is_dir() for c in candidates):
        if name is not None:
            logger.warning("--resume latest: %s names %s, which does not exist, and %s holds no other "
                           "checkpoint; starting from step 0.", root / LATEST, name, root)
        return None  # nothing written yet: start fresh, so the same command can be re-run after a kill
    damaged = []
    for candidate in candidates:
        problems = _problems(candidate) if candidate.is_dir() else [f"{candidate} does not exist"]
        if not problems:
            if damaged:
                logger.warning("--resume latest: resuming from %s instead of the damaged %s.", candidate,
                               ", ".join(c.name for c, _ in damaged))
            return candidate
        logger.warning("--resume latest: checkpoint %s is damaged and cannot be resumed: %s",
                       candidate, "; ".join(problems))
        damaged.append((candidate, problems))
    listing = " ".join(f"{c.name}: {'; '.join(p)}." for c, p in damaged)
    raise CheckpointError(f"--resume latest: no checkpoint in {root} can be resumed. {listing} Nothing was "
                          f"changed. Restore the run's checkpoints from a copy, or train into a new --out folder "
                          f"(or move {root} aside to train this one from step 0).")


def check_resumable(run_dir: str | Path, spec: Optional[str], expected_fingerprint: str) -> Optional[Path]:
    """The checkpoint `--resume spec` names, refused before anything in the run folder is touched when it
    is missing, damaged (see `resolve_resume`: `latest` falls back past damaged ones) or was written by
    another model configuration. Returns None when not resuming.

    Resuming from a checkpoint older than the run's newest logs a warning: the first checkpoint the resumed
    run writes deletes the newer ones (see `_apply_retention`)."""
    checkpoint = resolve_resume(run_dir, spec)
    if checkpoint is None:
        return None
    meta_path = checkpoint / META_FILE
    try:
        found = json.loads(meta_path.read_text()).get("fingerprint")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"--resume {spec}: cannot read {meta_path} ({err}). Resume from "
                              f"another checkpoint or start a new --out folder.") from None
    if found != expected_fingerprint:
        raise CheckpointError(
            f"--resume {spec}: checkpoint {checkpoint} was written with a different model configuration "
            f"(fingerprint {found}; this run's is {expected_fingerprint}). Nothing was changed. Resume with "
            f"the run's own settings (see {Path(run_dir) / 'config.yaml'}) or train into a new --out folder.")
    step = _step_of(checkpoint.name)
    if step is not None:
        root = Path(run_dir) / "checkpoints"  # where this run writes, and so where retention deletes
        newer = [p.name for p in list_checkpoints(root) if _step_of(p.name) > step]
        if newer:
            logger.warning("Resuming from %s although newer checkpoints exist (%s): the first checkpoint this "
                           "run writes deletes them, since the resumed run replaces those steps. Copy them out of "
                           "%s first to keep them.", checkpoint.name, ", ".join(newer), root)
    return checkpoint


# ---------------------------------------------------------------------------------------------- loading


def load_checkpoint(path: str | Path, expected_fingerprint: Optional[str] = None) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`.

    `expected_fingerprint` is the fingerprint of the current run's model-defining config; a checkpoint
    from a different configuration is refused with both values in the message. A file that cannot be read
    (missing, cut short, corrupt, or holding objects `weights_only=True` refuses) raises CheckpointError
    naming the file, what is wrong and the previous good checkpoint.
    """
    path = Path(path)
    meta_path = path / META_FILE

    def damaged(file: Path, what: str) -> CheckpointError:
        return CheckpointError(f"Checkpoint {path} cannot be loaded: {file} {what}. "
                               f"{_instead(path.parent, _step_of(path.name))}")

    try:
        meta = json.loads(meta_path.read_text())
        step = meta["step"]
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"its step is {step!r}, not a whole number")
    except FileNotFoundError:
        raise damaged(meta_path, "is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise damaged(meta_path, f"is not a checkpoint's meta.json ({_first_line(err)})") from None
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise CheckpointError(
            f"Checkpoint {path} was written by a run with a different model configuration "
            f"(its fingerprint {meta.get('fingerprint')}, this run's {expected_fingerprint}; see "
            f"{path / META_FILE} and the run's config.yaml). Resume with the same config, or start a new --out folder.")
    listed = meta.get("files") if isinstance(meta.get("files"), dict) else {}
    named = [n for n in listed if isinstance(n, str) and Path(n).name == n and n.endswith(".safetensors")]
    weights = sorted({*path.glob("*.safetensors"), *(path / n for n in named)})
    models = {}
    for f in weights:
        if not f.is_file():
            raise damaged(f, "is missing")
        try:
            models[f.stem] = load_file(str(f))
        except Exception as err:  # SafetensorError, OSError
            raise damaged(f, f"cannot be read ({_first_line(err)}{_size_note(f, listed)})") from None
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise damaged(state_path, "is missing")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused what it found: damaged, or not ours
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line),
                      _first_line(err))[:300]
        raise damaged(state_path, f"cannot be read with torch.load(weights_only=True) ({detail}): it is damaged, "
                                  f"or was not written by this toolkit") from None
    except Exception as err:  # truncated archives: RuntimeError (PytorchStreamReader), EOFError, OSError
        raise damaged(state_path, f"cannot be read ({_first_line(err)}{_size_note(state_path, listed)})") from None
    return Checkpoint(path=path, step=step, models=models, state=state, meta=meta)


def _size_note(f: Path, listed: dict) -> str:
    """'; it is N bytes, written as M' when meta.json recorded a different size, else ''."""
    try:
        actual = f.stat().st_size
    except OSError:
        return ""
    size = listed.get(f.name)
    return f"; it is {actual} bytes, written as {size}" if isinstance(size, int) and size != actual else ""
