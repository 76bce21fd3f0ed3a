"""What the GPU's numbers are read against: published GPU figures, and the CPU demo."""

from __future__ import annotations

WORKER = "benchmarks.gpu_check"
FP16_MAX = 65504.0  # the largest finite IEEE 754 binary16 value
STAGE_A_PRESET = "vae/kl-f8.yaml"
STAGE_B_PRESET = "unet/unet-ldm-kl8.yaml"

# Printed beside the numbers; none of them was measured here.
REFERENCE_FIGURES = {
    "bf16_matmul": "a tuned bf16 matmul on an H100/H200 reaches about 790 TFLOP/s of the 989 nominal "
                   "(dense bf16, NVIDIA's H100 SXM datasheet)",
    "conv_utilisation": "conv U-Nets and autoencoders typically reach 20-35% of that matmul peak",
    "stage_b_images_per_s": "MosaicML trained the SD-2 U-Net (865M parameters, text-conditioned, larger than "
                            "unet-ldm-kl8) at about 137 images/s per A100 at 256 px on precomputed latents",
    "hbm_bandwidth": "H200: 4.8 TB/s HBM3e nominal (NVIDIA's H200 datasheet)",
}

# docs/demo.md, measured 2026-12-03 on a 2-core CPU (fp32): the figures a GPU demo is read against.
CPU_DEMO = {"wall_minutes": 19.2, "stage_a_minutes": 8.5, "stage_b_minutes": 10.0, "val_psnr": 32.54,
            "heldout_psnr": 32.49, "bicubic_psnr": 21.18, "reconstructions_valid": 1.0,
            "samples_validity": 0.930, "samples_plain_diffusers_validity": 0.930}
