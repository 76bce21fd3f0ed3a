"""What would make the demo's training steps faster on this machine: each option against the demo's own
step, side by side in one run, as a ratio of seconds per step.

    python -m benchmarks.demo_speed_options --out runs/bench        # about 4 minutes on a 2-core CPU

Every row runs the real trainer (`train_vae` / `train_unet`) with `configs/demo.yaml`'s stage config plus
the row's overrides, in its own process, and reads the trainer's own `step_time` log after warm-up (the
steps alone: no validation, sampling or checkpoints). Stage B trains on a randomly initialised VAE of the
demo's preset: a step's speed does not depend on the weights. The last rows time a bare Stage B step
(the U-Net's loss, backward and fused AdamW, outside the trainer) eager and under `torch.compile`, with
the compilation's one-off cost, which the trainer would pay on every run.

What the options cost in quality is not measured here: docs/demo.md has the probes (batch size,
steps) and why the demo keeps fp32 whatever the speed of bf16 (the result would depend on the CPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import machine_description, markdown_table, run_isolated, seconds_per_call, write_results

WORKER = "benchmarks.demo_speed_options"
NEVER = 10 ** 9  # a step count no run reaches: validation, sampling and checkpoints off

ROWS = [
    ("A", "the demo's step (fp32, batch 8)", []),
    ("A", "channels_last", ["train.channels_last=true"]),
    ("A", "bf16 autocast", ["train.mixed_precision=bf16"]),
    # Narrower levels at 64 and 32 px, where the decoder spends most of its FLOPs (docs/demo-speed.md).
    ("A", "widths (16, 16, 64, 64)", ["model.block_out_channels=[16,16,64,64]"]),
    ("A", "widths (16, 16, 32, 64)", ["model.block_out_channels=[16,16,32,64]"]),
    ("B", "the demo's step (fp32, batch 64)", []),
    ("B", "channels_last", ["train.channels_last=true"]),
    ("B", "bf16 autocast", ["train.mixed_precision=bf16"]),
    ("B", "batch 48", ["train.batch_size=48"]),
    ("B", "batch 32", ["train.batch_size=32"]),
]


def _demo_stage_config(stage: str, steps: int, overrides: list[str]):
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from workflows.config import LDMConfig

    common = [f"train.max_steps={steps}", "train.log_every=1", f"train.checkpoint_every={NEVER}",
              "train.progress_bar=false", "train.latent_stats_images=8", "data.shapes_count=512"]
    if stage == "a":
        common += [f"train.validate_every={NEVER}", "data.val_count=8"]
    else:
        common += [f"sampling.sample_every={NEVER}", "sampling.grid_images=1", "sampling.num_inference_steps=1",
                   f"train.validate_every={NEVER}"]
    section = "stage_a" if stage == "a" else "stage_b"
    cfg = load_config(LDMConfig, config_path("demo.yaml"), [f"{section}.{o}" for o in common + overrides])
    return cfg.stage_a if stage == "a" else cfg.stage_b


def _random_demo_vae(folder: Path, model_cfg) -> Path:
    from stage_a_vae.architectures import build_autoencoder

    torch.manual_seed(0)
    build_autoencoder(model_cfg).save_pretrained(folder)
    return folder


def worker_trainer(args) -> dict[str, Any]:
    steps = args.warmup + args.iters
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = _demo_stage_config(args.stage, steps, args.overrides)
        if args.stage == "a":
            from stage_a_vae.train import train_vae

            run = train_vae(cfg, "builtin:shapes", tmp / "run")
        else:
            from workflows.train_unet import train_unet

            vae = _random_demo_vae(tmp / "vae", _demo_stage_config("a", 1, []).model)
            run = train_unet(cfg, vae, "builtin:shapes", tmp / "run")
        history = json.loads((run / "metrics.json").read_text())["history"]
    times = [r["step_time"] for r in history if "step_time" in r][args.warmup:]
    return {"step_s": sum(times) / len(times), "batch": cfg.train.batch_size}


def worker_compile(args) -> dict[str, Any]:
    """A bare Stage B step of the demo's U-Net, eager and compiled."""
    from stage_b_diffusion.noise_schedule import build_noise_scheduler
    from stage_b_diffusion.objective import diffusion_loss
    from stage_b_diffusion.architectures import build_unet

    cfg = _demo_stage_config("b", 1, [])
    torch.manual_seed(0)
    unet = build_unet(cfg.model, latent_channels=4, latent_size=cfg.data.resolution // 8)
    scheduler = build_noise_scheduler(cfg.diffusion)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, fused=True)
    latents = torch.randn(cfg.train.batch_size, 4, cfg.data.resolution // 8, cfg.data.resolution // 8)
    generator = torch.Generator().manual_seed(0)

    def make_step(model):
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss, _ = diffusion_loss(model, latents, scheduler, cfg.diffusion, generator)
            loss.backward()
            optimizer.step()
        return step

    cpu = torch.device("cpu")
    eager = seconds_per_call(make_step(unet), cpu, warmup=args.warmup, iters=args.iters)
    compiled_step = make_step(torch.compile(unet))
    start = time.perf_counter()
    compiled_step()  # the compilation itself
    compile_s = time.perf_counter() - start
    compiled = seconds_per_call(compiled_step, cpu, warmup=args.warmup, iters=args.iters)
    return {"eager_step_s": eager, "compiled_step_s": compiled, "compile_s": compile_s,
            "batch": cfg.train.batch_size}


def run(out: Path, iters: int, warmup: int) -> dict[str, Any]:
    common = ["--iters", str(iters), "--warmup", str(warmup)]
    rows, baseline = [], {}
    for stage, option, overrides in ROWS:
        result = run_isolated(WORKER, ["--mode", "trainer", "--stage", stage.lower(), *common, *overrides])
        baseline.setdefault(stage, result["step_s"])
        rows.append({"stage": stage, "option": option, "overrides": " ".join(overrides) or "none",
                     "batch": result["batch"], "step_ms": 1000 * result["step_s"],
                     "ratio": result["step_s"] / baseline[stage]})
    compiled = run_isolated(WORKER, ["--mode", "compile", *common])
    for option, key in (("bare step, eager", "eager_step_s"), ("bare step, torch.compile", "compiled_step_s")):
        rows.append({"stage": "B", "option": option, "overrides": "n/a", "batch": compiled["batch"],
                     "step_ms": 1000 * compiled[key], "ratio": compiled[key] / compiled["eager_step_s"],
                     "one_off_s": compiled["compile_s"] if key == "compiled_step_s" else None})
    table = markdown_table(rows, [("stage", "stage"), ("option", "option"), ("overrides", "overrides"),
                                  ("batch", "batch"), ("step_ms", "ms/step"), ("ratio", "step time / demo's"),
                                  ("one_off_s", "one-off s")])
    note = (f"\n\n{machine_description(torch.device('cpu'))}; mean of {iters} steps after {warmup}; ratios "
            f"against the first row of the same stage (the bare-step rows: against the eager bare step).")
    data = {"rows": rows, "iters": iters, "warmup": warmup, "machine": machine_description(torch.device("cpu"))}
    write_results(out, "demo_speed_options", table + note, data)
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    # Worker mode (one row in a fresh process):
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["trainer", "compile"], help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=["a", "b"], help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    if args.result is not None:
        result = worker_trainer(args) if args.mode == "trainer" else worker_compile(args)
        args.result.write_text(json.dumps(result))
        return
    run(args.out, args.iters, args.warmup)


if __name__ == "__main__":
    main()
