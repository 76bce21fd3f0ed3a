"""A named model architecture plus a config's overrides: the check and the merge both stages use.

An architecture is a dict of diffusers keyword arguments in a stage's table (`VAE_ARCHITECTURES` in
stage_a_vae/architectures.py, `UNET_ARCHITECTURES` in stage_b_diffusion/architectures.py). The config key
`model.preset` names one; `model.block_out_channels`, `model.layers_per_block` and `model.norm_num_groups`,
where not null, replace its values. A YAML preset in configs/ is something else: a file of settings.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

from ldm_core.config.settings import ConfigError, _require


def check_architecture(model: Any, architectures: Mapping[str, dict]) -> None:
    """The model section of a config: `preset` names an entry of `architectures`, `block_out_channels` is a
    non-empty list of positive widths or null, and `layers_per_block` and `norm_num_groups` are positive or
    null."""
    _require(model.preset in architectures, "model.preset", model.preset, f"one of {', '.join(architectures)}")
    widths = model.block_out_channels
    _require(widths is None or (len(widths) > 0 and all(c > 0 for c in widths)), "model.block_out_channels",
             widths, "a non-empty list of positive widths, or null")
    for key in ("layers_per_block", "norm_num_groups"):
        value = getattr(model, key)
        _require(value is None or value > 0, f"model.{key}", value, "a positive integer or null")


def architecture_kwargs(model: Any, architectures: Mapping[str, dict],
                        level_block_types: Optional[tuple[str, str]] = None) -> dict:
    """A copy of the keyword arguments of architecture `model.preset`, with the config's overrides applied.

    Parameters:
        model: a model config section: `preset`, and `block_out_channels`, `layers_per_block`,
            `norm_num_groups`, each null to keep the architecture's value.
        architectures: the stage's table of named architectures (never modified).
        level_block_types: (down, up) block type of every level, for an architecture whose levels are all
            alike (the autoencoder's): `block_out_channels` may then change the number of levels and the
            block types follow it. None: the levels differ (the U-Net's attention levels), so
            `block_out_channels` must keep the architecture's number of levels.

    Raises:
        ConfigError: an unknown name, a bad override, another number of levels where it is fixed, or a
            `norm_num_groups` that does not divide every width (GroupNorm would fail inside diffusers).
    """
    check_architecture(model, architectures)
    kwargs = copy.deepcopy(architectures[model.preset])
    levels = len(kwargs["block_out_channels"])
    if model.block_out_channels is not None:
        channels = tuple(int(c) for c in model.block_out_channels)
        if level_block_types is not None:
            kwargs["down_block_types"] = (level_block_types[0],) * len(channels)
            kwargs["up_block_types"] = (level_block_types[1],) * len(channels)
        elif len(channels) != levels:
            raise ConfigError(
                f"model.block_out_channels={list(channels)} has {len(channels)} entries but preset "
                f"{model.preset!r} has {levels} levels {list(kwargs['block_out_channels'])}; give "
                f"{levels} channel counts or pick another preset ({', '.join(architectures)}).")
        kwargs["block_out_channels"] = channels
    if model.layers_per_block is not None:
        kwargs["layers_per_block"] = int(model.layers_per_block)
    if model.norm_num_groups is not None:
        kwargs["norm_num_groups"] = int(model.norm_num_groups)
    groups = kwargs["norm_num_groups"]
    bad = [c for c in kwargs["block_out_channels"] if c % groups]
    if bad:
        raise ConfigError(f"model.block_out_channels {list(kwargs['block_out_channels'])} must all be "
                          f"multiples of norm_num_groups={groups} (GroupNorm); {bad} are not.")
    return kwargs
