"""Which autoencoder does the demo's Stage B learn fastest on, and which `inspect-vae` figure says so beforehand?

    python -m benchmarks.latent_space_experiment --demo-vae runs/demo/stage_a/vae --out runs/bench/latent_space

Each variant is the demo's autoencoder (`configs/demo.yaml`, Stage A) fine-tuned for `--finetune-steps` with
one option of docs/latent-space.md or a larger KL weight, beside the same fine-tune without any option (the
control) and the demo's autoencoder as it is. Fine-tuning a trained autoencoder is how EQ-VAE applies its
regulariser (Kouzelis et al. 2025, sec. 4). For each autoencoder: `inspect-vae`'s figures on 256 unseen
shapes, then the demo's Stage B with its settings but `--stage-b-steps` steps (its cosine schedule ends
there), once per seed, its checkpoints halfway and at the end each scored over `--num-images` samples from
fixed noise (DPM-Solver++, 50 steps) by the exact shapes scorer and by SWD.

A killed run continues: a finished piece (an autoencoder, an inspection, a Stage B run, a score) is kept and
skipped. Several processes may share the work by giving each its own `--variants`. `--summarise` only reads
what is there and writes OUT/latent_space_experiment.{json,md} and the picture.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

DATA = "builtin:shapes"
# name -> Stage A overrides of the fine-tune (None: the demo's autoencoder as it is, no fine-tune).
VARIANTS: dict[str, list[str] | None] = {
    "as-is": None,
    "fine-tune": [],
    "eqvae": ["stage_a.loss.equivariance=eqvae"],
    "scale": ["stage_a.loss.equivariance=scale"],
    "latent-noise": ["stage_a.loss.latent_noise=0.5"],
    "kl-x10": ["stage_a.loss.kl_weight=1e-5"],
    "kl-x100": ["stage_a.loss.kl_weight=1e-4"],
}


def finetune_overrides(demo_vae: str, steps: int) -> list[str]:
    """The fine-tune every variant shares: from the demo's weights, LDM's L1 loss, no discriminator."""
    return [f"stage_a.model.pretrained={demo_vae}", f"stage_a.train.max_steps={steps}",
            "stage_a.loss.l2_warmup_steps=0", f"stage_a.loss.disc_start={steps}", "stage_a.train.lr=2e-4",
            "stage_a.train.lr_warmup_steps=50", f"stage_a.train.checkpoint_every={steps}",
            "stage_a.train.validate_every=500"]


def stage_b_overrides(steps: int, seed: int) -> list[str]:
    """The demo's Stage B with `steps` steps, checkpoints kept halfway and at the end."""
    return [f"stage_b.train.max_steps={steps}", f"stage_b.train.seed={seed}",
            f"stage_b.train.checkpoint_every={steps // 2}", "stage_b.train.keep_checkpoints=4",
            "stage_b.sampling.metrics_every=500", f"stage_b.sampling.sample_every={steps}"]


def autoencoder(variant: str, args) -> Path:
    """The variant's autoencoder folder, fine-tuned first if it is not there yet."""
    from ldm_core.config.preset_files import config_path
    from ldm_core.config.settings import load_config
    from stage_a_vae.train import train_vae
    from workflows.config import LDMConfig

    if VARIANTS[variant] is None:
        return Path(args.demo_vae)
    run = args.out / variant / "stage_a"
    if not (run / "vae" / "config.json").is_file():
        cfg = load_config(LDMConfig, config_path("demo.yaml"),
                          finetune_overrides(args.demo_vae, args.finetune_steps) + VARIANTS[variant])
        train_vae(cfg.stage_a, DATA, run, resume="latest" if run.exists() else None)
    return run / "vae"


def inspection(variant: str, vae_dir: Path, args) -> dict:
    """`inspect-vae`'s report on 256 unseen shapes (seed 1, as `ldm inspect-vae`), kept in VARIANT/inspect.json."""
    from evaluation.inspect_vae import inspect, read_images
    from ldm_core.models.autoencoder_folders import load_frozen_vae

    path = args.out / variant / "inspect.json"
    if not path.is_file():
        vae, _ = load_frozen_vae(vae_dir)
        images, labels = read_images(DATA, 64, 256, seed=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(inspect(vae, images, labels)["report"], indent=2))
    return json.loads(path.read_text())


def stage_b(variant: str, vae_dir: Path, seed: int, args) -> Path:
    """The demo's Stage B on the variant's latents, trained if not there yet; returns its run folder."""
    from ldm_core.config.preset_files import config_path
    from ldm_core.config.settings import load_config
    from workflows.config import LDMConfig
    from workflows.train_all import train_both_stages

    out = args.out / variant / f"seed{seed}"
    if not (out / "stage_b" / "pipeline" / "model_index.json").is_file():
        cfg = load_config(LDMConfig, config_path("demo.yaml"), stage_b_overrides(args.stage_b_steps, seed))
        train_both_stages(cfg, DATA, out, vae=str(vae_dir), resume="latest" if (out / "stage_b").exists() else None)
    return out / "stage_b"


def scores(run: Path, args) -> dict:
    """Each kept checkpoint of a Stage B run scored over `--num-images` samples; kept in RUN/../scores.json."""
    from benchmarks.sample_metric_rank import batches, real_shapes, sample_checkpoint, score
    from evaluation.shapes_score import score_images
    from evaluation.swd import descriptors_of, swd
    from pipelines.latent_diffusion import LatentDiffusionPipeline
    from stage_b_diffusion.noise_schedule import make_sampler

    path = run.parent / "scores.json"
    if path.is_file():
        return json.loads(path.read_text())
    n = args.num_images
    reference = descriptors_of(batches(real_shapes(n, 1)))  # held-out shapes, as benchmarks/sample_metric_rank.py
    floor = swd(descriptors_of(batches(real_shapes(n, 2))), reference)["mean"]
    pipe = LatentDiffusionPipeline.from_pretrained(run / "pipeline")
    pipe.scheduler = make_sampler("dpmsolver++", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result = {}
    for step in (args.stage_b_steps // 2, args.stage_b_steps):
        samples = sample_checkpoint(pipe, run / "checkpoints" / f"step-{step:07d}", n, 50, seed=0)
        shapes = score_images(samples.numpy())
        result[str(step)] = {**score(samples, reference, floor), "max_class_deviation": shapes["max_class_deviation"],
                             "class_histogram": shapes["class_histogram"]}
        print(variant_label(run), step, f"valid {result[str(step)]['valid']:.1%}", flush=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def variant_label(run: Path) -> str:
    return f"{run.parent.parent.name}/{run.parent.name}"


# The inspect-vae figures set beside Stage B's progress: name -> how to read it from a report.
def _noise_psnr(sigma: float):
    return lambda r: next(row["psnr"] for row in r["decoder_under_noise"] if row["sigma"] == sigma)


FIGURES = {
    "held-out PSNR": _noise_psnr(0.0),
    "PSNR, latent noise 0.1": _noise_psnr(0.1),
    "PSNR, latent noise 0.2": _noise_psnr(0.2),
    "equivariance PSNR, 2x down": lambda r: r["equivariance_psnr"]["downscale_2x"],
    "equivariance PSNR, quarter turn": lambda r: r["equivariance_psnr"]["rotate_90"],
    "latent high-frequency share": lambda r: r["spectra"]["latents_hf_share"],
    "KL per position": lambda r: float(np.mean([c["kl_per_position"] for c in r["channels"]])),
    "posterior std / spread": lambda r: float(np.mean([c["posterior_over_spread"] for c in r["channels"]])),
    "interpolation evenness, linear": lambda r: r["interpolation_evenness"]["linear"],
    "PCA variance in 2 axes": lambda r: r["pca_explained_variance"],
}


CONTROL = "fine-tune"  # the same fine-tune with no option: what each option is compared with, seed by seed


def collect(args) -> dict:
    """Each autoencoder's inspect-vae figures and, per Stage B seed, its scores and in-training curve."""
    rows = {}
    for variant in VARIANTS:
        report_path = args.out / variant / "inspect.json"
        if not report_path.is_file():
            continue
        report = json.loads(report_path.read_text())
        seeds = {}
        for seed_dir in sorted((args.out / variant).glob("seed*")):
            if (seed_dir / "scores.json").is_file():
                run_scores = json.loads((seed_dir / "scores.json").read_text())
                curve = json.loads((seed_dir / "stage_b" / "metrics.json").read_text())["history"]
                seeds[seed_dir.name] = {**run_scores, "in_training": [{k: row[k] for k in ("step", "swd", "valid")
                                                                       if k in row} for row in curve if "swd" in row]}
        rows[variant] = {"figures": {name: read(report) for name, read in FIGURES.items()}, "stage_b": seeds}
    return rows


def paired_difference(row: dict, control: Optional[dict], end: str) -> Optional[float]:
    """The valid share at `end` minus the control's on the same seeds (seeds differ by more than the options
    do, so only same-seed differences compare autoencoders), in points; None without a shared seed."""
    if control is None:
        return None
    shared = [s for s in row["stage_b"] if s in control["stage_b"] and end in row["stage_b"][s]
              and end in control["stage_b"][s]]
    if not shared:
        return None
    return float(np.mean([100 * (row["stage_b"][s][end]["valid"] - control["stage_b"][s][end]["valid"])
                          for s in shared]))


def table(rows: dict, half: str, end: str) -> list[str]:
    lines = [f"| autoencoder | held-out PSNR | PSNR at latent noise 0.1 | equivariance PSNR 2x down / quarter turn | "
             f"latent HF share | KL per position | valid at {half} | valid at {end} | valid at {end} against "
             f"{CONTROL}, same seed | SWD at {end} | class share furthest from 1/3 at {end} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, row in rows.items():
        f = row["figures"]
        per_seed = lambda step, key, fmt: " / ".join(fmt(s[step][key]) for s in row["stage_b"].values() if step in s) or "-"
        gap = paired_difference(row, rows.get(CONTROL), end)
        lines.append(
            f"| {variant} | {f['held-out PSNR']:.2f} | {f['PSNR, latent noise 0.1']:.2f} | "
            f"{f['equivariance PSNR, 2x down']:.2f} / {f['equivariance PSNR, quarter turn']:.2f} | "
            f"{f['latent high-frequency share']:.3f} | {f['KL per position']:.2f} | "
            f"{per_seed(half, 'valid', lambda v: f'{v:.1%}')} | {per_seed(end, 'valid', lambda v: f'{v:.1%}')} | "
            f"{'-' if gap is None else f'{gap:+.1f} points'} | {per_seed(end, 'swd', lambda v: f'{v:.1f}')} | "
            f"{per_seed(end, 'max_class_deviation', lambda v: f'{100 * v:.0f} points off')} |")
    return lines


def rank_figures(rows: dict, end: str) -> tuple[dict, list[str]]:
    """Spearman's rho of each figure against the valid share at `end`, averaged over the seeds every scored
    autoencoder has (so that no autoencoder gains from a kinder seed); None where either list is constant."""
    from scipy.stats import spearmanr

    scored = {v: r for v, r in rows.items() if any(end in s for s in r["stage_b"].values())}
    common = sorted(set.intersection(*(set(r["stage_b"]) for r in scored.values()))) if scored else []
    predictors = {}
    if len(scored) >= 3 and common:
        valid = [float(np.mean([r["stage_b"][s][end]["valid"] for s in common])) for r in scored.values()]
        for name in FIGURES:
            values = [r["figures"][name] for r in scored.values()]
            rho = spearmanr(values, valid).statistic if len(set(values)) > 1 and len(set(valid)) > 1 else np.nan
            predictors[name] = None if np.isnan(rho) else float(rho)
    lines = ["", f"Spearman rank correlation over the {len(scored)} autoencoders of each figure with the valid "
             f"share at step {end} ({', '.join(common) or 'no seed'}, the seeds all of them have):", "",
             "| figure | rho |", "|---|---|"]
    lines += [f"| {name} | {'-' if rho is None else f'{rho:+.2f}'} |" for name, rho in predictors.items()]
    return {"seeds": common, "rho": predictors}, lines


def summarise(args) -> dict:
    """Everything finished so far: the table, the figures ranked against Stage B's validity, the picture."""
    from ldm_core.training.accelerator import cpu_description

    half, end = str(args.stage_b_steps // 2), str(args.stage_b_steps)
    rows = collect(args)
    predictors, ranking = rank_figures(rows, end)
    lines = table(rows, half, end) + ranking
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_description(), "demo_vae": args.demo_vae,
              "finetune_steps": args.finetune_steps, "stage_b_steps": args.stage_b_steps,
              "num_images": args.num_images, "variants": {v: VARIANTS[v] for v in rows}, "rows": rows,
              "against_control": {v: paired_difference(r, rows.get(CONTROL), end) for v, r in rows.items()},
              "predictors": predictors, "table_markdown": "\n".join(lines)}
    (args.out / "latent_space_experiment.json").write_text(json.dumps(result, indent=2))
    (args.out / "latent_space_experiment.md").write_text(result["table_markdown"] + "\n")
    if any(r["stage_b"] for r in rows.values()):
        save_curves(rows, end, args.out / "latent_space_experiment.png")
    print(result["table_markdown"])
    return result


def save_curves(rows: dict, end: str, path: Path) -> None:
    """Left: valid share of the in-training samples (64 from fixed noise, the sampling section's sampler)
    against the step, one line per run. Right: the valid share over `--num-images` samples at the end,
    one bar per autoencoder (the mean over seeds) with each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, ((variant, row), colour) in enumerate(zip(rows.items(), colours)):
        for j, runs in enumerate(row["stage_b"].values()):
            points = [(p["step"], p["valid"]) for p in runs["in_training"] if "valid" in p]
            if points:
                steps, valid = zip(*points)
                curves.plot(steps, [100 * v for v in valid], color=colour, linestyle="-" if j == 0 else "--",
                            marker="o", markersize=3, label=variant if j == 0 else None)
        finals = [100 * runs[end]["valid"] for runs in row["stage_b"].values() if end in runs]
        if finals:
            bars.bar(k, np.mean(finals), color=colour, alpha=0.6)
            bars.plot([k] * len(finals), finals, "o", color="black", markersize=4)
    curves.set_xlabel("Stage B step")
    curves.set_ylabel("valid samples (%, 64 from fixed noise)")
    curves.set_title("During training (solid: seed 0, dashed: seed 1)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    bars.set_xticks(range(len(rows)), list(rows), rotation=30, ha="right", fontsize=8)
    bars.set_ylabel(f"valid samples at step {end} (%)")
    bars.set_title("At the end (bar: mean, dots: seeds)")
    bars.grid(alpha=0.3, axis="y")
    fig.suptitle("The demo's Stage B on each autoencoder")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-vae", default="runs/demo/stage_a/vae", help="the demo's autoencoder (ldm demo)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/latent_space"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1", help="Stage B seeds")
    parser.add_argument("--finetune-steps", type=int, default=1500)
    parser.add_argument("--stage-b-steps", type=int, default=2000)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--summarise", action="store_true", help="only summarise what is there")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not args.summarise:
        if not (Path(args.demo_vae) / "config.json").is_file():
            parser.error(f"--demo-vae {args.demo_vae} holds no config.json: run `ldm demo` first (make demo).")
        for seed in (int(s) for s in args.seeds.split(",")):
            for variant in variants:
                vae_dir = autoencoder(variant, args)
                inspection(variant, vae_dir, args)
                scores(stage_b(variant, vae_dir, seed, args), args)
    summarise(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
