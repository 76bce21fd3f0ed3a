"""What the GPU's numbers are read against: published GPU figures, and the project's own CPU demo.

The GPU figures are other people's, cited. The CPU figures are this project's: read from the results
docs/demo.md publishes for the current demo (its "## Results" section), so a new CPU measurement there is
what the next GPU check shows beside its own demo. A figure the page no longer states is listed under
"missing" instead of being filled in.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

# Printed beside the numbers; none of them was measured here.
REFERENCE_FIGURES = {
    "bf16_matmul": "a tuned bf16 matmul on an H100/H200 reaches about 790 TFLOP/s of the 989 nominal "
                   "(dense bf16, NVIDIA's H100 SXM datasheet)",
    "conv_utilisation": "conv U-Nets and autoencoders typically reach 20-35% of that matmul peak",
    "stage_b_images_per_s": "MosaicML trained the SD-2 U-Net (865M parameters, text-conditioned, larger than "
                            "unet-ldm-kl8) at about 137 images/s per A100 at 256 px on precomputed latents",
    "hbm_bandwidth": "H200: 4.8 TB/s HBM3e nominal (NVIDIA's H200 datasheet)",
}

DEMO_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "demo.md"

# (key, where, pattern, scale): `where` is None for the paragraph that starts "Measured", else the start of the
# first cell of the table row; the pattern's group is the figure, times `scale` (percentages become fractions).
_CPU_DEMO_FIGURES = (
    ("wall_minutes", None, r"\*\*([\d.]+) minutes\*\* wall time", 1.0),
    ("stage_a_minutes", None, r"wall time \(Stage A ([\d.]+) min", 1.0),
    ("stage_b_minutes", None, r"wall time \(Stage A [\d.]+ min, Stage B ([\d.]+) min", 1.0),
    ("val_psnr", "Stage A, ", r"held-out PSNR \*\*([\d.]+) dB", 1.0),
    ("heldout_psnr", "Stage A, ", r"\*\*([\d.]+) ± [\d.]+ dB on \d+ unseen shapes", 1.0),
    ("bicubic_psnr", "Stage A, ", r"against ([\d.]+) dB for bicubic-f8", 1.0),
    ("reconstructions_valid", "Stage A reconstructions", r"\*\*([\d.]+)%\*\*", 0.01),
    ("samples_validity", "Stage B, ", r"\*\*([\d.]+)% valid\*\*", 0.01),
    ("samples_plain_diffusers_validity", "the same noise through plain diffusers", r"\*\*([\d.]+)% valid\*\*", 0.01),
)


def _results_section(text: str) -> str:
    """docs/demo.md's "## Results" section, up to its first sub-section (the demos before it)."""
    match = re.search(r"^## Results\n(.*?)(?=^##)", text + "\n##", flags=re.S | re.M)
    return match.group(1) if match else ""


def _row(section: str, first_cell: str) -> Optional[str]:
    for line in section.splitlines():
        if line.startswith(f"| {first_cell}"):
            return line
    return None


def cpu_demo_figures(path: Path = DEMO_RESULTS) -> dict[str, Any]:
    """The current CPU demo's wall time and quality figures as docs/demo.md reports them, with the date, the
    machine and the page they come from; figures the page does not state are named in "missing"."""
    source = str(path.relative_to(path.parents[1])) if len(path.parents) > 1 else str(path)
    figures: dict[str, Any] = {"source": source}
    try:
        section = _results_section(path.read_text())
    except OSError as err:
        return {**figures, "error": f"{type(err).__name__}: {err}", "missing": [k for k, *_ in _CPU_DEMO_FIGURES]}
    measured = next((p for p in (q.strip() for q in section.split("\n\n")) if p.startswith("Measured")), "")
    date = re.search(r"Measured (\d{4}-\d{2}-\d{2})", measured)
    machine = re.search(r" on an? (.+?), torch", measured.replace("\n", " "))
    figures.update(measured=date.group(1) if date else None, machine=machine.group(1) if machine else None)
    missing = []
    for key, where, pattern, scale in _CPU_DEMO_FIGURES:
        text = measured.replace("\n", " ") if where is None else _row(section, where)
        found = re.search(pattern, text) if text else None
        if found:
            figures[key] = round(float(found.group(1)) * scale, 6)
        else:
            missing.append(key)
    figures["missing"] = missing
    return figures
