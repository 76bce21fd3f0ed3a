"""Stage A: train the KL autoencoder with LDM's loss under Accelerate.

Read top to bottom: set-up, data, models, optimizers, resume, the loop, export. The step semantics
follow CompVis latent-diffusion `ldm/models/autoencoder.py` (an autoencoder update and, once the
discriminator is on, a discriminator update on every batch). Departures, one line each, measured on
builtin:shapes by `benchmarks/stage_a_factors.py` (docs/stage-a-fast-start.md):
- residual branches start at zero (`model.zero_init_residual`): the largest gain in held-out PSNR;
- the posterior log-variance starts at -6 (`model.posterior_logvar_init`), not near 0;
- optional squared error before LDM's L1 (`loss.l2_warmup_steps`); the run ends on LDM's loss;
- gradients are clipped at `train.max_grad_norm` (LDM does not clip);
- an EMA of the autoencoder is kept and exported (`ema`; LDM has none);
- before `disc_start` nothing of the discriminator runs (LDM evaluates it and the adaptive weight
  anyway), its Adam starts then, and its step reuses this step's reconstruction.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm_core.data.step_batches import reexpose, resaturate, shuffle_channels
from ldm_core.config.settings import resolve_run_path
from ldm_core.training.ema import ema_weights, exported_copy
from ldm_core.images.grids import save_reconstruction_grid
from ldm_core.data.sources import hub_dataset_id
from ldm_core.models.autoencoder_folders import vae_downsampling_factor
from ldm_core.models.latent_scale import apply_scaling_factor, measure_latent_stats
from ldm_core.models.model_card import CardContent, write_model_card
from ldm_core.training.optimization import drop_gradients
from ldm_core.randomness import seeded_generator
from ldm_core.training.run_folder import write_json
from ldm_core.data.training_images import TrainingImages
from ldm_core.training.run import TrainingRun
from stage_a_vae.config import StageAConfig
from stage_a_vae.latent_regularisers import LatentTransform, draw_transform
from stage_a_vae.networks import AutoencoderForTraining, build_stage_a
from stage_a_vae.validation import reconstruct_uint8, validate_reconstructions

logger = logging.getLogger("ldm.train_vae")
CHANNEL_SHUFFLE_STREAM = 1  # the fourth seed key of the channel orders, after (seed, micro-step, rank)
REEXPOSE_STREAM = 2  # and of the exposures
RESATURATE_STREAM = 3  # and of the saturations
LATENT_TRANSFORM_STREAM = 4  # and of the latent regularisers' transforms


def train_vae(cfg: StageAConfig, data: str, out: str | Path, resume: Optional[str] = None) -> Path:
    """Train Stage A and write `out/vae/` (loadable with `AutoencoderKL.from_pretrained`). Returns the run folder."""
    # 1. Run folder, Accelerator (ldm_core/training/run.py) --------------------------------------------
    run = TrainingRun(cfg, cfg.train, out, resume, stage="A")
    accelerator, device, tc, lc = run.accelerator, run.device, cfg.train, cfg.loss

    # 2. Data: held in memory or streamed (ldm_core/data/training_images.py), split deterministically ------
    run.bind_data(data)  # a resume must read the same dataset
    # A relative data.image_cache_dir lives inside the run folder (config paths never write outside it).
    cache_dir = (resolve_run_path(run.run_dir, cfg.data.image_cache_dir, "data.image_cache_dir")
                 if cfg.data.image_cache_dir else None)
    images = TrainingImages(data, cfg.data, run.step_batches, seed=tc.seed, image_cache_dir=cache_dir,
                            progress=run.is_main, pin_memory=device.type == "cuda")

    # 3. Networks, loss, optimizers (stage_a_vae/networks.py), prepared by Accelerate ---------------
    nets = build_stage_a(cfg, device, first_download=accelerator.main_process_first)
    vae, discriminator, loss_fn, ema = nets.vae, nets.discriminator, nets.loss_fn, nets.ema
    sched_ae, sched_d = nets.sched_ae, nets.sched_d
    model, disc_ddp, opt_ae, opt_d = accelerator.prepare(AutoencoderForTraining(vae), discriminator, nets.opt_ae,
                                                         nets.opt_d)
    if ema is not None:
        ema.to(device)
    last_layer = vae.decoder.conv_out.weight  # where LDM takes the adaptive weight

    # 4. Resume -------------------------------------------------------------------------------------
    run.track(models={"vae": vae, "discriminator": discriminator},
              states={"opt_ae": opt_ae, "opt_d": opt_d, "sched_ae": sched_ae, "sched_d": sched_d},
              ema=ema, extra_state=lambda: {"logvar": float(loss_fn.logvar)})
    state = run.resume()
    if state is not None:
        loss_fn.logvar.data.fill_(float(state["logvar"]))

    # A fixed validation batch, rendered as input | reconstruction | difference.
    val_images = images.read(images.val_idx)
    grid_images = torch.from_numpy(val_images[:8].copy())

    def validate(tag: str) -> dict:
        metrics = {}
        if run.is_main:
            with ema_weights(ema, vae):
                metrics = validate_reconstructions(vae, val_images, device=device)
                recon = reconstruct_uint8(vae, grid_images, device=device)
            save_reconstruction_grid(grid_images, recon, run.run_dir / "images" / f"recon_{tag}.png")
            run.history.add(run.step, {f"val_{k}": v for k, v in metrics.items()})
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=run.step)
        accelerator.wait_for_everyone()
        return metrics

    # 5. This micro-step's images, with the data options and the latent transform, each on its own stream
    factor = vae_downsampling_factor(vae)

    def training_batch(index: int) -> tuple[torch.Tensor, Optional[LatentTransform]]:
        x, _ = images.batch(index, device)

        def stream(key: int, on: torch.device | str = "cpu") -> torch.Generator:
            return seeded_generator(tc.seed, index, accelerator.process_index, key, device=on)

        if cfg.data.channel_shuffle:  # its own stream, so the posterior's samples stay as without it
            x = shuffle_channels(x, stream(CHANNEL_SHUFFLE_STREAM))
        if cfg.data.reexpose:  # likewise
            x = reexpose(x, stream(REEXPOSE_STREAM), cfg.data.reexpose)
        if cfg.data.resaturate:  # likewise
            x = resaturate(x, stream(RESATURATE_STREAM), cfg.data.resaturate)
        transform = None
        if lc.equivariance != "none" or lc.latent_noise:  # likewise; off, nothing is drawn
            transform = draw_transform(lc.equivariance, lc.equivariance_share, lc.latent_noise,
                                       x.shape[-1] // factor, factor, stream(LATENT_TRANSFORM_STREAM, device))
        return x, transform

    # 6. The loop: one optimizer step reads top to bottom (CompVis/latent-diffusion: ldm/models/autoencoder.py,
    # `training_step`: the autoencoder's update, then, once the discriminator is on, the discriminator's).
    model.train()
    disc_ddp.train()
    for step in run.steps(desc="Stage A", lr=lambda: sched_ae.get_last_lr()[0],
                          postfix=lambda s: {k: f"{s[k]:.3g}" for k in ("rec", "kl", "g_loss", "d_loss") if k in s},
                          periodic=[(tc.validate_every, lambda step: validate(f"step{step:07d}")),
                                    (tc.checkpoint_every, lambda step: run.write_checkpoint())],
                          before_first_step=lambda: validate("step0000000")):  # the baseline for later validations
        disc_on = loss_fn.discriminator_active(step)
        logs, skipped = {}, False
        for index in run.micro_steps(step, model, disc_ddp):
            if skipped:  # every micro-step still enters `accumulate`, so Accelerate's count stays in phase
                continue
            x, transform = training_batch(index)
            # The autoencoder: forward (the discriminator only scores, frozen and unwrapped), loss against T(x).
            if disc_on:
                discriminator.requires_grad_(False)
            with accelerator.autocast():
                recon, mean, logvar = model(x, run.generator(index, device), transform)
            target = transform.image(x) if transform is not None else x
            posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
            ae_loss, ae_logs = loss_fn.autoencoder_loss(target, recon, posterior, step, last_layer=last_layer,
                                                        discriminator=discriminator)
            logs.update(ae_logs)
            if run.is_nonfinite({"loss": ae_loss, **ae_logs}, step):  # train.nonfinite_loss: stop raised, or skip
                skipped = True
                continue
            # Backward; clip, log and check the gradient norm on the syncing micro-step; the optimizer step.
            if not run.backward_and_step(ae_loss, opt_ae, model.parameters(), step):
                skipped = True
                continue
            if not disc_on:
                continue
            # The discriminator, after the autoencoder's update, on the same reconstruction (detached).
            discriminator.requires_grad_(True)
            d_loss, d_logs = loss_fn.discriminator_loss(target, recon.detach(), step, discriminator=disc_ddp)
            if run.is_nonfinite({**d_logs, "d_loss": d_loss}, step):
                skipped = True
                continue
            if not run.backward_and_step(d_loss, opt_d, disc_ddp.parameters(), step, norm_name="d_grad_norm"):
                skipped = True
                continue
            logs.update(d_logs)  # logged once applied
        if skipped:  # the step counter, schedules and EMA still advance, so the next batch is fresh
            drop_gradients(opt_ae, opt_d)
            logs["nonfinite_skips"] = run.nonfinite.skipped
        sched_ae.step()
        if disc_on:  # the discriminator's schedule starts with it
            sched_d.step()
        if ema is not None:
            ema.step(vae.parameters())
        run.log(logs)

    images.close()  # stops the loader's worker processes, if any

    # 7. Export: EMA weights, measured latent scale, metrics, pictures -----------------------------
    final_metrics = validate("final")
    run.write_checkpoint()
    stats = None
    if run.is_main:
        export = exported_copy(vae, ema, cfg.ema)
        stats_images = images.read(images.train_idx[:tc.latent_stats_images])
        stats = measure_latent_stats(export, stats_images, max_images=tc.latent_stats_images,
                                     seed=tc.seed)
        apply_scaling_factor(export, stats)
        export.save_pretrained(run.run_dir / "vae")
        write_json(run.run_dir / "vae" / "latent_stats.json", stats.to_json())
        write_model_card(run.run_dir / "vae", _model_card(cfg, run, export, data, images, final_metrics, stats))
    run.finish(curves=(["rec", "kl", "g_loss", "d_loss", "d_weight", "logits_real", "logits_fake", "val_psnr",
                        "val_ssim"], "Stage A"),
               metrics={"validation": final_metrics, "latent_stats": stats.to_json() if stats else None},
               run_info={"data": data, "dataset": images.summary(),
                         "lpips_trunk": lc.lpips_trunk if lc.perceptual_weight > 0 else "none",
                         "exported_weights": "ema" if (ema is not None and cfg.ema.export_ema) else "raw"})
    return run.run_dir


def _model_card(cfg: StageAConfig, run: TrainingRun, vae, data: str, images: TrainingImages, validation: dict,
                stats) -> CardContent:
    """What RUN/vae/README.md says: the autoencoder, how to load it, its training and its measured figures."""
    f, channels = vae_downsampling_factor(vae), vae.config.latent_channels
    tc = cfg.train
    return CardContent(
        title=f"KL autoencoder, f={f}, {channels} latent channels",
        summary=(f"A diffusers `AutoencoderKL` ({sum(p.numel() for p in vae.parameters()):,} parameters) trained with "
                 f"LDM's autoencoder loss (L1 + LPIPS + KL + PatchGAN; CompVis/latent-diffusion "
                 f"`ldm/modules/losses/contperceptual.py`). Its `config.json` holds the latent scale measured on its "
                 f"training images: `scaling_factor` = 1/std = {stats.scaling_factor:.5g} over {stats.num_images} "
                 f"images (`latent_stats.json`)."),
        usage=('from diffusers import AutoencoderKL\n\n'
               'vae = AutoencoderKL.from_pretrained("THIS_FOLDER_OR_HUB_ID")\n'
               '# Stage B on its latents: ldm train-unet --vae THIS_FOLDER_OR_HUB_ID --data ... --out RUN'),
        training=[("data", data), ("training images", len(images.train_idx)), ("resolution", cfg.data.resolution),
                  ("steps", run.step), ("batch size", f"{tc.batch_size} x {run.accelerator.num_processes} process(es)"),
                  ("learning rate", tc.lr), ("precision", tc.mixed_precision),
                  ("LPIPS trunk", cfg.loss.lpips_trunk if cfg.loss.perceptual_weight > 0 else "none (weight 0)"),
                  ("PatchGAN from step", cfg.loss.disc_start), ("KL weight", cfg.loss.kl_weight)],
        figures=[(f"held-out PSNR (dB, {len(images.val_idx)} images)", validation.get("psnr")),
                 (f"held-out SSIM ({len(images.val_idx)} images)", validation.get("ssim")),
                 ("latent std", stats.std), ("scaling_factor (1/std)", stats.scaling_factor)],
        config_yaml=(run.run_dir / "config.yaml").read_text(),
        picture=run.run_dir / "images" / "recon_final.png",
        picture_name="reconstructions.png", picture_caption="Held-out images: input, reconstruction, difference",
        tags=["autoencoder", "vae", "kl-autoencoder"], datasets=[d for d in [hub_dataset_id(data)] if d])
