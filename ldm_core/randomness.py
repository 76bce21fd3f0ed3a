"""Seeded random streams: one per training micro-step and process, one per generated image.

Every stream comes from numpy's SeedSequence of its keys, so streams for different keys are
independent (not consecutive integer seeds) and the same on any machine.
"""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from numpy's SeedSequence(keys): independent streams for different
    keys (not consecutive integer seeds), reproducible on any machine."""
    if any(k < 0 for k in keys):
        raise ValueError(f"Seed keys must be non-negative, got {keys}.")
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2 ** 63 - 1))


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for every random draw of one micro-step on one process."""
    return seeded_generator(seed, step, rank, device=device)



def image_generator(base_seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of image `index`: seeded from (base_seed, index), so seeds of different images are
    independent (not consecutive integers) and reproducible."""
    return seeded_generator(base_seed, index, device=device)

