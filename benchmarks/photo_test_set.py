"""The test set of `make bench-photos`: six kinds of image, none of which the autoencoder trains on.

| kind | what | from |
|---|---|---|
| texture | crops of side R to 4R brought to R (the test of the first photo benchmark) | scikit-image's chelsea and coffee |
| whole | whole photographs brought down to R: three squares a photograph, at the left, centre and right of its long side | the held-out wallpaper photographs; scikit-image's chelsea, coffee, camera, coins, moon, grass, gravel, brick |
| smooth | renders at scene scale and at 2x to 4x, and linear and radial gradients between random colours | the held-out wallpaper renders; generated |
| dark | night sky and fundus photographs, and crops of the held-out photographs with their levels scaled to 12-30% | scikit-image's hubble_deep_field and retina; the held-out wallpaper photographs |
| bright | a bright-field micrograph, and crops of the held-out photographs lifted to 70-88% of white | scikit-image's immunohistochemistry; the held-out wallpaper photographs |
| flat | uniform fields at every combination of 0, 64, 128, 191 and 255 per channel, black and white included | generated |

Which corpus images are held out is decided here (`held_out`): every fifth photograph and every second render
in file-name order. `benchmarks/real_photos.py` trains only on the others (`training_files`), and the
scikit-image photographs it trains on (astronaut, rocket, stereo_motorcycle) appear in no kind, so no test
image is a training image (tests/test_photo_test_set.py checks both).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from benchmarks import photo_corpus

KINDS = ("texture", "whole", "smooth", "dark", "bright", "flat")
TEXTURE_PHOTOS = ("chelsea", "coffee")
WHOLE_SKIMAGE = ("chelsea", "coffee", "camera", "coins", "moon", "grass", "gravel", "brick")
DARK_SKIMAGE = ("hubble_deep_field", "retina")
BRIGHT_SKIMAGE = ("immunohistochemistry",)
FLAT_LEVELS = (0, 64, 128, 191, 255)
# How many images a kind gets at R = 64 (half as many at 128 for the crop-based ones; whole and flat are fixed).
CROPS_AT_64 = {"texture": 512, "smooth": 64, "dark": 128, "bright": 128}
GRADIENTS = 64


def held_out(rows: Sequence[dict]) -> set[str]:
    """The corpus files (manifest `file`) kept for testing: every fifth photograph, every second render."""
    chosen: set[str] = set()
    for kind, every in (("photo", 5), ("render", 2)):
        files = sorted(row["file"] for row in rows if row["kind"] == kind)
        chosen.update(files[::every])
    return chosen


def held_out_files(rows: Sequence[dict], kind: str) -> list[str]:
    """The held-out corpus files (manifest `file`) of one kind, in file-name order."""
    return sorted(f for f in held_out(rows) if _kind(rows, f) == kind)


def training_files(corpus: Path, kinds: Sequence[str]) -> list[Path]:
    """The corpus's files of the given kinds that no test kind uses."""
    rows = photo_corpus.load_manifest(corpus)
    test = held_out(rows)
    chosen = [corpus / row["file"] for row in rows if row["kind"] in kinds and row["file"] not in test]
    if not chosen:
        raise photo_corpus.CorpusError(f"the corpus in {corpus} has no training image of kind {', '.join(kinds)}.")
    return chosen


def load_photo(name: str) -> np.ndarray:
    """A photograph bundled with scikit-image as RGB uint8 (grayscale repeated; a stereo pair's left view)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left view, right view, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3].astype(np.uint8)


def _open(path: Path, longest: int = 2048) -> np.ndarray:
    """A corpus image as RGB uint8, brought down (antialiased) so its longer side is at most `longest` px:
    the test crops span at most 8R, so nothing finer is ever used."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = longest / max(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        return np.asarray(image)


def random_crop(image: np.ndarray, rng: np.random.Generator, smallest: int, largest: int) -> np.ndarray:
    """A square of side in [smallest, min(largest, shorter side)] at a random place."""
    h, w = image.shape[:2]
    side = int(rng.integers(min(smallest, h, w), min(largest, h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return image[top:top + side, left:left + side]


def whole_squares(image: np.ndarray) -> list[np.ndarray]:
    """Three squares of the full shorter side: at the start, the middle and the end of the longer side."""
    h, w = image.shape[:2]
    side = min(h, w)
    starts = sorted({0, (max(h, w) - side) // 2, max(h, w) - side})
    return [image[s:s + side] if h > w else image[:, s:s + side] for s in starts]


def gradient(rng: np.random.Generator, size: int, ends: Optional[Sequence] = None) -> np.ndarray:
    """A linear (at a random angle) or radial (from a random centre) blend of two colours (random by default)."""
    if ends is None:
        ends = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    a, b = (np.asarray(e, dtype=np.float64) for e in ends)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
    else:
        cy, cx = rng.uniform(0, 1, 2)
        t = np.hypot(yy - cy, xx - cx)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    return np.round(a + (b - a) * t[..., None]).clip(0, 255).astype(np.uint8)


def scale_levels(image: np.ndarray, rng: np.random.Generator, dark: bool) -> np.ndarray:
    """Dark: levels scaled by 0.12-0.30; bright: the distance to white scaled by 0.12-0.30."""
    gain = rng.uniform(0.12, 0.30)
    x = image.astype(np.float64)
    return np.round(x * gain if dark else 255 - (255 - x) * gain).astype(np.uint8)


def build_test_set(out: Path, resolution: int, corpus: Optional[Path], seed: int = 0,
                   fraction: float = 1.0) -> dict[str, int]:
    """Write `out/<kind>/NNNN_<source>.png` for every kind at test size R; returns the count per kind.

    Crops are saved as cut (bench-recon brings each to R: shorter side resized, centre crop); whole squares,
    gradients and flat fields are saved at R already. Crop counts halve at R = 128 and again at 256, and are
    multiplied by `fraction` (at least 2 each; for quick runs, which also keep only the eight corners of the
    flat fields' colour cube and a `fraction` of the whole photographs). Without a corpus, the kinds take only
    scikit-image's photographs and generated images (dark and bright crops then come from chelsea and coffee).
    """
    rng = np.random.default_rng(seed)
    photos: list[np.ndarray] = []
    renders: list[np.ndarray] = []
    if corpus is not None:
        rows = photo_corpus.load_manifest(corpus)
        photos = [_open(corpus / f) for f in held_out_files(rows, "photo")]
        renders = [_open(corpus / f) for f in held_out_files(rows, "render")]
    scale = max(1, resolution // 64)
    counts = {kind: max(2, round(n // scale * fraction)) for kind, n in CROPS_AT_64.items()}
    r = resolution
    kinds: dict[str, list[tuple[str, np.ndarray]]] = {kind: [] for kind in KINDS}

    skimage = {name: load_photo(name) for name in {*TEXTURE_PHOTOS, *WHOLE_SKIMAGE, *DARK_SKIMAGE, *BRIGHT_SKIMAGE}}
    for k in range(counts["texture"]):
        name = TEXTURE_PHOTOS[k % len(TEXTURE_PHOTOS)]
        kinds["texture"].append((name, random_crop(skimage[name], rng, r, 4 * r)))
    for name, image in [*((n, skimage[n]) for n in WHOLE_SKIMAGE), *((f"wallpaper{i}", p) for i, p in enumerate(photos))]:
        kinds["whole"] += [(name, _resized(square, r)) for square in whole_squares(image)]
    for i, render in enumerate(renders):
        kinds["smooth"] += [(f"render{i}", _resized(square, r)) for square in whole_squares(render)[::2]]
    for k in range(counts["smooth"] if renders else 0):
        render = renders[k % len(renders)]
        kinds["smooth"].append((f"render{k % len(renders)}", random_crop(render, rng, 2 * r, 4 * r)))
    kinds["smooth"] += [("gradient", gradient(rng, r)) for _ in range(max(2, round(GRADIENTS // scale * fraction)))]
    sources = ([(f"wallpaper{i}", p) for i, p in enumerate(photos)]
               or [(name, skimage[name]) for name in TEXTURE_PHOTOS])
    for kind, named, dark in (("dark", DARK_SKIMAGE, True), ("bright", BRIGHT_SKIMAGE, False)):
        own = counts[kind] // 4  # a quarter from the genuinely dark or bright photographs
        for k in range(own):
            name = named[k % len(named)]
            kinds[kind].append((name, random_crop(skimage[name], rng, r, 4 * r)))
        for k in range(counts[kind] - own):
            name, photo = sources[k % len(sources)]
            kinds[kind].append((name, scale_levels(random_crop(photo, rng, r, 8 * r), rng, dark)))
    levels = FLAT_LEVELS if fraction >= 1 else (0, 255)  # a quick run keeps the cube's corners
    kinds["flat"] = [(f"flat_{a}_{b}_{c}", np.full((r, r, 3), (a, b, c), np.uint8))
                     for a in levels for b in levels for c in levels]
    if fraction < 1:
        kinds["whole"] = kinds["whole"][:max(2, round(len(kinds["whole"]) * fraction))]

    if out.exists():
        shutil.rmtree(out)
    for kind, images in kinds.items():
        folder = out / kind
        folder.mkdir(parents=True)
        for k, (name, image) in enumerate(images):
            Image.fromarray(image).save(folder / f"{k:04d}_{name}.png")
    return {kind: len(images) for kind, images in kinds.items()}


def _kind(rows: Sequence[dict], file: str) -> str:
    return next(row["kind"] for row in rows if row["file"] == file)


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    """A square brought to size x size px (antialiased bicubic), as bench-recon would."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


# --------------------------------------------------------------------------------------------------
# Measures over a kind's bench-recon rows


def flat_field_summary(rows: Sequence[dict], names: Callable[[dict], str] = lambda r: r["name"]) -> dict:
    """Median and worst PSNR of the flat fields, the worst channel bias in levels, and what black and
    white come back as (the mean reconstructed level per channel)."""
    psnr = np.asarray([r["psnr"] for r in rows], dtype=np.float64)
    bias = np.asarray([r["bias"] for r in rows], dtype=np.float64)
    out = {"n": len(rows), "median_psnr": float(np.median(psnr)), "worst_psnr": float(psnr.min()),
           "median_abs_bias": float(np.median(np.abs(bias).max(axis=1))), "worst_abs_bias": float(np.abs(bias).max())}
    for label, level in (("black", 0), ("white", 255)):
        row = next((r for r in rows if names(r).endswith(f"flat_{level}_{level}_{level}.png")), None)
        out[label] = None if row is None else [round(level + b, 1) for b in row["bias"]]
    return out
