"""Stage A built and stepped by hand the way `train_vae` does, for the correctness and speed sections."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from benchmarks.gpu_check.runner import autocast as _autocast


@dataclass
class StageAParts:
    vae: Any
    discriminator: Any
    loss_fn: Any
    model: Any  # AutoencoderForTraining(vae), or its torch.compile
    opt_ae: Any
    opt_d: Any
    scaler: Any
    last_layer: torch.Tensor
    max_grad_norm: float


def build_perceptual(loss_cfg, device: torch.device) -> tuple[Any, str]:
    """LPIPS with the config's VGG trunk where its weights are on this machine, else a random trunk of the
    same cost (nothing is downloaded; the trunk used is reported)."""
    from ldm_core.models.pretrained import MissingWeightsError
    from stage_a_vae.perceptual import build_lpips

    try:
        return build_lpips(loss_cfg.lpips_trunk, loss_cfg.lpips_weights).to(device), loss_cfg.lpips_trunk
    except MissingWeightsError as err:
        return build_lpips("random").to(device), f"random (the VGG16 file is missing: {str(err)[:120]})"


def build_stage_a(cfg, perceptual, device: torch.device, *, channels_last: bool = False, fp16: bool = False,
                  ldm_optimizers: bool = False) -> StageAParts:
    """Our Stage A models, loss and optimizers as `train_vae` builds them (stage_a_vae/train.py, section 3),
    without Accelerate; with `ldm_optimizers` plain Adam(0.5, 0.9) for both, as LDM's `configure_optimizers`."""
    from ldm_core.training.accelerator import apply_memory_format
    from ldm_core.training.optimization import make_adam
    from stage_a_vae.discriminator import build_discriminator
    from stage_a_vae.losses import LPIPSWithDiscriminatorLoss
    from stage_a_vae.architectures import build_autoencoder
    from stage_a_vae.train import AutoencoderForTraining

    torch.manual_seed(0)
    tc, lc = replace(cfg.train, channels_last=channels_last), cfg.loss
    vae = apply_memory_format(build_autoencoder(cfg.model), tc).to(device)
    disc = apply_memory_format(build_discriminator(lc), tc).to(device)
    loss_fn = LPIPSWithDiscriminatorLoss(lc, perceptual if lc.perceptual_weight > 0 else None, disc).to(device)
    if ldm_optimizers:
        opt_ae = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=tc.lr, betas=(0.5, 0.9))
    else:
        trained = list(vae.parameters()) + ([loss_fn.logvar] if lc.learn_logvar else [])
        opt_ae = make_adam(trained, tc, lr=tc.lr)
        opt_d = make_adam(disc.parameters(), tc, lr=tc.disc_learning_rate, betas=tc.disc_betas)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    return StageAParts(vae, disc, loss_fn, AutoencoderForTraining(vae), opt_ae, opt_d, scaler,
                       vae.decoder.conv_out.weight, tc.max_grad_norm)


def _has_gradients(optimizer) -> bool:
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


def _same_bits(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Bit-for-bit equality, NaN and inf included (torch.equal calls two NaN gradients different)."""
    if a is None or b is None:
        return a is None and b is None
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def step_if_gradients(scaler, optimizer) -> bool:
    """Step `optimizer` through the scaler only when some parameter has a gradient. An optimizer without any
    (the discriminator's before disc_start) makes GradScaler.step raise "No inf checks were recorded for this
    optimizer" on the unfused path (nerfstudio-project/nerfstudio#1919 guards its optimizers the same way)."""
    if not _has_gradients(optimizer):
        return False
    scaler.step(optimizer)
    return True


def _unscale_and_clip(scaler, optimizer, max_norm: float) -> None:
    # Clipping needs true gradients: unscale first (a no-op without fp16). train_vae clips both updates.
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


def stage_a_step(p: StageAParts, x: torch.Tensor, step: int, dtype: torch.dtype, generator, *,
                 inspect: bool = False) -> dict[str, Any]:
    """One optimizer step of Stage A (`autoencoder_micro_step` in stage_a_vae/train.py, applied by the loop in
    ldm_core/training/run.py) by hand: the autoencoder update, then, once the discriminator is on, its update
    on the detached reconstruction.

    As under Accelerate, the models run under autocast and the autoencoder's outputs come back in fp32
    (accelerate's `prepare_model` wraps forward in autocast and `convert_outputs_to_fp32`); the loss keeps
    its own arithmetic and LPIPS in fp32. One grad scaler serves both optimizers: each loss is scaled, each
    optimizer with gradients is stepped, and the scale is updated once per iteration (PyTorch's AMP
    examples, "Working with multiple models, losses, and optimizers"; accelerate#439 on Accelerate's shared
    scaler). With `inspect` it also returns what section 3 checks.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    device = x.device
    disc_on = p.loss_fn.discriminator_active(step)
    info: dict[str, Any] = {"step": step, "disc_on": disc_on}
    if disc_on:
        p.discriminator.requires_grad_(False)  # the autoencoder's update only scores with it
    with _autocast(device, dtype):
        recon, mean, logvar = (t.float() for t in p.model(x, generator))
        posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
        ae_loss, logs = p.loss_fn.autoencoder_loss(x, recon, posterior, step, last_layer=p.last_layer,
                                                   discriminator=p.discriminator)
    p.scaler.scale(ae_loss).backward()
    _unscale_and_clip(p.scaler, p.opt_ae, p.max_grad_norm)
    if inspect:
        info["losses"] = {"ae_loss": ae_loss.detach(), **logs}
        info["disc_grads_after_ae_step"] = sum(q.grad is not None for q in p.discriminator.parameters())
    scale = float(p.scaler.get_scale()) if p.scaler.is_enabled() else None
    info["ae_stepped"] = step_if_gradients(p.scaler, p.opt_ae)
    if inspect:  # train_vae zeroes them here; kept, they show whether the discriminator's update adds to them
        ae_grads = [None if q.grad is None else q.grad.clone() for q in p.vae.parameters()]
    if disc_on:
        p.discriminator.requires_grad_(True)
        with _autocast(device, dtype):
            d_loss, d_logs = p.loss_fn.discriminator_loss(x, recon.detach(), step)
        p.scaler.scale(d_loss).backward()
        _unscale_and_clip(p.scaler, p.opt_d, p.max_grad_norm)
        if inspect:
            info["losses"].update(d_logs)  # d_loss, logits_real, logits_fake
            grads = [q.grad for q in p.discriminator.parameters() if q.grad is not None]
            info["disc_grads_after_d_step"] = len(grads)
            # Under fp16 an inf gradient is routine: the scaler skips that update and lowers the scale.
            info["disc_grads_finite"] = sum(bool(torch.isfinite(g).all()) for g in grads)
            info["ae_grads_unchanged_by_d_step"] = all(
                _same_bits(a, q.grad) for a, q in zip(ae_grads, p.vae.parameters()))
    info["d_stepped"] = step_if_gradients(p.scaler, p.opt_d)
    p.scaler.update()
    if scale is not None:
        info["scale"] = scale
        info["scaler_skipped_step"] = float(p.scaler.get_scale()) < scale  # an inf gradient halves the scale
    p.opt_ae.zero_grad(set_to_none=True)
    p.opt_d.zero_grad(set_to_none=True)
    if inspect:
        info["losses"] = {k: float(v) for k, v in info["losses"].items()}
        info["opt_d_state_tensors"] = len(p.opt_d.state)
    return info
