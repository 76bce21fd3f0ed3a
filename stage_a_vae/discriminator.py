"""The PatchGAN discriminator of pix2pix (Isola et al. 2017), as used by taming-transformers and LDM.

Architecture follows CompVis/taming-transformers ``taming/modules/discriminator/model.py``: a stride-2
4x4 convolution without normalisation, ``num_layers - 1`` more stride-2 convolutions doubling the width
(capped at 8x), one stride-1 convolution, each followed by a normalisation and LeakyReLU(0.2), and a final
stride-1 convolution to one logit per patch. With the defaults each logit sees a 70x70 receptive field.

The normalisation is a choice here. LDM uses BatchNorm, whose statistics are per process under DDP (and
whose running-stat buffers trip in-place autograd errors when the discriminator runs twice in one step).
GroupNorm, the default, normalises each sample on its own, so its result does not depend on the batch
split across processes, the per-process batch size, or train/eval mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("group", "batch", "sync_batch", "instance")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        # 32 groups as in the autoencoder; fewer when a narrow test model has fewer channels.
        return nn.GroupNorm(math.gcd(32, channels), channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "sync_batch":
        return nn.SyncBatchNorm(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"Unknown discriminator norm {norm!r}; choose one of {', '.join(NORMS)}.")


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: one real/fake logit per overlapping image patch.

    Parameters:
        input_channels (`int`, defaults to 3): channels of the images judged.
        channels (`int`, defaults to 64): width of the first convolution (``ndf`` in pix2pix).
        num_layers (`int`, defaults to 3): number of stride-2 convolutions; 3 gives 70x70 patches.
        norm (`str`, defaults to ``"group"``): ``group`` (GroupNorm, rank-independent under DDP),
            ``batch`` (LDM's choice), ``sync_batch`` (BatchNorm with statistics over all processes), or
            ``instance`` (InstanceNorm with affine parameters).

    Output shape for an ``(N, C, H, W)`` input with 3 layers: ``(N, 1, H/8 - 2, W/8 - 2)``.
    """

    def __init__(self, input_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"Unknown discriminator norm {norm!r}; choose one of {', '.join(NORMS)}.")
        if num_layers < 1 or channels < 1 or input_channels < 1:
            raise ValueError(f"NLayerDiscriminator needs positive sizes, got input_channels={input_channels}, "
                             f"channels={channels}, num_layers={num_layers}.")
        # A bias before a norm that subtracts each channel's mean is dead weight (taming drops it for
        # BatchNorm). GroupNorm only removes a group's mean, so there the bias still acts and is kept.
        use_bias = norm == "group"

        layers: list[nn.Module] = [
            nn.Conv2d(input_channels, channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            # The last of these keeps the resolution (stride 1), as in pix2pix.
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, kernel_size=4, stride=stride, padding=1, bias=use_bias),
                _norm_layer(norm, channels * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.norm = norm
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return patch logits ``(N, 1, h, w)``; positive means "real"."""
        return self.main(images)


def _init_weights(module: nn.Module) -> None:
    # taming's `weights_init` (after pix2pix): convolutions N(0, 0.02); norm scales N(1, 0.02), shifts 0.
    # Convolution biases start at 0 as in pix2pix's `init_weights` (taming leaves PyTorch's default).
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._NormBase)) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_discriminator(loss_cfg) -> NLayerDiscriminator:
    """Build the discriminator described by a `VAELossConfig` (``disc_channels``, ``disc_num_layers``,
    ``disc_norm``) for RGB images."""
    return NLayerDiscriminator(input_channels=3, channels=loss_cfg.disc_channels,
                               num_layers=loss_cfg.disc_num_layers, norm=loss_cfg.disc_norm)


__all__ = ["NLayerDiscriminator", "NORMS", "build_discriminator"]
