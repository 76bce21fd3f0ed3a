"""Checkpoints (ldm_core/training/checkpoints.py): written whole or not at all and read back as written, the
one a resume picks, a checkpoint of another config refused by its fingerprint, retention (keep-N, also after
resuming from an older checkpoint), damaged checkpoints, a full disk.

Tiny tensors built here, no models, so the file runs in seconds. The full-disk test mounts a 1 MiB tmpfs
(root only; skipped with the reason otherwise); the variants without root make the writers fail the way a
full disk makes them fail, and report the free space a full disk has.
"""

import errno
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ldm_core.training import checkpoints as ckpt
from ldm_core.training.checkpoints import (LATEST, CheckpointError, check_resumable, list_checkpoints, load_checkpoint,
                                 resolve_resume, save_checkpoint, step_dir_name)

FP = "fingerprint-1"


def _parts(step, numel=4, state_numel=3):
    models = {"model": {"w": torch.full((numel,), float(step))}, "ema": {"w": torch.full((2,), -float(step))}}
    state = {"opt": {"buf": [torch.full((state_numel,), float(step))]}, "history": [{"step": step, "loss": 1.0}]}
    return models, state


def _save(root, step, keep=2, fp=FP, **sizes):
    models, state = _parts(step, **sizes)
    return save_checkpoint(root, step, models, state, {"fingerprint": fp}, keep=keep)


def _steps(root):
    return [int(p.name.split("-")[1]) for p in list_checkpoints(root)]


def _latest(root):
    """The step `latest` names, after checking that it names a checkpoint that loads."""
    name = (root / LATEST).read_text().strip()
    loaded = load_checkpoint(root / name, FP)
    assert torch.equal(loaded.models["model"]["w"], torch.full((4,), float(loaded.step)))
    return loaded.step


def _hidden(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _warnings(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ----------------------------------------------------------------------------- (a) writing, reading, picking


def test_round_trip_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10)
    _save(root, 20)
    ck = load_checkpoint(resolve_resume(tmp_path, "latest"), expected_fingerprint=FP)
    assert ck.step == 20
    assert torch.equal(ck.models["model"]["w"], torch.full((4,), 20.0))
    assert torch.equal(ck.state["opt"]["buf"][0], torch.ones(3) * 20)


def test_half_written_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 5)
    # A run killed while writing step 6 leaves a temporary folder and possibly a folder without meta.json.
    (root / ".step-0000006.tmp-123").mkdir()
    (root / "step-0000007").mkdir()
    (root / "step-0000007" / "model.safetensors").write_bytes(b"partial")
    assert resolve_resume(tmp_path, "latest").name == "step-0000005"
    (root / "latest").unlink()  # even without the pointer
    assert resolve_resume(tmp_path, "latest").name == "step-0000005"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(root / "step-0000007"))


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path):
    assert resolve_resume(tmp_path, "latest") is None
    assert resolve_resume(tmp_path, None) is None


def test_missing_resume_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))


def test_checkpoint_from_other_config_is_refused(tmp_path):
    path = _save(tmp_path / "checkpoints", 3, fp="one")
    with pytest.raises(CheckpointError, match="different model configuration"):
        load_checkpoint(path, expected_fingerprint="two")
    assert json.loads((path / "meta.json").read_text())["step"] == 3


def test_training_state_is_read_with_weights_only(tmp_path):
    path = _save(tmp_path / "checkpoints", 1)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"payload": Evil()}, path / "training_state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- (b) retention


def test_retention_keeps_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _save(root, step, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-0000003", "step-0000004"]


def test_keep_one_after_resuming_from_an_older_checkpoint(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in range(1, 7):
        _save(root, step, keep=10)
    older = root / step_dir_name(2)
    with caplog.at_level(logging.WARNING, logger="ldm.train"):
        assert check_resumable(tmp_path, str(older), FP) == older
    assert "step-0000006" in _warnings(caplog)  # told before anything is deleted
    assert _steps(root) == [1, 2, 3, 4, 5, 6]  # checking deletes nothing
    for step in (3, 4, 5):  # the resumed run writes its own checkpoints
        _save(root, step, keep=1)
        assert _steps(root) == [step]
        assert _latest(root) == step
    assert resolve_resume(tmp_path, "latest") == root / step_dir_name(5)


@pytest.mark.parametrize("keep", [0, 1, 2, 3, 4])
def test_keep_n_after_resuming_keeps_the_newest_up_to_the_one_just_written(tmp_path, keep):
    root = tmp_path / "checkpoints"
    for step in range(1, 7):
        _save(root, step, keep=10)
    _save(root, 3, keep=keep)  # resumed from step-0000002: 4, 5 and 6 are an abandoned continuation
    assert _steps(root) == list(range(max(1, 4 - max(keep, 1)), 4))
    assert _latest(root) == 3


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_n_keeps_the_n_newest_and_latest_always_exists(tmp_path, keep):
    root = tmp_path / "checkpoints"
    for step in range(1, 8):
        _save(root, step, keep=keep)
        assert _latest(root) == step
        assert _steps(root) == list(range(max(1, step - keep + 1), step + 1))


def test_retention_goes_by_step_not_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 9_999_999, keep=1)
    _save(root, 10_000_000, keep=1)  # "step-10000000" sorts before "step-9999999" as text
    assert _steps(root) == [10_000_000]
    assert _latest(root) == 10_000_000
    (root / LATEST).unlink()
    assert resolve_resume(tmp_path, "latest").name == "step-10000000"


# ----------------------------------------------------------------------------- (c) damaged checkpoints


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step, keep=5)
    return tmp_path


def _cut(path, keep_fraction):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep_fraction)] if keep_fraction < 1 else data[:-1])


def _damage(path, how):
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "half":
        _cut(path, 0.5)
    elif how == "last byte":
        _cut(path, 1)
    elif how == "not json":
        path.write_text("{this is not json")
    elif how == "not an object":
        path.write_text("[1, 2, 3]")


def _assert_falls_back(run, bad_file, caplog):
    root = run / "checkpoints"
    newest = root / "step-0000003"
    with caplog.at_level(logging.WARNING, logger="ldm.train"):
        assert check_resumable(run, "latest", FP) == root / "step-0000002"
    said = _warnings(caplog)
    assert "step-0000003" in said and bad_file in said and "step-0000002" in said, said
    with pytest.raises(CheckpointError) as explicit:
        check_resumable(run, str(newest), FP)
    message = str(explicit.value)
    assert bad_file in message and "--resume " + str(root / "step-0000002") in message, message
    with pytest.raises(CheckpointError, match=re.escape(bad_file)):
        load_checkpoint(newest, FP)
    assert load_checkpoint(root / "step-0000002", FP).step == 2  # the fallback loads


@pytest.mark.parametrize("how", ["half", "last byte", "empty", "missing"])
@pytest.mark.parametrize("bad_file", ["model.safetensors", "ema.safetensors", "training_state.pt"])
def test_damaged_newest_file_falls_back_to_the_previous_checkpoint(run, bad_file, how, caplog):
    _damage(run / "checkpoints" / "step-0000003" / bad_file, how)
    _assert_falls_back(run, bad_file, caplog)


@pytest.mark.parametrize("how", ["not json", "half", "empty", "not an object"])
def test_broken_meta_json_falls_back_to_the_previous_checkpoint(run, how, caplog):
    _damage(run / "checkpoints" / "step-0000003" / "meta.json", how)
    _assert_falls_back(run, "meta.json", caplog)


@pytest.mark.parametrize("bad_file", ["model.safetensors", "training_state.pt"])
def test_truncation_is_found_without_recorded_sizes(run, bad_file, caplog):
    """Checkpoints whose meta.json lists no file sizes are checked by their headers and zip directory."""
    for folder in list_checkpoints(run / "checkpoints"):
        meta = json.loads((folder / "meta.json").read_text())
        del meta["files"]
        (folder / "meta.json").write_text(json.dumps(meta))
    _damage(run / "checkpoints" / "step-0000003" / bad_file, "last byte")
    _assert_falls_back(run, bad_file, caplog)


def test_latest_naming_a_missing_folder_falls_back(run, caplog):
    root = run / "checkpoints"
    (root / LATEST).write_text("step-0000009\n")
    with caplog.at_level(logging.WARNING, logger="ldm.train"):
        assert check_resumable(run, "latest", FP) == root / "step-0000003"
    assert "step-0000009" in _warnings(caplog)


def test_no_checkpoint_that_loads_is_an_error_naming_them(run):
    root = run / "checkpoints"
    _damage(root / "step-0000001" / "training_state.pt", "half")
    _damage(root / "step-0000002" / "model.safetensors", "last byte")
    _damage(root / "step-0000003" / "meta.json", "not json")
    with pytest.raises(CheckpointError) as err:
        check_resumable(run, "latest", FP)
    message = str(err.value)
    for name in ("step-0000001", "step-0000002", "step-0000003", "training_state.pt", "model.safetensors",
                 "meta.json", "new --out folder"):
        assert name in message, message
    with pytest.raises(CheckpointError, match="No earlier checkpoint"):
        check_resumable(run, str(root / "step-0000002"), FP)


def test_corrupt_bytes_that_pass_the_checks_still_load_as_a_checkpoint_error(run):
    state = run / "checkpoints" / "step-0000003" / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[64:120] = bytes(56)  # inside data.pkl: same size, zip directory intact
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="training_state.pt.*step-0000002"):
        load_checkpoint(state.parent, FP)


# ----------------------------------------------------------------------------- (d) a full disk


def _need_mb(message):
    found = re.search(r"need about ([\d.]+) MB", message)
    assert found, message
    return float(found.group(1))


def _bytes_of(models, state):
    return (sum(t.nbytes for m in models.values() for t in m.values())
            + sum(t.nbytes for t in state["opt"]["buf"]))


def _assert_full_disk_handled(root, err, expected_bytes):
    message = str(err)
    assert "No space left" in message and "step-0000002" in message, message
    assert "step-0000001 is intact" in message, message
    assert abs(_need_mb(message) - expected_bytes / 1e6) <= 0.1 * expected_bytes / 1e6 + 0.05, message
    assert "\n" not in message
    assert _steps(root) == [1]
    assert _latest(root) == 1
    assert torch.equal(load_checkpoint(root / "step-0000001", FP).state["opt"]["buf"][0], torch.full((3,), 1.0))
    assert _hidden(root) == [], "a temporary file or folder was left behind"


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted afterwards whatever happens."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {' '.join((done.stderr or done.stdout).split())}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.parametrize("big", ["model", "state"])
def test_full_disk_while_writing_a_checkpoint(small_disk, big):
    root = small_disk / "run" / "checkpoints"
    _save(root, 1, keep=2)
    sizes = {"numel": 300_000} if big == "model" else {"state_numel": 300_000}  # 1.2 MB > 1 MiB
    models, state = _parts(2, **sizes)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(root, 2, models, state, {"fingerprint": FP}, keep=2)
    _assert_full_disk_handled(root, err.value, _bytes_of(models, state))
    _save(root, 2, keep=2)  # nothing left behind eats the space a small one needs
    assert _steps(root) == [1, 2]


def _failing(exc, fill=None):
    """A writer that starts the file, as a filling disk does, then fails (after `fill()`, if given)."""
    def write(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"PK\x03\x04 partial")
        if fill is not None:
            fill()
        raise exc
    return write


NO_SPACE = ["torch.save", "save_file", "json.dump"]


def _patch(monkeypatch, target, exc, fill=None):
    if target == "torch.save":
        monkeypatch.setattr(ckpt.torch, "save", _failing(exc, fill))
    elif target == "save_file":
        monkeypatch.setattr(ckpt, "save_file", _failing(exc, fill))
    else:
        def dump(obj, fh, *args, **kwargs):
            fh.write("{")
            if fill is not None:
                fill()
            raise exc
        monkeypatch.setattr(ckpt.json, "dump", dump)


@pytest.mark.parametrize("target", NO_SPACE)
def test_full_disk_reported_by_the_writers(tmp_path, monkeypatch, target):
    root = tmp_path / "checkpoints"
    _save(root, 1, keep=2)
    models, state = _parts(2, numel=250_000, state_numel=50_000)
    _patch(monkeypatch, target, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(root, 2, models, state, {"fingerprint": FP}, keep=2)
    monkeypatch.undo()
    _assert_full_disk_handled(root, err.value, _bytes_of(models, state))


class _Disk:
    """shutil.disk_usage of a disk with `free` bytes left, which `fill()` uses up."""

    def __init__(self, free):
        self.free = free
        self.real = shutil.disk_usage

    def __call__(self, path):
        return self.real(path)._replace(free=self.free)

    def fill(self):
        self.free = 0


@pytest.mark.parametrize("target", ["torch.save", "save_file"])
def test_disk_filling_up_while_writing_is_a_full_disk_whatever_the_writer_says(tmp_path, monkeypatch, target):
    # torch.save and safetensors say "unexpected pos" or "I/O error", without an errno: the disk is measured.
    root = tmp_path / "checkpoints"
    _save(root, 1, keep=2)
    models, state = _parts(2, numel=250_000, state_numel=50_000)
    disk = _Disk(10**9)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", disk)
    _patch(monkeypatch, target, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
           fill=disk.fill)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(root, 2, models, state, {"fingerprint": FP}, keep=2)
    monkeypatch.undo()
    _assert_full_disk_handled(root, err.value, _bytes_of(models, state))


def test_checkpoint_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 1, keep=2)
    models, state = _parts(2, numel=250_000, state_numel=50_000)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", _Disk(600_000))
    monkeypatch.setattr(ckpt.torch, "save", _failing(AssertionError("nothing may be written")))
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(root, 2, models, state, {"fingerprint": FP}, keep=2)
    monkeypatch.undo()
    _assert_full_disk_handled(root, err.value, _bytes_of(models, state))
    assert "0.60 MB was free" in str(err.value)


def test_other_write_failures_are_one_line_and_clean_up(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 1, keep=2)
    monkeypatch.setattr(ckpt.torch, "save", _failing(OSError(errno.EACCES, "Permission denied", "x")))
    with pytest.raises(CheckpointError, match="Cannot write checkpoint step-0000002.*step-0000001 is intact"):
        _save(root, 2, keep=2)
    monkeypatch.undo()
    assert _steps(root) == [1] and _latest(root) == 1 and _hidden(root) == []
    # With space left, anything but an OSError is not the disk's doing (a bug): raised as it is.
    for exc in (RuntimeError("unexpected pos 576 vs 534"), TypeError("cannot pickle 'generator' object")):
        monkeypatch.setattr(ckpt.torch, "save", _failing(exc))
        with pytest.raises(type(exc)):
            _save(root, 2, keep=2)
        monkeypatch.undo()
        assert _steps(root) == [1] and _latest(root) == 1 and _hidden(root) == []


def test_full_disk_while_moving_latest(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, 1, keep=1)

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_latest", no_space)
    with pytest.raises(CheckpointError, match="No space left.*--resume " + re.escape(str(root / "step-0000002"))):
        _save(root, 2, keep=1)
    monkeypatch.undo()
    assert _latest(root) == 1  # untouched, and retention did not run
    assert _steps(root) == [1, 2] and load_checkpoint(root / "step-0000002", FP).step == 2
