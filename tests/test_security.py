"""Loading is data only: safetensors or `weights_only` unpickling, no code from model folders, and
config paths that cannot lead writes out of the run folder.

Already covered elsewhere: a checkpoint's training_state.pt is read with weights_only
(tests/test_checkpoints.py::test_training_state_is_read_with_weights_only).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from workflows.cli import main
from ldm_core.config.settings import ConfigError, resolve_run_path
from ldm_core.models.pretrained import UnsafeModelFolderError, check_model_folder, load_state_dict
from pipelines.latent_diffusion import LatentDiffusionPipeline
from stage_b_diffusion.config import DiffusionConfig, UNetModelConfig
from stage_b_diffusion.noise_schedule import build_noise_scheduler, make_sampler
from stage_b_diffusion.architectures import build_unet

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("ldm_core", "stage_a_vae", "stage_b_diffusion", "pipelines", "evaluation", "benchmarks")


def _marker_code(marker: Path) -> str:
    """Python source that proves it ran by creating `marker`."""
    return f"open({str(marker)!r}, 'w').write('ran')\nclass Evil:\n    pass\n"


@pytest.fixture
def saved_pipeline(tmp_path) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=4,
                        layers_per_block=1, sample_size=32)
    unet = build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=4, latent_size=4)
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=make_sampler("ddim", build_noise_scheduler(
        DiffusionConfig())))
    folder = tmp_path / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def _edit_index(folder: Path, **changes) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


# ----------------------------------------------------------------------------- unpickling


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            dotted = f"{getattr(func.value, 'id', '')}.{func.attr}" if isinstance(func, ast.Attribute) else ""
            if dotted == name:
                yield node


def test_every_torch_load_in_the_sources_uses_weights_only():
    sources = [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")]
    assert sources
    checked = 0
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree, "torch.load"):
            kwargs = {k.arg: k.value for k in call.keywords}
            assert isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True, \
                f"{path.relative_to(REPO)}:{call.lineno} calls torch.load without weights_only=True"
            checked += 1
        for name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load"):
            assert not list(_calls(tree, name)), f"{path.relative_to(REPO)} calls {name}"
        for call in _calls(tree, "np.load"):
            assert "allow_pickle" not in {k.arg for k in call.keywords}, f"{path.relative_to(REPO)}:{call.lineno}"
    assert checked >= 2  # ldm_core/training/checkpoints.py and ldm_core/models/pretrained.py at least


def test_weights_file_with_a_code_payload_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"features.0.weight": torch.zeros(1), "x": Payload()}, tmp_path / "weights.pth")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_state_dict(tmp_path / "weights.pth")
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pth")  # plain tensors still load
    assert torch.equal(load_state_dict(tmp_path / "plain.pth")["w"], torch.ones(2))


# ----------------------------------------------------------------------------- model folders


def test_saved_pipeline_loads_with_safetensors_only(saved_pipeline):
    assert (saved_pipeline / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert check_model_folder(saved_pipeline) == saved_pipeline
    loaded = LatentDiffusionPipeline.from_pretrained(saved_pipeline)
    assert loaded.unet.config.in_channels == loaded.vae.config.latent_channels == 4


def test_custom_pipeline_class_file_in_the_folder_is_never_imported(saved_pipeline, tmp_path):
    marker = tmp_path / "ran.txt"
    (saved_pipeline / "evil.py").write_text(_marker_code(marker))
    _edit_index(saved_pipeline, _class_name=["evil", "Evil"])
    with pytest.raises(UnsafeModelFolderError, match="describes"):
        LatentDiffusionPipeline.from_pretrained(saved_pipeline)
    _edit_index(saved_pipeline, _class_name="LatentDiffusionPipeline")
    # Even with a valid index, a Python file is refused: diffusers would route a file named after the
    # custom_pipeline argument (None.py when none is given) or a component's library to dynamic code.
    (saved_pipeline / "evil.py").rename(saved_pipeline / "None.py")
    with pytest.raises(UnsafeModelFolderError, match=r"contains code \(None.py\)"):
        LatentDiffusionPipeline.from_pretrained(saved_pipeline)
    assert not marker.exists()


def test_custom_component_code_is_never_imported(saved_pipeline, tmp_path):
    marker = tmp_path / "ran.txt"
    (saved_pipeline / "unet" / "evil.py").write_text(_marker_code(marker))
    _edit_index(saved_pipeline, unet=["evil", "Evil"])
    with pytest.raises(UnsafeModelFolderError, match=r"'unet' is \['evil', 'Evil'\]"):
        LatentDiffusionPipeline.from_pretrained(saved_pipeline)
    _edit_index(saved_pipeline, unet=["diffusers", "UNet2DModel"])
    (saved_pipeline / "unet" / "evil.py").rename(saved_pipeline / "unet" / "diffusers.py")
    with pytest.raises(UnsafeModelFolderError, match="unet/diffusers.py"):
        LatentDiffusionPipeline.from_pretrained(saved_pipeline)
    _edit_index(saved_pipeline, extra=["os", "system"])
    with pytest.raises(UnsafeModelFolderError, match="'extra'"):
        LatentDiffusionPipeline.from_pretrained(saved_pipeline)
    assert not marker.exists()


@pytest.mark.parametrize("option", ["trust_remote_code", "custom_pipeline"])
def test_remote_code_options_are_refused(saved_pipeline, option):
    with pytest.raises(ValueError, match=f"{option} is not supported"):
        LatentDiffusionPipeline.from_pretrained(saved_pipeline, **{option: True if option == "trust_remote_code"
                                                                   else str(saved_pipeline / "x.py")})
    with pytest.raises(ValueError, match="use_safetensors must stay True"):
        LatentDiffusionPipeline.from_pretrained(saved_pipeline, use_safetensors=False)


def test_pickle_only_weights_are_refused(saved_pipeline, capsys):
    unet_dir = saved_pipeline / "unet"
    state = load_state_dict(unet_dir / "diffusion_pytorch_model.safetensors")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeModelFolderError, match="only as pickle files"):
        LatentDiffusionPipeline.from_pretrained(saved_pipeline)
    # Through the command a user runs: one line, exit code 2.
    rc = main(["generate", "--model", str(saved_pipeline), "--device", "cpu", "--out", str(saved_pipeline / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "only safetensors weights are read" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- paths from configs


def test_config_paths_stay_inside_the_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert resolve_run_path(run, "cache", "data.latent_cache_dir") == (run / "cache").resolve()
    assert resolve_run_path(run, "a/b", "data.latent_cache_dir") == (run / "a" / "b").resolve()
    absolute = tmp_path / "shared"
    assert resolve_run_path(run, str(absolute), "data.latent_cache_dir") == absolute  # an explicit choice
    for escape in ("..", "../x", "a/../../x"):
        with pytest.raises(ConfigError, match="climbs out of the run folder"):
            resolve_run_path(run, escape, "data.latent_cache_dir")
    os.symlink(tmp_path, run / "link")  # a link inside the run folder pointing out of it
    with pytest.raises(ConfigError, match="outside the run folder"):
        resolve_run_path(run, "link/cache", "data.latent_cache_dir")


def test_vae_folders_are_read_as_safetensors_only(tmp_path, capsys):
    """`--vae` of train-unet and bench-recon: a VAE whose weights exist only as a pickle is refused."""
    from stage_a_vae.config import VAEModelConfig
    from stage_a_vae.architectures import build_autoencoder

    vae_dir = tmp_path / "vae"
    build_autoencoder(VAEModelConfig(preset="kl-f8-tiny")).save_pretrained(vae_dir)
    state = load_state_dict(vae_dir / "diffusion_pytorch_model.safetensors")
    (vae_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, vae_dir / "diffusion_pytorch_model.bin")
    for command in (["train-unet", "--vae", str(vae_dir), "--data", "builtin:shapes", "--out", str(tmp_path / "b")],
                    ["bench-recon", "--vae", str(vae_dir), "--data", "builtin:shapes", "--num-images", "2",
                     "--resolution", "16", "--out", str(tmp_path / "r.json")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "only safetensors weights are read" in err and "Traceback" not in err
    assert not (tmp_path / "b" / "checkpoints").exists() and not (tmp_path / "r.json").exists()
