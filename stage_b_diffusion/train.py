"""Stage B: train a noise-predicting U-Net on the frozen autoencoder's scaled latents.

Read top to bottom: set-up, frozen VAE and latent scale, latent cache, U-Net, optimizer, resume, the
step, the loop, export. The objective is DDPM's (Ho et al. 2020) with LDM's KL-8 schedule; the
autoencoder's encoder runs once per image (the latent cache), never in the training step.

Departure from LDM's step: the latents are scaled by the measured 1/std times `diffusion.input_scale`
(Chen 2023's input scaling; LDM: 1/std alone, the default here). The demo's 2 took its samples from 22%
to 31% valid at 3,000 steps (docs/demo.md).

The saved pipeline's class is given by the caller (`build_pipeline`), so this stage imports only the
core; `workflows/` passes `pipelines.latent_diffusion.LatentDiffusionPipeline`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ldm_core.models.autoencoder_folders import load_frozen_vae, read_vae_folder, vae_downsampling_factor
from ldm_core.config.settings import resolve_run_path
from ldm_core.training.ema import exported_copy
from ldm_core.images.grids import save_grid
from ldm_core.data.sources import hub_dataset_id
from ldm_core.models.hub import describe_model_source, hub_repo_id
from ldm_core.models.latent_scale import resolve_latent_scale, scale_latents
from ldm_core.models.model_card import CardContent, write_model_card
from ldm_core.training.optimization import drop_gradients
from ldm_core.randomness import image_generator
from ldm_core.data.training_images import TrainingImages
from ldm_core.training.run import TrainingRun
from stage_b_diffusion.config import StageBConfig
from stage_b_diffusion.latent_cache import ImagesToEncode, load_or_build_latent_cache, vae_digest
from stage_b_diffusion.noise_schedule import make_sampler
from stage_b_diffusion.objective import diffusion_loss, drop_class_labels
from stage_b_diffusion.architectures import check_unet_matches_vae
from stage_b_diffusion.networks import build_stage_b

logger = logging.getLogger("ldm.train_unet")

# (vae, unet, scheduler, class_names) -> a diffusers DiffusionPipeline with save_pretrained and __call__.
PipelineBuilder = Callable[..., Any]
# (held-out images, as many training images, --data) -> scorer(samples uint8 (N, 3, R, R)) -> {name: value}.
SampleScorerBuilder = Callable[[np.ndarray, np.ndarray, str], Callable[[np.ndarray], dict]]


def train_unet(cfg: StageBConfig, vae_path: str | Path, data: str, out: str | Path,
               resume: Optional[str] = None, *, build_pipeline: PipelineBuilder,
               build_sample_scorer: Optional[SampleScorerBuilder] = None) -> Path:
    """Train Stage B and write `out/pipeline/` (built by `build_pipeline`). Returns the run folder.

    With `sampling.metrics_every`, `build_sample_scorer` scores samples during training (the caller passes
    `evaluation.training_scores.SampleScorer`; this stage imports only the core)."""
    # 1. Run folder and Accelerator (ldm_core/training/run.py) ----------------------------------------
    read_vae_folder(vae_path)  # a wrong --vae is refused before the run folder exists
    run = TrainingRun(cfg, cfg.train, out, resume, stage="B")
    accelerator, device, tc = run.accelerator, run.device, cfg.train

    # 2. Frozen VAE and the U-Net it fixes, data, latent scale, latent cache -------------------------
    vae, vae_dir = load_frozen_vae(vae_path)
    # The U-Net learns this VAE's latent space: a resume with another VAE is refused before any work.
    run.bind("vae", vae_digest(vae), "--vae (compared by its config and weights)")
    run.bind_data(data)
    # The U-Net's shape comes from the VAE (stage_b_diffusion/networks.py); check they fit before any image is encoded.
    nets = build_stage_b(cfg, latent_channels=vae.config.latent_channels,
                         latent_size=cfg.data.resolution // vae_downsampling_factor(vae))
    unet, noise_scheduler, lr_scheduler, ema = nets.unet, nets.noise_scheduler, nets.lr_scheduler, nets.ema
    check_unet_matches_vae(unet, vae, cfg.data.resolution)
    # The images are only read to be encoded once; training draws from the latent cache.
    images = TrainingImages(data, cfg.data, None, seed=tc.seed, progress=run.is_main)
    train_idx = images.train_idx
    scale_info = resolve_latent_scale(vae, vae_dir, images.read(train_idx[:tc.latent_stats_images]),
                                      tc.latent_stats_images, tc.seed, cfg.diffusion.input_scale)
    # A relative data.latent_cache_dir lives inside the run folder (config paths never write outside it).
    cache_dir = resolve_run_path(run.run_dir, cfg.data.latent_cache_dir, "data.latent_cache_dir")
    # Every process encodes its own shards of the cache, then all open every shard (read row by row).
    cache = load_or_build_latent_cache(
        vae, ImagesToEncode(len(train_idx), cfg.data.resolution,
                            images.fingerprint() + "|" + hashlib.sha256(train_idx.tobytes()).hexdigest(),
                            lambda start, stop: (u8 for _, u8 in images.iter_read(train_idx[start:stop]))),
        flip=cfg.data.flip, cache_dir=cache_dir, progress=run.is_main, dtype=cfg.data.latent_cache_dtype,
        shard_size=cfg.data.latent_shard_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, wait_for_everyone=accelerator.wait_for_everyone)
    batches = run.step_batches(np.arange(len(train_idx)), cfg.data.flip)
    labels, class_names = _training_labels(cfg, images)

    # 3. Prepared by Accelerate ----------------------------------------------------------------------
    unet_ddp, optimizer = accelerator.prepare(unet, nets.optimizer)
    if ema is not None:
        ema.to(device)

    # 4. Resume ---------------------------------------------------------------------------------------
    run.track(models={"unet": unet}, states={"optimizer": optimizer, "lr_scheduler": lr_scheduler},
              ema=ema,
              mismatch_advice=f"This VAE ({vae_dir}) has {vae.config.latent_channels} latent channels; resume with "
                              f"the VAE the run was started with (see {run.run_dir / 'run_info.json'}).")
    run.resume()

    def make_pipeline():
        """The pipeline of the frozen VAE and the exported (EMA) U-Net: what gets sampled and saved."""
        sampler = make_sampler(cfg.sampling.scheduler, noise_scheduler.config)
        return build_pipeline(vae=vae, unet=exported_copy(unet, ema, cfg.ema), scheduler=sampler,
                              class_names=class_names)

    def draw_samples(n: int, output_type: str = "pil"):
        """n samples of the exported weights from fixed noise (image i from the sampling seed and i)."""
        pipe = make_pipeline()
        pipe.set_progress_bar_config(disable=True)
        class_labels = [i % len(class_names) for i in range(n)] if class_names else None
        return pipe(batch_size=n, num_inference_steps=cfg.sampling.num_inference_steps, output_type=output_type,
                    generator=[image_generator(cfg.sampling.seed, i) for i in range(n)],
                    class_labels=class_labels).images

    scorer = None
    if cfg.sampling.metrics_every and build_sample_scorer is not None and run.is_main:
        held_out = images.read(images.val_idx[:cfg.sampling.metrics_images])
        scorer = build_sample_scorer(held_out, images.read(train_idx[:len(held_out)]), data)

    def score_samples(step: int) -> None:
        """The sample scores at this step, logged with the losses, and what they cost."""
        if scorer is not None:
            started = time.monotonic()
            samples = draw_samples(cfg.sampling.metrics_images, output_type="np")
            scores = scorer(np.round(samples * 255).astype(np.uint8).transpose(0, 3, 1, 2))
            scores["metrics_seconds"] = time.monotonic() - started
            run.history.add(step, scores)
            accelerator.log({f"samples/{k}": v for k, v in scores.items()}, step=step)
        accelerator.wait_for_everyone()

    def sample_grid(tag: str) -> None:
        if run.is_main:
            save_grid(draw_samples(cfg.sampling.grid_images), run.run_dir / "images" / f"samples_{tag}.png")
        accelerator.wait_for_everyone()

    # 5. This micro-step's latents (from the cache, scaled) and class labels (some dropped for guidance)
    null_class = cfg.model.num_classes  # the extra embedding used for classifier-free guidance

    def training_batch(index: int, generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        positions, flips = batches(index)
        latents = scale_latents(cache.draw(torch.from_numpy(positions), generator,
                                           mode=cfg.diffusion.latent_sampling, flip=torch.from_numpy(flips)),
                                vae.config).to(device)
        class_labels = None
        if labels is not None:
            class_labels = drop_class_labels(torch.from_numpy(labels[positions]), null_class,
                                             cfg.model.class_dropout, generator).to(device)
        return latents, class_labels

    # 6. The loop: one optimizer step reads top to bottom (DDPM's noise-prediction loss, Ho et al. 2020, eq. 14;
    # diffusers examples/unconditional_image_generation/train_unconditional.py).
    unet_ddp.train()
    for step in run.steps(desc="Stage B", lr=lambda: lr_scheduler.get_last_lr()[0],
                          postfix=lambda s: {"loss": f"{s['loss']:.4f}"},
                          periodic=[(cfg.sampling.sample_every, lambda step: sample_grid(f"step{step:07d}")),
                                    (cfg.sampling.metrics_every or tc.max_steps + 1, score_samples),
                                    (tc.checkpoint_every, lambda step: run.write_checkpoint())]):
        logs, skipped = {}, False
        for index in run.micro_steps(step, unet_ddp):
            if skipped:  # every micro-step still enters `accumulate`, so Accelerate's count stays in phase
                continue
            generator = run.generator(index)  # this micro-step's latents, noise and timesteps
            latents, class_labels = training_batch(index, generator)
            with accelerator.autocast():
                loss, loss_logs = diffusion_loss(unet_ddp, latents, noise_scheduler, cfg.diffusion, generator,
                                                 class_labels=class_labels)
            logs.update(loss_logs)
            if run.is_nonfinite({"loss": loss}, step):  # train.nonfinite_loss: stop raised, or skip
                skipped = True
                continue
            # Backward; clip, log and check the gradient norm on the syncing micro-step; the optimizer step.
            if not run.backward_and_step(loss, optimizer, unet_ddp.parameters(), step):
                skipped = True
                continue
        if skipped:  # the step counter, schedule and EMA still advance, so the next batch is fresh
            drop_gradients(optimizer)
            logs["nonfinite_skips"] = run.nonfinite.skipped
        lr_scheduler.step()
        if ema is not None:
            ema.step(unet.parameters())
        run.log(logs)

    # 7. Export: the pipeline with EMA weights, metrics, pictures ------------------------------------
    run.write_checkpoint()
    sample_grid("final")
    if run.is_main:
        make_pipeline().save_pretrained(run.run_dir / "pipeline")
        write_model_card(run.run_dir / "pipeline", _model_card(cfg, run, vae, vae_dir, data, len(train_idx), scale_info))
    run.finish(curves=(["loss", "grad_norm", "lr", ("swd", "swd_floor"), "valid"], "Stage B"),
               metrics={"latent_scale": scale_info},
               run_info={"vae": str(vae_path), "data": data, "train_images": len(train_idx), "dataset": images.summary(),
                         "latent_cache": {"dtype": cfg.data.latent_cache_dtype, "shard_size": cfg.data.latent_shard_size},
                         "class_names": class_names})
    return run.run_dir


def _training_labels(cfg: StageBConfig, images: TrainingImages):
    """Class ids of the training images when the U-Net is class-conditional, else (None, None)."""
    if cfg.model.num_classes == 0:
        return None, None
    if images.labels is None:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} asks for class conditioning, but {images.spec} "
                         f"has no labels. Put each class's images in its own first-level subfolder, or use "
                         f"model.num_classes=0.")
    if len(images.class_names) != cfg.model.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but {images.spec} has "
                         f"{len(images.class_names)} classes ({', '.join(images.class_names)}). Set "
                         f"model.num_classes={len(images.class_names)}.")
    return images.labels[images.train_idx], list(images.class_names)


def _model_card(cfg: StageBConfig, run: TrainingRun, vae, vae_dir: Path, data: str, train_images: int,
                scale_info: dict) -> CardContent:
    """What RUN/pipeline/README.md says: the pipeline, how to sample from it, its training and figures."""
    tc, dc = cfg.train, cfg.diffusion
    shift = getattr(vae.config, "shift_factor", None)
    normalisation = (f"(z - {shift:g}) * {vae.config.scaling_factor:.5g}" if shift is not None
                     else f"z * {vae.config.scaling_factor:.5g}")
    source = describe_model_source(vae_dir)
    return CardContent(
        title="Latent diffusion pipeline (UNet2DModel on a frozen KL autoencoder)",
        summary=(f"A `LatentDiffusionPipeline` (two-stage-ldm): a `UNet2DModel` trained with DDPM's noise-prediction "
                 f"objective on the latents of a frozen `AutoencoderKL` ({source}), normalised as {normalisation} "
                 f"(`vae/config.json`). The folder has diffusers' layout: `vae/`, `unet/`, `scheduler/` load with "
                 f"plain diffusers classes."),
        usage=('from pipelines.latent_diffusion import LatentDiffusionPipeline  # the two-stage-ldm package\n\n'
               'pipe = LatentDiffusionPipeline.from_pretrained("THIS_FOLDER_OR_HUB_ID")\n'
               'images = pipe(batch_size=16, num_inference_steps=20).images\n'
               '# or: ldm generate --model THIS_FOLDER_OR_HUB_ID --num-images 16 --out samples'),
        training=[("data", data), ("training images", train_images), ("resolution", cfg.data.resolution),
                  ("autoencoder", source), ("steps", run.step),
                  ("batch size", f"{tc.batch_size} x {run.accelerator.num_processes} process(es)"),
                  ("learning rate", tc.lr), ("noise schedule", f"{dc.beta_schedule} {dc.beta_start:g} to {dc.beta_end:g}, "
                                                               f"{dc.num_train_timesteps} steps"),
                  ("prediction", dc.prediction_type), ("Min-SNR gamma", dc.snr_gamma or "off"),
                  ("precision", tc.mixed_precision)],
        figures=[("final training loss", run.history.last("loss")),
                 ("latent scale from", scale_info.get("source")),
                 ("scaling_factor trained with", scale_info.get("trained_scaling_factor"))],
        config_yaml=(run.run_dir / "config.yaml").read_text(),
        picture=run.run_dir / "images" / "samples_final.png",
        picture_name="samples.png", picture_caption=f"Samples from the saved weights ({cfg.sampling.scheduler}, {cfg.sampling.num_inference_steps} "
                        f"steps, seed {cfg.sampling.seed})",
        pipeline_tag="unconditional-image-generation", tags=["latent-diffusion"],
        datasets=[d for d in [hub_dataset_id(data)] if d], base_model=hub_repo_id(vae_dir))
