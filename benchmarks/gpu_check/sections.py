"""The sections, in the order they run (`--sections` picks some; they always run in this order)."""

from __future__ import annotations

from typing import Callable

from benchmarks.gpu_check.demo import section_demo
from benchmarks.gpu_check.machine import section_limits, section_machine
from benchmarks.gpu_check.runner import Runner
from benchmarks.gpu_check.sampling import section_sampling
from benchmarks.gpu_check.stage_a_correctness import section_stage_a_correctness
from benchmarks.gpu_check.stage_a_speed import section_stage_a_speed
from benchmarks.gpu_check.stage_b_correctness import section_stage_b_correctness
from benchmarks.gpu_check.stage_b_speed import section_stage_b_speed

SECTIONS: dict[str, Callable[[Runner], dict]] = {
    "machine": section_machine, "limits": section_limits, "stage_a_correctness": section_stage_a_correctness,
    # Stage B's trainer runs on the autoencoder Stage A's just exported, as `ldm train` chains them.
    "stage_b_correctness": section_stage_b_correctness, "stage_a_speed": section_stage_a_speed,
    "stage_b_speed": section_stage_b_speed, "sampling": section_sampling, "demo": section_demo}
SECTION_NAMES = tuple(SECTIONS)
