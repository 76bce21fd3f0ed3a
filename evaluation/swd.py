"""Sliced Wasserstein distance between two sets of images: a sample metric that needs no pretrained network.

Karras et al. 2018, "Progressive Growing of GANs for Improved Quality, Stability, and Variation", appendix D:
each image is split into a Laplacian pyramid from its own size down to 16 px; from every level of every image
128 neighbourhoods of 7x7 pixels are drawn at random (3 channels: 147 values each), normalised per channel;
the distance between two sets of such descriptors is the sliced Wasserstein distance, 4 times over 128
random unit directions: the mean absolute difference of the two sets' sorted projections. It is reported per
level (the fine levels speak of texture and edges, the coarsest of colour and layout) and as the mean over
levels, times 1e3 as the paper does.

One departure, for a metric that must see a colour cast: both sets' descriptors are normalised with the
*reference* set's per-channel mean and standard deviation. The paper's code normalises each set by its own
statistics, which removes exactly the difference in mean colour and contrast between the two sets at the
coarsest level (tests/test_swd.py shows a shift growing the distance).

Where an image's neighbourhoods are drawn is a function of the image's own pixels (a hash seeds it), so the
distance does not depend on the order of the images, and a set against itself is exactly 0. Two sets of
different sizes are compared at the quantiles of the smaller (the sorted projections of the larger
interpolated there), which is the one-dimensional Wasserstein distance between them.

Descriptors are collected batch by batch (`PatchDescriptors.add`), so a set of any size is read once and only
its descriptors are kept (128 x 147 float32 a level and image: 75 KB). The cost is in sorting the
projections: about a second per level and repeat for 512 images on two CPU cores.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

COARSEST = 16  # px: the smallest pyramid level
NEIGHBOURHOOD = 7  # px: a descriptor's side
PER_IMAGE = 128  # descriptors drawn from each level of each image
REPEATS = 4  # rounds of random directions
DIRECTIONS = 128  # directions a round
SCALE = 1e3  # the paper reports SWD x 10^3
SWD_IMPL = (f"sliced Wasserstein distance of {NEIGHBOURHOOD}x{NEIGHBOURHOOD}x3 Laplacian-pyramid neighbourhoods "
            f"(Karras et al. 2018, appendix D): pyramid down to {COARSEST} px, {PER_IMAGE} per level and image, "
            f"normalised per channel by the reference set, {REPEATS} x {DIRECTIONS} random directions, x{SCALE:g}")

# The 5-tap binomial filter of Burt & Adelson's pyramid (1983), as in the paper's code.
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The separable 5x5 binomial blur of each channel, with reflected borders."""
    c = x.shape[1]
    k = _BINOMIAL.to(x.device, x.dtype)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def laplacian_pyramid(images: torch.Tensor, coarsest: int = COARSEST) -> list[torch.Tensor]:
    """Band-pass levels from the images' size down to `coarsest` px, the last one the low-pass residual.

    Parameters:
        images: float (N, C, H, W), H and W equal and a power-of-two multiple of `coarsest`.
    """
    size = images.shape[-1]
    if images.shape[-2] != size or size < coarsest or (size // coarsest) & (size // coarsest - 1) or size % coarsest:
        raise ValueError(f"The pyramid needs square images whose side is {coarsest} px times a power of two; got "
                         f"{images.shape[-2]}x{size}.")
    levels, current = [], images
    while current.shape[-1] > coarsest:
        smaller = _blur(current)[..., ::2, ::2]
        up = torch.zeros_like(current)
        up[..., ::2, ::2] = smaller
        levels.append(current - 4 * _blur(up))  # zero-insertion keeps a quarter of the energy: x4
        current = smaller
    levels.append(current)
    return levels


def _draw_neighbourhoods(level: torch.Tensor, count: int, generators: list[torch.Generator]) -> torch.Tensor:
    """`count` random 7x7 neighbourhoods of each image of a level, image i's drawn with `generators[i]`:
    (N * count, C, 7, 7)."""
    n, c, h, w = level.shape
    half = NEIGHBOURHOOD // 2
    ys = torch.stack([torch.randint(half, h - half, (count,), generator=g) for g in generators])
    xs = torch.stack([torch.randint(half, w - half, (count,), generator=g) for g in generators])
    offsets = torch.arange(-half, half + 1)
    rows = (ys[..., None] + offsets).view(n, count, NEIGHBOURHOOD, 1).expand(-1, -1, -1, NEIGHBOURHOOD)
    cols = (xs[..., None] + offsets).view(n, count, 1, NEIGHBOURHOOD).expand(-1, -1, NEIGHBOURHOOD, -1)
    flat = (rows * w + cols).reshape(n, 1, -1).expand(-1, c, -1)
    patches = level.reshape(n, c, h * w).gather(2, flat.to(level.device))
    return patches.view(n, c, count, NEIGHBOURHOOD, NEIGHBOURHOOD).transpose(1, 2).reshape(n * count, c,
                                                                                           NEIGHBOURHOOD, NEIGHBOURHOOD)


@dataclass
class PatchDescriptors:
    """The 7x7 neighbourhoods of a set of images, level by level, collected batch by batch.

    Parameters:
        seed: mixed with each image's hash into where its neighbourhoods are drawn.
        per_image: neighbourhoods drawn from each level of each image.
    """

    seed: int = 0
    per_image: int = PER_IMAGE
    levels: list[list[torch.Tensor]] = field(default_factory=list)
    images: int = 0
    size: Optional[int] = None

    def add(self, images: torch.Tensor) -> None:
        """Add uint8 images (B, 3, H, W); every image of a set must have the same square size."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SWD expects uint8 images (B, 3, H, W); got {images.dtype} {tuple(images.shape)}.")
        if self.size is not None and images.shape[-1] != self.size:
            raise ValueError(f"Every image of a set must have one size: {images.shape[-1]} px after {self.size} px.")
        self.size = images.shape[-1]
        pyramid = laplacian_pyramid(images.to(torch.float32) / 127.5 - 1)
        if not self.levels:
            self.levels = [[] for _ in pyramid]
        # Each image's positions follow from its pixels: the same image always gives the same descriptors.
        generators = [torch.Generator().manual_seed(_image_seed(image, self.seed)) for image in images.cpu()]
        for bucket, level in zip(self.levels, pyramid):
            bucket.append(_draw_neighbourhoods(level, self.per_image, generators).flatten(1))
        self.images += images.shape[0]

    def stacked(self) -> list[torch.Tensor]:
        return [torch.cat(bucket) for bucket in self.levels]


def _image_seed(image: torch.Tensor, seed: int) -> int:
    digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, repeats: int = REPEATS,
                       directions: int = DIRECTIONS) -> float:
    """The sliced Wasserstein distance between two sets of vectors (M, D) and (M', D): for each of `repeats` x
    `directions` random unit directions, the mean absolute difference of the sorted projections (the larger
    set's interpolated at the smaller's quantiles when M != M'); their mean."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Two sets of vectors of one length are needed; got {tuple(a.shape)} and {tuple(b.shape)}.")
    if len(a) > len(b):
        a, b = b, a
    results = []
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], directions, generator=generator)
        dirs /= dirs.norm(dim=0, keepdim=True)
        pa, _ = torch.sort((a @ dirs).T.contiguous(), dim=1)
        pb, _ = torch.sort((b @ dirs).T.contiguous(), dim=1)
        if pb.shape[1] != pa.shape[1]:
            pb = _at_quantiles(pb, pa.shape[1])
        results.append((pa - pb).abs().mean())
    return float(torch.stack(results).mean())


def _at_quantiles(sorted_rows: torch.Tensor, count: int) -> torch.Tensor:
    """Each sorted row linearly interpolated at the midpoints of `count` equal quantile bins."""
    m = sorted_rows.shape[1]
    position = ((torch.arange(count, dtype=torch.float64) + 0.5) * m / count - 0.5).clamp(0, m - 1)
    low = position.floor().long()
    high = (low + 1).clamp(max=m - 1)
    weight = (position - low).to(sorted_rows.dtype)
    return sorted_rows[:, low] * (1 - weight) + sorted_rows[:, high] * weight


def swd(generated: PatchDescriptors, reference: PatchDescriptors, seed: int = 0) -> dict:
    """The SWD between two sets' descriptors, per level (keyed by the level's size in px) and their mean.

    Both are normalised per channel with the reference's statistics; `seed` draws the directions. Returns
    {"levels": {"64": ..., "32": ..., "16": ...}, "mean": ..., "n": (generated images, reference images),
    "impl": ...}."""
    if generated.size != reference.size or not generated.levels or not reference.levels:
        raise ValueError(f"Both sets need images of one size; got {generated.size} and {reference.size} px.")
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for k, (gen, ref) in enumerate(zip(generated.stacked(), reference.stacked())):
        channels = ref.view(len(ref), 3, -1)
        mean = channels.mean(dim=(0, 2)).repeat_interleave(NEIGHBOURHOOD ** 2)
        std = channels.std(dim=(0, 2)).clamp_min(1e-8).repeat_interleave(NEIGHBOURHOOD ** 2)
        size = generated.size >> k if k < len(generated.levels) - 1 else COARSEST
        result[str(size)] = SCALE * sliced_wasserstein((gen - mean) / std, (ref - mean) / std, generator)
    return {"levels": result, "mean": sum(result.values()) / len(result), "n": (generated.images, reference.images),
            "impl": SWD_IMPL}


def descriptors_of(batches: Iterable[torch.Tensor], seed: int = 0) -> PatchDescriptors:
    """The descriptors of every uint8 batch (B, 3, H, W) in `batches`."""
    collected = PatchDescriptors(seed=seed)
    for batch in batches:
        collected.add(batch)
    return collected


def swd_between(images_a: torch.Tensor, images_b: torch.Tensor, seed: int = 0, batch_size: int = 256) -> dict:
    """SWD of two uint8 image tensors (N, 3, H, W); `images_b` is the reference."""
    def batches(images):
        return (images[i:i + batch_size] for i in range(0, len(images), batch_size))

    return swd(descriptors_of(batches(images_a), seed), descriptors_of(batches(images_b), seed), seed)


__all__ = ["SWD_IMPL", "PatchDescriptors", "descriptors_of", "laplacian_pyramid", "sliced_wasserstein", "swd",
           "swd_between"]
