"""Faults of a training run a hostile user finds, one test per class (not per case).

- Bad values: every training command checks the whole resolved config before any work, and answers a
  bad value with one line naming the key or file, no traceback, and no run folder.
- Two runs cannot share a folder (a lock that a dead process does not hold).
- Resume applies what may change (learning rate, steps) and records it, and refuses what may not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ldm_core.config.settings import ConfigError
from ldm_core.training.checkpoints import list_checkpoints, load_checkpoint
from workflows.cli import DEBUG_ENV, main

from test_signals_nan import STAGE_A, STAGE_B


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, argv):
    """(exit code, stderr) of `ldm argv`."""
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


# (command, extra arguments, expected part of the one-line message). The stage B commands name a
# --vae that does not exist: the config is checked before the VAE is looked at.
BAD_VALUES = [
    ("train-vae", ["train.log_every=0"], "train.log_every=0"),
    ("train-vae", ["train.validate_every=0"], "train.validate_every=0"),
    ("train-vae", ["train.seed=-1"], "train.seed=-1"),
    ("train-vae", ["train.adam_beta1=1.5"], "train.adam_beta1=1.5"),
    ("train-vae", ["train.disc_adam_beta2=1.0"], "train.disc_adam_beta2=1.0"),
    ("train-vae", ["model.preset=kl-f8-huge"], "model.preset='kl-f8-huge'"),
    ("train-vae", ["loss.disc_channels=0"], "loss.disc_channels=0"),
    ("train-vae", ["data.resolution=0"], "data.resolution=0"),
    ("train-vae", ["train.mixed_precision=fp16"], "fp16 needs a CUDA GPU"),
    ("train-vae", ["train.max_steps=[1"], "override 'train.max_steps=[1'"),
    ("train-vae", ["trian.max_steps=2"], "Unknown config key 'trian'"),
    ("train-unet", ["sampling.sample_every=0"], "sampling.sample_every=0"),
    ("train-unet", ["sampling.scheduler=fastest"], "sampling.scheduler='fastest'"),
    ("train-unet", ["sampling.num_inference_steps=5000"], "sampling.num_inference_steps=5000"),
    ("train-unet", ["model.preset=unet-xl"], "model.preset='unet-xl'"),
    ("train-unet", ["diffusion.num_train_timesteps=0"], "diffusion.num_train_timesteps=0"),
    ("train", ["stage_b.data.resolution=32"], "stage_b.data.resolution=32"),
    ("train", ["evaluation.num_images=0"], "evaluation.num_images=0"),
    ("train", ["evaluation.recon_images=1"], "evaluation.recon_images=1"),
    ("train", ["stage_b.train.mixed_precision=fp16"], "stage_b.train.mixed_precision=fp16"),
]


@pytest.mark.parametrize("command,extra,expected", BAD_VALUES, ids=[f"{c}:{e[0]}" for c, e, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_it_before_any_work(tmp_path, capsys, command, extra, expected):
    out = tmp_path / "run"
    vae = ["--vae", tmp_path / "no-vae"] if command == "train-unet" else []
    rc, err = run_cli(capsys, [command, *vae, "--data", "builtin:shapes", "--out", out, *extra])
    assert rc == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("content,expected", [
    (b"train:\n  max_steps: [1, 2\n", "not valid YAML at line"),
    (b"\x00\x9f\x92\x96binary\xff\xfe", "not valid YAML"),
    (b"- a list\n- not a mapping\n", "must hold a mapping"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path, capsys, content, expected):
    config = tmp_path / "broken.yaml"
    config.write_bytes(content)
    rc, err = run_cli(capsys, ["train-vae", "--config", config, "--data", "builtin:shapes", "--out", tmp_path / "r"])
    assert rc == 2 and expected in err and str(config) in err and "Traceback" not in err, err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    # With --debug (or its environment variable) the error leaves `main`, so Python prints its traceback.
    argv = ["train-vae", "--data", "builtin:shapes", "--out", str(tmp_path / "r"), "train.log_every=0"]
    with pytest.raises(ConfigError, match="train.log_every=0"):
        main(["--debug", *argv])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="train.log_every=0"):
        main(argv)
    assert not (tmp_path / "r").exists()


def _train_vae(capsys, out, *extra, resume=False):
    return run_cli(capsys, ["train-vae", "--data", "builtin:shapes", "--out", out, *STAGE_A, "train.max_steps=4",
                            "train.checkpoint_every=2", "train.lr_schedule=constant", *extra,
                            *(["--resume", "latest"] if resume else [])])


def test_two_runs_cannot_share_a_folder_and_a_dead_owner_does_not_hold_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # Another process holds the folder, as a run in progress does (its lock is the same flock).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from ldm_core.training.run_folder import _record_lock_owner, lock_run_dir; "
        f"out = Path({str(out)!r}); lock_run_dir(out); _record_lock_owner(out); print('locked', flush=True); "
        "time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
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
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, time; from pathlib import Path; from ldm_core.training.run_folder import lock_run_dir; "
        f"lock_run_dir(Path({str(out)!r})); child = os.fork(); "
        "time.sleep(120) if child == 0 else (print(child, flush=True), time.sleep(120))")],
        stdout=subprocess.PIPE, text=True)
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
    rc, err = run_cli(capsys, ["train-vae", "--data", folder, "--out", out, *STAGE_A, "train.max_steps=4",
                               "train.checkpoint_every=2", "train.lr_schedule=constant", "--resume", "latest"])
    assert rc == 2 and "started with another --data" in err and "builtin:shapes" in err, err


def test_stage_b_refuses_bad_sampling_values_before_encoding(tmp_path, capsys):
    # The sampling section used to be read only when the first grid was drawn, after training.
    rc, err = run_cli(capsys, ["train-unet", "--vae", tmp_path / "no-vae", "--data", "builtin:shapes",
                               "--out", tmp_path / "run", *STAGE_B, "sampling.grid_images=0"])
    assert rc == 2 and "sampling.grid_images=0" in err
