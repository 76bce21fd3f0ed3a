"""benchmarks/real_photos_ldm.py at toy size: crops of a photo run's training copies, Stage B on its autoencoder's
latents with the sample scores during training, the final scores against held-out crops, and the figure."""

import json

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from benchmarks import real_photos_ldm


def test_stage_b_on_photo_crops_end_to_end(tmp_path):
    photos_run = tmp_path / "photos_run"
    (photos_run / "photos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (200, 260, 3), dtype=np.uint8)).save(photos_run / "photos" / f"p{k}.png")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1,
                  latent_channels=4, sample_size=64).save_pretrained(photos_run / "without_gan" / "vae")
    corpus = tmp_path / "corpus"  # two held-out photographs (every fifth of ten, in name order)
    rows = []
    for k in range(10):
        file = f"images/pkg/photo{k}.png"
        (corpus / file).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(corpus / file)
        rows.append({"file": file, "kind": "photo", "package": "pkg"})
    (corpus / "manifest.json").write_text(json.dumps({"images": rows}))
    out = tmp_path / "ldm"
    assert real_photos_ldm.main(["--photos-run", str(photos_run), "--corpus", str(corpus), "--out", str(out),
                                 "--crops", "24", "--num-samples", "8", "model.preset=unet-tiny",
                                 "model.block_out_channels=null", "train.max_steps=4", "train.batch_size=4",
                                 "data.val_count=4", "sampling.metrics_every=2", "sampling.metrics_images=4",
                                 "sampling.num_inference_steps=2", "sampling.grid_images=2",
                                 "train.progress_bar=false"]) == 0
    assert len(list((out / "crops").glob("*.png"))) == 24
    with Image.open(next((out / "crops").glob("*.png"))) as crop:
        assert crop.size == (128, 128)
    summary = json.loads((out / "summary.json").read_text())
    assert [row["step"] for row in summary["curve"]] == [2, 4]
    assert summary["scores"]["swd"]["n_generated"] == 8 and summary["scores"]["swd"]["floor"] is not None
    with Image.open(out / "samples_beside_real.png") as figure:  # samples, real crops, reconstructions
        assert figure.size == (8 * 132 - 4, 3 * 128 + 16)
