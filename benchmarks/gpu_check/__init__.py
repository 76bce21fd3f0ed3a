"""One command for a GPU machine: what the machine is, what it can do, whether both stages' trainers train
correctly under mixed precision, and how fast both stages train and sample, against the references, in at
most 8 minutes.

    make gpu-check                                              # = python -m benchmarks.gpu_check --out runs/gpu_check
    python -m benchmarks.gpu_check --tiny --out /tmp/gpu_check  # the same code on a CPU, tiny models
    python -m benchmarks.gpu_check --sections machine,limits,stage_a_correctness

Sections (each with its wall seconds and its results or an error; `--sections` picks some), one file each:

1. machine (machine.py): GPU name, memory, power limit, torch / CUDA / cuDNN versions, TF32 settings.
2. limits (machine.py): bf16 (and fp32) matmul FLOP/s at 8192^3, device-to-device copy bandwidth.
3. stage_a_correctness (stage_a_correctness.py): `train_vae` itself on configs/vae/kl-f8.yaml (256 px) for 40
   steps under bf16 and fp16 (Accelerate's autocast and grad scaler), the discriminator on after 20; checks
   read from its metrics.json, its checkpoints and its exported vae/.
4. stage_b_correctness (stage_b_correctness.py): `train_unet` itself on that autoencoder, the same way.
5. stage_a_speed (stage_a_speed.py): images/s at batch 16/32/64, eager and channels-last (torch.compile in a
   subprocess with a time limit), the time split between autoencoder, LPIPS and discriminator, peak memory,
   utilisation, and LDM's step as written (`benchmarks/reference_loops.py`).
6. stage_b_speed (stage_b_speed.py): configs/unet/unet-ldm-kl8.yaml on 32x32x4 latents at batch 128/256/512
   in bf16, against the diffusers text-to-image step.
7. sampling (sampling.py): U-Net forwards/s at batch 256 and VAE decodes at 256 px, bf16 against fp32;
   images/s of DPM-Solver++ at 20 steps end to end through `LatentDiffusionPipeline`.
8. demo (demo.py): `ldm demo` (both stages of `make demo`) in a subprocess: wall time and the quality figures
   of its summary, beside the CPU figures docs/demo.md publishes (references.py reads them).

`OUT/gpu_check.json` is rewritten (atomically) after every section, so a run that is cut keeps what it
measured; a section that raises is recorded and the next one runs (runner.py). A section is skipped, with the
reason, when the time left in `--budget-s` (default 470) is below what it needs (plans.py). Each check is
recorded as {name, ok, detail}; a skipped check also has "skipped": true. The process exits 1 if a check
failed or a section raised. report.py writes the Markdown summary.

FLOPs are counted by `torch.utils.flop_counter` on one call of each timed step (as `benchmarks/bench_train.py`
counts the reference loops); utilisation is achieved FLOP/s over the bf16 matmul FLOP/s measured in section 2,
for every row whatever its precision. The speed sections' models have random weights: speed does not depend
on them.

Without CUDA (or with `--tiny`) the same code runs tiny presets (kl-f8-tiny at 32 px, unet-tiny on 8x8 latents,
batches of 2, two trainer steps under bf16 only, one timed step, a 2-step demo in this process), so everything
that reaches the GPU has run before (tests/test_gpu_check.py).
"""

from benchmarks.gpu_check.cli import main
from benchmarks.gpu_check.report import all_checks, summary_markdown
from benchmarks.gpu_check.runner import FP16_MAX
from benchmarks.gpu_check.sections import SECTION_NAMES, SECTIONS

__all__ = ["FP16_MAX", "SECTIONS", "SECTION_NAMES", "all_checks", "main", "summary_markdown"]
