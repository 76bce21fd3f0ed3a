"""Exponential moving averages of trained weights (diffusers `EMAModel`)."""

from __future__ import annotations

import copy

import torch

from ldm_core.config.settings import EMAConfig


def make_ema(model: torch.nn.Module, ema_cfg: EMAConfig):
    """diffusers `EMAModel` over `model`'s parameters, or None when EMA is off.

    `foreach` updates all shadow tensors in a few fused ops instead of a Python loop over them, with the
    same values (tests/test_fast_paths.py; the time it saves: docs/performance.md).
    """
    if not ema_cfg.enabled:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=ema_cfg.decay, use_ema_warmup=ema_cfg.use_warmup,
                    inv_gamma=ema_cfg.inv_gamma, power=ema_cfg.power, foreach=True)



class ema_weights:
    """Context: evaluate `model` with the EMA weights swapped in, then put the training weights back."""

    def __init__(self, ema, model: torch.nn.Module):
        self.ema, self.model = ema, model

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())
        return False


def exported_copy(model: torch.nn.Module, ema, ema_cfg: EMAConfig) -> torch.nn.Module:
    """An eval-mode copy of `model` carrying the EMA weights when `ema.export_ema` (what a run saves and samples)."""
    exported = copy.deepcopy(model).eval()
    if ema is not None and ema_cfg.export_ema:
        ema.copy_to(exported.parameters())
    return exported
