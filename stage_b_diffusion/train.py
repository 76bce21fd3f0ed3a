"""Stage B: train a noise-predicting U-Net on the frozen autoencoder's scaled latents.

Read top to bottom: set-up, frozen VAE and latent scale, latent cache, U-Net, optimizer, resume, the
loop, export. The objective is DDPM's (Ho et al. 2020) with LDM's KL-8 schedule; the autoencoder's
encoder runs once per image (the latent cache), never in the training step.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from ldm_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, step_dir_name
from ldm_core.config import resolve_run_path
from ldm_core.data import load_dataset, train_val_split
from ldm_core.imaging import save_grid
from ldm_core.latent_stats import apply_scaling_factor, measure_latent_stats, scale_latents
from ldm_core.pretrained import check_model_folder
from ldm_core.run_control import (GracefulStop, NonFiniteLossPolicy, TimeBudget, drop_gradients, end_run,
                                  finish_step)
from ldm_core.speed import StepTimer, apply_memory_format, make_adam
from ldm_core.training import (MetricHistory, StepBatches, clip_gradients, environment_info, make_accelerator,
                               make_ema, make_lr_scheduler, prepare_run_dir, record_scalars, restore_shared_state,
                               shared_checkpoint_state, step_generator, write_json)
from stage_b_diffusion.config import StageBConfig
from stage_b_diffusion.latent_cache import load_or_build_latent_cache
from stage_b_diffusion.noise_schedule import build_noise_scheduler, make_sampler
from stage_b_diffusion.objective import diffusion_loss, drop_class_labels
from stage_b_diffusion.presets import build_unet, check_unet_matches_vae

logger = logging.getLogger("ldm.train_unet")


def default_cache_dir() -> Path:
    """Where latent caches live unless `data.cache_dir` says otherwise (shared by later runs)."""
    base = os.environ.get("LDM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "two-stage-ldm"
    return Path(base) / "latents"


def load_frozen_vae(vae_path: str | Path) -> tuple[AutoencoderKL, Path]:
    """Load any diffusers AutoencoderKL folder (ours: RUN/vae) in eval mode with gradients off.

    Returns the model and the folder it came from (a Stage A run folder resolves to its vae/).
    """
    path = Path(vae_path)
    if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "vae"  # a Stage A run folder was given
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--vae {vae_path}: no AutoencoderKL config.json there. Give a Stage A run's vae/ "
                                f"folder or any diffusers AutoencoderKL folder.")
    check_model_folder(path, what="--vae folder")  # data only: no code, no pickle-only weights
    vae = AutoencoderKL.from_pretrained(path, use_safetensors=True)
    vae.eval().requires_grad_(False)
    return vae, path


def resolve_latent_scale(vae: AutoencoderKL, vae_path: Path, images: np.ndarray, max_images: int, seed: int):
    """Use the VAE folder's measured scale (latent_stats.json); otherwise measure 1/std, say so, and write it
    into `vae.config.scaling_factor` (so the saved pipeline carries it). Returns what was used, for metrics.json."""
    stats_file = Path(vae_path) / "latent_stats.json"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        return {"source": str(stats_file), **stats}
    stats = measure_latent_stats(vae, images, max_images=max_images, seed=seed)
    logger.warning("%s has no measured latent scale (latent_stats.json); measured 1/std = %.5f over %d images "
                   "(its config says %.5f). Using the measured value.", vae_path, stats.scaling_factor,
                   stats.num_images, float(vae.config.scaling_factor))
    apply_scaling_factor(vae, stats)
    return {"source": "measured", **stats.to_json()}


def train_unet(cfg: StageBConfig, vae_path: str | Path, data: str, out: str | Path,
               resume: Optional[str] = None) -> Path:
    """Train Stage B and write `out/pipeline/` (a LatentDiffusionPipeline). Returns the run folder."""
    from pipelines.latent_diffusion import LatentDiffusionPipeline

    # 1. Run folder and Accelerator -----------------------------------------------------------------
    run_dir, ckpt_path = prepare_run_dir(out, cfg, resume)
    accelerator = make_accelerator(cfg.train, run_dir)
    is_main, device, tc = accelerator.is_main_process, accelerator.device, cfg.train

    # 2. Frozen VAE and the U-Net it fixes, data, latent scale, latent cache -------------------------------------------------
    vae, vae_dir = load_frozen_vae(vae_path)
    # The U-Net's shape comes from the VAE; check they fit before any image is encoded.
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(tc.seed)
    unet = apply_memory_format(build_unet(cfg.model, latent_channels=vae.config.latent_channels,
                                          latent_size=cfg.data.resolution // f), tc)
    check_unet_matches_vae(unet, vae, cfg.data.resolution)
    dataset = load_dataset(data, cfg.data.resolution, shapes_count=cfg.data.shapes_count,
                           shapes_seed=cfg.data.shapes_seed, progress=is_main)
    train_idx, _ = train_val_split(len(dataset), cfg.data.val_count, cfg.data.split_seed)
    train_images = dataset.images[train_idx]
    scale_info = resolve_latent_scale(vae, vae_dir, train_images, tc.latent_stats_images, tc.seed)
    # A relative data.cache_dir lives inside the run folder (config paths never write outside it).
    cache_dir = (resolve_run_path(run_dir, cfg.data.cache_dir, "data.cache_dir") if cfg.data.cache_dir
                 else default_cache_dir())
    with accelerator.main_process_first():  # one process encodes, the others read the finished file
        cache = load_or_build_latent_cache(vae, train_images, flip=cfg.data.flip,
                                           cache_dir=cache_dir, progress=is_main)
    batches = StepBatches(np.arange(len(train_idx)), tc.batch_size, accelerator.num_processes,
                          accelerator.process_index, tc.seed, cfg.data.flip)
    labels, class_names = _training_labels(cfg, dataset, train_idx)

    # 3. Noise schedule, optimizer ------------------------------------------------------------------------
    noise_scheduler = build_noise_scheduler(cfg.diffusion)
    optimizer = make_adam(unet.parameters(), tc, lr=tc.lr, decoupled_weight_decay=True)
    lr_scheduler = make_lr_scheduler(optimizer, tc)
    ema = make_ema(unet, cfg.ema)
    unet_ddp, optimizer = accelerator.prepare(unet, optimizer)
    if ema is not None:
        ema.to(device)

    # 4. Resume ---------------------------------------------------------------------------------------
    fp = cfg.model_fingerprint()
    step, history = 0, MetricHistory()
    nonfinite = NonFiniteLossPolicy(tc.nonfinite_loss, tc.max_nonfinite_skips)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, fp)
        try:
            unet.load_state_dict(ckpt.models["unet"])
        except RuntimeError as err:  # same config, but a VAE with other latent channels fixes other shapes
            raise CheckpointError(f"--resume {resume}: the checkpoint's U-Net does not fit the U-Net this VAE "
                                  f"({vae_dir}, {vae.config.latent_channels} latent channels) needs: "
                                  f"{str(err).splitlines()[1].strip()}. Resume with the VAE the run was "
                                  f"started with (see {run_dir / 'run_info.json'}).") from None
        optimizer.load_state_dict(ckpt.state["optimizer"])
        lr_scheduler.load_state_dict(ckpt.state["lr_scheduler"])
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
            state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                     "nonfinite_skips": nonfinite.skipped, **shared_checkpoint_state(ema, accelerator, history)}
            save_checkpoint(run_dir / "checkpoints", step, {"unet": unet.state_dict()}, state,
                            {"fingerprint": fp, "stage": "B"}, tc.keep_checkpoints)
        accelerator.wait_for_everyone()
        saved_step = step
        return path

    def export_unet():
        """A copy of the U-Net carrying the EMA weights (what gets sampled and saved)."""
        exported = copy.deepcopy(unet).eval()
        if ema is not None and cfg.ema.export_ema:
            ema.copy_to(exported.parameters())
        return exported

    def make_pipeline(unet_for_sampling):
        sampler = make_sampler(cfg.sampling.scheduler, noise_scheduler.config)
        return LatentDiffusionPipeline(vae=vae, unet=unet_for_sampling, scheduler=sampler, class_names=class_names)

    def sample_grid(tag: str) -> None:
        if is_main:
            pipe = make_pipeline(export_unet())
            pipe.set_progress_bar_config(disable=True)
            n = cfg.sampling.grid_images
            gens = [torch.Generator().manual_seed(cfg.sampling.seed + i) for i in range(n)]
            class_labels = [i % len(class_names) for i in range(n)] if class_names else None
            images = pipe(batch_size=n, num_inference_steps=cfg.sampling.num_inference_steps, generator=gens,
                          output_type="pil", class_labels=class_labels).images
            save_grid(images, run_dir / "images" / f"samples_{tag}.png")
        accelerator.wait_for_everyone()

    # 5. The loop ---------------------------------------------------------------------------------------
    if is_main:
        accelerator.init_trackers("stage_b")
    budget = TimeBudget(tc.time_budget_minutes)
    timer = StepTimer(device)  # step time alone, logged as step_time
    bar = tqdm(total=tc.max_steps, initial=step, desc="Stage B", disable=not (is_main and tc.progress_bar),
               dynamic_ncols=True)
    unet_ddp.train()
    accum = tc.gradient_accumulation_steps
    stopped_early = False
    null_class = cfg.model.num_classes  # the extra embedding used for classifier-free guidance
    # SIGINT/SIGTERM: finish the step in flight, write a checkpoint, stop (ldm_core.run_control.GracefulStop).
    # Work every N steps; the lambdas read `step` when called, so this list is built once.
    periodic = [(cfg.sampling.sample_every, lambda: sample_grid(f"step{step:07d}")),
                (tc.checkpoint_every, write_checkpoint)]
    with GracefulStop() as stop:
        while step < tc.max_steps:
            timer.start()
            skipped = False  # a non-finite loss under train.nonfinite_loss=skip drops the rest of the step
            for micro in range(accum):
                micro_step = step * accum + micro
                positions, flips = batches(micro_step)
                generator = step_generator(tc.seed, micro_step, accelerator.process_index)
                latents = scale_latents(cache.draw(torch.from_numpy(positions), generator,
                                                   mode=cfg.diffusion.latent_sampling, flip=torch.from_numpy(flips)),
                                        vae.config).to(device)
                class_labels = None
                if labels is not None:
                    class_labels = drop_class_labels(torch.from_numpy(labels[positions]), null_class,
                                                     cfg.model.class_dropout, generator).to(device)
                with accelerator.accumulate(unet_ddp):
                    if skipped:  # still inside `accumulate`, so Accelerate's micro-step count stays in phase
                        continue
                    with accelerator.autocast():
                        loss, logs = diffusion_loss(unet_ddp, latents, noise_scheduler, cfg.diffusion, generator,
                                                    class_labels=class_labels)
                    if not nonfinite.ok({"loss": loss}, step, accelerator):
                        skipped = True
                        continue
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        logs["grad_norm"] = clip_gradients(accelerator, unet_ddp.parameters(), tc.max_grad_norm)
                        # An inf gradient norm is routine under fp16 (the grad scaler skips that step itself).
                        if accelerator.scaler is None and not nonfinite.ok(
                                {"grad_norm": logs["grad_norm"], "loss": loss}, step, accelerator):
                            skipped = True
                            continue
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if skipped:  # the step counter, schedule and EMA still advance, so the next batch is fresh
                drop_gradients(optimizer)
                logs["nonfinite_skips"] = nonfinite.skipped
            lr_scheduler.step()
            if ema is not None:
                ema.step(unet.parameters())
            step += 1
            timer.stop()

            if step % tc.log_every == 0 or step == tc.max_steps:
                logs["step_time"] = timer.mean_and_reset()
                scalars = record_scalars(accelerator, history, step, logs, lr_scheduler.get_last_lr()[0])
                bar.set_postfix(loss=f"{scalars['loss']:.4f}")
            bar.update(1)
            if finish_step(step, tc.max_steps, periodic, write_checkpoint, stop, budget, accelerator, bar):
                stopped_early = True
                break
    bar.close()

    # 6. Export: the pipeline with EMA weights, metrics, pictures ------------------------------------
    write_checkpoint()
    sample_grid("final")
    if is_main:
        make_pipeline(export_unet()).save_pretrained(run_dir / "pipeline")
        history.save_curves(run_dir / "images" / "loss_curves.png", ["loss", "grad_norm", "lr"], "Stage B")
        write_json(run_dir / "metrics.json", {"steps": step, "stopped_early": stopped_early,
                                              "latent_scale": scale_info, "history": history.rows})
        write_json(run_dir / "run_info.json", {
            "stage": "B", "vae": str(vae_path), "data": data, "train_images": len(train_idx),
            "class_names": class_names, "processes": accelerator.num_processes, "environment": environment_info()})
    accelerator.wait_for_everyone()
    end_run(accelerator)
    return run_dir


def _training_labels(cfg: StageBConfig, dataset, train_idx: np.ndarray):
    """Class ids of the training images when the U-Net is class-conditional, else (None, None)."""
    if cfg.model.num_classes == 0:
        return None, None
    if dataset.labels is None:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} asks for class conditioning, but {dataset.source} "
                         f"has no labels. Put each class's images in its own first-level subfolder, or use "
                         f"model.num_classes=0.")
    if len(dataset.class_names) != cfg.model.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but {dataset.source} has "
                         f"{len(dataset.class_names)} classes ({', '.join(dataset.class_names)}). Set "
                         f"model.num_classes={len(dataset.class_names)}.")
    return dataset.labels[train_idx], list(dataset.class_names)
