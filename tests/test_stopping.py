"""How a training run stops (ldm_core/training/stopping.py), through both stages' trainers: SIGINT/SIGTERM
end the step in flight, write a checkpoint and say how to resume (a second SIGINT aborts at once); a NaN/inf
loss stops the run naming the step and its terms, or skips exactly that update (train.nonfinite_loss=skip)
up to a limit."""

import json
import os
import signal
import time

import pytest
import torch

from ldm_core.training.checkpoints import list_checkpoints, load_checkpoint, resolve_resume
from ldm_core.config.settings import load_config
from ldm_core.training.stopping import GracefulStop, NonFiniteLossPolicy, TrainingInterrupted, all_finite
from stage_a_vae.config import StageAConfig
from stage_a_vae.losses import LPIPSWithDiscriminatorLoss
from stage_a_vae.train import train_vae
from stage_b_diffusion.config import StageBConfig
from workflows.train_unet import train_unet

from tiny_runs import SMOKE_A, SMOKE_B, STAGE_A, STAGE_B, save_tiny_vae


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def _a(*extra):
    return load_config(StageAConfig, SMOKE_A, STAGE_A + list(extra))


def _b(cache, *extra):
    return load_config(StageBConfig, SMOKE_B, STAGE_B + [f"data.latent_cache_dir={cache}", *extra])


def _signal_at_micro_step(monkeypatch, module, micro_step, signum):
    """Send `signum` to this process while micro-step `micro_step` is being computed (before its forward)."""
    original = module.step_generator

    def step_generator(seed, step, rank, *args, **kwargs):
        if step == micro_step:
            os.kill(os.getpid(), signum)
        return original(seed, step, rank, *args, **kwargs)

    monkeypatch.setattr(module, "step_generator", step_generator)


def _tensors(checkpoint_dir, name):
    return load_checkpoint(checkpoint_dir).models[name]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_finishes_the_step_checkpoints_and_resumes_identically(tmp_path, monkeypatch):
    import ldm_core.training.run as module  # both stages draw every micro-step's generator through it

    full = train_vae(_a("train.max_steps=6"), "builtin:shapes", tmp_path / "full")
    handler_before = signal.getsignal(signal.SIGTERM)
    _signal_at_micro_step(monkeypatch, module, 2, signal.SIGTERM)  # during step index 2, the third step
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM after step 3 of 6.*--resume latest"):
        train_vae(_a("train.max_steps=6"), "builtin:shapes", tmp_path / "part")
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the run's handler is gone again
    ckpt = resolve_resume(tmp_path / "part", "latest")
    assert ckpt.name == "step-0000003" and load_checkpoint(ckpt).step == 3
    assert not (tmp_path / "part" / "vae").exists()  # no export from a stopped run
    monkeypatch.undo()
    train_vae(_a("train.max_steps=6"), "builtin:shapes", tmp_path / "part", resume="latest")
    last = lambda run: list_checkpoints(run / "checkpoints")[-1]  # noqa: E731
    assert _same(_tensors(last(full), "vae"), _tensors(last(tmp_path / "part"), "vae"))
    assert _same(_tensors(last(full), "discriminator"), _tensors(last(tmp_path / "part"), "discriminator"))


def test_sigint_stops_stage_b_after_the_step(tmp_path, monkeypatch, vae_dir):
    import ldm_core.training.run as module

    _signal_at_micro_step(monkeypatch, module, 1, signal.SIGINT)
    # What was there before the run (Python's default, or SIG_IGN when the suite runs in the background).
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"SIGINT after step 2 of 5"):
        train_unet(_b(tmp_path / "cache", "train.max_steps=5"), vae_dir, "builtin:shapes", tmp_path / "run")
    assert resolve_resume(tmp_path / "run", "latest").name == "step-0000002"
    assert signal.getsignal(signal.SIGINT) is handler_before  # the run's handler is gone again


def test_second_sigint_aborts_at_once():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.describe() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; it must not get here
            raise AssertionError("the second SIGINT did not abort")


def _nan_autoencoder_loss(monkeypatch, at_steps):
    original = LPIPSWithDiscriminatorLoss.autoencoder_loss

    def autoencoder_loss(self, inputs, reconstructions, posterior, global_step, **kwargs):
        loss, logs = original(self, inputs, reconstructions, posterior, global_step, **kwargs)
        if global_step in at_steps:
            logs = {**logs, "rec": torch.tensor(float("nan"))}
            loss = loss + logs["rec"]
        return loss, logs

    monkeypatch.setattr(LPIPSWithDiscriminatorLoss, "autoencoder_loss", autoencoder_loss)


def test_nan_stops_the_run_naming_step_and_terms_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _nan_autoencoder_loss(monkeypatch, {3})
    with pytest.raises(FloatingPointError, match=r"step 3: loss=nan, .*rec=nan, .*kl=.*--resume latest"):
        train_vae(_a("train.max_steps=6", "train.checkpoint_every=2"), "builtin:shapes", run)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-0000002"]
    ckpt = load_checkpoint(resolve_resume(run, "latest"))
    assert ckpt.step == 2 and all(torch.isfinite(v).all() for v in ckpt.models["vae"].values())
    monkeypatch.undo()  # the fault is gone: the same command with --resume latest finishes
    train_vae(_a("train.max_steps=6", "train.checkpoint_every=2"), "builtin:shapes", run, resume="latest")
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6


def test_nan_in_the_discriminator_loss_is_caught(tmp_path, monkeypatch):
    original = LPIPSWithDiscriminatorLoss.discriminator_loss

    def discriminator_loss(self, *args, **kwargs):
        d_loss, logs = original(self, *args, **kwargs)
        return d_loss * float("inf"), logs

    monkeypatch.setattr(LPIPSWithDiscriminatorLoss, "discriminator_loss", discriminator_loss)
    with pytest.raises(FloatingPointError, match=r"step 2: d_loss=inf"):
        train_vae(_a("train.max_steps=4"), "builtin:shapes", tmp_path / "run")


def _nan_diffusion_loss(monkeypatch, at_steps):
    import stage_b_diffusion.train as module

    original, calls = module.diffusion_loss, {"n": 0}

    def diffusion_loss(*args, **kwargs):
        loss, logs = original(*args, **kwargs)
        step, calls["n"] = calls["n"], calls["n"] + 1  # one call per step (no accumulation here)
        return (loss * float("nan"), logs) if step in at_steps else (loss, logs)

    monkeypatch.setattr(module, "diffusion_loss", diffusion_loss)


@pytest.mark.loss_curves  # a skipped step logs a NaN loss, which the curves leave out
def test_skip_drops_exactly_the_bad_update(tmp_path, monkeypatch, vae_dir):
    run = tmp_path / "run"
    _nan_diffusion_loss(monkeypatch, {2})
    train_unet(_b(tmp_path / "cache", "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=10",
                  "train.nonfinite_loss=skip"), vae_dir, "builtin:shapes", run)
    ckpts = {c.name: load_checkpoint(c) for c in list_checkpoints(run / "checkpoints")}
    before, after, next_one = ckpts["step-0000002"], ckpts["step-0000003"], ckpts["step-0000004"]
    assert _same(before.models["unet"], after.models["unet"])  # step index 2 changed nothing
    assert not _same(after.models["unet"], next_one.models["unet"])  # training went on
    steps = lambda c: [s["step"] for s in c.state["optimizer"]["state"].values()]  # noqa: E731
    assert steps(before) == steps(after)  # Adam's moments and counts untouched too
    assert after.state["nonfinite_skips"] == 1
    rows = json.loads((run / "metrics.json").read_text())["history"]
    assert [r.get("nonfinite_skips") for r in rows if "loss" in r] == [None, None, 1, None]


def test_skip_limit_then_stops(tmp_path, monkeypatch, vae_dir):
    _nan_diffusion_loss(monkeypatch, set(range(1, 100)))
    with pytest.raises(FloatingPointError, match=r"step 3: .*2 steps were already skipped"):
        train_unet(_b(tmp_path / "cache", "train.max_steps=6", "train.nonfinite_loss=skip",
                      "train.max_nonfinite_skips=2"), vae_dir, "builtin:shapes", tmp_path / "run")


def test_finiteness_is_checked_on_numbers_and_tensors_and_the_policy_counts_then_stops():
    assert all_finite({"loss": torch.tensor(1.0), "grad_norm": 3.0})
    assert not all_finite({"loss": torch.tensor(1.0), "grad_norm": float("inf")})
    assert not all_finite({"terms": torch.tensor([1.0, float("nan")])})
    policy = NonFiniteLossPolicy("skip", max_skips=1)
    policy.skip_or_stop({"loss": torch.tensor(1.0), "grad_norm": float("inf")}, step=1)
    assert policy.skipped == 1
    with pytest.raises(FloatingPointError, match="step 2: loss=nan.*1 steps were already skipped"):
        policy.skip_or_stop({"loss": torch.tensor(float("nan"))}, step=2)
    with pytest.raises(FloatingPointError, match="step 0: loss=inf.*train.nonfinite_loss=skip"):
        NonFiniteLossPolicy("stop", max_skips=5).skip_or_stop({"loss": torch.tensor(float("inf"))}, step=0)
    with pytest.raises(ValueError, match="stop or skip"):
        NonFiniteLossPolicy("ignore", 1)


def test_cli_reports_the_stop_and_how_to_resume(tmp_path, monkeypatch, capsys):
    import ldm_core.training.run as module

    from workflows.cli import main

    _signal_at_micro_step(monkeypatch, module, 1, signal.SIGINT)
    rc = main(["train-vae", "--data", "builtin:shapes", "--out", str(tmp_path / "run"), "--config", SMOKE_A,
               *STAGE_A, "train.max_steps=50"])
    err = capsys.readouterr().err
    assert rc == 130 and "--resume latest" in err and "Traceback" not in err
    assert resolve_resume(tmp_path / "run", "latest").name == "step-0000002"
