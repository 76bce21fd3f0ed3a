"""Configuration of the whole two-stage job (`ldm train`, `ldm demo`): one section per stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from stage_a_vae.config import StageAConfig
from stage_b_diffusion.config import StageBConfig


@dataclass
class EvaluationConfig:
    """What the end-to-end job measures after training."""

    num_images: int = 64  # images generated from noise
    scheduler: str = "dpmsolver++"
    num_inference_steps: int = 20
    seed: int = 0


@dataclass
class LDMConfig:
    stage_a: StageAConfig = field(default_factory=StageAConfig)
    stage_b: StageBConfig = field(default_factory=StageBConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
