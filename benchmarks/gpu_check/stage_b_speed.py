"""Section: Stage B's speed. unet-ldm-kl8 on 32x32x4 latents at three batches in bf16, against the diffusers
text-to-image step (which encodes every batch through the frozen VAE).

The timed step is Stage B's optimizer step as `train_unet` takes it (the loss under autocast, backward,
clipping, fused AdamW, the EMA), without Accelerate, so that FLOPs can be counted on one call; the trainer
itself runs in the correctness section.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.gpu_check import plans
from benchmarks.gpu_check.references import REFERENCE_FIGURES
from benchmarks.gpu_check.runner import Runner, autocast, free_memory, images, measure, skipped_row


def _ours_rows(r: Runner, cfg, nets, size: int) -> list[dict[str, Any]]:
    from stage_b_diffusion.objective import diffusion_loss

    plan, dev, tc = r.plan, r.device, cfg.train
    unet, scheduler, optimizer, ema = nets.unet, nets.noise_scheduler, nets.optimizer, nets.ema
    if ema is not None:
        ema.to(dev)
    generator = torch.Generator(dev).manual_seed(0)
    rows = []
    for batch in plan.b_batches:
        if not r.affords("stage_b_speed", plan.row_s):
            rows.append(skipped_row("budget", batch, path="ours"))
            continue
        latents = torch.randn(batch, 4, size, size, device=dev)  # as drawn from the latent cache

        def step():
            with autocast(dev, torch.bfloat16):
                loss, _ = diffusion_loss(unet, latents, scheduler, cfg.diffusion, generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), tc.max_grad_norm or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(unet.parameters())

        rows.append(measure(r, step, batch, path="ours", precision="bf16"))
        optimizer.zero_grad(set_to_none=True)
        del latents
        free_memory(dev)
    return rows


def _text_to_image_row(r: Runner, cfg, unet, scheduler) -> dict[str, Any]:
    """The diffusers text-to-image step: encode every batch through the frozen VAE, plain AdamW; under bf16
    autocast, as that example runs with --mixed_precision=bf16."""
    from benchmarks.reference_loops import text_to_image_stage_b_step
    from stage_a_vae.architectures import build_autoencoder

    plan, dev = r.plan, r.device
    batch = plan.b_reference_batch
    if not r.affords("stage_b_speed", plan.row_s):
        return skipped_row("budget", batch, path="diffusers text-to-image")
    vae = build_autoencoder(plans.stage_a_config(plan).model).to(dev).eval().requires_grad_(False)
    reference_opt = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    pictures = images(batch, cfg.data.resolution, dev)
    generator = torch.Generator(dev).manual_seed(0)

    def reference_step():
        with autocast(dev, torch.bfloat16):
            text_to_image_stage_b_step(vae, unet, scheduler, reference_opt, pictures, generator)

    row = measure(r, reference_step, batch, path="diffusers text-to-image", precision="bf16")
    del vae, reference_opt, pictures
    return row


def section_stage_b_speed(r: Runner) -> dict[str, Any]:
    from stage_b_diffusion.architectures import count_parameters
    from stage_b_diffusion.networks import build_stage_b

    cfg = plans.stage_b_config(r.plan)
    size = cfg.data.resolution // 8
    nets = build_stage_b(cfg, latent_channels=4, latent_size=size)  # the trainer's U-Net, AdamW and EMA
    unet = nets.unet.to(r.device)
    rows = _ours_rows(r, cfg, nets, size)
    nets.optimizer = nets.ema = None  # their state would crowd the reference's row
    free_memory(r.device)
    rows.append(_text_to_image_row(r, cfg, unet, nets.noise_scheduler))
    batch = r.plan.b_reference_batch
    ours = next((w for w in rows if w["path"] == "ours" and w["batch"] == batch and "step_s" in w), None)
    ref = rows[-1] if "step_s" in rows[-1] else None
    return {"preset": cfg.model.preset, "parameters": count_parameters(unet), "latent_shape": [4, size, size],
            "rows": rows, "ours_over_text_to_image": ref["step_s"] / ours["step_s"] if ours and ref else None,
            "anchors": [REFERENCE_FIGURES["stage_b_images_per_s"], REFERENCE_FIGURES["conv_utilisation"]]}
