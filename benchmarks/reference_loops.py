"""The reference training steps our trainers are measured against, written as the references run them.

Stage A: CompVis latent-diffusion as written (`ldm/models/autoencoder.py: AutoencoderKL.training_step`
with `ldm/modules/losses/contperceptual.py: LPIPSWithDiscriminator`) under PyTorch Lightning's two-
optimizer loop: for every batch, `training_step` runs once per optimizer and each call does a full
encode/decode forward; the generator half evaluates the discriminator and the adaptive weight whatever
the step (before `disc_start` they are multiplied by `disc_factor = 0`); the discriminator half computes
its loss times 0 and still steps its optimizer. fp32, plain Adam(0.5, 0.9).

Stage B: the diffusers text-to-image training pattern (`examples/text_to_image/train_text_to_image.py`):
every step encodes the batch through the frozen VAE, samples the posterior, scales it, adds noise at
uniform timesteps and regresses the noise with MSE; fp32, plain AdamW.

These are benchmark baselines only; they share the models (AutoencoderKL, the PatchGAN, LPIPS, the U-Net)
with our trainers so that only the loop differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ldm_stage_a_step(vae, discriminator, perceptual, loss_cfg, opt_ae, opt_d, x: torch.Tensor,
                     global_step: int) -> None:
    """One Lightning batch of LDM's AutoencoderKL: generator update, then discriminator update."""
    disc_factor = loss_cfg.disc_factor if global_step >= loss_cfg.disc_start else 0.0  # adopt_weight
    last_layer = vae.decoder.conv_out.weight
    logvar = torch.zeros((), device=x.device)  # LDM's logvar is not in any optimizer: it stays at init

    # optimizer_idx 0 (train encoder+decoder)
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    rec_loss = (x - recon).abs() + loss_cfg.perceptual_weight * perceptual(x, recon)
    nll_loss = rec_loss / torch.exp(logvar) + logvar
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = torch.sum(posterior.kl()) / x.shape[0]
    logits_fake = discriminator(recon)
    g_loss = -torch.mean(logits_fake)
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach()
    d_weight = d_weight * loss_cfg.disc_weight
    loss = nll_loss + loss_cfg.kl_weight * kl_loss + d_weight * disc_factor * g_loss
    opt_ae.zero_grad(set_to_none=True)
    loss.backward()
    opt_ae.step()

    # optimizer_idx 1 (train the discriminator): Lightning calls training_step again, forward included.
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    logits_real = discriminator(x.detach())
    logits_fake = discriminator(recon.detach())
    d_loss = disc_factor * 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()


def text_to_image_stage_b_step(vae, unet, noise_scheduler, optimizer, x: torch.Tensor,
                               generator: torch.Generator) -> None:
    """One step of the diffusers text-to-image example's loop, unconditional."""
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.sample(generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps).sample
    loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
