"""`ldm demo`: the whole job on built-in data, with a summary that names every output.

builtin:shapes -> Stage A (kl-f8-mini) -> Stage B (unet-small) -> images from noise, scored by the exact
shapes scorer twice: through the project's pipeline and through plain diffusers models with the
independent DPM-Solver++ loop of `evaluation/reference_sampler.py` -> reconstruction benchmark of the
trained VAE against `bicubic-f8` on shapes it never saw, in the training colours and in the held-out
colours (`builtin:shapes-unseen-colours`). The summary gives each part's wall time and the CPU. The preset is `configs/demo.yaml`, in fixed step
counts, so the same command gives the same result on any machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from ldm_core.sample_folder import GRID_FILE
from ldm_core.training.accelerator import cpu_description
from ldm_core.config.settings import load_config
from ldm_core.data.image_files import BUILTIN_SHAPES, BUILTIN_SHAPES_UNSEEN_COLOURS
from ldm_core.config.preset_files import config_path
from ldm_core.image_values import to_uint8
from ldm_core.training.metric_history import MetricHistory
from ldm_core.training.run_folder import write_json
from workflows.config import LDMConfig
from workflows.train_all import train_both_stages

logger = logging.getLogger("ldm.demo")
DATA = BUILTIN_SHAPES
SAMPLE_SCORES = ("n", "validity", "class_histogram", "max_class_deviation", "class_match")


def run_demo(out: Path, overrides: Sequence[str] = ()) -> dict:
    """Run the demo into `out` and return the summary (also written to out/summary.json and summary.md)."""
    out = Path(out)
    if (out / "summary.json").is_file():
        print((out / "summary.md").read_text())
        print(f"The demo in {out} is already complete (summary above). Run `ldm demo --out NEW_FOLDER` for a new one.")
        return json.loads((out / "summary.json").read_text())
    cfg = load_config(LDMConfig, config_path("demo.yaml"), overrides)
    started = time.monotonic()

    # 1. Both stages; a killed demo continues from its checkpoints when re-run.
    resume = "latest" if (out / "stage_a").exists() else None
    paths = train_both_stages(cfg, DATA, out, resume=resume)
    seconds = dict(paths["seconds"])
    train_minutes = (time.monotonic() - started) / 60

    # 2. Images from noise, scored; the reconstruction benchmarks.
    samples_dir = out / "samples"
    scores, plain = _sample_and_score(paths["pipeline"], cfg.evaluation, samples_dir, seconds)
    bench_dir, unseen_dir = out / "bench_recon", out / "bench_recon_unseen_colours"
    bench, unseen, round_trip = _benchmark_reconstructions(paths["vae"], cfg.stage_a.data, cfg.evaluation.recon_images,
                                                           bench_dir, unseen_dir, seconds)

    # 3. Summary.
    a_metrics = json.loads((out / "stage_a" / "metrics.json").read_text())
    b_metrics = json.loads((out / "stage_b" / "metrics.json").read_text())
    psnr, unseen_psnr = _psnr_by_model(bench), _psnr_by_model(unseen)
    summary = {
        "wall_minutes": round((time.monotonic() - started) / 60, 2),
        "training_minutes": round(train_minutes, 2),
        "seconds": seconds,
        "cpu": cpu_description(),
        "precision": {"stage_a": cfg.stage_a.train.mixed_precision, "stage_b": cfg.stage_b.train.mixed_precision},
        "stage_a": {"steps": a_metrics["steps"], "val_psnr": a_metrics["validation"].get("psnr"),
                    "val_ssim": a_metrics["validation"].get("ssim"),
                    "heldout_psnr": psnr["vae"], "bicubic_psnr": psnr.get("bicubic-f8"),
                    "unseen_colours_psnr": unseen_psnr["vae"], "unseen_colours_bicubic_psnr": unseen_psnr.get("bicubic-f8"),
                    "reconstructions_valid": round_trip["validity"], "recon_images": cfg.evaluation.recon_images,
                    "scaling_factor": a_metrics["latent_stats"]["scaling_factor"]},
        "stage_b": {"steps": b_metrics["steps"], "final_loss": MetricHistory(b_metrics["history"]).last("loss"),
                    "sample_scores": [{k: row[k] for k in ("step", "swd", "swd_floor", "valid", "metrics_seconds")
                                       if k in row} for row in b_metrics["history"] if "swd" in row]},
        # class_match (valid and showing the requested class) only for a class-conditional Stage B.
        "samples": {k: scores[k] for k in SAMPLE_SCORES + ("reasons",) if k in scores},
        "samples_plain_diffusers": {k: plain[k] for k in SAMPLE_SCORES if k in plain},
        "sampler": f"{cfg.evaluation.scheduler}, {cfg.evaluation.num_inference_steps} steps"
                   + (f", guidance {cfg.evaluation.guidance_scale:g}" if cfg.stage_b.model.num_classes else ""),
        "bench_recon": bench.get("table_markdown"),
        "bench_recon_unseen_colours": unseen.get("table_markdown"),
        "outputs": {
            "vae": str(paths["vae"]),
            "pipeline": str(paths["pipeline"]),
            "samples_grid": str(samples_dir / GRID_FILE),
            "samples_scores": str(samples_dir / "scores.json"),
            "stage_a_reconstructions": str(out / "stage_a" / "images" / "recon_final.png"),
            "stage_a_loss_curves": str(out / "stage_a" / "images" / "loss_curves.png"),
            "stage_b_sample_grid": str(out / "stage_b" / "images" / "samples_final.png"),
            "stage_b_loss_curves": str(out / "stage_b" / "images" / "loss_curves.png"),
            "bench_recon_json": str(bench_dir / "results.json"),
            "bench_recon_examples": str(bench_dir),
            "bench_recon_unseen_colours_json": str(unseen_dir / "results.json"),
            "tensorboard": f"tensorboard --logdir {out}",
        },
    }
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(_summary_markdown(summary))
    print(_summary_markdown(summary))
    return summary


def _sample_and_score(pipeline_folder: Path, ev, samples_dir: Path, seconds: dict) -> tuple[dict, dict]:
    """Images from noise through the project's pipeline and, from the same noise, through plain diffusers
    classes and a hand-written sampler (docs/demo.md); both scored by the shapes scorer."""
    from evaluation.shapes_score import score_folder, score_images
    from pipelines.latent_diffusion import LatentDiffusionPipeline
    from stage_b_diffusion.noise_schedule import make_sampler
    from workflows.generate import generate_images

    clock = time.monotonic()
    pipe = LatentDiffusionPipeline.from_pretrained(pipeline_folder)
    pipe.scheduler = make_sampler(ev.scheduler, pipe.scheduler.config)
    # A class-conditional model cycles through its classes (labels.json, which score_folder reads).
    generate_images(pipe, ev.num_images, seed=ev.seed, batch_size=16, num_inference_steps=ev.num_inference_steps,
                    guidance_scale=ev.guidance_scale, out_dir=samples_dir, overwrite=True)  # a killed demo re-samples
    seconds["sampling"] = round(time.monotonic() - clock, 1)
    scores = score_folder(samples_dir)
    write_json(samples_dir / "scores.json", scores)
    clock = time.monotonic()
    plain = score_images(*_plain_diffusers_samples(pipeline_folder, pipe, ev, samples_dir))
    write_json(samples_dir / "scores_plain_diffusers.json", plain)
    seconds["sampling_plain_diffusers"] = round(time.monotonic() - clock, 1)
    return scores, plain


def _benchmark_reconstructions(vae_folder: Path, data_cfg, num_images: int, bench_dir: Path, unseen_dir: Path,
                               seconds: dict) -> tuple[dict, dict, dict]:
    """Reconstruction fidelity on shapes the autoencoder never saw (another seed of the generator), in the
    training colours and in the colours held out of training, and how many survive the round trip valid:
    no Stage B can be more valid than that."""
    from evaluation.bench_recon import run_bench_recon

    clock = time.monotonic()
    heldout_seed = data_cfg.shapes_seed + 1
    bench = run_bench_recon([str(vae_folder)], DATA, data_cfg.resolution, num_images=num_images,
                            shapes_seed=heldout_seed, out_dir=bench_dir)
    unseen = run_bench_recon([str(vae_folder)], BUILTIN_SHAPES_UNSEEN_COLOURS, data_cfg.resolution,
                             num_images=num_images, shapes_seed=heldout_seed, out_dir=unseen_dir)
    round_trip = _reconstruction_validity(vae_folder, heldout_seed, num_images=num_images, size=data_cfg.resolution)
    seconds["bench_recon"] = round(time.monotonic() - clock, 1)
    return bench, unseen, round_trip


def _psnr_by_model(bench: dict) -> dict[str, float]:
    """{"vae": the autoencoder's mean PSNR, "bicubic-f8": the baseline's} from a bench-recon result."""
    return {("bicubic-f8" if m["name"] == "bicubic-f8" else "vae"): m["metrics"]["psnr"]["mean"] for m in bench["models"]}


def _reconstruction_validity(vae_folder: Path, seed: int, num_images: int, size: int) -> dict:
    """The shapes scorer on the autoencoder's reconstructions of `num_images` shapes of generator `seed`."""
    import torch
    from diffusers import AutoencoderKL

    from evaluation.shapes_score import score_images
    from ldm_core.data.shapes import make_shapes
    from stage_a_vae.validation import reconstruct_uint8

    images, labels, _ = make_shapes(num_images, seed, size=size)
    vae = AutoencoderKL.from_pretrained(vae_folder, use_safetensors=True)
    reconstructions = torch.cat([reconstruct_uint8(vae, torch.from_numpy(chunk)) for chunk in
                                 (images[i:i + 32] for i in range(0, num_images, 32))])
    return score_images(reconstructions.numpy(), labels)


def _plain_diffusers_samples(folder: Path, pipe, ev, samples_dir: Path):
    """uint8 (N, 3, H, W) images from the saved folder through plain diffusers models and the hand-written
    DPM-Solver++(2M) loop, from the same per-image noise as `generate_images` (and, for a class-conditional
    model, the classes it wrote to `samples_dir/labels.json`, with the same guidance); and those requested
    classes as SHAPE_CLASSES indices, or None."""
    import numpy as np
    import torch

    from evaluation.reference_sampler import sample_saved_pipeline
    from evaluation.shapes_score import SHAPE_CLASSES, read_requested_classes
    from ldm_core.randomness import image_generator
    from ldm_core.sample_folder import image_file_name

    size = pipe.unet.config.sample_size
    shape = (1, pipe.unet.config.in_channels, size, size)
    noise = torch.cat([torch.randn(shape, generator=image_generator(ev.seed, i)) for i in range(ev.num_images)])
    class_ids = requested = None
    if pipe.num_classes:
        labels = read_requested_classes(samples_dir)["labels"]
        names = [labels[image_file_name(i)] for i in range(ev.num_images)]
        class_ids = torch.tensor([pipe.config.class_names.index(name) for name in names])
        requested = np.array([SHAPE_CLASSES.index(name) for name in names])
    images = sample_saved_pipeline(folder, noise, num_steps=ev.num_inference_steps, class_labels=class_ids,
                                   guidance_scale=ev.guidance_scale)
    return np.asarray(to_uint8(images * 2 - 1)), requested


def _summary_markdown(s: dict) -> str:
    a, b, sm, pl, cpu = s["stage_a"], s["stage_b"], s["samples"], s["samples_plain_diffusers"], s["cpu"]
    extensions = ", ".join(name.upper().replace("_", "-") for name in ("avx2", "avx512", "avx512_bf16", "amx")
                           if cpu.get(name)) or "no AVX2"

    def classes(scores):
        shown = ", ".join(f"{k} {v:.0%}" for k, v in scores["class_histogram"].items())
        if "class_match" in scores:
            shown += f"; {scores['class_match']:.1%} valid and showing the class asked for"
        return shown

    lines = [
        "# two-stage-ldm demo",
        "",
        f"Wall time {s['wall_minutes']:.1f} min on {cpu['model']} ({cpu['cores']} cores; {extensions}): "
        + ", ".join(f"{part.replace('_', ' ')} {value / 60:.1f} min" for part, value in s["seconds"].items()) + ".",
        "",
        f"- Stage A: {a['steps']} steps, held-out PSNR {a['val_psnr']:.2f} dB, SSIM {a['val_ssim']:.4f}; on {a['recon_images']} "
        f"unseen shapes {a['heldout_psnr']:.2f} dB against {a['bicubic_psnr']:.2f} dB for bicubic-f8, and "
        f"{a['reconstructions_valid']:.1%} of their reconstructions valid shapes; on {a['recon_images']} shapes in colours held "
        f"out of training {a['unseen_colours_psnr']:.2f} dB against {a['unseen_colours_bicubic_psnr']:.2f} dB; "
        f"latent scaling factor {a['scaling_factor']:.4f}",
        f"- Stage B: {b['steps']} steps, final loss {b['final_loss']:.4f}" + _sample_scores_text(b["sample_scores"]),
        f"- {sm['n']} generated images ({s['sampler']}): {sm['validity']:.1%} valid shapes; classes {classes(sm)} "
        f"(largest deviation from 1/3: {sm['max_class_deviation']:.1%}); invalid because: "
        + (", ".join(f"{k} {v}" for k, v in sm["reasons"].items()) or "none"),
        f"- the same noise through plain diffusers models and a hand-written DPM-Solver++(2M): "
        f"{pl['validity']:.1%} valid; classes {classes(pl)}",
        "",
        "## Reconstruction benchmark (held-out shapes)",
        "",
        s["bench_recon"] or "(not available)",
        "",
        "## Reconstruction benchmark (held-out colours)",
        "",
        s["bench_recon_unseen_colours"] or "(not available)",
        "",
        "## Outputs",
        "",
    ]
    lines += [f"- {name}: {path}" for name, path in s["outputs"].items()]
    return "\n".join(lines) + "\n"


def _sample_scores_text(rows: list[dict]) -> str:
    """`; samples scored during training (SWD x1e3, floor 11.2; valid): 1000 58.1 (41%), ...; 4.1 s each`."""
    if not rows:
        return ""
    steps = ", ".join(f"{r['step']} {r['swd']:.1f}" + (f" ({r['valid']:.0%})" if "valid" in r else "") for r in rows)
    seconds = sum(r.get("metrics_seconds", 0) for r in rows) / len(rows)
    return (f"; its samples scored during training (step, SWD x1e3 against a floor of {rows[-1]['swd_floor']:.1f}, "
            f"valid share): {steps}; {seconds:.1f} s an evaluation")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train both stages on builtin:shapes with configs/demo.yaml, generate images, score them, "
                          "benchmark the VAE's reconstructions, and print a summary.")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of configs/demo.yaml")


def main(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), args.overrides)
    return 0
