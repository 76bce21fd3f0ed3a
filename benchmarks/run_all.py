"""`make bench`: every benchmark in one run, then one Markdown report with its date and machine.

    python -m benchmarks.run_all --pipeline runs/demo/stage_b/pipeline --out runs/bench

Writes OUT/train.{md,json}, OUT/sampling.{md,json} and OUT/report.md (what docs/performance.md
and docs/demo.md carry).
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from benchmarks import bench_sampling, bench_train
from benchmarks.harness import machine_description, pick_device


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=Path("runs/demo/stage_b/pipeline"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iters", type=int, default=10, help="timed training steps per path")
    args = parser.parse_args(argv)

    started = time.monotonic()
    bench_train.run("ab", args.out, args.device, args.iters, warmup=3)
    bench_sampling.run(args.pipeline, args.out, num_images=64, batch_size=64, device=args.device)
    minutes = (time.monotonic() - started) / 60
    report = (f"Measured {datetime.date.today().isoformat()} on {machine_description(pick_device(args.device))} "
              f"by `make bench` ({minutes:.1f} min).\n\n### Training\n\n{(args.out / 'train.md').read_text()}\n"
              f"### Sampling\n\n{(args.out / 'sampling.md').read_text()}")
    (args.out / "report.md").write_text(report)
    print(f"\nReport: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
