"""Pretrained weights fetched on first use (ldm_core/models/pretrained.py), against a file server on 127.0.0.1.

torch hub's own download (`torch.hub.download_url_to_file`: progress bar, sha256 prefix check) writes into its
checkpoint cache; a wrong file, a connection cut mid-file or a server that never answers leaves nothing there
and says so in one line. Offline, nothing is requested.
"""

from __future__ import annotations

import hashlib
import io
import time

import pytest
import torch

from loopback import FileServer
from ldm_core.models import pretrained
from ldm_core.models.pretrained import (MissingWeightsError, RemoteWeights, WeightsFileError, find_weights,
                                        torch_hub_checkpoint_dir)


def state_dict_bytes(seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save({"features.0.weight": torch.randn(8, 3, 3, 3), "features.0.bias": torch.randn(8)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A file server, torch hub's cache in tmp_path, the network allowed, and short timeouts."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    files = FileServer()
    with files.running() as url:
        files.url = url
        yield files


def register(monkeypatch, server, name: str, data: bytes, *, mode: str = "ok", hashed: bool = True,
             prefix: str | None = None) -> str:
    """Serve `data` and make `name` one of the files find_weights knows; returns the name."""
    server.add(name, data, mode)
    digest = hashlib.sha256(data).hexdigest()[:8] if prefix is None else prefix
    monkeypatch.setitem(pretrained.REMOTE_WEIGHTS, name, RemoteWeights("a test trunk", f"{server.url}/{name}",
                                                                       digest if hashed else None))
    return name


def left_in_cache() -> list[str]:
    folder = torch_hub_checkpoint_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_first_use_downloads_the_file_into_torch_hubs_cache(server, monkeypatch):
    data = state_dict_bytes()
    name = register(monkeypatch, server, "trunk-a.pth", data)
    path = find_weights(name)
    assert path == torch_hub_checkpoint_dir() / name and path.read_bytes() == data
    assert left_in_cache() == [name]
    requests = len(server.requests)
    assert find_weights(name) == path and len(server.requests) == requests  # cached: no second request


def test_a_wrong_hash_leaves_nothing_and_says_so(server, monkeypatch):
    name = register(monkeypatch, server, "trunk-b.pth", state_dict_bytes(), prefix="00000000")
    with pytest.raises(WeightsFileError, match="is not that file") as err:
        find_weights(name)
    assert "nothing was kept" in str(err.value) and "\n" not in str(err.value)
    assert left_in_cache() == []


def test_a_connection_cut_mid_file_leaves_nothing(server, monkeypatch):
    name = register(monkeypatch, server, "trunk-c.pth", state_dict_bytes(), mode="cut")
    with pytest.raises((WeightsFileError, MissingWeightsError), match="nothing was kept"):
        find_weights(name)
    assert left_in_cache() == []


def test_a_cut_file_without_a_published_hash_is_caught_by_its_check(server, monkeypatch):
    """torch-fidelity's Inception file has no published hash: the check (loading it) refuses a cut download."""
    name = register(monkeypatch, server, "unhashed.pth", state_dict_bytes(), mode="cut", hashed=False)
    with pytest.raises(WeightsFileError, match="cannot be read|not a weights file"):
        find_weights(name, check=lambda path: pretrained.load_state_dict(path))
    assert left_in_cache() == []


def test_an_unanswering_server_fails_in_seconds(server, monkeypatch):
    name = register(monkeypatch, server, "trunk-d.pth", state_dict_bytes(), mode="stall")
    started = time.monotonic()
    with pytest.raises(MissingWeightsError, match="Could not download trunk-d.pth") as err:
        find_weights(name)
    assert time.monotonic() - started < 20 and "timed out" in str(err.value)
    assert left_in_cache() == []


def test_offline_nothing_is_requested_and_the_message_gives_the_command(server, monkeypatch):
    from huggingface_hub import constants

    name = register(monkeypatch, server, "trunk-e.pth", state_dict_bytes())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError) as err:
        find_weights(name, option_hint="--lpips-weights PATH")
    message = str(err.value)
    assert server.requests == [] and left_in_cache() == []
    assert f"curl -L -o {name} {server.url}/{name}" in message
    assert str(torch_hub_checkpoint_dir() / name) in message and "--lpips-weights PATH" in message


def test_the_known_files_point_at_their_upstream_addresses():
    vgg = pretrained.REMOTE_WEIGHTS[pretrained.VGG16_FILE]
    assert vgg.url == "https://download.pytorch.org/models/vgg16-397923af.pth" and vgg.sha256_prefix == "397923af"
    alex = pretrained.REMOTE_WEIGHTS[pretrained.ALEXNET_FILE]
    assert alex.url.endswith("/alexnet-owt-7be5be79.pth") and alex.sha256_prefix == "7be5be79"
    inception = pretrained.REMOTE_WEIGHTS[pretrained.INCEPTION_FID_FILE]
    import torch_fidelity.feature_extractor_inceptionv3 as upstream

    assert inception.url == upstream.URL_INCEPTION_V3  # the file torch-fidelity itself would fetch
