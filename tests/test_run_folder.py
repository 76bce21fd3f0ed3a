"""The run folder (ldm_core/training/run_folder.py): one run at a time in a folder, and what a resume may change.

- Two runs cannot share a folder: a lock that a dead process, or what it forked, does not hold.
- Resume applies what may change (learning rate, steps) and records it in resumes.json, and refuses what
  may not before writing anything: a key that defines the run (a setting added since the run was saved
  is no change at its default), or other data (recorded with each checkpoint, ldm_core/training/run.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ldm_core.training.checkpoints import list_checkpoints, load_checkpoint

from tiny_runs import SMOKE_A, STAGE_A, run_cli


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_vae(capsys, out, *extra, resume=False):
    return run_cli(capsys, ["train-vae", "--data", "builtin:shapes", "--out", out, "--config", SMOKE_A, *STAGE_A,
                            "train.max_steps=4", "train.checkpoint_every=2", "train.lr_schedule=constant", *extra,
                            *(["--resume", "latest"] if resume else [])])


# ----------------------------------------------------------------------------- the lock


def _process_holding(out, then: str):
    """A Python process that creates and locks the run folder `out`, then runs `then` (with os, time, out)."""
    out.mkdir()
    script = ("import os, time; from pathlib import Path; "
              "from ldm_core.training.run_folder import _record_lock_owner, lock_run_dir; "
              f"out = Path({str(out)!r}); lock_run_dir(out); {then}")
    return out, subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_two_runs_cannot_share_a_folder_and_a_dead_owner_does_not_hold_it(tmp_path, capsys):
    # Another process holds the folder, as a run in progress does (its lock is the same flock).
    out, holder = _process_holding(tmp_path / "run", "_record_lock_owner(out); print('locked', flush=True); "
                                                     "time.sleep(120)")
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = _train_vae(capsys, out)
        assert rc == 2 and "is in use by a run that is still going" in err and f"pid {holder.pid}" in err
        assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    rc, err = _train_vae(capsys, out)  # the killed owner holds nothing
    assert rc == 0, err
    assert (out / "vae" / "config.json").is_file()


def test_a_killed_run_does_not_leave_its_folder_locked_by_what_it_forked(tmp_path):
    """A DataLoader worker is a fork of the run: when the run is killed, the worker may outlive it for a
    while, and it must not keep the folder locked meanwhile."""
    out, holder = _process_holding(tmp_path / "run", "child = os.fork(); "
                                   "time.sleep(120) if child == 0 else (print(child, flush=True), time.sleep(120))")
    worker = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        os.kill(worker, 0)  # the forked worker is still alive
        probe = subprocess.run([sys.executable, "-c", (
            "from pathlib import Path; from ldm_core.training.run_folder import lock_run_dir; "
            f"lock_run_dir(Path({str(out)!r})); print('locked')")], capture_output=True, text=True)
        assert probe.stdout.strip() == "locked", probe.stderr
    finally:
        os.kill(worker, signal.SIGKILL)


# ----------------------------------------------------------------------------- what a resume may change


def test_resume_applies_a_changed_learning_rate_and_steps_and_records_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_vae(capsys, out, "train.max_steps=2")[0] == 0
    rc, err = _train_vae(capsys, out, "train.max_steps=4", "train.lr=3e-5", resume=True)
    assert rc == 0, err
    newest = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert newest.step == 4
    assert newest.state["opt_ae"]["param_groups"][0]["lr"] == pytest.approx(3e-5)
    assert newest.state["sched_ae"]["base_lrs"] == [pytest.approx(3e-5)]
    resumes = json.loads((out / "resumes.json").read_text())
    assert resumes[0]["step"] == 2
    assert resumes[0]["changes"]["train.lr"] == {"from": 1e-4, "to": 3e-5}
    assert resumes[0]["changes"]["train.max_steps"] == {"from": 2, "to": 4}


def test_resume_refuses_a_change_that_defines_the_run_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_vae(capsys, out, "train.max_steps=2")[0] == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    config = (out / "config.yaml").read_text()
    rc, err = _train_vae(capsys, out, "train.max_steps=4", "train.batch_size=4", "data.split_seed=3", resume=True)
    assert rc == 2 and "train.batch_size: 2 -> 4" in err and "data.split_seed: 0 -> 3" in err, err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    assert (out / "config.yaml").read_text() == config


def test_resume_with_other_data_is_refused(tmp_path, capsys, write_image):
    import numpy as np

    out = tmp_path / "run"
    assert _train_vae(capsys, out, "train.max_steps=2")[0] == 0
    folder = tmp_path / "images"
    for i in range(8):
        write_image(folder / f"{i}.png", np.full((16, 16, 3), 20 * i, dtype=np.uint8))
    rc, err = run_cli(capsys, ["train-vae", "--data", folder, "--out", out, "--config", SMOKE_A, *STAGE_A,
                               "train.max_steps=4", "train.checkpoint_every=2", "train.lr_schedule=constant",
                               "--resume", "latest"])
    assert rc == 2 and "started with another --data" in err and "builtin:shapes" in err, err


def test_a_setting_added_since_a_run_was_saved_does_not_block_its_resume_at_its_default(tmp_path):
    """A run saved before data.reexpose existed resumes with it at its default, and not with another value."""
    import yaml

    from ldm_core.config.settings import load_config, save_config
    from ldm_core.training.run_folder import RunFolderError, check_resume_changes
    from stage_a_vae.config import StageAConfig

    config = load_config(StageAConfig, None, [])
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["data"]["reexpose"]  # as an older version wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert check_resume_changes(tmp_path, config) == {}
    with pytest.raises(RunFolderError, match=r"data.reexpose: None -> 0.5"):
        check_resume_changes(tmp_path, load_config(StageAConfig, None, ["data.reexpose=0.5"]))
