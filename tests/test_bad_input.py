"""The bad-input catalogue: each kind of bad input gets a clear message, and none loses work already written.

Items already covered elsewhere are not repeated here: truncated, zero-byte and non-image files, decompression
bombs, grayscale/RGBA/palette/CMYK/16-bit images, EXIF rotation, folder symlink loops, the empty folder and the
missing path at the API level are in tests/test_data.py; unknown keys, wrong types and impossible values at the
API level in tests/test_config.py; a missing --resume path and a checkpoint of another config at the API level
in tests/test_checkpoints.py; U-Net/VAE shape mismatches in tests/test_unet_architectures.py and tests/test_train_unet.py.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from workflows.cli import main
from ldm_core.config.settings import ConfigError, load_config
from ldm_core.data.image_files import BadImageError, load_image_uint8
from ldm_core.data.in_memory import load_dataset
from pipelines.latent_diffusion import LatentDiffusionPipeline
from stage_a_vae.config import StageAConfig
from stage_b_diffusion.config import DiffusionConfig, UNetModelConfig
from stage_b_diffusion.noise_schedule import build_noise_scheduler, make_sampler
from stage_b_diffusion.architectures import build_unet

# A Stage A run small enough to train in a few seconds on a CPU.
TINY_STAGE_A = ["model.preset=kl-f8-tiny", "data.resolution=32", "data.shapes_count=12", "data.val_count=4",
                "loss.lpips_trunk=random", "loss.perceptual_weight=0", "train.max_steps=1", "train.batch_size=4",
                "train.latent_stats_images=4", "train.progress_bar=false", "train.validate_every=1000",
                "ema.enabled=false"]


def noise_png(seed: int = 0, size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def folder_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by relative path (TensorBoard logs excluded: a new
    Accelerator may add an event file, which is not work lost)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "logs" not in p.relative_to(root).parts}


def cli_error(capsys, argv: list[str]) -> str:
    """Run `ldm argv`, require exit code 2 and a one-line message without a traceback; return it."""
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    line = err.splitlines()[-1]
    assert line.startswith(f"ldm {argv[0]}: error: ") and "Traceback" not in err
    return line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-step Stage A run: config.yaml, checkpoints/, vae/ and metrics to protect."""
    out = tmp_path_factory.mktemp("bad_input") / "run"
    assert main(["train-vae", "--data", "builtin:shapes", "--out", str(out), *TINY_STAGE_A]) == 0
    assert (out / "checkpoints" / "latest").is_file() and (out / "vae" / "config.json").is_file()
    return out


# ----------------------------------------------------------------------------- files


def test_corrupt_file_is_skipped_with_its_reason(tmp_path, write_image, caplog):
    """Flipped bytes inside the compressed data (not a cut): the decoder fails, the file is skipped."""
    data = bytearray(noise_png())
    for i in range(200, 260):
        data[i] ^= 0xFF
    (tmp_path / "broken.png").write_bytes(bytes(data))
    with pytest.raises(BadImageError, match="corrupt file") as info:
        load_image_uint8(tmp_path / "broken.png", 16)
    assert info.value.kind == "corrupt"
    write_image(tmp_path / "good.png", np.zeros((16, 16, 3), np.uint8))
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        result = load_dataset(tmp_path, 16, progress=False)
    assert result.names == ["good.png"] and result.report.skipped_kinds == {"corrupt": 1}
    assert any("broken.png" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)


def test_tiny_and_extreme_aspect_images_are_upscaled_and_counted(tmp_path, write_image):
    write_image(tmp_path / "dot.png", np.full((1, 1, 3), 77, np.uint8))
    write_image(tmp_path / "strip.png", np.full((1, 300, 3), 200, np.uint8))
    dot, upscaled = load_image_uint8(tmp_path / "dot.png", 32)
    assert upscaled and dot.shape == (3, 32, 32) and (dot == 77).all()
    result = load_dataset(tmp_path, 32, progress=False)
    assert len(result) == 2 and result.report.upscaled == 2
    assert "2 upscaled (short side below 32 px)" in result.report.summary()


def test_bilevel_and_gray_alpha_modes_become_rgb(tmp_path):
    """Modes beyond those in test_data: 1-bit images and grayscale with alpha (composited on white)."""
    Image.new("1", (8, 8), 1).save(tmp_path / "bits.png")
    la = Image.new("LA", (8, 8), (100, 255))
    la.paste((0, 0), (0, 0, 4, 8))  # left half: black but fully transparent
    la.save(tmp_path / "la.png")
    bits, _ = load_image_uint8(tmp_path / "bits.png", 8)
    assert (bits == 255).all()
    gray, _ = load_image_uint8(tmp_path / "la.png", 8)
    assert (gray[:, :, :4] == 255).all() and (gray[:, :, 4:] == 100).all()


def test_file_names_that_are_not_utf8_load_and_cache(tmp_path, write_image):
    folder = tmp_path / "images"
    folder.mkdir()
    raw_name = os.path.join(os.fsencode(folder), b"caf\xe9_\xff.png")  # Latin-1 bytes, invalid in UTF-8
    Image.fromarray(np.full((8, 8, 3), 40, np.uint8)).save(raw_name, format="PNG")
    write_image(folder / "plain.png", np.full((8, 8, 3), 90, np.uint8))
    first = load_dataset(folder, 8, cache_dir=tmp_path / "cache", progress=False)
    assert first.names == [os.fsdecode(b"caf\xe9_\xff.png"), "plain.png"]
    assert os.fsencode(first.names[0]) == b"caf\xe9_\xff.png"  # the exact bytes survive
    assert (first.images[0] == 40).all() and (first.images[1] == 90).all()
    again = load_dataset(folder, 8, cache_dir=tmp_path / "cache", progress=False)  # read from the cache
    assert isinstance(again.images, np.memmap) and again.names == first.names
    assert np.array_equal(again.images, first.images)


def test_broken_and_looping_file_symlinks_are_skipped_with_a_reason(tmp_path, write_image):
    write_image(tmp_path / "good.png", np.zeros((8, 8, 3), np.uint8))
    os.symlink("loop.png", tmp_path / "loop.png")  # points at itself
    os.symlink("gone.png", tmp_path / "dangling.png")
    result = load_dataset(tmp_path, 8, cache_dir=tmp_path.parent / "cache_links", progress=False)
    assert result.names == ["good.png"] and result.report.skipped_kinds == {"unreadable": 2}
    reasons = dict(result.report.skipped)
    assert "broken or looping symbolic link" in reasons[str(tmp_path / "loop.png")]
    assert "Too many levels of symbolic links" in reasons[str(tmp_path / "loop.png")]
    assert "No such file" in reasons[str(tmp_path / "dangling.png")]


# ----------------------------------------------------------------------------- folders (through the CLI)


def test_cli_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = cli_error(capsys, ["train-vae", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"),
                              *TINY_STAGE_A])
    assert "No image files in" in line and "Supported extensions: .bmp" in line


def test_cli_output_folder_that_cannot_be_written(tmp_path, capsys):
    """Tests run as root, so chmod cannot make a folder unwritable; a path under a regular FILE cannot be
    created by anyone."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = cli_error(capsys, ["train-vae", "--data", "builtin:shapes", "--out", str(blocker / "run"), *TINY_STAGE_A])
    assert "Cannot write to the output folder" in line and "Not a directory" in line and "--out" in line
    assert blocker.read_text() == "not a folder"


def test_cli_generate_into_a_folder_that_cannot_be_written(tmp_path, capsys):
    """Same trick as above (a path under a regular file) for `ldm generate --out`."""
    torch.manual_seed(0)
    pipeline_dir = tmp_path / "pipeline"
    _tiny_pipeline().save_pretrained(pipeline_dir)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = cli_error(capsys, ["generate", "--model", str(pipeline_dir), "--num-images", "1", "--steps", "1",
                              "--device", "cpu", "--out", str(blocker / "samples")])
    assert "Not a directory" in line and str(blocker / "samples") in line and "choose another" in line


# ----------------------------------------------------------------------------- configs (through the CLI)


def test_cli_wrong_type_names_key_type_and_default(tmp_path, capsys):
    line = cli_error(capsys, ["train-vae", "--data", "builtin:shapes", "--out", str(tmp_path / "r"),
                              "train.max_steps=many"])
    assert "'train.max_steps'" in line and "wrong type" in line
    assert "It must be of type int (default train.max_steps=1000)" in line
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_cli_negative_learning_rate(tmp_path, capsys):
    line = cli_error(capsys, ["train-vae", "--data", "builtin:shapes", "--out", str(tmp_path / "r"), "train.lr=-0.1"])
    assert "train.lr=-0.1 is not allowed: it must be a positive number" in line
    assert not (tmp_path / "r").exists()


def test_cli_resolution_not_divisible_by_f(tmp_path, capsys):
    line = cli_error(capsys, ["train-vae", "--data", "builtin:shapes", "--out", str(tmp_path / "r"),
                              "data.resolution=60"])
    assert "data.resolution=60 is not divisible" in line and "f=8" in line and "multiple of 8" in line


def test_unet_resolution_mismatch_suggests_valid_resolutions():
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=4,
                        layers_per_block=1)
    from stage_b_diffusion.architectures import check_unet_matches_vae

    unet = build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=4, latent_size=4)
    with pytest.raises(ValueError, match=r"Set data.resolution to a multiple of 8 \(e.g. 32 or 40\)"):
        check_unet_matches_vae(unet, vae, 36)


def _tiny_pipeline(vae_latent_channels: int = 4, unet_latent_channels: int = 4) -> LatentDiffusionPipeline:
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
                        latent_channels=vae_latent_channels, layers_per_block=1, sample_size=32)
    unet = build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=unet_latent_channels, latent_size=4)
    return LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=make_sampler("ddim", build_noise_scheduler(
        DiffusionConfig())))


def test_pipeline_refuses_a_unet_that_does_not_match_its_vae(tmp_path, capsys):
    with pytest.raises(ValueError, match="latent_channels=8: they were not trained together"):
        _tiny_pipeline(vae_latent_channels=8, unet_latent_channels=4)
    # The same mismatch in a saved folder (another model's vae/ copied in) is met by `ldm generate`.
    torch.manual_seed(0)
    _tiny_pipeline().save_pretrained(tmp_path / "pipeline")
    other = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=8,
                          layers_per_block=1)
    other.save_pretrained(tmp_path / "pipeline" / "vae")
    line = cli_error(capsys, ["generate", "--model", str(tmp_path / "pipeline"), "--device", "cpu",
                              "--out", str(tmp_path / "samples")])
    assert "not trained together" in line and not (tmp_path / "samples").exists()


# ----------------------------------------------------------------------------- existing runs: no work lost


def test_wrong_config_for_an_existing_run_changes_nothing(finished_run, capsys):
    before = folder_hashes(finished_run)
    for override in ("train.lr=-1", "train.max_step=5", "data.resolution=60"):
        cli_error(capsys, ["train-vae", "--data", "builtin:shapes", "--out", str(finished_run), "--resume", "latest",
                           *TINY_STAGE_A, override])
    assert folder_hashes(finished_run) == before


def test_existing_run_without_resume_is_refused_and_unchanged(finished_run, capsys):
    before = folder_hashes(finished_run)
    line = cli_error(capsys, ["train-vae", "--data", "builtin:shapes", "--out", str(finished_run), *TINY_STAGE_A])
    assert "already holds checkpoints" in line and "--resume latest" in line
    assert folder_hashes(finished_run) == before


def test_checkpoint_from_a_different_config_is_refused_before_anything_is_written(finished_run, capsys):
    before = folder_hashes(finished_run)
    line = cli_error(capsys, ["train-vae", "--data", "builtin:shapes", "--out", str(finished_run), "--resume", "latest",
                              *TINY_STAGE_A, "model.latent_channels=8"])
    assert "different model configuration" in line and "Nothing was changed" in line and "new --out folder" in line
    assert folder_hashes(finished_run) == before  # config.yaml was not replaced by the new config


def test_config_fingerprint_matches_what_the_trainer_wrote(finished_run):
    import json

    saved = load_config(StageAConfig, finished_run / "config.yaml")
    (checkpoint,) = (finished_run / "checkpoints").glob("step-*")
    assert saved.model_fingerprint() == json.loads((checkpoint / "meta.json").read_text())["fingerprint"]
    changed = load_config(StageAConfig, finished_run / "config.yaml", ["loss.kl_weight=0.5"])
    assert changed.model_fingerprint() != saved.model_fingerprint()


def test_resume_path_that_does_not_exist_changes_nothing(finished_run, tmp_path, capsys):
    before = folder_hashes(finished_run)
    line = cli_error(capsys, ["train-vae", "--data", "builtin:shapes", "--out", str(finished_run), "--resume",
                              str(tmp_path / "step-9999999"), *TINY_STAGE_A])
    assert "no such checkpoint" in line and "--resume latest" in line and "step-0000001" in line
    assert folder_hashes(finished_run) == before


def test_ldm_train_refuses_an_explicit_checkpoint_path(finished_run, tmp_path, capsys):
    line = cli_error(capsys, ["train", "--data", "builtin:shapes", "--out", str(tmp_path / "both"), "--resume",
                              str(finished_run / "checkpoints" / "step-0000001")])
    assert "use --resume latest" in line and not (tmp_path / "both").exists()


def test_config_path_climbing_out_of_the_run_folder_is_refused(tmp_path, capsys):
    line = cli_error(capsys, ["train-vae", "--data", "builtin:shapes", "--out", str(tmp_path / "r"),
                              "data.image_cache_dir=../../elsewhere"])
    assert "climbs out of the run folder" in line
    with pytest.raises(ConfigError, match="not a usable path"):
        load_config(StageAConfig, None, ["data.image_cache_dir=''"])
