"""SIGKILL at random moments, then `--resume latest`: both stages end bit-identical to an uninterrupted run.

Each training segment runs in a child process (forked from the test process, so it needs no fresh
imports) that is killed with a real SIGKILL at a moment drawn from a fixed seed: some time after its
newest checkpoint appeared, so kills land in steps, in checkpoint writes and in start-up. After every
kill the newest checkpoint must load; a last segment finishes the run.
"""

import os
import signal
import time
import traceback

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from ldm_core.training.checkpoints import LATEST, list_checkpoints, load_checkpoint, resolve_resume
from ldm_core.config.settings import load_config
from stage_a_vae.config import StageAConfig
from stage_a_vae.train import train_vae
from stage_b_diffusion.config import StageBConfig
from workflows.train_unet import train_unet

from tiny_runs import SMOKE_A, SMOKE_B, STAGE_A as TINY_A, STAGE_B as TINY_B, save_tiny_vae

KILLS = 5
# The tiny runs with a discriminator from step 4 (Stage A), two micro-steps a step (Stage B), a cosine
# schedule, EMA, and a checkpoint after every step, two kept.
STAGE_A = TINY_A + ["loss.disc_start=4", "train.lr_schedule=cosine", "ema.enabled=true", "train.max_steps=30",
                    "train.checkpoint_every=1", "train.keep_checkpoints=2"]
STAGE_B = TINY_B + ["train.lr_schedule=cosine", "ema.enabled=true", "train.gradient_accumulation_steps=2",
                    "train.max_steps=40", "train.checkpoint_every=1", "train.keep_checkpoints=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _latest_step(run):
    pointer = run / "checkpoints" / LATEST
    try:
        return int(pointer.read_text().strip().split("-")[1])
    except (OSError, ValueError, IndexError):
        return -1


def _segment(train):
    """Run `train()` in a forked child; returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: train, then leave without running the parent's pytest machinery
        code = 0
        try:
            train()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def _kill_and_resume(run, train, seed):
    """Kill `KILLS` segments with SIGKILL at random moments, check the checkpoint each time, then finish."""
    rng = np.random.default_rng(seed)
    events = []
    for _ in range(KILLS):
        before = _latest_step(run)
        pid = _segment(train)
        deadline = time.monotonic() + 120
        while _latest_step(run) <= before and time.monotonic() < deadline:  # progress first
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                raise AssertionError(f"segment ended before it was killed (step {_latest_step(run)})")
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the run finished too early"
        leftovers = sorted(p.name for p in (run / "checkpoints").glob(".*tmp*"))
        ckpt = load_checkpoint(resolve_resume(run, "latest"))  # never a half-written one
        assert all(torch.isfinite(t).all() for m in ckpt.models.values() for t in m.values())
        events.append((ckpt.step, leftovers))
    pid = _segment(train)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the final resumed segment failed"
    return events


def _assert_same_final_state(run_a, run_b):
    a = load_checkpoint(list_checkpoints(run_a / "checkpoints")[-1])
    b = load_checkpoint(list_checkpoints(run_b / "checkpoints")[-1])
    assert a.step == b.step
    for name in a.models:
        assert a.models[name].keys() == b.models[name].keys()
        assert all(torch.equal(a.models[name][k], b.models[name][k]) for k in a.models[name]), name
    flat = lambda obj: torch.cat([t.flatten().double() for t in _tensors(obj)])  # noqa: E731
    assert torch.equal(flat(a.state), flat(b.state))  # optimizers, EMA
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_time"} for r in rows]  # noqa: E731
    assert strip(a.state["history"]) == strip(b.state["history"])  # every logged loss, step by step


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


@pytest.mark.parametrize("loader", [
    [],  # the shapes held in memory
    # streamed through two DataLoader workers with a fresh random crop at every draw
    ["data.loader=stream", "data.crop=random_resized", "data.num_workers=2"],
], ids=["memory", "stream"])
def test_stage_a_killed_five_times_ends_identical(tmp_path, loader):
    cfg = load_config(StageAConfig, SMOKE_A, STAGE_A + loader)
    train_vae(cfg, "builtin:shapes", tmp_path / "full")
    run = tmp_path / "killed"
    events = _kill_and_resume(run, lambda: train_vae(cfg, "builtin:shapes", run, resume="latest"), seed=11)
    assert len(events) == KILLS and events[-1][0] < cfg.train.max_steps
    _assert_same_final_state(tmp_path / "full", run)
    full_vae = AutoencoderKL.from_pretrained(tmp_path / "full" / "vae").state_dict()
    killed_vae = AutoencoderKL.from_pretrained(run / "vae").state_dict()
    assert all(torch.equal(full_vae[k], killed_vae[k]) for k in full_vae)  # exported EMA weights too


def test_stage_b_killed_five_times_ends_identical(tmp_path):
    vae_dir = save_tiny_vae(tmp_path / "vae")
    cfg = load_config(StageBConfig, SMOKE_B, STAGE_B + [f"data.latent_cache_dir={tmp_path / 'cache'}"])
    train_unet(cfg, vae_dir, "builtin:shapes", tmp_path / "full")  # also builds the latent cache
    run = tmp_path / "killed"
    events = _kill_and_resume(run, lambda: train_unet(cfg, vae_dir, "builtin:shapes", run, resume="latest"),
                              seed=12)
    assert len(events) == KILLS and events[-1][0] < cfg.train.max_steps
    _assert_same_final_state(tmp_path / "full", run)
