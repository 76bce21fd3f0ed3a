"""Models by Hub id (ldm_core/models/hub.py), against a stand-in Hub on 127.0.0.1 (tests/loopback.py).

The Hugging Face cache is built by `huggingface_hub` itself, downloading from the stand-in, so it has the
library's real layout (blobs, snapshots, refs, tree listings). Offline, the commands must work from it by
name and refuse what is unsafe; online, only the model's own files may be fetched, and what would be
refused is refused before anything is downloaded. No test reaches the real Hub.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from loopback import FakeHub, serving
from ldm_core.models.hub import (AUTOENCODER, PIPELINE, HubError, HubReference, describe_model_source,
                                 fetch_command, parse_hub_reference, resolve_model_argument)
from ldm_core.models.pretrained import UnsafeModelFolderError
from ldm_core.models.autoencoder_folders import read_vae_folder

ROOT = Path(__file__).resolve().parent.parent


def tiny_vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    """f=8 like SD's autoencoders, a few thousand weights."""
    torch.manual_seed(latent_channels)
    return AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1,
                         latent_channels=latent_channels, sample_size=32, **config)


def saved_files(model, tmp: Path, prefix: str = "") -> dict[str, bytes]:
    """The files `save_pretrained` writes, as {repository path: bytes}."""
    model.save_pretrained(tmp)
    return {f"{prefix}{p.relative_to(tmp).as_posix()}": p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Repositories like the published ones, with tiny random weights."""
    tmp = tmp_path_factory.mktemp("repos")
    sd_vae = saved_files(tiny_vae(4), tmp / "sd")  # like stabilityai/sd-vae-ft-mse: the autoencoder at the root
    # Like SD3's pipeline repository: model_index.json, a 16-channel autoencoder with a shift in vae/, other
    # components beside it, and fp16 variants that must not be fetched.
    sd3 = saved_files(tiny_vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                               scaling_factor=1.5305), tmp / "sd3", "vae/")
    sd3.update({"model_index.json": json.dumps({"_class_name": "StableDiffusion3Pipeline"}).encode(),
                "vae/diffusion_pytorch_model.fp16.safetensors": b"fp16 variant",
                "text_encoder/config.json": b"{}", "text_encoder/model.safetensors": b"text encoder weights",
                "README.md": b"# sd3-like\n"})
    pickle_only = {k: v for k, v in sd_vae.items() if k == "config.json"}
    pickle_only["diffusion_pytorch_model.bin"] = b"pickle bytes"
    with_code = dict(sd_vae, **{"modeling_vae.py": b"import os\n"})
    return {"org/sd-vae": sd_vae, "org/sd3-like": sd3, "org/pickle-only": pickle_only, "org/with-code": with_code}


def use_hub(monkeypatch, url: str, cache: Path, *, offline: bool) -> None:
    """Point huggingface_hub at the stand-in (what HF_ENDPOINT does at import) and at `cache`."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)


@pytest.fixture(scope="module")
def warm_cache(repos, tmp_path_factory) -> Path:
    """A Hugging Face cache holding every repository whole, written by huggingface_hub's own download."""
    from huggingface_hub import snapshot_download

    cache = tmp_path_factory.mktemp("hf_cache")
    hub = FakeHub()
    for repo_id, files in repos.items():
        hub.add(repo_id, files)
    with hub.running() as url, pytest.MonkeyPatch.context() as patch:
        use_hub(patch, url, cache, offline=False)
        for repo_id in repos:
            snapshot_download(repo_id)
    assert (cache / "models--org--sd-vae" / "refs" / "main").is_file()  # the library's layout
    return cache


# --------------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("text, expected", [
    ("stabilityai/sd-vae-ft-mse", HubReference("stabilityai/sd-vae-ft-mse")),
    ("hf://org/name@v1.0/vae", HubReference("org/name", "v1.0", "vae")),
    ("org/name/vae", HubReference("org/name", None, "vae")),
    ("org/name@refs%2Fpr%2F3", HubReference("org/name", "refs/pr/3")),
])
def test_hub_ids_parse(text, expected):
    assert parse_hub_reference(text) == expected


@pytest.mark.parametrize("text", ["./runs/vae", "/abs/vae", "name", "org/../etc", "~/vae"])
def test_paths_are_not_hub_ids(text):
    assert parse_hub_reference(text) is None


def test_a_local_folder_wins_over_a_hub_id_of_the_same_spelling(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_argument("org/name", kind=AUTOENCODER, option="--vae") == Path("org/name")


def test_the_fetch_command_names_only_the_models_files():
    command = fetch_command(HubReference("stabilityai/stable-diffusion-3-medium-diffusers", "main"), AUTOENCODER)
    assert command == ("hf download stabilityai/stable-diffusion-3-medium-diffusers --revision main "
                       "--include config.json --include diffusion_pytorch_model.safetensors "
                       "--include vae/config.json --include vae/diffusion_pytorch_model.safetensors")


def test_a_cached_folder_is_described_by_its_hub_id(warm_cache):
    folder = next((warm_cache / "models--org--sd3-like" / "snapshots").iterdir()) / "vae"
    assert describe_model_source(folder) == f"org/sd3-like@{folder.parent.name}/vae"
    assert describe_model_source("/some/where/vae") == "/some/where/vae"


# --------------------------------------------------------------------------------------------------
# Offline, from the cache


def test_offline_names_resolve_to_the_cached_autoencoder(warm_cache, monkeypatch):
    use_hub(monkeypatch, "http://127.0.0.1:9", warm_cache, offline=True)  # nothing listens on port 9
    root = resolve_model_argument("org/sd-vae", kind=AUTOENCODER, option="--vae")
    assert read_vae_folder(root)[1]["latent_channels"] == 4
    in_vae = resolve_model_argument("org/sd3-like", kind=AUTOENCODER, option="--vae")  # found in vae/
    assert in_vae.name == "vae" and read_vae_folder(in_vae)[1]["shift_factor"] == pytest.approx(0.0609)
    assert resolve_model_argument("org/sd3-like/vae", kind=AUTOENCODER, option="--vae") == in_vae


@pytest.mark.parametrize("repo, message", [("org/pickle-only", "only as pickle files"),
                                           ("org/with-code", "contains code")])
def test_offline_unsafe_repositories_are_refused_in_one_line(warm_cache, monkeypatch, repo, message):
    use_hub(monkeypatch, "http://127.0.0.1:9", warm_cache, offline=True)
    folder = resolve_model_argument(repo, kind=AUTOENCODER, option="--vae")
    with pytest.raises(UnsafeModelFolderError, match=message) as err:
        read_vae_folder(folder)
    assert "\n" not in str(err.value)


def test_offline_cold_cache_is_one_line_with_the_fetch_command(tmp_path):
    """A real `ldm` process with HF_HUB_OFFLINE=1 and an empty cache: exit status 2, one line, in seconds."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "workflows.cli", "bench-recon", "--vae", "stabilityai/sd-vae-ft-mse",
                             "--data", "builtin:shapes", "--resolution", "64", "--num-images", "4",
                             "--out", str(tmp_path / "r.json")], cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("ldm bench-recon: error: --vae stabilityai/sd-vae-ft-mse: not in the Hugging Face cache")
    assert ("hf download stabilityai/sd-vae-ft-mse --include config.json --include "
            "diffusion_pytorch_model.safetensors" in lines[0])
    assert "Traceback" not in result.stderr and not (tmp_path / "r.json").exists()
    assert elapsed < 60  # no network wait (the process start and imports take a few seconds)


def test_offline_by_name_train_unet_generate_and_bench_recon(warm_cache, repos, monkeypatch, tmp_path, capsys):
    """Stage B on the 16-channel SD3-like autoencoder named by its Hub id, then its pipeline by Hub id, then
    bench-recon of both autoencoders by name: all with the network off."""
    from huggingface_hub import snapshot_download

    from workflows.cli import main

    use_hub(monkeypatch, "http://127.0.0.1:9", warm_cache, offline=True)
    run = tmp_path / "b"
    assert main(["train-unet", "--config", "unet/unet-small", "--vae", "org/sd3-like", "--data", "builtin:shapes",
                 "--out", str(run), "model.preset=unet-tiny", "train.max_steps=3", "train.batch_size=4",
                 "data.shapes_count=24", "data.val_count=4", "sampling.grid_images=2", "sampling.num_inference_steps=2",
                 "train.progress_bar=false", "train.checkpoint_every=3"]) == 0
    vae_config = json.loads((run / "pipeline" / "vae" / "config.json").read_text())
    # The published normalisation is kept as it is (no 1/std measured over it).
    assert vae_config["latent_channels"] == 16
    assert vae_config["shift_factor"] == pytest.approx(0.0609) and vae_config["scaling_factor"] == pytest.approx(1.5305)
    assert json.loads((run / "metrics.json").read_text())["latent_scale"]["source"] == "config.json"
    card = (run / "pipeline" / "README.md").read_text()
    assert "base_model: org/sd3-like" in card and "(z - 0.0609) * 1.5305" in card

    # The trained pipeline published as org/my-ldm, cached while online, then generated from by name offline.
    hub = FakeHub()
    hub.add("org/my-ldm", {p.relative_to(run / "pipeline").as_posix(): p.read_bytes()
                           for p in (run / "pipeline").rglob("*") if p.is_file()})
    with hub.running() as url:
        with pytest.MonkeyPatch.context() as online:
            use_hub(online, url, warm_cache, offline=False)
            resolve_model_argument("org/my-ldm", kind=PIPELINE, option="--model")
        assert sorted(hub.served) == sorted(f"org/my-ldm/{p}" for p in (
            "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"))
    assert main(["generate", "--model", "org/my-ldm", "--num-images", "2", "--steps", "2",
                 "--out", str(tmp_path / "samples")]) == 0
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["grid.png", "image_00000.png", "image_00001.png"]

    out = tmp_path / "bench" / "results.json"
    assert main(["bench-recon", "--vae", "org/sd-vae", "--vae", "org/sd3-like", "--data", "builtin:shapes",
                 "--resolution", "32", "--num-images", "4", "--metrics", "psnr", "--out", str(out),
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "| org/sd-vae |" in table and "| org/sd3-like |" in table, table


# --------------------------------------------------------------------------------------------------
# Online, against the stand-in Hub


@pytest.fixture
def online_hub(repos, monkeypatch, tmp_path):
    hub = FakeHub()
    for repo_id, files in repos.items():
        hub.add(repo_id, files)
    with hub.running() as url:
        use_hub(monkeypatch, url, tmp_path / "cache", offline=False)
        yield hub


def test_online_fetches_only_the_autoencoders_own_files(online_hub, tmp_path):
    folder = resolve_model_argument("org/sd3-like", kind=AUTOENCODER, option="--vae")
    assert sorted(online_hub.served) == ["org/sd3-like/vae/config.json",
                                         "org/sd3-like/vae/diffusion_pytorch_model.safetensors"]
    assert read_vae_folder(folder)[1]["latent_channels"] == 16
    # The cache remembers the name: the same id resolves offline afterwards.
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    assert resolve_model_argument("org/sd3-like", kind=AUTOENCODER, option="--vae") == folder


@pytest.mark.parametrize("repo, error, message", [
    ("org/pickle-only", UnsafeModelFolderError, "only as pickle files"),
    ("org/with-code", UnsafeModelFolderError, "holds code"),
    ("org/missing", HubError, "no model org/missing on the Hub"),
])
def test_online_refusals_come_before_any_download(online_hub, repo, error, message):
    with pytest.raises(error, match=message) as err:
        resolve_model_argument(repo, kind=AUTOENCODER, option="--vae")
    assert online_hub.served == [] and "\n" not in str(err.value)


def test_an_unanswering_hub_is_reported_in_seconds(monkeypatch, tmp_path):
    """A server that accepts the connection and never answers: the metadata timeout, not minutes."""
    from http.server import BaseHTTPRequestHandler
    import threading

    release = threading.Event()

    class Silent(BaseHTTPRequestHandler):
        def do_GET(self):
            release.wait(30)

        def log_message(self, *args):
            pass

    with serving(Silent) as url:
        use_hub(monkeypatch, url, tmp_path / "cache", offline=False)
        started = time.monotonic()
        with pytest.raises(HubError, match="cannot be reached") as err:
            resolve_model_argument("org/sd-vae", kind=AUTOENCODER, option="--vae")
        release.set()
    assert time.monotonic() - started < 15
    assert "hf download org/sd-vae" in str(err.value)


# --------------------------------------------------------------------------------------------------
# SD3-style latent normalisation


def test_shifted_normalisation_round_trips_and_matches_diffusers_sd3():
    """scale_latents is (z - shift) * scale, as diffusers' SD3 pipelines encode (StableDiffusion3InpaintPipeline.
    _encode_vae_image), and unscale_latents its inverse, as they decode (`latents / scaling_factor +
    shift_factor` before `vae.decode` in pipeline_stable_diffusion_3.py)."""
    from types import SimpleNamespace

    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint import (
        StableDiffusion3InpaintPipeline)

    from ldm_core.models.latent_scale import scale_latents, unscale_latents

    vae = tiny_vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = scale_latents(vae.encode(x).latent_dist.sample(torch.Generator().manual_seed(3)), vae.config)
        theirs = StableDiffusion3InpaintPipeline._encode_vae_image(SimpleNamespace(vae=vae), x,
                                                                   torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        z = vae.encode(x).latent_dist.mode()
        round_trip = vae.decode(unscale_latents(scale_latents(z, vae.config), vae.config)).sample
        # Equal up to the rounding of one multiply-add in float32, which the decoder carries through.
        torch.testing.assert_close(round_trip, vae.decode(z).sample, rtol=0, atol=1e-4)
        sd3_decode = vae.decode(ours / vae.config.scaling_factor + vae.config.shift_factor).sample
        torch.testing.assert_close(vae.decode(unscale_latents(ours, vae.config)).sample, sd3_decode, rtol=0, atol=0)


def test_pipeline_decodes_latents_as_diffusers_sd3_does():
    """Our pipeline's images are the SD3 decode of its own final latents."""
    from diffusers import DDIMScheduler

    from pipelines.latent_diffusion import LatentDiffusionPipeline
    from stage_b_diffusion.architectures import build_unet
    from stage_b_diffusion.config import UNetModelConfig

    vae = tiny_vae(16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    torch.manual_seed(0)
    unet = build_unet(UNetModelConfig(preset="unet-tiny"), latent_channels=16, latent_size=4)
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    with torch.no_grad():
        sd3 = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    torch.testing.assert_close(images, (sd3.clamp(-1, 1) + 1) / 2, rtol=0, atol=1e-6)
