"""The two sizes of the GPU check: the GPU plan, and a tiny one that runs the same code on a CPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STAGE_A_PRESET = "vae/kl-f8.yaml"
STAGE_B_PRESET = "unet/unet-ldm-kl8.yaml"
SHAPES = "builtin:shapes"


@dataclass(frozen=True)
class Plan:
    name: str
    vae_overrides: tuple[str, ...]    # on configs/vae/kl-f8.yaml
    unet_overrides: tuple[str, ...]   # on configs/unet/unet-ldm-kl8.yaml
    # The correctness sections: both trainers, `correctness_steps` optimizer steps (Stage A's disc_start is half
    # of them), on `correctness_images` shapes of which `correctness_val` are held out.
    correctness_batch: int
    correctness_steps: int
    correctness_images: int
    correctness_val: int
    b_correctness_overrides: tuple[str, ...]  # on top of unet_overrides
    a_batches: tuple[int, ...]
    a_split_batch: int                # the batch of the time split, the LDM rows and torch.compile
    b_batches: tuple[int, ...]
    b_reference_batch: int
    sample_batch: int
    decode_batch: int
    dpm_steps: int
    matmul_size: int
    matmul_seconds: float
    copy_mib: int
    warmup: int
    iters: int
    demo_overrides: tuple[str, ...]
    compile_default: bool
    # The time guard: the least a section (or one timed row) needs; a section is skipped below it.
    min_s: dict[str, float] = field(default_factory=dict)
    row_s: float = 0.0
    # Run `ldm demo` in this process (no interpreter start, no timeout) instead of as the user's command.
    demo_in_process: bool = False


def _tiny_demo_overrides() -> tuple[str, ...]:
    """Both stages of `ldm demo` for 2 steps on 32 px shapes with the unit-test presets (about 10 s here)."""
    common = ["data.resolution=32", "data.shapes_count=48", "data.val_count=8", "train.max_steps=2",
              "train.batch_size=4", "train.latent_stats_images=8", "train.progress_bar=false"]
    out = [f"{stage}.{o}" for stage in ("stage_a", "stage_b") for o in common]
    return tuple(out + ["stage_a.model.preset=kl-f8-tiny", "stage_b.model.preset=unet-tiny",
                        "stage_b.model.block_out_channels=null", "stage_b.sampling.grid_images=2",
                        "stage_b.sampling.num_inference_steps=2", "evaluation.num_images=4",
                        "evaluation.num_inference_steps=2", "evaluation.recon_images=8"])


# 40 correctness steps. At kl-f8's initialisation on 256 px shapes (batch 4, random LPIPS trunk, fp32 on a
# CPU) the largest weight gradient of LDM's loss, summed over pixels, is about 5.6e5: above fp16's 65,504
# even unscaled, so fp16 steps overflow until Accelerate's grad scaler has halved its 65,536 about 20 times
# (one halving per skipped step). The checks compare the weights between the checkpoints at steps 20 and 40,
# after those skips. The correctness U-Net is unet-ldm-kl8's layout at half its width (74M parameters
# instead of 295M): a checkpoint with its Adam and EMA states is then 1.2 GB instead of 4.7 GB.
FULL = Plan(name="full", vae_overrides=(), unet_overrides=(), correctness_batch=4, correctness_steps=40,
            correctness_images=64, correctness_val=8,
            b_correctness_overrides=("model.block_out_channels=[96,192,192,384,384]",),
            a_batches=(16, 32, 64), a_split_batch=32, b_batches=(128, 256, 512), b_reference_batch=128,
            sample_batch=256, decode_batch=32, dpm_steps=20, matmul_size=8192, matmul_seconds=2.0,
            copy_mib=2048, warmup=2, iters=3, demo_overrides=(), compile_default=True,
            min_s={"machine": 0, "limits": 10, "stage_a_correctness": 60, "stage_b_correctness": 40,
                   "stage_a_speed": 45, "stage_b_speed": 30, "sampling": 20, "demo": 120},
            row_s=6.0)
# Tiny: every code path at the least work that still runs it (two correctness steps are one before and one
# after disc_start; the FLOP count's call is the warm-up; 4 solver steps run its second-order updates).
TINY = Plan(name="tiny", vae_overrides=("model.preset=kl-f8-tiny", "data.resolution=32"),
            unet_overrides=("model.preset=unet-tiny", "data.resolution=64"), correctness_batch=2,
            correctness_steps=2, correctness_images=12, correctness_val=4, b_correctness_overrides=(),
            a_batches=(2,), a_split_batch=2, b_batches=(2, 4), b_reference_batch=2,
            sample_batch=2, decode_batch=2, dpm_steps=4, matmul_size=256, matmul_seconds=0.1, copy_mib=8,
            warmup=0, iters=1, demo_overrides=_tiny_demo_overrides(), compile_default=False, demo_in_process=True)


def stage_a_config(plan: Plan, extra: tuple[str, ...] = ()):
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from stage_a_vae.config import StageAConfig

    return load_config(StageAConfig, config_path(STAGE_A_PRESET), [*plan.vae_overrides, *extra])


def stage_b_config(plan: Plan, extra: tuple[str, ...] = ()):
    from ldm_core.config.settings import load_config
    from ldm_core.config.preset_files import config_path
    from stage_b_diffusion.config import StageBConfig

    return load_config(StageBConfig, config_path(STAGE_B_PRESET), [*plan.unet_overrides, *extra])


def lpips_trunk_here(loss_cfg) -> tuple[str, str]:
    """The LPIPS trunk a Stage A run can use here without a download, and how to report it: the config's VGG16
    where its file is on this machine (`loss.lpips_weights`, else torch hub's cache), else a random trunk of
    the same cost. A GPU machine may have no network, and a 528 MB download would eat the time budget."""
    from ldm_core.models.pretrained import LPIPS_TRUNK_FILES, torch_hub_checkpoint_dir

    if loss_cfg.lpips_trunk != "vgg":
        return loss_cfg.lpips_trunk, loss_cfg.lpips_trunk
    weights = loss_cfg.lpips_weights
    path = Path(weights).expanduser() if weights else torch_hub_checkpoint_dir() / LPIPS_TRUNK_FILES["vgg"]
    if path.is_file():
        return "vgg", "vgg"
    return "random", f"random (the VGG16 file is not at {path}; the check downloads nothing)"
