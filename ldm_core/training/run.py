"""The services both stages' training loops use: the run folder, checkpoints, periodic work, stopping.

A stage writes its own loop and its own step, in the order it happens (stage_a_vae/train.py,
stage_b_diffusion/train.py); `TrainingRun` keeps the rest: the run folder and its saved config, the
Accelerator, the step counter, the metric history, checkpoints (write, resume), the non-finite-loss
policy, logging, periodic work, clean stops, then the metrics.json / run_info.json export.

    run = TrainingRun(cfg, cfg.train, out, resume, stage="A")
    ... data, models and optimizers, on run.device ...
    run.track(models={"vae": vae}, states={"opt": opt, "sched": sched}, ema=ema)
    state = run.resume()  # the checkpoint's training state (None for a fresh run)
    for step in run.steps(desc="Stage A", periodic=[(every, action)], ...):
        for index in run.micro_steps(step, model):  # inside Accelerate's `accumulate`
            ... forward, loss; `run.is_nonfinite(...)`; backward, clip, optimizer step ...
        ... schedule and EMA steps ...
        run.log(logs)
    run.finish(metrics={...}, run_info={...}, curves=[...])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from ldm_core.training.accelerator import check_mixed_precision, end_run, make_accelerator
from ldm_core.data.sources import data_identity
from ldm_core.data.step_batches import StepBatches
from ldm_core.training.checkpoints import META_FILE, CheckpointError, load_checkpoint, save_checkpoint, step_dir_name
from ldm_core.config.settings import TrainConfig
from ldm_core.training.metric_history import MetricHistory, record_scalars
from ldm_core.training.optimization import clip_gradients
from ldm_core.randomness import step_generator
from ldm_core.training.stopping import GracefulStop, NonFiniteLossPolicy, TimeBudget, all_finite, interrupted
from ldm_core.training.run_folder import RESUMES_FILE, environment_info, prepare_run_dir, unlock_run_dir, write_json
from ldm_core.training.step_timer import StepTimer, Throughput

logger = logging.getLogger("ldm.train")


class TrainingRun:
    """One stage's training run, from its folder to its exported metrics.

    Parameters:
        cfg: the stage config (saved as config.yaml; `cfg.model_fingerprint()` guards resumes).
        train_cfg: its `train` section.
        out: the run folder to create.
        resume: None, "latest" or a checkpoint folder.
        stage: "A" or "B": names the checkpoints, trackers and run_info.json.
    """

    def __init__(self, cfg: Any, train_cfg: TrainConfig, out: str | Path, resume: Optional[str], *, stage: str):
        self.train_cfg, self.stage, self.resume_from = train_cfg, stage, resume
        self._created = time.monotonic()
        self.timing: dict[str, float] = {}  # start-up and throughput, written to run_info.json
        check_mixed_precision(train_cfg)
        self.run_dir, self._checkpoint, self.resume_changes = prepare_run_dir(out, cfg, resume)
        self.config_values = dataclasses.asdict(cfg)  # what a tracker records of the run
        self.accelerator = make_accelerator(train_cfg, self.run_dir)
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.fingerprint = cfg.model_fingerprint()
        self.step = 0
        self.history = MetricHistory()
        self.nonfinite = NonFiniteLossPolicy(train_cfg.nonfinite_loss, train_cfg.max_nonfinite_skips)
        self.stopped_early = False
        self._models: dict[str, torch.nn.Module] = {}
        self._states: dict[str, Any] = {}
        self._ema = None
        self._extra_state: Callable[[], dict] = dict
        self._mismatch_advice = ""
        self._saved_step: Optional[int] = None
        self._bound: dict[str, str] = {}
        self._logs: dict[str, Any] = {}

    # ---- what the stage asks of the run ------------------------------------------------------------

    def step_batches(self, indices, flip: bool) -> StepBatches:
        """This process's share of every global batch, as a pure function of the micro-step."""
        acc = self.accelerator
        return StepBatches(indices, self.train_cfg.batch_size, acc.num_processes, acc.process_index,
                           self.train_cfg.seed, flip)

    def generator(self, micro_step: int, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator for every random draw of one micro-step on this process."""
        return step_generator(self.train_cfg.seed, micro_step, self.accelerator.process_index, device)

    def bind_data(self, data: str) -> None:
        """`bind` the dataset: a path by its absolute path, a built-in set or a Hub dataset by its name."""
        self.bind("data", data_identity(str(data)), "--data")

    def bind(self, name: str, value: str, what: str) -> None:
        """Record a value outside the config that defines the run (the data, Stage B's VAE), saved with every
        checkpoint; a resume with another value is refused here, before any work. `what` names it for
        the message (e.g. "--vae")."""
        self._bound[name] = value
        if self._checkpoint is None:
            return
        try:
            recorded = json.loads((self._checkpoint / META_FILE).read_text()).get("bound", {}).get(name)
        except (OSError, ValueError):  # check_resumable has already vetted the checkpoint; nothing recorded
            recorded = None
        if recorded is None:
            logger.warning("%s records no %s; resuming without checking it.", self._checkpoint, what)
        elif recorded != value:
            raise CheckpointError(f"--resume {self.resume_from}: this run was started with another {what} "
                                  f"(recorded {_short(recorded)}, given {_short(value)}). Resume with the one it "
                                  f"was started with, or start a new run in another --out folder.")

    def track(self, *, models: dict[str, torch.nn.Module], states: dict[str, Any], ema=None,
              extra_state: Callable[[], dict] = dict, mismatch_advice: str = "") -> None:
        """Name what a checkpoint holds: `models` (unwrapped modules, saved as safetensors), `states` (objects
        with state_dict / load_state_dict: optimizers, LR schedules), the EMA, and `extra_state()` (plain values).
        `mismatch_advice` ends the message when a checkpoint's tensors do not fit these models."""
        self._models, self._states, self._extra_state = dict(models), dict(states), extra_state
        self._ema, self._mismatch_advice = ema, mismatch_advice

    def resume(self) -> Optional[dict]:
        """Load the checkpoint being resumed into what `track` named; returns its training state (for the
        stage's own extra values), or None for a fresh run."""
        if self._checkpoint is None:
            return None
        ckpt = load_checkpoint(self._checkpoint, self.fingerprint)
        schedules = {name: list(obj.base_lrs) for name, obj in self._states.items() if hasattr(obj, "base_lrs")}
        for name, module in self._models.items():
            try:
                module.load_state_dict(ckpt.models[name])
            except RuntimeError as err:  # same config, but shapes fixed by something else (another VAE)
                detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
                raise CheckpointError(f"--resume {self.resume_from}: the checkpoint's {name} does not fit the "
                                      f"{name} this run builds: {detail}. {self._mismatch_advice}") from None
        for name, obj in self._states.items():
            obj.load_state_dict(ckpt.state[name])
        for name, base_lrs in schedules.items():
            _apply_learning_rates(self._states[name], base_lrs)
        self.nonfinite.skipped = int(ckpt.state.get("nonfinite_skips", 0))
        if self._ema is not None:
            self._ema.load_state_dict(ckpt.state["ema"])
        if self.accelerator.scaler is not None and "scaler" in ckpt.state:
            self.accelerator.scaler.load_state_dict(ckpt.state["scaler"])
        self.step, self.history = ckpt.step, MetricHistory(ckpt.state["history"])
        self._saved_step = self.step
        logger.info("Resumed from %s at step %d", self._checkpoint, self.step)
        if self.resume_changes and self.is_main:
            changes = {k: {"from": a, "to": b} for k, (a, b) in self.resume_changes.items()}
            logger.info("Resumed with changes: %s", ", ".join(f"{k} {a!r} -> {b!r}"
                                                             for k, (a, b) in self.resume_changes.items()))
            path = self.run_dir / RESUMES_FILE
            earlier = json.loads(path.read_text()) if path.is_file() else []
            write_json(path, earlier + [{"step": self.step, "checkpoint": self._checkpoint.name, "changes": changes}])
        return ckpt.state

    def write_checkpoint(self) -> Path:
        """Write the current step's checkpoint (once per step) and return its folder."""
        path = self.run_dir / "checkpoints" / step_dir_name(self.step)
        if self._saved_step == self.step:  # already on disk; re-writing the same step would not be atomic
            return path
        if self.is_main:
            state = {name: obj.state_dict() for name, obj in self._states.items()}
            state.update(self._extra_state())
            state.update({"nonfinite_skips": self.nonfinite.skipped, "history": self.history.rows})
            if self._ema is not None:
                state["ema"] = self._ema.state_dict()
            if self.accelerator.scaler is not None:
                state["scaler"] = self.accelerator.scaler.state_dict()
            save_checkpoint(self.run_dir / "checkpoints", self.step,
                            {name: module.state_dict() for name, module in self._models.items()}, state,
                            {"fingerprint": self.fingerprint, "stage": self.stage, "bound": self._bound},
                            self.train_cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self._saved_step = self.step
        return path

    # ---- the loop and the export ---------------------------------------------------------------------

    def steps(self, *, desc: str, periodic: list[tuple[int, Callable[[int], Any]]], lr: Callable[[], float],
              postfix: Callable[[dict], dict], before_first_step: Optional[Callable[[], Any]] = None) -> Iterator[int]:
        """The optimizer steps to run, until `train.max_steps`, the time budget or SIGINT/SIGTERM.

        The stage's loop body writes the step itself (stage_a_vae/train.py, stage_b_diffusion/train.py) and
        ends it with `log`; once the body returns, this counts the step, records the logs every
        `train.log_every` steps, runs the periodic work and stops cleanly when asked.

        Parameters:
            periodic: (every, action) pairs; action(step) runs after each step where step % every == 0.
            lr: the current learning rate, logged with each log line.
            postfix: the progress bar's postfix from the logged scalars.
            before_first_step: run once when the run starts at step 0 (a baseline validation).
        """
        tc, acc = self.train_cfg, self.accelerator
        if self.is_main:
            # Weights & Biases gets the run's name and resolved config; TensorBoard writes RUN/logs/stage_x/.
            (self.run_dir / "logs").mkdir(exist_ok=True)
            acc.init_trackers(f"stage_{self.stage.lower()}", init_kwargs={"wandb": {
                "name": self.run_dir.name, "dir": str(self.run_dir / "logs"), "config": self.config_values}})
        if self.step == 0 and before_first_step is not None:
            before_first_step()
        budget, timer = TimeBudget(tc.time_budget_minutes), StepTimer(self.device)  # the timer: step_time
        throughput = Throughput(self._created, tc.batch_size * tc.gradient_accumulation_steps * acc.num_processes)
        bar = tqdm(total=tc.max_steps, initial=self.step, desc=desc, disable=not (self.is_main and tc.progress_bar),
                   dynamic_ncols=True)
        with GracefulStop() as stop:
            while self.step < tc.max_steps:
                throughput.step_starts()
                timer.start()
                self._logs = {}
                yield self.step
                self.step += 1
                timer.stop()
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    self._logs["step_time"] = timer.mean_and_reset()
                    bar.set_postfix(postfix(record_scalars(acc, self.history, self.step, self._logs, lr())))
                bar.update(1)
                for every, action in periodic:  # validation, samples, checkpoints
                    if self.step % every == 0:
                        action(self.step)
                if stop.requested(acc):  # after the step in flight, with a checkpoint to resume from
                    bar.close()
                    checkpoint = self.write_checkpoint()
                    end_run(acc)
                    raise interrupted(stop, self.step, tc.max_steps, checkpoint)
                if budget.ends_run(self.step, tc.max_steps, acc):
                    self.stopped_early = True
                    break
        bar.close()
        self.timing.update(throughput.timing())

    def micro_steps(self, step: int, *modules: torch.nn.Module) -> Iterator[int]:
        """The micro-step indices of optimizer step `step` (its batches and random draws are functions of them),
        each inside Accelerate's `accumulate` of `modules`, which syncs gradients on the last one only."""
        accum = self.train_cfg.gradient_accumulation_steps
        for index in range(step * accum, (step + 1) * accum):
            with self.accelerator.accumulate(*modules):
                yield index

    def is_nonfinite(self, values: dict[str, Any], step: int) -> bool:
        """True when any of `values` (a loss, its terms, a gradient norm) is NaN or inf on any process; then
        `train.nonfinite_loss` decides: stop raises here, skip counts the step (ldm_core/training/stopping.py).
        Checked before backward or the optimizer step, so a bad value never reaches the weights."""
        if all_finite(values, self.accelerator):
            return False
        self.nonfinite.skip_or_stop(values, step)
        return True

    def backward_and_step(self, loss: torch.Tensor, optimizer, parameters, step: int, *,
                          norm_name: str = "grad_norm") -> bool:
        """One optimizer's update from a loss already checked finite, in the order it happens: backward; on
        the micro-step that syncs (Accelerate's `accumulate`), the accumulated gradients clipped to
        `train.max_grad_norm`, their pre-clip norm logged as `norm_name` and checked like a loss; the
        optimizer step; the gradients cleared.

        Returns False when the norm is NaN or inf and `train.nonfinite_loss=skip` skips the step: nothing is
        applied and the caller drops the rest of the step. Under fp16 an inf norm is routine and not checked:
        the grad scaler skips that update itself and lowers its scale.
        """
        acc = self.accelerator
        acc.backward(loss)
        if acc.sync_gradients:
            norm = clip_gradients(acc, parameters, self.train_cfg.max_grad_norm)
            self.log({norm_name: norm})
            if acc.scaler is None and self.is_nonfinite({norm_name: norm, "loss": loss}, step):
                return False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def log(self, logs: dict[str, Any]) -> None:
        """The step's scalars, recorded (every `train.log_every` steps) once the step ends."""
        self._logs.update(logs)

    def finish(self, *, metrics: dict, run_info: dict, curves: tuple[list[str], str]) -> None:
        """Write the loss curves, metrics.json and run_info.json (main process), then close the trackers."""
        if self.is_main:
            keys, title = curves
            self.history.save_curves(self.run_dir / "images" / "loss_curves.png", keys, title)
            write_json(self.run_dir / "metrics.json", {"steps": self.step, "stopped_early": self.stopped_early,
                                                       **metrics, "history": self.history.rows})
            write_json(self.run_dir / "run_info.json", {
                "stage": self.stage, **run_info, "processes": self.accelerator.num_processes, "timing": self.timing,
                "environment": environment_info()})
        self.accelerator.wait_for_everyone()
        end_run(self.accelerator)
        unlock_run_dir(self.run_dir)


def _short(value: str) -> str:
    """A sha256 shortened for a message; anything else unchanged."""
    return f"sha256 {value[:12]}..." if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else value


def _apply_learning_rates(schedule, base_lrs: list[float]) -> None:
    """Put this run's configured learning rates into a schedule restored from a checkpoint.

    A restored LambdaLR carries the checkpoint's base rates (and its optimizer the checkpoint's current
    rate), so a `train.lr` changed on resume would be ignored. The schedule's position (last_epoch) and
    its lambdas, built from this run's config (warm-up, max_steps), are kept.
    """
    schedule.base_lrs = list(base_lrs)
    for group, base, factor in zip(schedule.optimizer.param_groups, base_lrs, schedule.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]
