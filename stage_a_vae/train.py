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

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ldm_core.training.accelerator import apply_memory_format
from ldm_core.data.step_batches import reexpose, resaturate, shuffle_channels
from ldm_core.config.settings import resolve_run_path
from ldm_core.training.ema import ema_weights, exported_copy, make_ema
from ldm_core.images.grids import save_reconstruction_grid
from ldm_core.data.sources import hub_dataset_id
from ldm_core.models.autoencoder_folders import vae_downsampling_factor
from ldm_core.models.latent_scale import apply_scaling_factor, measure_latent_stats
from ldm_core.models.model_card import CardContent, write_model_card
from ldm_core.training.optimization import make_adam, make_lr_scheduler
from ldm_core.randomness import seeded_generator
from ldm_core.training.run_folder import write_json
from ldm_core.data.training_images import TrainingImages
from ldm_core.training.run import MicroStep, Network, TrainingRun, Update
from stage_a_vae.config import StageAConfig
from stage_a_vae.discriminator import NLayerDiscriminator
from stage_a_vae.losses import LPIPSWithDiscriminatorLoss
from stage_a_vae.perceptual import build_lpips
from stage_a_vae.architectures import build_autoencoder
from stage_a_vae.latent_regularisers import LatentTransform, draw_transform
from stage_a_vae.validation import reconstruct_uint8, validate_reconstructions

logger = logging.getLogger("ldm.train_vae")
CHANNEL_SHUFFLE_STREAM = 1  # the fourth seed key of the channel orders, after (seed, micro-step, rank)
REEXPOSE_STREAM = 2  # and of the exposures
RESATURATE_STREAM = 3  # and of the saturations
LATENT_TRANSFORM_STREAM = 4  # and of the latent regularisers' transforms


class AutoencoderForTraining(torch.nn.Module):
    """Encode, sample the posterior, decode: one forward so DDP sees the whole autoencoder.

    Returns tensors only (reconstruction, posterior mean, posterior log-variance) because DDP looks for
    tensors in a module's output.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                transform: Optional[LatentTransform] = None):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        if transform is not None:  # stage_a_vae/latent_regularisers.py: the decoder sees T(z)
            z = transform.latent(z)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


@dataclass
class StageANetworks:
    """What Stage A's step body works with.

    Parameters:
        autoencoder: an `AutoencoderForTraining` as prepared, its Adam (with the learned log-variance) and schedule.
        discriminator: the prepared discriminator, its Adam and schedule; active from `loss.disc_start`.
        scorer: the discriminator's unwrapped module, which scores reconstructions in the autoencoder's loss.
        loss_fn: LDM's loss (stage_a_vae/losses.py).
        last_layer: the decoder's last weight, where LDM takes the adaptive weight.
        autocast: the forward's mixed-precision context (`accelerator.autocast`).
    """

    autoencoder: Network
    discriminator: Network
    scorer: torch.nn.Module
    loss_fn: LPIPSWithDiscriminatorLoss
    last_layer: torch.Tensor
    autocast: Callable[[], ContextManager] = contextlib.nullcontext


def autoencoder_micro_step(parts: StageANetworks, micro: MicroStep, x: torch.Tensor,
                           generator: torch.Generator, transform: Optional[LatentTransform] = None) -> Iterator[Update]:
    """One micro-step of Stage A on images `x` in [-1, 1] (CompVis/latent-diffusion: ldm/models/autoencoder.py,
    `training_step`): the autoencoder's update, then, once the discriminator is on, the discriminator's.

    Yields each `Update`; the discriminator's loss is computed after the autoencoder's update was applied,
    on the same reconstruction (detached). `generator` draws the posterior's sample. With a `transform`
    (stage_a_vae/latent_regularisers.py) the decoder sees T(z) and the whole loss is taken against T(x).
    """
    disc_on = parts.discriminator.active(micro.step)
    # The discriminator only scores reconstructions here: frozen, and unwrapped (no DDP bookkeeping).
    if disc_on:
        parts.scorer.requires_grad_(False)
    with parts.autocast():
        recon, mean, logvar = parts.autoencoder.module(x, generator, transform)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    if transform is not None:
        x = transform.image(x)
    ae_loss, logs = parts.loss_fn.autoencoder_loss(x, recon, posterior, micro.step, last_layer=parts.last_layer,
                                                   discriminator=parts.scorer)
    micro.logs.update(logs)
    yield Update(parts.autoencoder, ae_loss, {"loss": ae_loss, **logs})
    if disc_on:
        parts.scorer.requires_grad_(True)
        d_loss, d_logs = parts.loss_fn.discriminator_loss(x, recon.detach(), micro.step,
                                                          discriminator=parts.discriminator.module)
        yield Update(parts.discriminator, d_loss, {**d_logs, "d_loss": d_loss})
        micro.logs.update(d_logs)  # logged once applied


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
    with accelerator.main_process_first():  # a first-use download happens once, not once per process
        perceptual = build_lpips(lc.lpips_trunk, lc.lpips_weights) if lc.perceptual_weight > 0 else None
    loss_fn = LPIPSWithDiscriminatorLoss(lc, perceptual, discriminator).to(device)
    ae_params = list(vae.parameters()) + ([loss_fn.logvar] if lc.learn_logvar else [])
    opt_ae = make_adam(ae_params, tc, lr=tc.lr)
    opt_d = make_adam(discriminator.parameters(), tc, lr=tc.disc_learning_rate, betas=tc.disc_betas)
    sched_ae, sched_d = make_lr_scheduler(opt_ae, tc), make_lr_scheduler(opt_d, tc, schedule=tc.disc_schedule)
    ema = make_ema(vae, cfg.ema)
    model, disc_ddp, opt_ae, opt_d = accelerator.prepare(AutoencoderForTraining(vae), discriminator, opt_ae, opt_d)
    if ema is not None:
        ema.to(device)
    parts = StageANetworks(Network(model, opt_ae, sched_ae),
                           Network(disc_ddp, opt_d, sched_d, log_grad_norm=False, active=loss_fn.discriminator_active),
                           discriminator, loss_fn, vae.decoder.conv_out.weight, accelerator.autocast)

    # 4. Resume -------------------------------------------------------------------------------------
    run.track(models={"vae": vae, "discriminator": discriminator},
              states={"opt_ae": opt_ae, "opt_d": opt_d, "sched_ae": sched_ae, "sched_d": sched_d},
              ema=ema, ema_of=vae, extra_state=lambda: {"logvar": float(loss_fn.logvar)})
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

    # 5. The step body, on this micro-step's images; the loop is ldm_core/training/run.py's `TrainingRun.train`
    factor = vae_downsampling_factor(vae)

    def micro_step(micro: MicroStep) -> Iterator[Update]:
        x, _ = images.batch(micro.index, device)
        if cfg.data.channel_shuffle:  # its own stream, so the posterior's samples stay as without it
            x = shuffle_channels(x, seeded_generator(tc.seed, micro.index, accelerator.process_index,
                                                     CHANNEL_SHUFFLE_STREAM))
        if cfg.data.reexpose:  # likewise
            x = reexpose(x, seeded_generator(tc.seed, micro.index, accelerator.process_index, REEXPOSE_STREAM),
                         cfg.data.reexpose)
        if cfg.data.resaturate:  # likewise
            x = resaturate(x, seeded_generator(tc.seed, micro.index, accelerator.process_index, RESATURATE_STREAM),
                           cfg.data.resaturate)
        transform = None
        if lc.equivariance != "none" or lc.latent_noise:  # likewise; off, nothing is drawn
            transform = draw_transform(lc.equivariance, lc.equivariance_share, lc.latent_noise,
                                       x.shape[-1] // factor, factor,
                                       seeded_generator(tc.seed, micro.index, accelerator.process_index,
                                                        LATENT_TRANSFORM_STREAM, device=device))
        return autoencoder_micro_step(parts, micro, x, run.generator(micro.index, device), transform)

    # 6. The loop -----------------------------------------------------------------------------------
    model.train()
    disc_ddp.train()
    run.train(micro_step, [parts.autoencoder, parts.discriminator], desc="Stage A",
              lr=lambda: sched_ae.get_last_lr()[0],
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
