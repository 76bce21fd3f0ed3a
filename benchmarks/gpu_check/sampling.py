"""Section: sampling. U-Net forwards/s and VAE decodes, bf16 weights against fp32, and images/s of
DPM-Solver++ end to end through `LatentDiffusionPipeline`."""

from __future__ import annotations

import copy
from typing import Any

import torch

from benchmarks.gpu_check import plans
from benchmarks.gpu_check.runner import Runner, check, free_memory, measure, skipped_row


def _precision_rows(r: Runner, unet, vae, sampler, size: int, precision: str) -> tuple[list[dict], list[dict]]:
    from pipelines.latent_diffusion import LatentDiffusionPipeline

    plan, dev, dtype = r.plan, r.device, unet.dtype
    rows, checks = [], []
    noisy = torch.randn(plan.sample_batch, 4, size, size, device=dev, dtype=dtype)
    t = torch.full((plan.sample_batch,), 500, device=dev)
    z = torch.randn(plan.decode_batch, 4, size, size, device=dev, dtype=dtype)
    with torch.inference_mode():
        rows.append(measure(r, lambda: unet(noisy, t).sample, plan.sample_batch, what="U-Net forward",
                            precision=precision))
        decoded = vae.decode(z).sample
        checks.append(check(f"{precision}: VAE decode finite", bool(torch.isfinite(decoded).all()),
                            f"max |x| {float(decoded.abs().amax()):.3g}"))
        rows.append(measure(r, lambda: vae.decode(z).sample, plan.decode_batch, what="VAE decode",
                            precision=precision))
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=copy.deepcopy(sampler))
    pipe.set_progress_bar_config(disable=True)

    def sample(steps=plan.dpm_steps):
        return pipe(batch_size=plan.sample_batch, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator(dev).manual_seed(0), decode_batch_size=plan.decode_batch).images

    if r.affords("sampling", plan.row_s):
        sample(2)  # warm-up at the same batch; the FLOP count's call warms up the rest
        rows.append(measure(r, sample, plan.sample_batch, what=f"DPM-Solver++ {plan.dpm_steps} steps, end to end",
                            precision=precision, warmup=0, iters=1))
    else:
        rows.append(skipped_row("budget", plan.sample_batch, what="DPM-Solver++ end to end", precision=precision))
    del noisy, z, decoded
    free_memory(dev)
    return rows, checks


def section_sampling(r: Runner) -> dict[str, Any]:
    from stage_a_vae.architectures import build_autoencoder
    from stage_b_diffusion.architectures import build_unet
    from stage_b_diffusion.noise_schedule import build_noise_scheduler, make_sampler

    plan, dev = r.plan, r.device
    cfg = plans.stage_b_config(plan)
    size = cfg.data.resolution // 8
    torch.manual_seed(0)
    models = {"fp32": (build_unet(cfg.model, latent_channels=4, latent_size=size).to(dev).eval(),
                       build_autoencoder(plans.stage_a_config(plan).model).to(dev).eval())}
    models["bf16"] = tuple(copy.deepcopy(m).to(torch.bfloat16) for m in models["fp32"])  # bf16 weights, as inference runs
    sampler = make_sampler("dpmsolver++", build_noise_scheduler(cfg.diffusion))
    rows, checks = [], []
    for precision, (unet, vae) in models.items():
        got, found = _precision_rows(r, unet, vae, sampler, size, precision)
        rows += got
        checks += found
    for row in rows:
        if "step_s" in row:
            row["calls_per_s"] = 1 / row["step_s"]
    by = {(w["what"], w["precision"]): w for w in rows if "step_s" in w}
    ratios = {what: by[what, "fp32"]["step_s"] / by[what, "bf16"]["step_s"]
              for what, _ in by if (what, "fp32") in by and (what, "bf16") in by}
    return {"image_size": cfg.data.resolution, "latent_shape": [4, size, size], "rows": rows,
            "bf16_speedup_over_fp32": ratios, "checks": checks}
