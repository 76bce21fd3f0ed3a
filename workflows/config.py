"""Configuration of the whole two-stage job (`ldm train`, `ldm demo`): one section per stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from ldm_core.config.settings import _require
from ldm_core.sampling import DEFAULT_SAMPLING_STEPS
from stage_a_vae.config import StageAConfig
from stage_b_diffusion.config import StageBConfig, check_sampling, check_sampling_settings


@dataclass
class EvaluationConfig:
    """What the end-to-end job measures after training."""

    num_images: int = 64  # images generated from noise
    scheduler: str = "dpmsolver++"
    num_inference_steps: int = DEFAULT_SAMPLING_STEPS  # configs/demo.yaml sets 50
    seed: int = 0
    # Classifier-free guidance weight for a class-conditional Stage B (stage_b.model.num_classes > 0), whose
    # images then cycle through the classes; 1 = the plain conditional model.
    guidance_scale: float = 1.0
    recon_images: int = 256  # held-out shapes in each reconstruction benchmark (training and held-out colours)

    def __post_init__(self) -> None:
        check_sampling("evaluation", self.scheduler, self.seed)
        _require(self.num_images > 0, "evaluation.num_images", self.num_images, "a positive integer")
        # Standard deviations need two images.
        _require(self.recon_images >= 2, "evaluation.recon_images", self.recon_images, "a whole number of at least 2")


@dataclass
class LDMConfig:
    stage_a: StageAConfig = field(default_factory=StageAConfig)
    stage_b: StageBConfig = field(default_factory=StageBConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        check_sampling_settings("evaluation", num_inference_steps=self.evaluation.num_inference_steps,
                                num_train_timesteps=self.stage_b.diffusion.num_train_timesteps,
                                timesteps_key="stage_b.diffusion.num_train_timesteps",
                                guidance_scale=self.evaluation.guidance_scale,
                                conditional=self.stage_b.model.num_classes > 0,
                                classes_key="stage_b.model.num_classes > 0")
        _require(self.stage_a.data.resolution == self.stage_b.data.resolution, "stage_b.data.resolution",
                 self.stage_b.data.resolution, f"stage_a.data.resolution={self.stage_a.data.resolution}: the U-Net "
                 f"learns the VAE's latents of the same images")
