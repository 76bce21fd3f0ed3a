"""`ldm eval-samples`: score a folder of generated images.

- `--dataset builtin:shapes`: the exact shapes scorer (`evaluation.shapes_score.score_folder`):
  validity, class balance, colour histograms and, for class-conditional samples (a `labels.json` from
  `ldm generate` beside the images), the fraction that show the requested class (`class_match`).
- `--reference SPEC` (any `--data` spec): the sliced Wasserstein distance of the generated images to the
  reference images (`evaluation.swd`, no pretrained network), and FID and KID through the same Inception code
  path as `ldm bench-recon`'s rFID (`evaluation.inception`; the weights download on first use, and without
  them both are null with the reason). Each is printed beside its floor: the same metric between as many
  other real images as were generated and the same reference set, which is what "as good as real" reads at
  this sample count (FID and SWD are biased at small n). Reference images are brought to the generated
  images' size the way every dataset image is (shorter side, bicubic, centre crop). The generated images
  are the folder's image files (searched recursively) except its `grid.png`, the overview `ldm generate`
  writes beside the images, which is not a sample (the shapes scorer leaves it out too).

Every option is checked before any image is read or any network built, and the JSON is written under a
temporary name and renamed into place, so a failed run never leaves a partial `eval.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from evaluation.inception import FID_IMPL, load_fid_inception
from evaluation.report import check_can_create, printable_name
from evaluation.swd import SWD_IMPL, PatchDescriptors, swd
from ldm_core.atomic_files import write_atomic
from ldm_core.config.settings import DataConfig
from ldm_core.data.image_files import BUILTIN_SHAPES, DataError, decode_stream, default_workers, list_image_files
from ldm_core.data.sources import open_image_source, source_kind
from ldm_core.data.streaming import iter_image_batches
from ldm_core.models.pretrained import MissingWeightsError
from ldm_core.sample_folder import GRID_FILE, SCORES_FILE

logger = logging.getLogger("ldm.eval")



def sample_files(folder: str | Path) -> list[Path]:
    """The generated images of `folder` for the FID: its image files except the grid `ldm generate` writes.

    A grid is a mosaic of the samples, not a sample: counted as one it would shift the FID
    (`evaluation.shapes_score.score_folder` leaves it out for the same reason).
    """
    folder = Path(folder).expanduser()
    return [p for p in list_image_files(folder) if p != folder / GRID_FILE]


def _generated_batches(files: list[Path], resolution: int, batch_size: int):
    """uint8 batches (B, 3, R, R) of the generated images; unreadable files are skipped with a warning."""
    arrays = []
    for path, array, _, err in decode_stream(files, resolution, default_workers()):
        if err is not None:
            logger.warning("skipping %s: %s", printable_name(path), err)
            continue
        arrays.append(array)
        if len(arrays) == batch_size:
            yield np.stack(arrays)
            arrays = []
    if arrays:
        yield np.stack(arrays)


class _Features(torch.nn.Module):
    """Stands in for the feature network of torchmetrics' FID and KID, which are then given features the
    Inception network computed once per image (every image is scored by up to four metrics)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class _Sets:
    """The three image sets a score and its floor need, read once: generated (G), reference (R) and floor (F),
    as SWD descriptors and, when the Inception network is there, its features."""

    net: Optional[torch.nn.Module]
    device: torch.device
    swd: dict = field(default_factory=lambda: {k: PatchDescriptors() for k in "GRF"})
    features: dict = field(default_factory=lambda: {k: [] for k in "GRF"})

    def add(self, which: str, images: np.ndarray) -> None:
        batch = torch.from_numpy(np.ascontiguousarray(images))
        self.swd[which].add(batch)
        if self.net is not None:
            with torch.no_grad():
                self.features[which].append(self.net(batch.to(self.device)).double().cpu())

    def count(self, which: str) -> int:
        return self.swd[which].images


def _split_reference(reference: str, n_generated: int, num_reference: Optional[int]) -> tuple[int, int, str]:
    """(reference images, floor images, why there is no floor or ""): the floor set is the n_generated
    images after the reference set, so the score and the floor compare sets of the same sizes."""
    if source_kind(reference) == "shapes":
        return num_reference or DataConfig().shapes_count, n_generated, ""
    available = len(open_image_source(reference))
    if num_reference is not None:
        reference_count = min(num_reference, available)
    else:
        reference_count = available - n_generated if available >= 2 * n_generated else available
    floor = n_generated if available - reference_count >= n_generated else 0
    why = "" if floor else (f"the reference holds {available} images; a floor needs {n_generated} more than the "
                            f"{reference_count} it is scored against (give fewer with --num-reference)")
    return reference_count, floor, why


def sample_scores(folder: str | Path, reference: str, *, fid_weights: Optional[str] = None,
                  num_reference: Optional[int] = None, shapes_seed: int = 1, batch_size: int = 32,
                  device: Optional[str | torch.device] = None,
                  fid_feature_net: Optional[torch.nn.Module] = None) -> dict:
    """SWD (always), FID and KID (when the Inception weights are there) of the images in `folder` against a
    reference, each with its floor: the same metric between `n` other real images and the same reference set,
    where `n` is the number of generated images. A score at the floor is as good as real at this sample count.

    Parameters:
        reference: any `--data` spec (builtin:shapes, a folder, shards, a Hugging Face dataset).
        num_reference: reference images scored against (default: builtin:shapes `DataConfig.shapes_count`
            drawn with `shapes_seed`; a folder all but the `n` kept for the floor).
        fid_feature_net: replaces the Inception network (structural tests only; not an FID then).

    Returns {"swd": {...}, "fid": {...}, "kid": {...}}, each with "value" and "floor" (None with "reason" when
    it cannot be computed).
    """
    _check_fid_options(reference, num_reference, batch_size)
    files = _require_samples(folder)
    with Image.open(files[0]) as first:
        resolution = min(first.size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inception_reason = None
    try:
        net = fid_feature_net if fid_feature_net is not None else load_fid_inception(fid_weights, device)
    except MissingWeightsError as err:
        if fid_weights:  # the user named a file that is not there: an error, as in `ldm bench-recon`
            raise
        net, inception_reason = None, str(err)
    sets = _Sets(net.to(device).eval() if net is not None else None, device)
    for images in _generated_batches(files, resolution, batch_size):
        sets.add("G", images)
    n = sets.count("G")
    reference_count, floor_count, no_floor = _split_reference(str(reference), n, num_reference)
    for _, images, _, _ in iter_image_batches(str(reference), resolution, batch_size,
                                              limit=reference_count + floor_count,
                                              shapes_count=reference_count + floor_count, shapes_seed=shapes_seed):
        seen = sets.count("R") + sets.count("F")
        split = max(0, min(len(images), reference_count - seen))
        if split:
            sets.add("R", images[:split])
        if split < len(images):
            sets.add("F", images[split:])
    common = {"n_generated": n, "n_reference": sets.count("R"), "n_floor": sets.count("F"), "resolution": resolution,
              "reference": printable_name(reference)}
    impl = FID_IMPL if fid_feature_net is None else "injected feature network (test only; not an FID)"
    return {"swd": {**common, **_swd_entry(sets, no_floor)},
            "fid": {**common, **_inception_entry(sets, "fid", inception_reason, no_floor), "impl": impl},
            "kid": {**common, **_inception_entry(sets, "kid", inception_reason, no_floor),
                    "impl": f"torchmetrics KernelInceptionDistance (polynomial kernel, degree 3) on {impl}"}}


def _swd_entry(sets: _Sets, no_floor: str) -> dict:
    if min(sets.count("G"), sets.count("R")) < 1:
        return {"value": None, "floor": None, "reason": "no image could be read on one side"}
    try:
        score = swd(sets.swd["G"], sets.swd["R"])
    except ValueError as err:  # a size the pyramid cannot take
        return {"value": None, "floor": None, "reason": str(err)}
    floor = swd(sets.swd["F"], sets.swd["R"]) if sets.count("F") else None
    return {"value": score["mean"], "levels": score["levels"], "floor": floor["mean"] if floor else None,
            "floor_levels": floor["levels"] if floor else None, "reason": no_floor or None, "impl": SWD_IMPL}


def _inception_entry(sets: _Sets, metric: str, unavailable: Optional[str], no_floor: str) -> dict:
    """FID or KID of G against R, and of F against R, from the features computed once."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if unavailable is not None:
        return {"value": None, "floor": None, "reason": unavailable}
    if min(sets.count("G"), sets.count("R")) < 2:
        return {"value": None, "floor": None, "reason": f"{metric.upper()} needs at least 2 images on each side; "
                                                        f"{sets.count('G')} generated and {sets.count('R')} reference "
                                                        f"images could be read"}
    reference = torch.cat(sets.features["R"])
    width = reference.shape[1]

    def against_reference(which: str) -> float:
        other = torch.cat(sets.features[which])
        if metric == "fid":
            measure = FrechetInceptionDistance(feature=_Features(width), normalize=False)
        else:
            size = min(len(other), len(reference), 1000)
            measure = KernelInceptionDistance(feature=_Features(width), subset_size=size, subsets=100)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            measure.update(reference, real=True)
            measure.update(other, real=False)
            value = measure.compute()
        return float(value[0] if isinstance(value, tuple) else value)  # KID: (mean, std) over subsets

    floor_ok = sets.count("F") >= 2
    return {"value": against_reference("G"), "floor": against_reference("F") if floor_ok else None,
            "reason": None if floor_ok else (no_floor or "a floor needs at least 2 other real images")}


def _require_samples(folder: str | Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{printable_name(folder)} is not a folder; give the folder that holds the generated images.")
    files = sample_files(folder)
    if not files:
        raise DataError(f"No image files in {printable_name(folder)} (searched recursively; {GRID_FILE} does not "
                        f"count); give the folder that holds the generated images.")
    return files


def _check_fid_options(reference: str, num_reference: Optional[int], batch_size: int = 1) -> None:
    """--reference names builtin:shapes, a folder, shards or a Hugging Face dataset with images; --num-reference >= 2."""
    if num_reference is not None and (isinstance(num_reference, bool) or not isinstance(num_reference, int)
                                      or num_reference < 2):
        raise ValueError(f"--num-reference must be a whole number of at least 2 (FID needs 2 images), "
                         f"got {num_reference!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}.")
    if source_kind(str(reference)) != "shapes":  # raises DataError for an unknown builtin: name
        open_image_source(str(reference))  # DataError: missing, a file, no images, no readable shard


def _check_out_file(out: Path) -> None:
    """Refuse, before any work, an --out the run could only fail to write at its end."""
    if out.is_dir():
        raise ValueError(f"--out {printable_name(out)} is a folder; give a JSON file name such as "
                         f"{printable_name(out / 'eval.json')}.")
    check_can_create(out)


def run_eval_samples(folder: str | Path, *, dataset: Optional[str] = None, reference: Optional[str] = None,
                     fid_weights: Optional[str] = None, num_reference: Optional[int] = None,
                     out: Optional[str | Path] = None, **fid_options) -> dict:
    """Score a folder of generated images; write the result as JSON to `out` when given."""
    folder = Path(folder)
    # Every option first: a wrong one is refused before the scorer or Inception reads a single image.
    _require_samples(folder)
    if dataset is not None and dataset != BUILTIN_SHAPES:
        raise ValueError(f"--dataset {dataset!r} has no scorer; the only one is {BUILTIN_SHAPES}. "
                         f"Use --reference SPEC to score against any images (SWD, and FID and KID with the "
                         f"Inception weights).")
    if reference is not None:
        _check_fid_options(reference, num_reference, fid_options.get("batch_size", 1))
    elif num_reference is not None or fid_weights:
        raise ValueError("--num-reference and --fid-weights are for the scores against reference images, which "
                         f"need --reference SPEC (a folder, a dataset or {BUILTIN_SHAPES}).")
    if out is not None:
        _check_out_file(Path(out))
    result: dict = {"folder": printable_name(folder), "dataset": dataset}
    if dataset == BUILTIN_SHAPES:
        from evaluation.shapes_score import score_folder

        result["shapes"] = score_folder(folder)
    if reference is None:
        result.update({name: {"value": None, "floor": None, "reason": "no --reference given"}
                       for name in ("swd", "fid", "kid")})
    else:
        result.update(sample_scores(folder, reference, fid_weights=fid_weights, num_reference=num_reference,
                                    **fid_options))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # ensure_ascii (the default) keeps the file ASCII, whatever the image names.
        write_atomic(out, json.dumps(result, indent=2))
    return result


def summary_text(result: dict) -> str:
    """A few readable lines for the terminal."""
    lines = [f"Generated images: {result['folder']}"]
    shapes = result.get("shapes")
    if shapes:
        classes = ", ".join(f"{k} {v:.0%}" for k, v in shapes["class_histogram"].items())
        lines.append(f"shapes: {shapes['n']} images, {shapes['validity']:.1%} valid; classes {classes} "
                     f"(largest deviation from 1/3: {shapes['max_class_deviation']:.1%})")
        if shapes.get("reasons"):
            lines.append("  invalid because: " + ", ".join(f"{k} x{v}" for k, v in shapes["reasons"].items()))
        if "class_match" in shapes:
            lines.append(_class_match_line(shapes))
    for name, label, digits in (("swd", "SWD x1e3", 1), ("fid", "FID", 2), ("kid", "KID", 4)):
        if name in result:
            lines.append(score_line(label, result[name], digits))
    return "\n".join(lines)


def score_line(label: str, entry: dict, digits: int) -> str:
    """`SWD x1e3 41.2 (floor 12.8: 128 other real images against the same 1024 reference images)`."""
    if entry.get("value") is None:
        return f"{label}: n/a ({entry.get('reason')})"
    floor = ("floor n/a: " + str(entry.get("reason")) if entry.get("floor") is None else
             f"floor {entry['floor']:.{digits}f}: {entry['n_floor']} other real images")
    return (f"{label} {entry['value']:.{digits}f} ({entry['n_generated']} generated against {entry['n_reference']} "
            f"reference images at {entry['resolution']} px; {floor})")


def _percent(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _class_match_line(shapes: dict) -> str:
    """E.g. `class match (shows the requested class): 83.3% of all images (90.9% of valid ones) at guidance 3;
    circle 100.0% of 4, square 75.0% of 4, triangle 75.0% of 4`."""
    guidance = (shapes.get("conditioning") or {}).get("guidance_scale")
    per_class = ", ".join(f"{name} {_percent(entry['class_match'])} of {entry['n']}"
                          for name, entry in shapes["class_match_by_class"].items())
    return (f"class match (shows the requested class): {_percent(shapes['class_match'])} of all images "
            f"({_percent(shapes['class_match_among_valid'])} of valid ones)"
            f"{'' if guidance is None else f' at guidance {guidance:g}'}; {per_class}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `ldm eval-samples`."""
    parser.add_argument("folder", help="folder of generated images")
    parser.add_argument("--dataset", default=None,
                        help=f"{BUILTIN_SHAPES}: run the exact shapes scorer (plus the class match of "
                             f"class-conditional samples when labels.json is beside them)")
    parser.add_argument("--reference", default=None, metavar="SPEC",
                        help=f"reference images, any --data spec (a folder, a dataset, {BUILTIN_SHAPES}): SWD, and "
                             f"FID and KID with the Inception weights, each beside its floor (other real images "
                             f"against the same reference)")
    parser.add_argument("--num-reference", type=int, default=None,
                        help=f"reference images scored against (default: all but the floor's; "
                             f"{DataConfig().shapes_count} for {BUILTIN_SHAPES})")
    parser.add_argument("--fid-weights", default=None, metavar="PATH",
                        help="weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", default=None, help="JSON file (default FOLDER/eval.json)")


def main(args: argparse.Namespace) -> int:
    """Run `ldm eval-samples`, print the summary and write the JSON."""
    out = args.out or Path(args.folder) / SCORES_FILE
    result = run_eval_samples(args.folder, dataset=args.dataset, reference=args.reference,
                              fid_weights=args.fid_weights, num_reference=args.num_reference, out=out)
    print(summary_text(result))
    print(f"Written: {printable_name(out)}")
    return 0
