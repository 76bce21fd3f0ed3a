"""`ldm eval-samples`: score a folder of generated images.

- `--dataset builtin:shapes`: the exact shapes scorer (`evaluation.shapes_score.score_folder`):
  validity, class balance, colour histograms and, for class-conditional samples (a `labels.json` from
  `ldm generate` beside the images), the fraction that show the requested class (`class_match`).
- `--reference DIR|builtin:shapes`: FID of the generated images against the reference images, through
  the same Inception code path as `ldm bench-recon`'s rFID (`evaluation.inception`). Reference images
  are brought to the generated images' size the way every dataset image is (shorter side, bicubic,
  centre crop), so both sets reach Inception's resize from the same resolution. Without the Inception
  weights the FID is null with a reason naming the file to install; nothing is downloaded. The generated
  images are the folder's image files (searched recursively) except its `grid.png`, the overview
  `ldm generate` writes beside the images, which is not a sample (the shapes scorer leaves it out too).

Every option is checked before any image is read or any network built, and the JSON is written under a
temporary name and renamed into place, so a failed run never leaves a partial `eval.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from evaluation.inception import FID_IMPL, FIDStatistics, load_fid_inception
from evaluation.report import check_can_create, printable_name
from evaluation.shapes_score import GRID_NAME
from ldm_core.atomic_files import write_atomic
from ldm_core.config.settings import DataConfig
from ldm_core.data.image_files import BUILTIN_SHAPES, DataError, decode_stream, default_workers, list_image_files
from ldm_core.data.sources import open_image_source, source_kind
from ldm_core.data.streaming import iter_image_batches
from ldm_core.models.pretrained import MissingWeightsError

logger = logging.getLogger("ldm.eval")


SCORES_FILE = "eval.json"  # the default --out, beside the images it scores

def sample_files(folder: str | Path) -> list[Path]:
    """The generated images of `folder` for the FID: its image files except the grid `ldm generate` writes.

    A grid is a mosaic of the samples, not a sample: counted as one it would shift the FID
    (`evaluation.shapes_score.score_folder` leaves it out for the same reason).
    """
    folder = Path(folder).expanduser()
    return [p for p in list_image_files(folder) if p != folder / GRID_NAME]


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


def sample_fid(folder: str | Path, reference: str, *, fid_weights: Optional[str] = None,
               num_reference: Optional[int] = None, shapes_seed: int = 1, batch_size: int = 32,
               device: Optional[str | torch.device] = None,
               fid_feature_net: Optional[torch.nn.Module] = None) -> dict:
    """FID between the images in `folder` and a reference folder (or `builtin:shapes`).

    Parameters:
        num_reference: reference images used (default: all of the folder; for builtin:shapes
            `DataConfig.shapes_count` images drawn with `shapes_seed`).
        fid_feature_net: replaces the Inception network (structural tests only; not an FID then).

    Returns:
        {"value", "n_generated", "n_reference", "resolution", "impl", "reason"}; `value` is None and
        `reason` says why when the weights are missing.
    """
    _check_fid_options(reference, num_reference, batch_size)
    files = _require_samples(folder)
    with Image.open(files[0]) as first:
        resolution = min(first.size)
    entry = {"value": None, "n_generated": 0, "n_reference": 0, "resolution": resolution,
             "reference": printable_name(reference), "impl": FID_IMPL, "reason": None}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        net = fid_feature_net if fid_feature_net is not None else load_fid_inception(fid_weights)
    except MissingWeightsError as err:
        if fid_weights:  # the user named a file that is not there: an error, as in `ldm bench-recon`
            raise
        entry["reason"] = str(err)
        return entry
    if fid_feature_net is not None:
        entry["impl"] = "injected feature network (test only; not an FID)"
    stats = FIDStatistics(net, device)
    for images in _generated_batches(files, resolution, batch_size):
        stats.update(torch.from_numpy(images), real=False)
    count = num_reference or DataConfig().shapes_count
    for _, images, _, _ in iter_image_batches(str(reference), resolution, batch_size, limit=num_reference,
                                           shapes_count=count, shapes_seed=shapes_seed):
        stats.update(torch.from_numpy(images), real=True)
    entry["n_reference"], entry["n_generated"] = stats.counts()
    if min(stats.counts()) < 2:
        entry["reason"] = (f"FID needs at least 2 images on each side; {entry['n_generated']} generated and "
                           f"{entry['n_reference']} reference images could be read")
        return entry
    entry["value"] = stats.compute()
    return entry


def _require_samples(folder: str | Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{printable_name(folder)} is not a folder; give the folder that holds the generated images.")
    files = sample_files(folder)
    if not files:
        raise DataError(f"No image files in {printable_name(folder)} (searched recursively; {GRID_NAME} does not "
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
                         f"Use --reference DIR for FID against any image folder.")
    if reference is not None:
        _check_fid_options(reference, num_reference, fid_options.get("batch_size", 1))
    elif num_reference is not None or fid_weights:
        raise ValueError("--num-reference and --fid-weights are for the FID, which needs --reference DIR or "
                         f"--reference {BUILTIN_SHAPES}.")
    if out is not None:
        _check_out_file(Path(out))
    result: dict = {"folder": printable_name(folder), "dataset": dataset}
    if dataset == BUILTIN_SHAPES:
        from evaluation.shapes_score import score_folder

        result["shapes"] = score_folder(folder)
    if reference is None:
        result["fid"] = {"value": None, "impl": FID_IMPL, "reason": "no --reference given"}
    else:
        result["fid"] = sample_fid(folder, reference, fid_weights=fid_weights, num_reference=num_reference,
                                   **fid_options)
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
    fid = result["fid"]
    if fid["value"] is not None:
        lines.append(f"FID {fid['value']:.2f} ({fid['n_generated']} generated vs {fid['n_reference']} "
                     f"reference images at {fid['resolution']}px; {fid['impl']})")
    else:
        lines.append(f"FID: n/a ({fid['reason']})")
    return "\n".join(lines)


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
    parser.add_argument("--reference", default=None, metavar="DIR",
                        help=f"reference images for FID: a folder or {BUILTIN_SHAPES}")
    parser.add_argument("--num-reference", type=int, default=None,
                        help=f"reference images used (default: all; {DataConfig().shapes_count} for "
                             f"{BUILTIN_SHAPES})")
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
