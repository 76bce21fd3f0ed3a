"""What every benchmark here shares: isolated runs, timing, FLOP counting, the machine's matmul peak,
peak memory, and the Markdown/JSON output.

Each measured path runs in its own fresh Python process (`run_isolated`), so its peak resident memory
is its own and no allocator or thread-pool state leaks from one path into the next.
"""

from __future__ import annotations

import contextlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch


def run_isolated(module: str, args: Sequence[str], timeout_s: float = 900) -> dict[str, Any]:
    """Run `python -m module --result FILE *args` in a new process and return the JSON it wrote.

    The worker's stderr is passed through (progress bars); a failure raises with the worker's exit code.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--result", str(result), *args]
        proc = subprocess.run(cmd, timeout=timeout_s, stdout=subprocess.DEVNULL)
        if proc.returncode != 0 or not result.is_file():
            raise RuntimeError(f"Benchmark worker failed (exit {proc.returncode}): {' '.join(cmd)}")
        return json.loads(result.read_text())


def peak_rss_mib() -> float:
    """Peak resident memory of this process's own memory map, in MiB.

    Linux's VmHWM starts afresh at exec. getrusage's ru_maxrss does not (it survives exec), so in a worker
    started by `run_isolated` it would start at the RSS of the benchmark process that forked it; it is
    used only where /proc is missing.
    """
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and peak accelerator memory on CUDA), in MiB."""
    peak = {"peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        peak["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], device: torch.device, *, warmup: int, iters: int) -> float:
    """Mean wall seconds of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of one call of `fn`, counted by `torch.utils.flop_counter` (matmuls and
    convolutions, forward and backward; a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def around_steps(before: Callable[[int], None], after: Callable[[int], None]) -> Iterator[None]:
    """Call `before(i)` and `after(i)` around the `i`-th (from 0) optimizer step of the real trainer, as
    bounded by the loop's `StepTimer` (`TrainingRun.steps` starts and stops it around each step).

    The patch wraps whatever `StepTimer.start` / `stop` are when it is entered, so hooks nest.
    """
    from ldm_core.training.step_timer import StepTimer

    original_start, original_stop = StepTimer.start, StepTimer.stop
    count = [0]

    def start(self):
        before(count[0])
        original_start(self)

    def stop(self):
        original_stop(self)
        after(count[0])
        count[0] += 1

    StepTimer.start, StepTimer.stop = start, stop
    try:
        yield
    finally:
        StepTimer.start, StepTimer.stop = original_start, original_stop


@contextlib.contextmanager
def counted_step_flops(index: int) -> Iterator[dict]:
    """Count the FLOPs of the `index`-th (from 0) optimizer step of the real trainer (`around_steps`).
    Yields a dict that holds `flops` once that step has run."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    record: dict = {}

    def before(i):
        if i == index:
            counter.__enter__()

    def after(i):
        if i == index:
            counter.__exit__(None, None, None)
            record["flops"] = int(counter.get_total_flops())

    with around_steps(before, after):
        yield record


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """This machine's achieved FLOP/s on a large square matmul in `dtype`: the ceiling used for utilisation."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    per_call = seconds_per_call(lambda: a @ b, device, warmup=2, iters=1)
    iters = max(3, int(seconds / max(per_call, 1e-6)))
    per_call = seconds_per_call(lambda: a @ b, device, warmup=1, iters=iters)
    return 2 * size ** 3 / per_call


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as a Markdown table; `columns` are (key, header) pairs; floats get 3 significant digits."""
    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e3 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, name: str, table: str, data: dict[str, Any]) -> None:
    """Print the table and write `name.md` and `name.json` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(table + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    print(table, flush=True)
