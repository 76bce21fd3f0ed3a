"""`TrainingRun` on its own (ldm_core/training/run.py), driving a toy regression written as the stages write
their loops: steps and micro-steps, logging, periodic work, the non-finite policy, checkpoints and resume,
and a clean stop on a signal."""

import os
import signal
from dataclasses import dataclass, field

import pytest
import torch

from ldm_core.config.settings import TrainConfig, fingerprint
from ldm_core.training.checkpoints import list_checkpoints, load_checkpoint
from ldm_core.training.optimization import drop_gradients, make_lr_scheduler
from ldm_core.training.run import TrainingRun
from ldm_core.training.stopping import TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ToyConfig:
    train: TrainConfig = field(default_factory=TrainConfig)

    def model_fingerprint(self) -> str:
        return fingerprint("toy")


def _config(**train) -> ToyConfig:
    values = dict(batch_size=4, max_steps=6, lr=0.05, lr_warmup_steps=0, log_every=1, checkpoint_every=1000,
                  progress_bar=False)
    values.update(train)
    return ToyConfig(TrainConfig(**values))


def toy_run(cfg: ToyConfig, out, resume=None, *, bad_steps=(), bad_gradient_steps=(), on_micro_step=None,
            periodic_every=2):
    """Fit y = 3x with one weight; returns the run, the weight, what the loop saw (with each step's weight
    before its update, and the final one). bad_steps have a NaN loss; bad_gradient_steps a finite loss and an inf gradient."""
    run = TrainingRun(cfg, cfg.train, out, resume, stage="A")
    tc, acc = cfg.train, run.accelerator
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=tc.lr)
    schedule = make_lr_scheduler(optimizer, tc)
    model, optimizer = acc.prepare(model, optimizer)
    run.track(models={"model": model}, states={"optimizer": optimizer, "schedule": schedule})
    run.resume()
    seen = {"indices": [], "synced": [], "periodic": [], "weights": []}
    for step in run.steps(desc="toy", lr=lambda: schedule.get_last_lr()[0], postfix=lambda s: {},
                          periodic=[(periodic_every, seen["periodic"].append),
                                    (tc.checkpoint_every, lambda step: run.write_checkpoint())]):
        logs, skipped = {}, False
        seen["weights"].append(float(model.weight.detach()))
        for index in run.micro_steps(step, model):
            if skipped:
                continue
            if on_micro_step is not None:
                on_micro_step(index)
            x = torch.randn(tc.batch_size, 1, generator=run.generator(index))
            loss = (model(x) - 3 * x).pow(2).mean()
            if step in bad_steps:
                loss = loss * float("nan")
            logs["loss"] = loss.detach()
            seen["indices"].append(index)
            if run.is_nonfinite({"loss": loss}, step):
                skipped = True
                continue
            hook = model.weight.register_hook(lambda grad: grad * float("inf")) if step in bad_gradient_steps else None
            seen["synced"].append(acc.sync_gradients)
            applied = run.backward_and_step(loss, optimizer, model.parameters(), step)
            if hook is not None:
                hook.remove()
            if not applied:
                skipped = True
                continue
        if skipped:
            drop_gradients(optimizer)
        schedule.step()
        run.log(logs)
    seen["weights"].append(float(model.weight.detach()))
    run.write_checkpoint()
    run.finish(metrics={}, run_info={}, curves=(["loss"], "toy"))
    return run, float(model.weight.detach()), seen


def test_steps_and_micro_steps_follow_the_config_and_accumulate_syncs_once_per_step(tmp_path):
    run, weight, seen = toy_run(_config(max_steps=3, gradient_accumulation_steps=2), tmp_path / "run")
    assert seen["indices"] == [0, 1, 2, 3, 4, 5]  # step s owns micro-steps 2s and 2s + 1
    assert seen["synced"] == [False, True] * 3
    assert run.step == 3 and seen["periodic"] == [2]
    losses = [row["loss"] for row in run.history.rows if "loss" in row]
    assert len(losses) == 3 and losses[-1] < losses[0]  # logged every step, and learning
    assert all("step_time" in row for row in run.history.rows if "loss" in row)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    _, full, _ = toy_run(_config(), tmp_path / "full")
    toy_run(_config(max_steps=4), tmp_path / "part")
    run, resumed, seen = toy_run(_config(), tmp_path / "part", resume="latest")
    assert seen["indices"] == [4, 5]  # only the steps after the checkpoint
    assert resumed == full and run.step == 6


def test_a_skipped_step_leaves_the_weights_counts_and_the_count_survives_a_resume(tmp_path):
    cfg = _config(max_steps=3, nonfinite_loss="skip", max_nonfinite_skips=2)
    run, _, seen = toy_run(cfg, tmp_path / "run", bad_steps={1})
    assert run.nonfinite.skipped == 1 and seen["synced"] == [True, True]  # step 1 never reached backward
    assert load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1]).state["nonfinite_skips"] == 1
    run, _, _ = toy_run(_config(max_steps=5, nonfinite_loss="skip", max_nonfinite_skips=2), tmp_path / "run",
                        resume="latest", bad_steps={3})
    assert run.nonfinite.skipped == 2


def test_a_nonfinite_loss_stops_the_run_by_default_naming_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 2: loss=nan"):
        toy_run(_config(), tmp_path / "run", bad_steps={2})


def _toy_inputs(run, step, accumulation, batch_size):
    return [torch.randn(batch_size, 1, generator=run.generator(index))
            for index in range(step * accumulation, (step + 1) * accumulation)]


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_backward_and_step_logs_the_accumulated_norm_once_and_applies_the_clipped_step(tmp_path, max_grad_norm):
    cfg = _config(max_steps=2, gradient_accumulation_steps=2, max_grad_norm=max_grad_norm)
    run, _, seen = toy_run(cfg, tmp_path / "run")
    norms = [row["grad_norm"] for row in run.history.rows if "grad_norm" in row]
    assert len(norms) == 2
    for step in range(2):
        # Independently: d/dw of the mean of the two micro-batches' losses mean((w x - 3 x)^2).
        w = seen["weights"][step]
        xs = _toy_inputs(run, step, 2, cfg.train.batch_size)
        grad = sum(float((2 * (w - 3) * x.pow(2)).mean()) for x in xs) / 2
        assert norms[step] == pytest.approx(abs(grad), rel=1e-5)
        # The update of plain SGD at the constant learning rate, on the gradient clipped to max_grad_norm.
        applied = grad if max_grad_norm == 0 or abs(grad) <= max_grad_norm else max_grad_norm * grad / abs(grad)
        assert seen["weights"][step + 1] == pytest.approx(w - cfg.train.lr * applied, rel=1e-5)


def test_a_nonfinite_gradient_from_a_finite_loss_skips_the_step_or_stops_the_run(tmp_path):
    cfg = _config(max_steps=3, nonfinite_loss="skip", max_nonfinite_skips=2)
    run, _, seen = toy_run(cfg, tmp_path / "skip", bad_gradient_steps={1})
    assert run.nonfinite.skipped == 1
    assert seen["weights"][2] == seen["weights"][1]  # nothing applied at step 1, and its gradients dropped
    assert seen["weights"][1] != seen["weights"][0]
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 1: .*grad_norm=inf"):
        toy_run(_config(max_steps=3), tmp_path / "stop", bad_gradient_steps={1})


def test_sigterm_ends_the_step_in_flight_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    def signal_at(index):
        if index == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match=r"SIGTERM after step 3 of 6.*--resume latest"):
        toy_run(_config(), tmp_path / "run", on_micro_step=signal_at)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-0000003"]
    _, resumed, _ = toy_run(_config(), tmp_path / "run", resume="latest")
    _, full, _ = toy_run(_config(), tmp_path / "full")
    assert resumed == full


def test_a_time_budget_ends_the_run_after_the_step_in_flight_and_says_so(tmp_path):
    # A budget already spent when the first step ends: the run stops there, early, with its checkpoint.
    run, _, seen = toy_run(_config(time_budget_minutes=1e-9), tmp_path / "run")
    assert run.step == 1 and run.stopped_early and seen["indices"] == [0]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-0000001"]
