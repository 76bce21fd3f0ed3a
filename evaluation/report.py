"""Writing benchmark results: the meta block, Markdown table, results.json, per-image CSV and PNGs.

File layout for `--out DIR/results.json`:
    DIR/results.json                   meta block and per-model summaries (no per-image rows)
    DIR/results.md                     the Markdown table printed on stdout
    DIR/results_per_image.csv          one row per (model, image)
    DIR/results_examples_<model>.png   best, median and worst image by PSNR, one row each:
                                       reference | reconstruction | |difference| x4

The files are written under temporary names beside their final ones and renamed into place together
once all of them are complete, results.json last, so a run that fails leaves the previous results (or
none), never a partial set. Image names are stored as `printable_name` gives them: file names need not be
UTF-8 on Linux, and JSON, CSV and Markdown must be.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch

from evaluation.reconstructors import sha256_file
from ldm_core.images.grids import save_reconstruction_grid

CSV_COLUMNS = ("model", "index", "name", "upscaled", "psnr", "ssim", "msssim", "lpips", "hf_power", "ref_hf_power",
               "chroma", "ref_chroma", "psnr_border", "psnr_interior", "bias_r", "bias_g", "bias_b")
DIFFERENCE_GAIN = 4.0
_PACKAGES = ("two-stage-ldm", "torch", "torchvision", "diffusers", "accelerate", "lpips", "torchmetrics",
             "torch-fidelity", "numpy", "pillow", "safetensors")

# model name -> [best, median, worst] global indices  ->  model name -> (reference, reconstruction) uint8
ExampleSource = Callable[[dict[str, list[int]]], dict[str, tuple[torch.Tensor, torch.Tensor]]]


def check_can_create(path: Path) -> None:
    """Refuse, before any work, a path the run could only fail to write at its end: its nearest existing
    folder must be a folder this process may write into (OSError with the path otherwise)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return


def printable_name(name) -> str:
    """A file name or path as text that UTF-8 files and terminals accept, the same for every valid name.

    `os.fsdecode` keeps bytes that are not UTF-8 as lone surrogates ("caf\udce9.png"), which no UTF-8
    writer accepts; here they become backslash escapes ("caf\\xe9.png"), so the name still shows
    which bytes the file has. Valid UTF-8 names come back unchanged.
    """
    text = os.fsdecode(name)
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decodes to: escape it as it is
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class StagedFiles:
    """Files written under temporary names beside their final paths and renamed into place together.

    `path(final)` gives the name to write to; `commit()` renames every file (in the order they were
    asked for); `discard()` removes what was written. The temporary names keep the final suffix, so
    writers that pick a format from it (Pillow) still work.
    """

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        final = Path(final)
        temporary = final.with_name(f".{final.stem}.partial-{os.getpid()}{final.suffix}")
        self._pending.append((temporary, final))
        return temporary

    def commit(self) -> None:
        for temporary, final in self._pending:
            os.replace(temporary, final)
        self._pending = []

    def discard(self) -> None:
        for temporary, _ in self._pending:
            temporary.unlink(missing_ok=True)
        self._pending = []


def library_versions() -> dict[str, Optional[str]]:
    """Versions of Python and of the libraries that shape the numbers."""
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def run_meta(*, models, metrics, device, data: str, num_images, resolution: int, latent: str, seed: int,
             dtype: str, shapes_seed: int, lpips_backbone: str, lpips_file: Optional[str],
             lpips_weights: Optional[str], fid_weights: Optional[str], fid: Optional[str]) -> dict:
    """The `meta` block of results.json: what was compared, on what, how, and with which libraries.

    `lpips_file` is the LPIPS trunk file in use (None when LPIPS is unavailable); `fid` is "inception",
    "injected" (a test network) or None (unavailable). Weight files are identified by sha256.
    """
    from ldm_core.images import metrics as M
    from evaluation.inception import FID_IMPL
    from ldm_core.models.pretrained import INCEPTION_FID_FILE, find_weights

    lpips_hash = sha256_file(find_weights(lpips_file, lpips_weights)) if lpips_file else None
    fid_hash = sha256_file(find_weights(INCEPTION_FID_FILE, fid_weights)) if fid == "inception" else None
    return {
        "command": "ldm bench-recon", "schema_version": 1,
        "models": [{"name": m.name, **m.describe()} for m in models],
        "data": printable_name(data), "shapes_seed": shapes_seed if data.startswith("builtin:") else None,
        "num_images_requested": num_images, "resolution": resolution,
        "crop": f"shorter side resized to {resolution} (Pillow bicubic, antialiased) then centre-cropped "
                f"to {resolution}x{resolution}, once, kept as uint8 (ldm_core.data.image_files)",
        "latent": latent, "seed": seed, "dtype": dtype, "device": str(device),
        "quantisation": "round((clamp(y, -1, 1) + 1) * 127.5) to uint8",
        "psnr_cap_db": M.PSNR_CAP_DB, "std": "population standard deviation over images (ddof=0)",
        "metrics_requested": list(metrics),
        "lpips": {"backbone": lpips_backbone, "impl": M.lpips_impl(lpips_backbone), "weights_sha256": lpips_hash},
        "fid": {"impl": "injected feature network (test only; not an FID)" if fid == "injected" else FID_IMPL,
                "weights_sha256": fid_hash},
        "versions": library_versions(),
    }


def save_pngs(root: Path, model: str, indices, names, reference: torch.Tensor, reconstruction: torch.Tensor,
              *, with_reference: bool) -> None:
    """`--save-recon`: every reconstruction as ROOT/<model>/<index>_<name>.png (and ROOT/reference/)."""
    from PIL import Image

    for k, (idx, name) in enumerate(zip(indices, names)):
        stem = f"{int(idx):06d}_{_safe(Path(str(name)).stem)}"
        pairs = [(root / _safe(model), reconstruction[k])]
        pairs += [(root / "reference", reference[k])] if with_reference else []
        for folder, image in pairs:
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{stem}.png")


def _pm(metric: dict, digits: int) -> str:
    if metric.get("mean") is None:
        return "n/a"
    if metric.get("std") is None:
        return f"{metric['mean']:.{digits}f}"
    return f"{metric['mean']:.{digits}f} ± {metric['std']:.{digits}f}"


def markdown_table(results: dict) -> str:
    """The model-card table: model | rFID | PSNR | SSIM | LPIPS (± std) | HF kept | chroma kept | img/s, with notes."""
    meta = results["meta"]
    lines = ["| model | rFID | PSNR ± std | SSIM ± std | LPIPS ± std | HF kept | chroma kept | img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for model in results["models"]:
        m, kept = model["metrics"], model.get("kept", {})
        speed = model["throughput"]["images_per_s"]
        ratios = [kept.get(key, {}).get("ratio") for key in ("hf_power", "chroma")]
        lines.append(f"| {model['name']} | {_pm(m['rfid'], 2)} | {_pm(m['psnr'], 2)} | {_pm(m['ssim'], 3)} "
                     f"| {_pm(m['lpips'], 3)} | {' | '.join('n/a' if r is None else f'{r:.3f}' for r in ratios)} "
                     f"| {'n/a' if speed is None else f'{speed:.1f}'} |")
    n = results["models"][0]["metrics"]["psnr"]["n"] if results["models"] else 0
    lines.append("")
    lines.append(f"N={n} images of {meta['data']} at {meta['resolution']}px, latent {meta['latent']}, "
                 f"{meta['dtype']} on {meta['device']}; PSNR capped at {meta['psnr_cap_db']:g} dB; "
                 f"LPIPS backbone {meta['lpips']['backbone']}; rFID against the same N references; HF kept: "
                 f"top-octave spectral power and chroma kept: mean max(RGB)-min(RGB), each the reconstructions' "
                 f"sum over the originals' (1.0 = no blur, no desaturation).")
    upscaled = (meta.get("upscaled") or {}).get("count")
    if upscaled:
        lines.append(f"upscaled: {upscaled} of the {n} images {'was' if upscaled == 1 else 'were'} smaller than "
                     f"{meta['resolution']}px and enlarged (bicubic) before encoding; their scores partly measure "
                     f"interpolated pixels.")
    first = results["models"][0]["metrics"] if results["models"] else {}
    for name, metric in first.items():
        reason = metric.get("reason")
        if reason and not reason.startswith("not requested"):
            lines.append(f"{name}: n/a because {reason}")
    return "\n".join(lines)


def example_indices(rows: list[dict]) -> list[int]:
    """Global indices of the best, median and worst image by PSNR (ties broken by index)."""
    ranked = sorted(rows, key=lambda r: (r["psnr"], r["index"]))
    return [ranked[-1]["index"], ranked[len(ranked) // 2]["index"], ranked[0]["index"]]


def write_csv(results: dict, path: Path) -> Path:
    """One row per (model, image) with every per-image metric (empty when unavailable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for model in results["models"]:
            for row in model["rows"]:
                bias = dict(zip(("bias_r", "bias_g", "bias_b"), row.get("bias") or ()))
                writer.writerow({"model": model["name"], **{k: row.get(k) for k in CSV_COLUMNS[1:]}, **bias})
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_outputs(results: dict, out: Path, example_source: Optional[ExampleSource] = None) -> dict:
    """Write results.json, the per-image CSV and the example PNGs next to `out`; return the file names.

    The example images are re-created by `example_source` (the run does not keep images in memory).
    Every file is written under a temporary name first and all are renamed into place at the end
    (`StagedFiles`), so on any error no file of this run replaces an earlier one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = StagedFiles()
    try:
        files = _write_staged(results, out, example_source, staged)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    # Example PNGs of models an earlier run with this --out compared, and this one did not, would sit
    # beside results that do not describe them.
    current = {entry["png"] for entry in files["examples"].values()}
    prefix = f"{out.stem}_examples_"
    for stale in out.parent.iterdir():
        if stale.name.startswith(prefix) and stale.suffix == ".png" and stale.name not in current:
            stale.unlink()
    results["meta"]["files"] = files
    return files


def _write_staged(results: dict, out: Path, example_source: Optional[ExampleSource], staged: StagedFiles) -> dict:
    csv_path = out.with_name(f"{out.stem}_per_image.csv")
    write_csv(results, staged.path(csv_path))
    files = {"json": out.name, "per_image_csv": csv_path.name}
    examples = {}
    if example_source is not None:
        wanted = {m["name"]: example_indices(m["rows"]) for m in results["models"] if len(m["rows"]) >= 1}
        images = example_source(wanted)
        for model in results["models"]:
            if model["name"] not in images:
                continue
            ref, rec = images[model["name"]]
            png = out.with_name(f"{out.stem}_examples_{_safe(model['name'])}.png")
            save_reconstruction_grid(ref, rec, staged.path(png), gain=DIFFERENCE_GAIN)
            by_index = {r["index"]: r["psnr"] for r in model["rows"]}
            examples[model["name"]] = {
                "png": png.name, "layout": f"rows best, median, worst by PSNR; columns reference | "
                                          f"reconstruction | |difference| x{DIFFERENCE_GAIN:g}",
                "indices": wanted[model["name"]], "psnr": [by_index[i] for i in wanted[model["name"]]]}
    files["examples"] = examples
    table = out.with_name(f"{out.stem}.md")
    staged.path(table).write_text(results.get("table_markdown") or markdown_table(results), encoding="utf-8")
    files["table_markdown"] = table.name
    document = {"meta": {**results["meta"], "files": files},
                "models": [{k: v for k, v in m.items() if k != "rows"} for m in results["models"]]}
    # ensure_ascii (the default) keeps the file ASCII whatever the names; printable_name made them valid text.
    staged.path(out).write_text(json.dumps(document, indent=2, allow_nan=False), encoding="utf-8")
    return files


__all__ = ["CSV_COLUMNS", "StagedFiles", "example_indices", "library_versions", "markdown_table",
           "printable_name", "run_meta", "save_pngs", "write_csv", "write_outputs"]
