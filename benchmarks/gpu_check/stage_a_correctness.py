"""Section: Stage A correctness under bf16 and fp16 (benchmarks/gpu_check/stage_a_parts.py steps it)."""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.gpu_check import plans
from benchmarks.gpu_check.runner import FP16_MAX, Runner, check, free_memory, images
from benchmarks.gpu_check.stage_a_parts import build_perceptual, build_stage_a, stage_a_step


class ActivationPeaks:
    """Forward hooks on every block of the encoder and decoder: the largest |activation| and its dtype."""

    BLOCKS = ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_out")

    def __init__(self, vae):
        self.peaks: dict[str, float] = {}
        self.dtypes: dict[str, str] = {}
        self.handles = []
        for part in ("encoder", "decoder"):
            for name, child in getattr(vae, part).named_children():
                if name not in self.BLOCKS:
                    continue
                blocks = enumerate(child) if isinstance(child, torch.nn.ModuleList) else [(None, child)]
                for i, block in blocks:
                    label = f"{part}.{name}" + ("" if i is None else f".{i}")
                    self.handles.append(block.register_forward_hook(self._hook(label)))

    def _hook(self, label: str):
        def hook(module, inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            value = float(t.detach().abs().amax())
            value = value if math.isfinite(value) else math.inf
            self.peaks[label] = max(self.peaks.get(label, 0.0), value)
            self.dtypes[label] = str(t.dtype).replace("torch.", "")
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()



def _precision_checks(r: Runner, cfg, perceptual, x: torch.Tensor, label: str, dtype: torch.dtype) -> tuple[dict, list]:
    p = build_stage_a(cfg, perceptual, r.device, fp16=dtype is torch.float16)
    peaks = ActivationPeaks(p.vae)
    generator = torch.Generator(r.device).manual_seed(0)
    try:
        steps = [stage_a_step(p, x, s, dtype, generator, inspect=True) for s in range(r.plan.correctness_steps)]
    finally:
        peaks.remove()
    disc_start = cfg.loss.disc_start
    before = [s for s in steps if s["step"] < disc_start]
    after = [s for s in steps if s["step"] >= disc_start]
    n_disc = sum(1 for _ in p.discriminator.parameters())
    tensors = [*p.vae.parameters(), *p.discriminator.parameters(), p.loss_fn.logvar]
    states = [t for opt in (p.opt_ae, p.opt_d) for st in opt.state.values() for t in st.values()
              if torch.is_tensor(t) and t.is_floating_point()]
    not_fp32 = sorted({str(t.dtype) for t in tensors + states if t.dtype != torch.float32})
    bad_losses = [(s["step"], k, v) for s in steps for k, v in s["losses"].items() if not math.isfinite(v)]
    d_weights = [s["losses"]["d_weight"] for s in after]
    max_weight = 1e4 * cfg.loss.disc_weight  # the adaptive weight's clamp (taming's calculate_adaptive_weight)
    top = max(peaks.peaks, key=peaks.peaks.get)
    out_dtype = peaks.dtypes.get("decoder.conv_out")
    checks = [
        check(f"{label}: every loss finite", not bad_losses and bool(steps),
              bad_losses or f"{len(steps)} steps, {len(steps[0]['losses'])}+ terms each"),
        check(f"{label}: parameters and optimizer states still fp32", not not_fp32,
              not_fp32 or f"{len(tensors)} parameters, {len(states)} optimizer tensors"),
        check(f"{label}: no discriminator gradients or optimizer step before disc_start",
              bool(before) and all(s["disc_grads_after_ae_step"] == 0 and not s["d_stepped"]
                                   and s["opt_d_state_tensors"] == 0 for s in before),
              [{k: s[k] for k in ("step", "disc_grads_after_ae_step", "d_stepped", "opt_d_state_tensors")}
               for s in before]),
        check(f"{label}: discriminator gradients present and stepped after disc_start",
              bool(after) and all(s["disc_grads_after_d_step"] == n_disc and s["d_stepped"]
                                  and s["disc_grads_after_ae_step"] == 0 for s in after),
              [{k: s[k] for k in ("step", "disc_grads_after_ae_step", "disc_grads_after_d_step", "disc_grads_finite",
                                  "d_stepped")} for s in after] + [f"{n_disc} discriminator parameters"]),
        check(f"{label}: autoencoder gradients untouched by the discriminator step",
              bool(after) and all(s["ae_grads_unchanged_by_d_step"] for s in after),
              [s["ae_grads_unchanged_by_d_step"] for s in after]),
        check(f"{label}: adaptive weight finite and positive after disc_start",
              bool(d_weights) and all(math.isfinite(w) and w > 0 for w in d_weights), d_weights),
        check(f"{label}: adaptive weight below its clamp (a clamped weight means a gradient underflowed)",
              bool(d_weights) and all(w < max_weight for w in d_weights), {"d_weight": d_weights, "clamp": max_weight}),
        # The fp16 limit matters even under bf16: it says whether this autoencoder could run in fp16 at all
        # (SD-XL's VAE overflows there: madebyollin/sdxl-vae-fp16-fix, diffusers' AutoencoderKL `force_upcast`).
        check(f"{label}: largest activation of every encoder/decoder block below fp16's 65,504",
              all(v < FP16_MAX for v in peaks.peaks.values()), f"largest: {top} {peaks.peaks[top]:.4g}"),
        check(f"{label}: the autoencoder ran in {label} under autocast", out_dtype == str(dtype).replace("torch.", ""),
              f"decoder.conv_out output dtype {out_dtype}"),
    ]
    if dtype is torch.float16:
        checks.append(check("fp16: the grad scaler stepped exactly the optimizers with gradients",
                            all(s["d_stepped"] == s["disc_on"] and s["ae_stepped"] for s in steps),
                            [{k: s.get(k) for k in ("step", "ae_stepped", "d_stepped", "scale", "scaler_skipped_step")}
                             for s in steps]))
    skipped = [s["step"] for s in steps if s.get("scaler_skipped_step")]
    result = {"steps": steps, "activation_peaks": peaks.peaks, "activation_dtypes": peaks.dtypes,
              # An inf/NaN gradient makes the scaler skip that update and halve its scale: recorded, not a
              # failure. LDM's loss sums over C*H*W rather than averaging, so its gradients are C*H*W times
              # a mean loss's, and the scaler's 65,536 start is likely to overflow fp16 for the first steps.
              "scaler_skipped_steps": skipped if dtype is torch.float16 else None,
              "fp16_headroom": FP16_MAX / max(peaks.peaks.values()) if peaks.peaks[top] > 0 else None}
    return result, checks


def section_stage_a_correctness(r: Runner) -> dict[str, Any]:
    plan = r.plan
    disc_start = plan.correctness_steps // 2
    cfg = plans.stage_a_config(plan, (f"loss.disc_start={disc_start}",))
    perceptual, trunk = build_perceptual(cfg.loss, r.device)
    x = images(plan.correctness_batch, cfg.data.resolution, r.device)
    results: dict[str, Any] = {"preset": cfg.model.preset, "resolution": cfg.data.resolution,
                               "batch": plan.correctness_batch, "disc_start": disc_start,
                               "steps": plan.correctness_steps, "lpips_trunk": trunk, "precisions": {}}
    checks: list[dict] = []
    for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        try:
            results["precisions"][label], found = _precision_checks(r, cfg, perceptual, x, label, dtype)
            checks += found
        except Exception as err:
            # fp16 autocast lacks kernels on some CPUs: not a failure of the code under test there.
            on_cpu = (r.device.type == "cpu" and dtype is torch.float16
                      and (isinstance(err, NotImplementedError) or "Half" in str(err)))
            checks.append(check(f"{label}: Stage A steps ran", False, f"{type(err).__name__}: {err}"[:500],
                                skipped=on_cpu))
        free_memory(r.device)
    results["checks"] = checks
    return results
