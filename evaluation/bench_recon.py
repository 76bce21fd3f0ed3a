"""`ldm bench-recon`: reconstruction fidelity of one or more KL autoencoders.

Protocol (docs/reconstruction-protocol.md): each reference is resized (shorter side) and centre-cropped once to a
uint8 image; `x = ref / 127.5 - 1` is encoded, the posterior mode (or a seeded sample) is decoded in
fp32 (by default) and quantised to uint8; every metric then reads only the two uint8 tensors. A
no-learning row, `bicubic-f<f>` (bicubic down- and up-sampling by the autoencoder's factor f), is always
included so a table shows what the learned latent buys over plain resampling.

Images smaller than the resolution are enlarged before encoding (the protocol's single resize); how many
were is counted, recorded in results.json (`meta.upscaled`), noted under the table and logged once.
Every option, the data and each autoencoder folder (config and weights) are checked before the first
image is read, and the results files appear only once all of them are written (`evaluation.report`).

The work is split in three steps so that 1 and N processes give the same numbers:
`collect_shard` runs this process's share of the images through every model and keeps only per-image
rows and running sums; `finalize` merges the shards (gathered with accelerate's `gather_object`) into
the results; `run_bench_recon` does both and writes the report.
"""

from __future__ import annotations

import argparse
import logging
import numbers
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ldm_core.images import metrics as M
from evaluation.inception import FID_IMPL, FIDStatistics, load_fid_inception
from evaluation.reconstructors import (BicubicReconstructor, PeakMemory, Reconstructor,
                                       VAEReconstructor)
from evaluation.report import (check_can_create, markdown_table, printable_name, run_meta, save_pngs,
                               write_outputs)
from ldm_core.config.settings import DataConfig
from ldm_core.data.image_files import DataError
from ldm_core.data.sources import open_image_source, source_kind
from ldm_core.data.streaming import iter_image_batches
from ldm_core.image_values import to_model_input, to_uint8
from ldm_core.models.hub import AUTOENCODER, resolve_model_argument
from ldm_core.models.latent_scale import LatentMoments
from ldm_core.models.pretrained import MissingWeightsError, WeightsFileError

logger = logging.getLogger("ldm.bench")

ALL_METRICS = ("psnr", "ssim", "msssim", "lpips", "rfid")
# A batch: global image indices, uint8 images (B, 3, R, R), image names, and optionally whether each image
# was smaller than R and enlarged (sources without that fourth item count as not enlarged).
Batch = tuple[Sequence[int], np.ndarray, Sequence[str]]
BatchSource = Callable[[int, int], Iterator[Batch]]


@dataclass
class BenchPlan:
    """Everything a benchmark run needs, identical on every process.

    Build it with `make_plan`. `unavailable` maps a metric name to the reason it is null.
    """

    models: list[Reconstructor]
    batches: BatchSource
    meta: dict
    metrics: tuple[str, ...]
    device: torch.device
    lpips_model: Optional[torch.nn.Module] = None
    fid_net: Optional[torch.nn.Module] = None
    unavailable: dict[str, str] = field(default_factory=dict)
    save_recon: Optional[Path] = None


def make_plan(vae_paths: Sequence[str], data: str, resolution: int, *, num_images: Optional[int] = None,
              metrics: Sequence[str] = ALL_METRICS, latent: str = "mode", seed: int = 0,
              dtype: str = "fp32", batch_size: int = 16, lpips_backbone: str = "alex",
              lpips_weights: Optional[str] = None, fid_weights: Optional[str] = None,
              shapes_seed: int = 1, device: Optional[str | torch.device] = None,
              save_recon: Optional[str] = None, batch_source: Optional[BatchSource] = None,
              fid_feature_net: Optional[torch.nn.Module] = None, streaming: bool = False) -> BenchPlan:
    """Check the options, describe the autoencoders and find the metric networks' weights.

    Parameters:
        vae_paths: run folders (holding `vae/`) or diffusers `AutoencoderKL` folders; a `Reconstructor`
            object may stand in for a folder (Python API).
        data: any `--data` source (ldm_core/data/sources.py); `num_images` limits it (all images by default).
        streaming: read a Hub dataset (`hf:org/name[:split]`) as a stream instead of downloading it whole.
        metrics: a subset of psnr, ssim, msssim, lpips, rfid.
        latent: "mode" (the protocol's default) or "sample" (seeded per image from `seed`).
        dtype: fp32 (default), bf16 or fp16 for the autoencoders.
        lpips_backbone / lpips_weights / fid_weights: see `ldm_core.images.metrics.load_lpips` and
            `evaluation.inception.load_fid_inception`; a missing file makes that metric null.
        batch_source: `(rank, world_size) -> batches`, replacing the data reader (Python API only).
        fid_feature_net: replaces the Inception network (structural tests only; never reported).
    """
    _check_options(vae_paths, resolution, batch_size, seed, shapes_seed, metrics, latent, dtype, num_images)
    try:
        device = torch.device(device) if device else _default_device()
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if batch_source is None:
        _check_data(data, streaming)

    vaes = [p if isinstance(p, Reconstructor) else VAEReconstructor(p, dtype=dtype, latent=latent, seed=seed)
            for p in vae_paths]
    _deduplicate_names(vaes)
    factors = sorted({v.factor for v in vaes})
    bad = [f for f in factors if resolution % f]
    if bad:
        raise ValueError(f"--resolution {resolution} must be divisible by the autoencoder factor {bad[0]}.")
    models: list[Reconstructor] = [BicubicReconstructor(f) for f in factors] + vaes

    plan = BenchPlan(models=models, batches=batch_source or _data_source(data, resolution, batch_size,
                                                                         num_images, shapes_seed, streaming),
                     meta={}, metrics=tuple(metrics), device=device,
                     save_recon=Path(save_recon) if save_recon else None)
    for name in ALL_METRICS:
        if name not in metrics:
            plan.unavailable[name] = "not requested (add it to --metrics)"
    reason = M.msssim_unavailable_reason(resolution, resolution)
    if "msssim" in metrics and reason:
        plan.unavailable["msssim"] = reason
    _load_metric_networks(plan, lpips_backbone, lpips_weights, fid_weights, fid_feature_net)
    plan.meta = run_meta(
        models=plan.models, metrics=plan.metrics, device=plan.device, data=data, num_images=num_images,
        resolution=resolution, latent=latent, seed=seed, dtype=dtype, shapes_seed=shapes_seed,
        lpips_backbone=lpips_backbone,
        lpips_file=M.LPIPS_BACKBONES[lpips_backbone] if plan.lpips_model is not None else None,
        lpips_weights=lpips_weights, fid_weights=fid_weights,
        fid=("injected" if fid_feature_net is not None else "inception") if plan.fid_net is not None else None)
    return plan


def _check_options(vae_paths, resolution, batch_size, seed, shapes_seed, metrics, latent, dtype, num_images) -> None:
    """The command's options, each refused with the flag's name and what it accepts."""
    for flag, value, low in (("--resolution", resolution, 1), ("--batch-size", batch_size, 1), ("--seed", seed, 0),
                             ("--shapes-seed", shapes_seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{flag} must be a whole number of at least {low}, got {value!r}.")
    if not metrics:
        raise ValueError(f"--metrics names no metric; give a comma-separated subset of {','.join(ALL_METRICS)}.")
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"Unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}.")
    if latent not in ("mode", "sample"):
        raise ValueError(f"--latent must be 'mode' or 'sample', not {latent!r}.")
    if dtype not in VAEReconstructor.DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(VAEReconstructor.DTYPES)}, not {dtype!r}.")
    if not vae_paths:
        raise ValueError("Give at least one autoencoder with --vae PATH.")
    if num_images is not None and num_images < 2:
        raise ValueError("--num-images must be at least 2 (standard deviations and FID need 2 images).")


def _load_metric_networks(plan: BenchPlan, lpips_backbone: str, lpips_weights: Optional[str],
                          fid_weights: Optional[str], fid_feature_net: Optional[torch.nn.Module]) -> None:
    """LPIPS and FID Inception networks onto `plan`, or the reason each metric is null."""
    # A file that is neither in torch hub's cache nor downloadable now (offline, a failed or wrong download)
    # makes the metric null with the reason; a wrong explicit path is an error (the user asked for that file).
    # The main process goes first, so a first-use download happens once.
    with _process_state().main_process_first():
        if "lpips" in plan.metrics:
            try:
                plan.lpips_model = M.load_lpips(lpips_backbone, lpips_weights).to(plan.device)
            except (MissingWeightsError, WeightsFileError) as err:
                if lpips_weights:
                    raise
                plan.unavailable["lpips"] = str(err)
        if "rfid" in plan.metrics:
            try:
                plan.fid_net = fid_feature_net if fid_feature_net is not None else load_fid_inception(fid_weights)
            except (MissingWeightsError, WeightsFileError) as err:
                if fid_weights:
                    raise
                plan.unavailable["rfid"] = str(err)


# --------------------------------------------------------------------------------------------------
# 1. One process's share


@torch.no_grad()
def collect_shard(plan: BenchPlan, rank: int = 0, world_size: int = 1, progress: bool = False) -> list[dict]:
    """Run this process's images through every model; return one shard dict per model.

    A shard holds per-image rows, running FID sums of the reconstructions (and, for the first model,
    of the references), running latent sums, encode+decode time and peak memory. Nothing in it grows
    with the number of images except the per-image rows.
    """
    shards = []
    for position, model in enumerate(plan.models):
        fid = FIDStatistics(plan.fid_net, plan.device) if plan.fid_net is not None else None
        rows, seconds, moments, warmup = [], 0.0, LatentMoments(), None
        memory = PeakMemory(plan.device)
        with memory.loading():
            model.load(plan.device)
        bar = tqdm(desc=f"{model.name}", unit="img", disable=not progress)
        for batch in plan.batches(rank, world_size):
            indices, images, names = batch[:3]
            upscaled = list(batch[3]) if len(batch) > 3 else [False] * len(indices)
            names = [printable_name(name) for name in names]  # valid text for JSON, CSV and PNG names
            ref = torch.from_numpy(np.ascontiguousarray(images))
            x = to_model_input(ref.to(plan.device))
            start = time.perf_counter()
            with memory.measuring():
                y, latents = model.reconstruct(x, indices)
                if plan.device.type == "cuda":
                    torch.cuda.synchronize(plan.device)
            seconds += time.perf_counter() - start
            if not torch.isfinite(y).all():
                # Quantising would turn NaN into plausible-looking pixel values and scores.
                raise FloatingPointError(f"{model.name} gave NaN or infinite reconstructions for image(s) "
                                         f"{', '.join(names[:3])}; with --dtype fp16 or bf16 try --dtype fp32.")
            warmup = warmup or (len(indices), seconds)  # first batch: kernel selection, allocator growth
            rec = to_uint8(y.float()).cpu()
            rows.extend(_rows(plan, indices, names, upscaled, ref, rec))
            if fid is not None:
                fid.update(rec, real=False)
                if position == 0:  # reference statistics once, during the cheap baseline pass
                    fid.update(ref, real=True)
            if latents is not None:
                moments.add(latents)
            if plan.save_recon is not None:
                save_pngs(plan.save_recon, model.name, indices, names, ref, rec, with_reference=position == 0)
            bar.update(len(indices))
        bar.close()
        model.unload()
        fid_state = fid.state() if fid is not None else None
        latent_sums = moments.to_state() if moments.count else None
        shards.append({"name": model.name, "rows": rows, "fid": fid_state, "latent_sums": latent_sums,
                       "seconds": seconds, "warmup": warmup or (0, 0.0),
                       "peak_memory_bytes": memory.peak_bytes})
    return shards


def _rows(plan: BenchPlan, indices, names, upscaled, ref: torch.Tensor, rec: torch.Tensor) -> list[dict]:
    psnr = M.psnr_per_image(ref, rec)
    ssim = M.ssim_per_image(ref, rec)
    msssim = M.msssim_per_image(ref, rec) if "msssim" not in plan.unavailable else None
    lp = M.lpips_per_image(plan.lpips_model, ref, rec) if plan.lpips_model is not None else None
    detail = {key: (fn(ref), fn(rec)) for key, fn in (("hf_power", M.high_frequency_power), ("chroma", M.mean_chroma))}
    border, interior = M.border_interior_psnr(ref, rec) if min(ref.shape[-2:]) > 2 * M.BORDER_RING_PX else (None, None)
    bias = M.channel_bias(ref, rec)
    return [{"index": int(idx), "name": str(name), "upscaled": bool(upscaled[i]), "psnr": float(psnr[i]),
             "psnr_border": float(border[i]) if border is not None else None,
             "psnr_interior": float(interior[i]) if interior is not None else None,
             "bias": [round(float(b), 4) for b in bias[i]],
             "ssim": float(ssim[i]) if "ssim" not in plan.unavailable else None,
             "msssim": float(msssim[i]) if msssim is not None else None,
             "lpips": float(lp[i]) if lp is not None else None,
             **{f"ref_{key}": float(r[i]) for key, (r, _) in detail.items()},
             **{key: float(y[i]) for key, (_, y) in detail.items()}}
            for i, (idx, name) in enumerate(zip(indices, names))]


# --------------------------------------------------------------------------------------------------
# 2. Merging shards


def finalize(plan: BenchPlan, shards_per_process: Sequence[list[dict]]) -> dict:
    """Merge every process's shards into the results dict (the JSON written by `ldm bench-recon`)."""
    results = {"meta": dict(plan.meta), "models": []}
    first = sorted((row for shards in shards_per_process for row in shards[0]["rows"]), key=lambda r: r["index"])
    results["meta"]["upscaled"] = {
        "count": sum(bool(r.get("upscaled")) for r in first), "n": len(first),
        "names": [r["name"] for r in first if r.get("upscaled")][:20],
        "note": f"images whose shorter side was below {plan.meta.get('resolution')} px, enlarged (Pillow "
                f"bicubic) before encoding; names lists at most 20"}
    reference_states = [shards[0]["fid"] for shards in shards_per_process if shards[0]["fid"]]
    for position, model in enumerate(plan.models):
        parts = [shards[position] for shards in shards_per_process]
        rows = sorted((row for part in parts for row in part["rows"]), key=lambda r: r["index"])
        indices = [r["index"] for r in rows]
        if len(set(indices)) != len(indices):
            raise RuntimeError("The same image was evaluated by two processes; the shards overlap.")
        entry = {"name": model.name, **model.describe(), "metrics": {}, "rows": rows}
        impls = {"psnr": M.PSNR_IMPL, "ssim": M.SSIM_IMPL, "msssim": M.MSSSIM_IMPL,
                 "lpips": plan.meta["lpips"]["impl"], "rfid": FID_IMPL}
        for name in ("psnr", "ssim", "msssim", "lpips"):
            summary = M.summarize([r[name] for r in rows]) if name not in plan.unavailable \
                else M.summarize([])
            entry["metrics"][name] = {**summary, "impl": impls[name], "reason": plan.unavailable.get(name)}
        entry["metrics"]["rfid"] = _rfid(plan, parts, reference_states, len(rows))
        # Blur and desaturation as the share of the originals' fine detail and colour that is kept.
        entry["kept"] = {key: {"ratio": M.kept_ratio([r[key] for r in rows], [r[f"ref_{key}"] for r in rows]),
                               "impl": impl}
                         for key, impl in (("hf_power", M.HIGH_FREQUENCY_IMPL), ("chroma", M.CHROMA_IMPL))}
        entry["border"] = {"psnr_border": M.summarize([r["psnr_border"] for r in rows]),
                           "psnr_interior": M.summarize([r["psnr_interior"] for r in rows]), "impl": M.BORDER_IMPL}
        biases = np.asarray([r["bias"] for r in rows], dtype=np.float64).reshape(-1, 3)
        entry["bias"] = {"mean": biases.mean(axis=0).tolist(), "mean_abs": np.abs(biases).mean(axis=0).tolist(),
                         "worst_abs": float(np.abs(biases).max()) if biases.size else None, "impl": M.BIAS_IMPL}
        entry["throughput"] = _throughput(parts)
        entry["peak_memory"] = {"bytes": max(p["peak_memory_bytes"] for p in parts),
                                "method": PeakMemory.describe(plan.device)}
        entry["latent_stats"] = _merge_latent_sums([p["latent_sums"] for p in parts])
        results["models"].append(entry)
    return results


def _throughput(parts: list[dict]) -> dict:
    """Images per second of encode+decode on one device, without each process's first (warm-up) batch."""
    n = sum(len(p["rows"]) - p["warmup"][0] for p in parts)
    seconds = sum(p["seconds"] - p["warmup"][1] for p in parts)
    method = "encode+decode time only, first batch of each process excluded as warm-up, per device"
    if n <= 0 or seconds <= 0:  # a single batch: nothing left after the warm-up
        n, seconds = sum(len(p["rows"]) for p in parts), sum(p["seconds"] for p in parts)
        method = "encode+decode time only, single batch (includes warm-up), per device"
    return {"images_per_s": n / seconds if seconds > 0 else None, "n": n, "seconds": seconds,
            "method": method}


def _rfid(plan: BenchPlan, parts, reference_states, n: int) -> dict:
    entry = {"mean": None, "std": None, "n": 0, "impl": FID_IMPL, "reason": plan.unavailable.get("rfid")}
    if plan.fid_net is None:
        return entry
    if n < 2:  # a folder with one usable image: report it instead of failing after the whole run
        entry["reason"] = f"FID needs at least 2 images; {n} could be read"
        return entry
    stats = FIDStatistics(plan.fid_net)
    for part in parts:
        stats.merge(part["fid"], real=False)
    for state in reference_states:
        stats.merge(state, fake=False)
    entry.update(mean=stats.compute(), n=n, reason=None,
                 reference=f"the same {stats.counts()[0]} reference images")
    return entry


def _merge_latent_sums(states: list[Optional[dict]]) -> Optional[dict]:
    states = [s for s in states if s is not None]
    if not states:
        return None
    moments = LatentMoments.merge(states)
    std = moments.std()
    return {"channel_mean": moments.channel_mean().tolist(), "channel_std": moments.channel_std().tolist(),
            "mean": moments.mean(), "std": std, "implied_scaling_factor": 1.0 / std if std > 0 else None,
            "n_values": moments.values(),
            "note": "raw latents (before any scaling factor); implied factor = 1 / std over all values, "
                    "as LDM's scale_by_std"}


# --------------------------------------------------------------------------------------------------
# 3. The whole run


def run_bench_recon(vae_paths: Sequence[str], data: str, resolution: int, *,
                    out: Optional[str | Path] = None, out_dir: Optional[str | Path] = None,
                    progress: bool = True, **options) -> dict:
    """Benchmark the autoencoders; returns the results dict (with `table_markdown` and per-image `rows`).

    Parameters:
        out: where to write results.json (the CSV, PNGs and a Markdown copy of the table go beside
            it); `out_dir` is shorthand for `out_dir/results.json`. Nothing is written when both are None.
        progress: show a progress bar per model (main process only).
        options: those of `make_plan`.

    Under `accelerate launch` the images are sharded over the processes and the main process writes
    the report; the numbers equal a one-process run. The output paths are checked before any work, the
    report files are renamed into place together once all are written (`evaluation.report.write_outputs`),
    and `save_recon` is filled through a staging folder beside it, so a failed run leaves neither.
    """
    state = _process_state()
    options.setdefault("device", state.device)
    out = Path(out_dir) / "results.json" if out is None and out_dir is not None else out
    if out is not None:
        _check_writable(Path(out), "--out", is_file=True)
    save_recon = options.get("save_recon")
    if save_recon:
        _check_writable(Path(save_recon), "--save-recon", is_file=False)
        # Reconstructions are written into a staging folder beside it and moved in when the run is complete.
        options["save_recon"] = _staging(Path(save_recon))
    plan = make_plan(vae_paths, data, resolution, **options)
    plan.meta["world_size"] = state.num_processes
    if plan.save_recon is not None and state.is_main_process:
        shutil.rmtree(plan.save_recon, ignore_errors=True)  # what a crashed earlier run left
    if plan.save_recon is not None and state.num_processes > 1:
        state.wait_for_everyone()  # nobody writes into the staging folder before it is emptied
    try:
        shard = collect_shard(plan, state.process_index, state.num_processes,
                              progress=progress and state.is_main_process)
        shards = gather_object([shard]) if state.num_processes > 1 else [shard]
        results = finalize(plan, shards)
        results["table_markdown"] = markdown_table(results)
        if state.is_main_process:
            _warn_upscaled(results)
            if out is not None:
                write_outputs(results, Path(out), example_source=lambda wanted: _examples(plan, wanted))
            if plan.save_recon is not None:
                _publish_folder(plan.save_recon, Path(save_recon))
    except BaseException:
        if plan.save_recon is not None and state.is_main_process:
            shutil.rmtree(plan.save_recon, ignore_errors=True)
        raise
    return results


def _warn_upscaled(results: dict) -> None:
    upscaled = results["meta"]["upscaled"]
    if upscaled["count"]:
        logger.warning("%d of the %d images %s smaller than --resolution %s and enlarged (bicubic) before "
                       "encoding (e.g. %s); their scores partly measure interpolated pixels. Use a smaller "
                       "--resolution or larger images. The count is in results.json (meta.upscaled).",
                       upscaled["count"], upscaled["n"], "was" if upscaled["count"] == 1 else "were",
                       results["meta"]["resolution"], ", ".join(upscaled["names"][:3]))


def _check_writable(path: Path, flag: str, *, is_file: bool) -> None:
    """Refuse, before any work, an output path the run could only fail to write at its end."""
    if is_file and path.is_dir():
        raise ValueError(f"{flag} {printable_name(path)} is a folder; give a file name such as "
                         f"{printable_name(path / 'results.json')} (the CSV, PNGs and table go beside it).")
    if not is_file and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {printable_name(path)} is a file; give a folder for the PNGs.")
    check_can_create(path)


def _staging(folder: Path) -> Path:
    """Beside `folder`, on the same file system, so moving it into place is a rename."""
    return folder.parent / f".{folder.name}.bench-recon-partial"


def _publish_folder(staging: Path, folder: Path) -> None:
    """Move a finished staging folder to `folder`; into it, file by file, when it already exists."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = folder / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(staging)


def _check_data(data: str, streaming: bool = False) -> None:
    """--data names a source with at least 2 images (decoded later, during the run): builtin:shapes, a
    folder, WebDataset shards or a Hugging Face dataset (ldm_core/data/sources.py). A stream is only opened:
    its images are counted as they are read."""
    if source_kind(str(data)) == "shapes":  # raises DataError for an unknown builtin: name
        return
    source = open_image_source(str(data), streaming=streaming)
    if getattr(source, "streaming", False):
        return
    count = len(source)
    if count < 2:
        raise DataError(f"--data {printable_name(data)} holds {count} image; the benchmark needs at least "
                        f"2 (standard deviations and FID need 2 images).")


def _examples(plan: BenchPlan, wanted: dict[str, list[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Re-read the chosen images and reconstruct them again (deterministic: mode, or per-image seeds)."""
    needed = {i for idx in wanted.values() for i in idx}
    found: dict[int, np.ndarray] = {}
    for batch in plan.batches(0, 1):
        indices, images = batch[0], batch[1]
        found.update({int(i): images[k] for k, i in enumerate(indices) if int(i) in needed})
    out = {}
    with torch.no_grad():
        for model in plan.models:
            if model.name not in wanted:
                continue
            idx = wanted[model.name]
            ref = torch.from_numpy(np.stack([found[i] for i in idx]))
            model.load(plan.device)
            y, _ = model.reconstruct(to_model_input(ref.to(plan.device)), idx)
            model.unload()
            out[model.name] = (ref, to_uint8(y.float()).cpu())
    return out


def _data_source(data: str, resolution: int, batch_size: int, num_images: Optional[int],
                 shapes_seed: int, streaming: bool = False) -> BatchSource:
    def source(rank: int, world_size: int):
        yield from iter_image_batches(data, resolution, batch_size, limit=num_images, rank=rank,
                                      world_size=world_size, shapes_count=num_images or DataConfig().shapes_count,
                                      shapes_seed=shapes_seed, progress=False, streaming=streaming)
    return source


def _process_state():
    """accelerate's process state; without CUDA, several processes (torchrun) join over gloo on the CPU."""
    from accelerate import PartialState

    from ldm_core.training.accelerator import cpu_only

    return PartialState(cpu=cpu_only())


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _deduplicate_names(models: list[Reconstructor]) -> None:
    seen: dict[str, int] = {}
    for model in models:
        count = seen.get(model.name, 0)
        seen[model.name] = count + 1
        if count:
            model.name = f"{model.name}#{count + 1}"


# --------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `ldm bench-recon`."""
    parser.add_argument("--vae", action="append", required=True, metavar="PATH_OR_HUB_ID",
                        help="run folder (with vae/), diffusers AutoencoderKL folder, or Hugging Face Hub id fetched on "
                             "first use (e.g. stabilityai/sd-vae-ft-mse); repeat to compare")
    parser.add_argument("--data", required=True,
                        help="image folder, WebDataset shards, Hugging Face dataset (a local one, or hf:org/name[:split] "
                             "on the Hub) or builtin:shapes")
    parser.add_argument("--streaming", action="store_true",
                        help="read a Hub dataset as a stream (only the images used are fetched) instead of "
                             "downloading it whole")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--num-images", type=int, default=None, help="default: every image of --data")
    parser.add_argument("--metrics", default=",".join(ALL_METRICS),
                        help=f"comma-separated subset of {','.join(ALL_METRICS)}")
    parser.add_argument("--latent", choices=("mode", "sample"), default="mode")
    parser.add_argument("--seed", type=int, default=0, help="seed of --latent sample (per image)")
    parser.add_argument("--dtype", choices=VAEReconstructor.DTYPES, default="fp32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lpips-net", choices=tuple(M.LPIPS_BACKBONES), default="alex")
    parser.add_argument("--lpips-weights", default=None, metavar="PATH", help="torchvision trunk file")
    parser.add_argument("--fid-weights", default=None, metavar="PATH",
                        help="weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--shapes-seed", type=int, default=1,
                        help="seed of builtin:shapes (default 1: not the training set's seed 0)")
    parser.add_argument("--out", default="bench-recon/results.json",
                        help="results JSON; the CSV, PNGs and table go beside it")
    parser.add_argument("--save-recon", default=None, metavar="DIR", help="save every image as PNG here")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    """Run `ldm bench-recon` and print the Markdown table."""
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    # Bad input raises ValueError / FileNotFoundError / MissingWeightsError, which `ldm` prints as a
    # one-line error (workflows/cli.py).
    vaes = [str(resolve_model_argument(vae, kind=AUTOENCODER, option="--vae")) for vae in args.vae]
    results = run_bench_recon(
        vaes, args.data, args.resolution, out=args.out, progress=not args.no_progress,
        num_images=args.num_images, metrics=metrics, latent=args.latent, seed=args.seed,
        dtype=args.dtype, batch_size=args.batch_size, lpips_backbone=args.lpips_net,
        lpips_weights=args.lpips_weights, fid_weights=args.fid_weights,
        shapes_seed=args.shapes_seed, save_recon=args.save_recon, streaming=args.streaming)
    if _process_state().is_main_process:
        print(results["table_markdown"])
    return 0
