"""The training-run skeleton both stages share.

A stage keeps only what is its own (its models, its step body, its export); `TrainingRun` does the rest:
the run folder and its saved config, the Accelerator, the step counter, the metric history, the
non-finite-loss policy, checkpoints (write, resume), and the loop's progress bar, step timer, time
budget, SIGINT/SIGTERM handling and periodic work, then the metrics.json / run_info.json export.

    run = TrainingRun(cfg, cfg.train, out, resume, stage="A")
    ... data, models and optimizers, on run.device ...
    run.track(models={"vae": vae}, states={"opt": opt, "sched": sched}, ema=ema, optimizers=[opt])
    state = run.resume()  # the checkpoint's training state (None for a fresh run)
    run.train(train_step, desc="Stage A", periodic=[(every, action)], lr=..., postfix=...)
    run.finish(metrics={...}, run_info={...}, curves=[...])

`train_step(step)` does one optimizer step: it iterates `run.micro_steps(*models)` (gradient
accumulation), calls `run.backward(...)` and `run.finite(...)` (both return False when a NaN/inf makes
the step be skipped under `train.nonfinite_loss=skip`; the loop then clears the gradients and moves on),
steps its schedules and EMA, and returns the scalars to log.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from ldm_core.training.accelerator import check_mixed_precision, end_run, make_accelerator
from ldm_core.data.step_batches import StepBatches
from ldm_core.training.checkpoints import META_FILE, CheckpointError, load_checkpoint, save_checkpoint, step_dir_name
from ldm_core.config.settings import TrainConfig
from ldm_core.training.metric_history import MetricHistory, record_scalars
from ldm_core.training.optimization import clip_gradients, drop_gradients
from ldm_core.randomness import step_generator
from ldm_core.training.stopping import GracefulStop, NonFiniteLossPolicy, TimeBudget, finish_step
from ldm_core.training.run_folder import RESUMES_FILE, environment_info, prepare_run_dir, unlock_run_dir, write_json
from ldm_core.training.step_timer import StepTimer

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
        self._optimizers: list = []
        self._ema = None
        self._extra_state: Callable[[], dict] = dict
        self._mismatch_advice = ""
        self._saved_step: Optional[int] = None
        self._skipping = False
        self._bound: dict[str, str] = {}

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
        """`bind` the dataset: a folder by its absolute path, a built-in set by its name."""
        spec = str(data)
        self.bind("data", spec if spec.startswith("builtin:") else str(Path(spec).expanduser().resolve()), "--data")

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

    def track(self, *, models: dict[str, torch.nn.Module], states: dict[str, Any], optimizers: Iterable,
              ema=None, extra_state: Callable[[], dict] = dict, mismatch_advice: str = "") -> None:
        """Name what a checkpoint holds: `models` (unwrapped modules, saved as safetensors), `states` (objects
        with state_dict / load_state_dict: optimizers, LR schedules), the EMA, and `extra_state()` (plain
        values). `optimizers` are cleared when a step is skipped. `mismatch_advice` ends the message when a
        checkpoint's tensors do not fit these models."""
        self._models, self._states, self._optimizers = dict(models), dict(states), list(optimizers)
        self._ema, self._extra_state, self._mismatch_advice = ema, extra_state, mismatch_advice

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

    # ---- inside a step -------------------------------------------------------------------------------

    def micro_steps(self, *models: torch.nn.Module) -> Iterator[int]:
        """The micro-steps of this optimizer step (gradient accumulation), each inside
        `accelerator.accumulate(*models)`. Once the step is skipped the remaining ones are passed over, still
        inside `accumulate`, so Accelerate's micro-step count stays in phase."""
        accum = self.train_cfg.gradient_accumulation_steps
        for micro in range(accum):
            with self.accelerator.accumulate(*models):
                if self._skipping:
                    continue
                yield self.step * accum + micro

    def finite(self, values: dict[str, Any]) -> bool:
        """True when every value is finite; otherwise stop (train.nonfinite_loss=stop: raises) or mark this
        step skipped and return False (skip). Called before a backward, so a bad value never reaches the weights."""
        if self.nonfinite.ok(values, self.step, self.accelerator):
            return True
        self._skipping = True
        return False

    def backward(self, loss: torch.Tensor, parameters, logs: Optional[dict] = None) -> bool:
        """Backward, then on a sync step clip the gradients at `train.max_grad_norm`. With `logs`, the pre-clip
        norm is logged as grad_norm and checked like a loss (an inf norm under fp16 is routine: the grad
        scaler skips that step itself). Returns False when the step is skipped."""
        self.accelerator.backward(loss)
        if not self.accelerator.sync_gradients:
            return True
        norm = clip_gradients(self.accelerator, parameters, self.train_cfg.max_grad_norm)
        if logs is None:
            return True
        logs["grad_norm"] = norm
        return self.accelerator.scaler is not None or self.finite({"grad_norm": norm, "loss": loss})

    # ---- the loop and the export ---------------------------------------------------------------------

    def train(self, train_step: Callable[[int], dict], *, desc: str,
              periodic: list[tuple[int, Callable[[int], Any]]], lr: Callable[[], float],
              postfix: Callable[[dict], dict], before_first_step: Optional[Callable[[], Any]] = None) -> None:
        """Run `train_step` until `train.max_steps`, the time budget or a signal.

        Parameters:
            periodic: (every, action) pairs; action(step) runs after each step where step % every == 0.
                A checkpoint is written on a signal; SIGINT/SIGTERM raise TrainingInterrupted after it.
            lr: the current learning rate, logged with each log line.
            postfix: the progress bar's postfix from the logged scalars.
            before_first_step: run once when the run starts at step 0 (a baseline validation).
        """
        tc = self.train_cfg
        if self.is_main:
            self.accelerator.init_trackers(f"stage_{self.stage.lower()}")
        if self.step == 0 and before_first_step is not None:
            before_first_step()
        budget = TimeBudget(tc.time_budget_minutes)
        timer = StepTimer(self.device)  # step time alone, logged as step_time
        bar = tqdm(total=tc.max_steps, initial=self.step, desc=desc, disable=not (self.is_main and tc.progress_bar),
                   dynamic_ncols=True)
        first_step, steps_run = self.step, 0
        with GracefulStop() as stop:
            while self.step < tc.max_steps:
                if steps_run == 1:  # throughput is measured from the end of the first step (warm-up, loader start)
                    steady_from = time.monotonic()
                    self.timing["seconds_to_first_step"] = round(steady_from - self._created, 3)
                timer.start()
                self._skipping = False
                logs = train_step(self.step)
                if self._skipping:  # the step counter, schedules and EMA still advance, so the next batch is fresh
                    drop_gradients(*self._optimizers)
                    logs["nonfinite_skips"] = self.nonfinite.skipped
                self.step += 1
                steps_run += 1
                timer.stop()
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    logs["step_time"] = timer.mean_and_reset()
                    bar.set_postfix(postfix(record_scalars(self.accelerator, self.history, self.step, logs, lr())))
                bar.update(1)
                if finish_step(self.step, tc.max_steps, periodic, self.write_checkpoint, stop, budget,
                               self.accelerator, bar):
                    self.stopped_early = True
                    break
        bar.close()
        if steps_run > 1:
            seconds = time.monotonic() - steady_from
            images = (steps_run - 1) * tc.batch_size * tc.gradient_accumulation_steps * self.accelerator.num_processes
            self.timing.update(steps=self.step - first_step, images_per_second=round(images / seconds, 3),
                               note="images/s over the steps after the first, periodic work included")

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
