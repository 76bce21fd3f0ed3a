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

from ldm_core.training.accelerator import apply_memory_format
from ldm_core.data.step_batches import shuffle_channels
from ldm_core.config.settings import resolve_run_path
from ldm_core.training.ema import ema_weights, exported_copy, make_ema
from ldm_core.images.grids import save_reconstruction_grid
from ldm_core.models.latent_scale import apply_scaling_factor, measure_latent_stats
from ldm_core.training.optimization import make_adam, make_lr_scheduler
from ldm_core.randomness import seeded_generator
from ldm_core.training.run_folder import write_json
from ldm_core.data.training_images import TrainingImages
from ldm_core.training.run import TrainingRun
from stage_a_vae.config import StageAConfig
from stage_a_vae.discriminator import NLayerDiscriminator
from stage_a_vae.losses import LPIPSWithDiscriminatorLoss
from stage_a_vae.perceptual import build_lpips
from stage_a_vae.architectures import build_autoencoder
from stage_a_vae.validation import reconstruct_uint8, validate_reconstructions

logger = logging.getLogger("ldm.train_vae")
CHANNEL_SHUFFLE_STREAM = 1  # the fourth seed key of the channel orders, after (seed, micro-step, rank)


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

    # 3. Models, loss, optimizers ---------------------------------------------------------------------
    torch.manual_seed(tc.seed)  # identical initial weights on every process
    vae = apply_memory_format(build_autoencoder(cfg.model), tc)
    discriminator = apply_memory_format(NLayerDiscriminator(input_channels=3, channels=lc.disc_channels,
                                                            num_layers=lc.disc_num_layers, norm=lc.disc_norm), tc)
    perceptual = build_lpips(lc.lpips_trunk, lc.lpips_weights) if lc.perceptual_weight > 0 else None
    loss_fn = LPIPSWithDiscriminatorLoss(lc, perceptual, discriminator).to(device)
    ae_params = list(vae.parameters()) + ([loss_fn.logvar] if lc.learn_logvar else [])
    opt_ae = make_adam(ae_params, tc, lr=tc.lr)
    opt_d = make_adam(discriminator.parameters(), tc, lr=tc.disc_learning_rate, betas=tc.disc_betas)
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
    run.track(models={"vae": vae, "discriminator": discriminator},
              states={"opt_ae": opt_ae, "opt_d": opt_d, "sched_ae": sched_ae, "sched_d": sched_d},
              optimizers=[opt_ae, opt_d], ema=ema, extra_state=lambda: {"logvar": float(loss_fn.logvar)})
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

    # 5. The step: an autoencoder update and, once the discriminator is on, a discriminator update ---
    def train_step(step: int) -> dict:
        disc_on = loss_fn.discriminator_active(step)
        logs: dict = {}
        for micro_step in run.micro_steps(model, disc_ddp):
            x, _ = images.batch(micro_step, device)
            if cfg.data.channel_shuffle:  # its own stream, so the posterior's samples stay as without it
                x = shuffle_channels(x, seeded_generator(tc.seed, micro_step, accelerator.process_index,
                                                         CHANNEL_SHUFFLE_STREAM))
            # Autoencoder update. The discriminator only scores reconstructions here, so its parameters
            # are frozen and its unwrapped module is used (no DDP bookkeeping).
            if disc_on:
                discriminator.requires_grad_(False)
            with accelerator.autocast():
                recon, mean, logvar = model(x, run.generator(micro_step, device))
            posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
            ae_loss, logs = loss_fn.autoencoder_loss(x, recon, posterior, step, last_layer=last_layer,
                                                     discriminator=discriminator)
            if not (run.finite({"loss": ae_loss, **logs}) and run.backward(ae_loss, model.parameters(), logs)):
                continue
            opt_ae.step()
            opt_ae.zero_grad(set_to_none=True)
            # Discriminator update on detached reconstructions, only once it is switched on.
            if disc_on:
                discriminator.requires_grad_(True)
                d_loss, d_logs = loss_fn.discriminator_loss(x, recon.detach(), step, discriminator=disc_ddp)
                if not run.finite({**d_logs, "d_loss": d_loss}):
                    continue
                run.backward(d_loss, disc_ddp.parameters())
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
                logs.update(d_logs)
        sched_ae.step()
        if disc_on:
            sched_d.step()
        if ema is not None:
            ema.step(vae.parameters())
        return logs

    # 6. The loop (ldm_core/training/run.py: bar, timer, budget, signals, checkpoints) ----------------
    model.train()
    disc_ddp.train()
    run.train(train_step, desc="Stage A", lr=lambda: sched_ae.get_last_lr()[0],
              postfix=lambda s: {k: f"{s[k]:.3g}" for k in ("rec", "kl", "g_loss", "d_loss") if k in s},
              periodic=[(tc.validate_every, lambda step: validate(f"step{step:07d}")),
                        (tc.checkpoint_every, lambda step: run.write_checkpoint())],
              before_first_step=lambda: validate("step0000000"))  # the baseline later validations are compared with

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
    run.finish(curves=(["rec", "kl", "g_loss", "d_loss", "d_weight", "logits_real", "logits_fake", "val_psnr",
                        "val_ssim"], "Stage A"),
               metrics={"validation": final_metrics, "latent_stats": stats.to_json() if stats else None},
               run_info={"data": data, "dataset": images.summary(),
                         "lpips_trunk": lc.lpips_trunk if lc.perceptual_weight > 0 else "none",
                         "exported_weights": "ema" if (ema is not None and cfg.ema.export_ema) else "raw"})
    return run.run_dir
