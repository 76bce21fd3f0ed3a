"""Why Stage A starts slowly, factor by factor: held-out PSNR after 250 / 500 / 1,000 steps.

    python -m benchmarks.stage_a_factors --out runs/bench          # every row, about 40 min on 2 cores
    python -m benchmarks.stage_a_factors --out runs/bench --rows 0,5   # re-measure rows; keep the others

Every row is the real trainer (`train_vae`) on builtin:shapes with the demo's Stage A config
(`configs/demo.yaml`), 1,000 steps with the same seed and data, the cosine schedule set to those 1,000
steps, held-out PSNR measured by the trainer's own validation (posterior mode, 64 held-out images) at
steps 250, 500 and 1,000. The first row is the recipe the demo used before (LDM's training step with
diffusers' initialisation); each later row adds one change to the row above it, and the last rows take
one change away from the final recipe, so both "what it adds" and "what it costs to lose" are measured.
Writes OUT/stage_a_factors.{md,json}; docs/stage-a-fast-start.md carries the latest table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.harness import machine_description, markdown_table, write_results

STEPS = 1000
CHECKPOINTS = (250, 500, 1000)

# The demo's Stage A before this benchmark, on the demo's architecture widths: 8 normalisation groups
# (2 channels a group at width 16, as kl-f8-small's 16 groups at width 32), mid-block attention,
# diffusers' initialisation, L1 throughout, LDM's Adam (betas 0.5, 0.9) at lr 1e-4.
LDM_BETAS = ["train.adam_beta1=0.5", "train.adam_beta2=0.9"]
BEFORE = ["model.norm_num_groups=8", "model.mid_block_attention=true", "model.zero_init_residual=false",
          "model.posterior_logvar_init=null", "loss.l2_warmup_steps=0", "train.lr=1e-4", *LDM_BETAS]

# (name, overrides on top of the demo config): cumulative from BEFORE to the final recipe, then
# leave-one-out from the final recipe.
ROWS: list[tuple[str, list[str]]] = [
    ("before: LDM step, diffusers init, L1, lr 1e-4", BEFORE),
    ("+ residual branches start at zero", BEFORE[:2] + BEFORE[3:]),
    ("+ posterior log-variance starts at -6", BEFORE[:2] + BEFORE[4:]),
    ("+ squared error for the first 750 steps", BEFORE[:2] + ["loss.l2_warmup_steps=750", "train.lr=1e-4", *LDM_BETAS]),
    ("+ lr 5e-4", BEFORE[:2] + ["loss.l2_warmup_steps=750", *LDM_BETAS]),
    ("+ one normalisation group, no mid-block attention", ["loss.l2_warmup_steps=750", *LDM_BETAS]),
    ("+ Adam betas (0.9, 0.99) instead of LDM's (0.5, 0.9) = the demo's recipe", ["loss.l2_warmup_steps=750"]),
    ("demo's recipe with diffusers' initialisation of the residual branches",
     ["loss.l2_warmup_steps=750", "model.zero_init_residual=false"]),
    ("demo's recipe without gradient clipping", ["loss.l2_warmup_steps=750", "train.max_grad_norm=0"]),
]


def run_row(overrides: list[str], folder: Path) -> dict:
    """Train one row's config for STEPS steps and return its PSNR at CHECKPOINTS and its wall time."""
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from workflows.config import LDMConfig
    from stage_a_vae.train import train_vae

    settings = [f"train.max_steps={STEPS}", "train.validate_every=250", f"train.checkpoint_every={STEPS}",
                "loss.disc_start=100000",  # reconstruction phase only: the factors are about the slow start
                "train.latent_stats_images=64", "train.progress_bar=false", *overrides]
    cfg = load_config(LDMConfig, config_path("demo.yaml"), [f"stage_a.{s}" for s in settings]).stage_a
    started = time.monotonic()
    run_dir = train_vae(cfg, "builtin:shapes", folder)
    minutes = (time.monotonic() - started) / 60
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    psnr = {row["step"]: row["val_psnr"] for row in history if "val_psnr" in row}
    return {**{f"psnr_{s}": psnr.get(s) for s in CHECKPOINTS}, "minutes": minutes}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--rows", default=None, help="comma-separated row numbers (default: all)")
    args = parser.parse_args(argv)
    chosen = [int(r) for r in args.rows.split(",")] if args.rows else range(len(ROWS))

    import torch

    columns = [("row", "row"), ("factor", "factor")] + [(f"psnr_{s}", f"PSNR @ {s} (dB)") for s in CHECKPOINTS] + [
        ("minutes", "wall (min)")]
    header = (f"Stage A on builtin:shapes, {STEPS} steps, batch 8, fp32, "
              f"{machine_description(torch.device('cpu'))}.\n\n")
    # Rows measured earlier and not chosen now are kept, so a table can be completed over several runs.
    previous = args.out / "stage_a_factors.json"
    rows = [r for r in json.loads(previous.read_text())["rows"] if r["row"] not in chosen] if previous.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        for index in chosen:
            name, overrides = ROWS[index]
            print(f"[{index}] {name}: {' '.join(overrides) or '(demo config)'}", flush=True)
            rows.append({"row": index, "factor": name, **run_row(overrides, Path(tmp) / f"row{index}"),
                         "overrides": " ".join(overrides)})
            # Written after every row, so a long run interrupted still leaves the rows it finished.
            ordered = sorted(rows, key=lambda r: r["row"])
            write_results(args.out, "stage_a_factors", header + markdown_table(ordered, columns),
                          {"rows": ordered, "steps": STEPS})


if __name__ == "__main__":
    main()
