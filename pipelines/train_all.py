"""`ldm train`: Stage A, then Stage B on its frozen autoencoder, then the saved pipeline.

The run folder holds `stage_a/` (with `vae/`), `stage_b/` (with `pipeline/`), and `pipeline` is the
folder to give to `ldm generate --model`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from pipelines.config import LDMConfig
from stage_a_vae.train import train_vae
from stage_b_diffusion.train import train_unet

logger = logging.getLogger("ldm.train")


def train_both_stages(cfg: LDMConfig, data: str, out: str | Path, vae: Optional[str] = None,
                      resume: Optional[str] = None) -> dict[str, Path]:
    """Run both stages into `out`; `vae` (an AutoencoderKL folder) skips Stage A. Returns the output paths."""
    out = Path(out)
    if cfg.stage_a.data.resolution != cfg.stage_b.data.resolution:
        raise ValueError(f"stage_a.data.resolution={cfg.stage_a.data.resolution} and stage_b.data.resolution="
                         f"{cfg.stage_b.data.resolution} differ; the U-Net is trained on the VAE's latents of the "
                         f"same images, so set both to the same value.")
    if vae is None:
        stage_a_dir = train_vae(cfg.stage_a, data, out / "stage_a", resume=resume)
        vae = str(stage_a_dir / "vae")
    else:
        logger.info("Skipping Stage A: using the autoencoder in %s", vae)
    stage_b_dir = train_unet(cfg.stage_b, vae, data, out / "stage_b", resume=resume)
    return {"vae": Path(vae), "pipeline": stage_b_dir / "pipeline", "stage_b": stage_b_dir}
