"""Stage A options that shape the latent space for Stage B, each off by default (stage_a_vae/config.py, `loss.*`).

- `equivariance: scale` (Skorokhodov et al., "Improving the Diffusability of Autoencoders", ICML 2025, eq. 5):
  on a share of the steps the latent is downscaled 2x (bilinear) before decoding, and the whole loss is
  taken against the image downscaled the same way: `|| down2(x) - D(down2(E(x))) ||`.
- `equivariance: eqvae` (Kouzelis et al., "EQ-VAE", ICML 2025; zelaki/eqvae `ldm/models/autoencoder.py`): on a
  share of the steps the latent is resized by s, uniform in [0.25, 0.97], and turned by a, a random number of
  quarter turns (1 to 3), and the whole loss is taken against the image resized and turned alike:
  `|| T(x) - D(T(E(x))) ||` with T = rot90^a o bilinear_s.
- `latent_noise: tau` (RAE, l-DeTok): the decoder sees `z + sigma * eps`, sigma = tau * U(0, 1) times the
  batch's latent std, so it learns to decode the imperfect latents a sampler gives.

A transform is drawn per micro-step from its own random stream, the same for the whole micro-batch (the
resized latents must share one size), and `LatentTransform.latent` and `.image` apply exactly the same
resize and turn to the latent and to the image (tests/test_latent_regularisers.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

EQVAE_SCALES = (0.25, 0.97)


@dataclass(frozen=True)
class LatentTransform:
    """What one micro-step does to its latents before decoding, and to its images as the loss's target.

    Parameters:
        size: the latent's side after a bilinear resize (None: unchanged); the image is resized to size * f.
        turns: quarter turns (counter-clockwise, `torch.rot90`) applied after the resize.
        noise: Gaussian noise added to the latent, its std as a multiple of the batch's latent std.
        generator: draws the noise.
        factor: the autoencoder's downsampling factor f.
    """

    size: Optional[int] = None
    turns: int = 0
    noise: float = 0.0
    generator: Optional[torch.Generator] = None
    factor: int = 8

    def latent(self, z: torch.Tensor) -> torch.Tensor:
        z = self._geometric(z, self.size)
        if self.noise:
            eps = torch.randn(z.shape, generator=self.generator, device=self.generator.device).to(z.device, z.dtype)
            z = z + self.noise * z.detach().std() * eps
        return z

    def image(self, x: torch.Tensor) -> torch.Tensor:
        return self._geometric(x, None if self.size is None else self.size * self.factor)

    def _geometric(self, t: torch.Tensor, size: Optional[int]) -> torch.Tensor:
        if size is not None and size != t.shape[-1]:
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=size < t.shape[-1])
        return torch.rot90(t, self.turns, dims=(2, 3)) if self.turns else t


def draw_transform(kind: str, share: float, latent_noise: float, latent_size: int, factor: int,
                   generator: torch.Generator) -> Optional[LatentTransform]:
    """This micro-step's transform (None: the plain step), drawn from `generator`.

    Parameters:
        kind: "none", "scale" or "eqvae" (`loss.equivariance`).
        share: the share of micro-steps that get the geometric transform (`loss.equivariance_share`).
        latent_noise: tau of `loss.latent_noise` (0: off).
        latent_size: the latent's side this micro-step (images are square).
    """
    draws = torch.rand(3, generator=generator, device=generator.device).tolist()
    size, turns = None, 0
    if kind != "none" and draws[0] < share:
        if kind == "scale":
            size = max(1, latent_size // 2)
        else:
            low, high = EQVAE_SCALES
            size = max(1, round(latent_size * (low + (high - low) * draws[1])))
            turns = 1 + min(2, int(draws[2] * 3))
    noise = latent_noise * torch.rand((), generator=generator, device=generator.device).item() if latent_noise else 0.0
    if size is None and not turns and not noise:
        return None
    return LatentTransform(size=size, turns=turns, noise=noise, generator=generator, factor=factor)
