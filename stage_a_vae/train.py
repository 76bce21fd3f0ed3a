"""Stage A: train the KL autoencoder with LDM's loss under Accelerate.

Read top to bottom: set-up, data, models, optimizers, resume, the loop, export. The step semantics
follow CompVis latent-diffusion `ldm/models/autoencoder.py` (an autoencoder update and, once the
discriminator is on, a discriminator update on every batch). Departures, one line each, measured on
builtin:shapes by `benchmarks/stage_a_factors.py` (README "Why Stage A starts fast"):
- residual branches start at zero (`model.zero_init_residual`): the largest gain in held-out PSNR;
- the posterior log-variance starts at -6 (`model.posterior_logvar_init`), not near 0;
- optional squared error before LDM's L1 (`loss.l2_warmup_steps`); the run ends on LDM's loss;
- gradients are clipped at `train.max_grad_norm` (LDM does not clip);
- an EMA of the autoencoder is kept and exported (`ema`; LDM has none);
- before `disc_start` nothing of the discriminator runs (LDM evaluates it and the adaptive weight
  anyway), its Adam starts then, and its step reuses this step's reconstruction.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from ldm_core.checkpoint import load_checkpoint, save_checkpoint, step_dir_name
from ldm_core.config import resolve_run_path
from ldm_core.data import load_dataset, train_val_split
from ldm_core.latent_stats import apply_scaling_factor, measure_latent_stats
from ldm_core.run_control import (GracefulStop, NonFiniteLossPolicy, TimeBudget, drop_gradients, end_run,
                                  finish_step)
from ldm_core.speed import StepTimer, apply_memory_format, make_adam
from ldm_core.training import (MetricHistory, StepBatches, clip_gradients, environment_info, images_to_batch,
                               make_accelerator, make_ema, make_lr_scheduler, prepare_run_dir, record_scalars,
                               restore_shared_state, shared_checkpoint_state, step_generator, write_json)
from stage_a_vae.config import StageAConfig
from stage_a_vae.discriminator import NLayerDiscriminator
from stage_a_vae.losses import LPIPSWithDiscriminatorLoss
from stage_a_vae.perceptual import build_lpips
from stage_a_vae.presets import build_autoencoder
from stage_a_vae.validation import reconstruct_uint8, validate_reconstructions

logger = logging.getLogger("ldm.train_vae")


class AutoencoderForTraining(torch.nn.Module):
    """Encode, sample the posterior, decode: one forward so DDP sees the whole autoencoder.

    Returns tensors only (reconstruction, posterior mean, posterior log-variance) because DDP looks for
    tensors in a module's output.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def train_vae(cfg: StageAConfig, data: str, out: str | Path, resume: Optional[str] = None) -> Path:
    """Train Stage A and write `out/vae/` (loadable with `AutoencoderKL.from_pretrained`). Returns the run folder."""
    # 1. Run folder, Accelerator, logging ------------------------------------------------------------
    run_dir, ckpt_path = prepare_run_dir(out, cfg, resume)
    accelerator = make_accelerator(cfg.train, run_dir)
    is_main = accelerator.is_main_process
    device = accelerator.device
    tc, lc = cfg.train, cfg.loss

    # 2. Data: decoded once to uint8, split deterministically ----------------------------------------
    # A relative data.cache_dir lives inside the run folder (config paths never write outside it).
    cache_dir = resolve_run_path(run_dir, cfg.data.cache_dir, "data.cache_dir") if cfg.data.cache_dir else None
    dataset = load_dataset(data, cfg.data.resolution, shapes_count=cfg.data.shapes_count,
                           shapes_seed=cfg.data.shapes_seed, cache_dir=cache_dir, progress=is_main)
    train_idx, val_idx = train_val_split(len(dataset), cfg.data.val_count, cfg.data.split_seed)
    batches = StepBatches(train_idx, tc.batch_size, accelerator.num_processes, accelerator.process_index,
                          tc.seed, cfg.data.flip)

    # 3. Models, loss, optimizers ---------------------------------------------------------------------
    torch.manual_seed(tc.seed)  # identical initial weights on every process
    vae = apply_memory_format(build_autoencoder(cfg.model), tc)
    discriminator = apply_memory_format(NLayerDiscriminator(input_channels=3, channels=lc.disc_channels,
                                                            num_layers=lc.disc_num_layers, norm=lc.disc_norm), tc)
    perceptual = build_lpips(lc.lpips_trunk, lc.lpips_weights) if lc.perceptual_weight > 0 else None
    loss_fn = LPIPSWithDiscriminatorLoss(lc, perceptual, discriminator).to(device)
    ae_params = list(vae.parameters()) + ([loss_fn.logvar] if lc.learn_logvar else [])
    opt_ae = make_adam(ae_params, tc, lr=tc.lr)
    opt_d = make_adam(discriminator.parameters(), tc, lr=tc.disc_lr or tc.lr)
    # LR schedules are stepped once per optimizer step by us (not prepared), so their meaning does not
    # change with the number of processes.
    sched_ae, sched_d = make_lr_scheduler(opt_ae, tc), make_lr_scheduler(opt_d, tc)
    ema = make_ema(vae, cfg.ema)
    model = AutoencoderForTraining(vae)
    model, disc_ddp, opt_ae, opt_d = accelerator.prepare(model, discriminator, opt_ae, opt_d)
    if ema is not None:
        ema.to(device)
    last_layer = vae.decoder.conv_out.weight  # LDM's adaptive weight is taken at the decoder's last layer

    # 4. Resume -------------------------------------------------------------------------------------
    fp = cfg.model_fingerprint()
    step, history = 0, MetricHistory()
    nonfinite = NonFiniteLossPolicy(tc.nonfinite_loss, tc.max_nonfinite_skips)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, fp)
        vae.load_state_dict(ckpt.models["vae"])
        discriminator.load_state_dict(ckpt.models["discriminator"])
        opt_ae.load_state_dict(ckpt.state["opt_ae"])
        opt_d.load_state_dict(ckpt.state["opt_d"])
        sched_ae.load_state_dict(ckpt.state["sched_ae"])
        sched_d.load_state_dict(ckpt.state["sched_d"])
        loss_fn.logvar.data.fill_(float(ckpt.state["logvar"]))
        nonfinite.skipped = int(ckpt.state.get("nonfinite_skips", 0))
        step, history = ckpt.step, restore_shared_state(ckpt.state, ema, accelerator)
        logger.info("Resumed from %s at step %d", ckpt_path, step)
    saved_step = step if ckpt_path is not None else None

    def write_checkpoint() -> Path:
        nonlocal saved_step
        path = run_dir / "checkpoints" / step_dir_name(step)
        if saved_step == step:  # already on disk; re-writing the same step would not be atomic
            return path
        if is_main:
            state = {"opt_ae": opt_ae.state_dict(), "opt_d": opt_d.state_dict(), "sched_ae": sched_ae.state_dict(),
                     "sched_d": sched_d.state_dict(), "logvar": float(loss_fn.logvar),
                     "nonfinite_skips": nonfinite.skipped, **shared_checkpoint_state(ema, accelerator, history)}
            save_checkpoint(run_dir / "checkpoints", step,
                            {"vae": vae.state_dict(), "discriminator": discriminator.state_dict()},
                            state, {"fingerprint": fp, "stage": "A"}, tc.keep_checkpoints)
        accelerator.wait_for_everyone()
        saved_step = step
        return path

    # A fixed validation batch, rendered as input | reconstruction | difference.
    val_images = dataset.images[val_idx]
    grid_images = torch.from_numpy(val_images[:8].copy())

    def run_validation(tag: str) -> dict:
        metrics = {}
        if is_main:
            with _ema_weights(ema, vae):
                metrics = validate_reconstructions(vae, val_images, device=device)
                recon = reconstruct_uint8(vae, grid_images, device=device)
            from ldm_core.imaging import save_reconstruction_grid

            save_reconstruction_grid(grid_images, recon, run_dir / "images" / f"recon_{tag}.png")
            history.add(step, {f"val_{k}": v for k, v in metrics.items()})
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        accelerator.wait_for_everyone()
        return metrics

    # 5. The loop -----------------------------------------------------------------------------------
    if is_main:
        accelerator.init_trackers("stage_a")
    if step == 0:
        run_validation("step0000000")  # the baseline every later validation is compared with
    budget = TimeBudget(tc.time_budget_minutes)
    timer = StepTimer(device)  # step time alone, logged as step_time
    bar = tqdm(total=tc.max_steps, initial=step, desc="Stage A", disable=not (is_main and tc.progress_bar),
               dynamic_ncols=True)
    model.train()
    disc_ddp.train()
    accum = tc.gradient_accumulation_steps
    stopped_early = False
    # SIGINT/SIGTERM: finish the step in flight, write a checkpoint, stop (ldm_core.run_control.GracefulStop).
    # Work every N steps; the lambdas read `step` when called, so this list is built once.
    periodic = [(tc.validate_every, lambda: run_validation(f"step{step:07d}")),
                (tc.checkpoint_every, write_checkpoint)]
    with GracefulStop() as stop:
        while step < tc.max_steps:
            timer.start()
            disc_on = loss_fn.discriminator_active(step)
            skipped = False  # a non-finite loss under train.nonfinite_loss=skip drops the rest of the step
            for micro in range(accum):
                micro_step = step * accum + micro
                indices, flips = batches(micro_step)
                x = images_to_batch(dataset.images, indices, flips, device)
                generator = step_generator(tc.seed, micro_step, accelerator.process_index, device)
                with accelerator.accumulate(model, disc_ddp):
                    if skipped:  # still inside `accumulate`, so Accelerate's micro-step count stays in phase
                        continue
                    # Autoencoder update. The discriminator only scores reconstructions here, so its
                    # parameters are frozen and its unwrapped module is used (no DDP bookkeeping).
                    if disc_on:
                        discriminator.requires_grad_(False)
                    with accelerator.autocast():
                        recon, mean, logvar = model(x, generator)
                    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
                    ae_loss, logs = loss_fn.autoencoder_loss(x, recon, posterior, step, last_layer=last_layer,
                                                             discriminator=discriminator)
                    if not nonfinite.ok({"loss": ae_loss, **logs}, step, accelerator):
                        skipped = True
                        continue
                    accelerator.backward(ae_loss)
                    if accelerator.sync_gradients:
                        logs["grad_norm"] = clip_gradients(accelerator, model.parameters(), tc.max_grad_norm)
                        # An inf gradient norm is routine under fp16 (the grad scaler skips that step itself).
                        if accelerator.scaler is None and not nonfinite.ok(
                                {"grad_norm": logs["grad_norm"], "loss": ae_loss}, step, accelerator):
                            skipped = True
                            continue
                    opt_ae.step()
                    opt_ae.zero_grad(set_to_none=True)
                    # Discriminator update on detached reconstructions, only once it is switched on.
                    if disc_on:
                        discriminator.requires_grad_(True)
                        d_loss, d_logs = loss_fn.discriminator_loss(x, recon.detach(), step, discriminator=disc_ddp)
                        if not nonfinite.ok({**d_logs, "d_loss": d_loss}, step, accelerator):
                            skipped = True
                            continue
                        accelerator.backward(d_loss)
                        if accelerator.sync_gradients:
                            clip_gradients(accelerator, disc_ddp.parameters(), tc.max_grad_norm)
                        opt_d.step()
                        opt_d.zero_grad(set_to_none=True)
                        logs.update(d_logs)
            if skipped:  # the step counter, schedules and EMA still advance, so the next batch is fresh
                drop_gradients(opt_ae, opt_d)
                logs["nonfinite_skips"] = nonfinite.skipped
            sched_ae.step()
            if disc_on:
                sched_d.step()
            if ema is not None:
                ema.step(vae.parameters())
            step += 1
            timer.stop()

            if step % tc.log_every == 0 or step == tc.max_steps:
                logs["step_time"] = timer.mean_and_reset()
                scalars = record_scalars(accelerator, history, step, logs, sched_ae.get_last_lr()[0])
                bar.set_postfix({k: f"{scalars[k]:.3g}" for k in ("rec", "kl", "g_loss", "d_loss") if k in scalars})
            bar.update(1)
            if finish_step(step, tc.max_steps, periodic, write_checkpoint, stop, budget, accelerator, bar):
                stopped_early = True
                break
    bar.close()

    # 6. Export: EMA weights, measured latent scale, metrics, pictures -----------------------------
    final_metrics = run_validation("final")
    write_checkpoint()
    if is_main:
        export = copy.deepcopy(vae).eval()
        if ema is not None and cfg.ema.export_ema:
            ema.copy_to(export.parameters())
        stats = measure_latent_stats(export, dataset.images[train_idx], max_images=tc.latent_stats_images,
                                     seed=tc.seed)
        apply_scaling_factor(export, stats)
        export.save_pretrained(run_dir / "vae")
        write_json(run_dir / "vae" / "latent_stats.json", stats.to_json())
        history.save_curves(run_dir / "images" / "loss_curves.png",
                            ["rec", "kl", "g_loss", "d_loss", "d_weight", "val_psnr", "val_ssim"], "Stage A")
        write_json(run_dir / "metrics.json", {
            "steps": step, "stopped_early": stopped_early, "validation": final_metrics,
            "latent_stats": stats.to_json(), "history": history.rows})
        write_json(run_dir / "run_info.json", {
            "stage": "A", "data": data, "dataset": {"images": len(dataset), "train": len(train_idx),
                                                   "val": len(val_idx), "summary": dataset.report.summary()},
            "lpips_trunk": lc.lpips_trunk if lc.perceptual_weight > 0 else "none",
            "exported_weights": "ema" if (ema is not None and cfg.ema.export_ema) else "raw",
            "processes": accelerator.num_processes, "environment": environment_info()})
    accelerator.wait_for_everyone()
    end_run(accelerator)
    return run_dir


class _ema_weights:
    """Context: evaluate with EMA weights swapped in, then put the training weights back."""

    def __init__(self, ema, model):
        self.ema, self.model = ema, model

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())
        return False
