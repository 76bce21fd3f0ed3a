"""Which images each step sees: the train / validation split and deterministic per-step batches.

The batch of a micro-step is a pure function of the step, so a resumed run sees the same data.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm_core.data.image_files import DataError
from ldm_core.image_values import to_model_input


def train_val_split(n: int, val_count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic disjoint split of range(n) into (train, validation) index arrays, each sorted.

    `val_count` is clipped so that at least one training image remains.
    """
    if n < 1:
        raise DataError(f"Cannot split a dataset of {n} images; at least one image is needed.")
    if val_count < 0:
        raise DataError(f"val_count must be 0 or more, got {val_count}.")
    val_count = min(int(val_count), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[val_count:]).astype(np.int64), np.sort(order[:val_count]).astype(np.int64)



class StepBatches:
    """Batch indices as a pure function of the micro-step, so a resumed run sees the same data.

    Each epoch is a permutation seeded by (seed, epoch); the global batch of a micro-step is split
    over processes by rank. Flips are drawn from (seed, epoch, index), so augmentation resumes exactly too.
    """

    def __init__(self, indices: np.ndarray, batch_size: int, world_size: int, rank: int, seed: int, flip: bool):
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.flip = flip
        global_batch = batch_size * world_size
        if len(self.indices) < global_batch:
            raise ValueError(f"The training split has {len(self.indices)} images, fewer than one global batch "
                             f"({batch_size} per process x {world_size} processes). Use more images or a smaller "
                             f"train.batch_size.")
        self.steps_per_epoch = len(self.indices) // global_batch

    def __call__(self, micro_step: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, within = divmod(micro_step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        start = within * self.batch_size * self.world_size + self.rank * self.batch_size
        chosen = order[start:start + self.batch_size]
        flips = np.random.default_rng([self.seed, epoch, 1]).random(len(self.indices))[chosen] < 0.5
        return self.indices[chosen], (flips if self.flip else np.zeros_like(flips))


def images_to_batch(images_uint8: np.ndarray, indices: np.ndarray, flips: np.ndarray,
                    device: torch.device) -> torch.Tensor:
    """Gather uint8 images, flip where asked, and map to [-1, 1] floats on `device`."""
    batch = torch.from_numpy(np.ascontiguousarray(images_uint8[indices])).to(device)
    if flips.any():
        mask = torch.from_numpy(flips).to(device)
        batch = torch.where(mask[:, None, None, None], batch.flip(-1), batch)
    return to_model_input(batch)



def reexpose(batch: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Each image of a batch in [-1, 1], with `probability`, shown at another exposure and contrast:
    x' = clip(m' + g * (x - m), -1, 1), m the image's mean level, m' uniform in [-1, 1] and g log-uniform in
    [1/2, 2], the same for its three channels.

    A colour augmentation for a few dozen photographs, which rarely reach black or white: re-exposed, they
    show the autoencoder dark, bright, low- and high-contrast versions of every scene, clipped shadows and
    skies included, so it does not learn their mid-tones as the only levels there are (docs/real-photographs.md).
    """
    n = batch.shape[0]
    draws = torch.rand(n, 3, generator=generator, device=generator.device).to(batch.device, batch.dtype)
    chosen = (draws[:, 0] < probability).to(batch.dtype)[:, None, None, None]
    mean = batch.mean(dim=(1, 2, 3), keepdim=True)
    target = (draws[:, 1] * 2 - 1)[:, None, None, None]
    gain = torch.exp2(draws[:, 2] * 2 - 1)[:, None, None, None]
    shown = (target + gain * (batch - mean)).clamp(-1, 1)
    return chosen * shown + (1 - chosen) * batch


def resaturate(batch: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Each image of a batch in [-1, 1], with `probability`, with its colours moved away from (or towards)
    grey: x' = clip(g + s * (x - g), -1, 1), g each pixel's mean over its channels, s log-uniform in [1/2, 4].

    Photographs rarely hold a pure primary; pushed out of the cube and clipped, their colours reach its edges
    and corners, which an autoencoder that has never seen them desaturates by tens of levels
    (docs/real-photographs.md).
    """
    n = batch.shape[0]
    draws = torch.rand(n, 2, generator=generator, device=generator.device).to(batch.device, batch.dtype)
    chosen = (draws[:, 0] < probability).to(batch.dtype)[:, None, None, None]
    factor = torch.exp2(draws[:, 1] * 3 - 1)[:, None, None, None]
    grey = batch.mean(dim=1, keepdim=True)
    shown = (grey + factor * (batch - grey)).clamp(-1, 1)
    return chosen * shown + (1 - chosen) * batch


def shuffle_channels(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image's colour channels in an order drawn from `generator` (one of the six of RGB).

    A colour augmentation that keeps every other statistic of a photograph: a hue becomes another hue, an
    edge stays the edge. On a few photographs an autoencoder otherwise learns their colours as a palette
    and shifts colours it has not seen (docs/real-photographs.md).
    """
    order = torch.argsort(torch.rand(batch.shape[0], batch.shape[1], generator=generator,
                                     device=generator.device), dim=1).to(batch.device)
    return torch.gather(batch, 1, order[:, :, None, None].expand_as(batch))
