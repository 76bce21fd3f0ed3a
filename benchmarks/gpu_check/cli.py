"""`python -m benchmarks.gpu_check`: the arguments, the plan for this machine, the sections, the summary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.gpu_check import plans
from benchmarks.gpu_check.report import all_checks, summary_markdown
from benchmarks.gpu_check.runner import Runner
from benchmarks.gpu_check.sections import SECTION_NAMES, SECTIONS
from benchmarks.gpu_check.stage_a_speed import worker_compile_stage_a
from benchmarks.harness import pick_device


def parse_args(argv) -> argparse.Namespace:
    import benchmarks.gpu_check as package

    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=package.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="writes OUT/gpu_check.json and .md")
    parser.add_argument("--tiny", action="store_true", help="tiny presets (automatic without CUDA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sections", default=",".join(SECTION_NAMES),
                        help=f"comma-separated subset of {','.join(SECTION_NAMES)}")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="the run's time from the start of main; 8 minutes less the interpreter's start")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="time torch.compile of the autoencoder (auto: on the GPU, not in tiny mode)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-timeout-s", type=float, default=90.0,
                        help="the compile worker's limit (import, build, compile, timed steps)")
    parser.add_argument("--worker", choices=["compile-stage-a"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _requested(spec: str) -> list[str]:
    sections = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTION_NAMES]
    if unknown or not sections:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {', '.join(SECTION_NAMES)}")
    return [s for s in SECTION_NAMES if s in sections]  # always in the sections' order


def _run_sections(args: argparse.Namespace, plan: plans.Plan, device: torch.device, sections: list[str]) -> Runner:
    threads = torch.get_num_threads()
    if plan.name == "tiny" and device.type == "cpu":
        # Tiny models gain nothing from a second thread, and next to another busy process OpenMP's barriers
        # cost far more than the work: a unet-tiny forward took 0.67 s on 2 threads, 4 ms on 1, on a 2-core
        # CPU shared with a training run. Restored below (a test calls main in its own process).
        torch.set_num_threads(1)
    try:
        runner = Runner(args, plan, device, sections)
        runner.write()
        for name in sections:
            runner.run(name, SECTIONS[name])  # looked up now, so a test can replace a section
        runner.report["complete"] = True
        runner.write()
    finally:
        torch.set_num_threads(threads)
    return runner


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.result.write_text(json.dumps(worker_compile_stage_a(args)))
        return 0
    device = pick_device(args.device)
    plan = plans.TINY if args.tiny or device.type != "cuda" else plans.FULL  # read now: a test may swap TINY
    runner = _run_sections(args, plan, device, _requested(args.sections))
    text = summary_markdown(runner.report)
    (runner.out / "gpu_check.md").write_text(text)
    print(text, flush=True)
    failed = any(not c["ok"] and not c.get("skipped") for c in all_checks(runner.report))
    errored = any(v["status"] == "error" for v in runner.report["sections"].values())
    return 1 if failed or errored else 0
