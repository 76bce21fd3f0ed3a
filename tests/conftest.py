"""Shared fixtures: small image folders, good and bad, written to a temporary directory."""

from __future__ import annotations

import io
import os
from pathlib import Path

# `make test` runs the tests in several processes (pytest-xdist): each gets its share of the cores, so that
# their thread pools do not oversubscribe the machine. Set before numpy and torch are imported, so that the
# processes the tests start inherit it too. A value the user set is kept.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# No test reaches a network: the Hugging Face libraries, and this project's own first-use downloads, work from
# their caches only (HF_HUB_OFFLINE, read by huggingface_hub when it is imported). The tests of the online paths
# switch it off themselves and talk to servers they start on 127.0.0.1 (tests/loopback.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def write_image():
    """write_image(path, array HxWx3 uint8 or HxW) -> Path: saves with the format the suffix names."""
    def write(path: Path, array: np.ndarray) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        return path
    return write


@pytest.fixture
def bad_files(tmp_path):
    """A dict of kind -> path for files that must be skipped: not an image, truncated PNG and JPEG,
    and an empty file. All live in tmp_path / "bad"."""
    folder = tmp_path / "bad"
    folder.mkdir()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # incompressible, so a cut loses pixels
    png, jpeg = _png_bytes(noise), _jpeg_bytes(noise)
    files = {
        "text": folder / "notes.png",
        "truncated_png": folder / "cut.png",
        "truncated_jpeg": folder / "cut.jpg",
        "empty": folder / "empty.png",
    }
    files["text"].write_text("this is not an image\n")
    files["truncated_png"].write_bytes(png[: len(png) // 2])
    files["truncated_jpeg"].write_bytes(jpeg[: len(jpeg) // 2])
    files["empty"].write_bytes(b"")
    return files


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: forked children must not use the parent's OpenMP pool, runs
    compared bit for bit must use the same kernels, and one thread is faster on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def random_lpips_built_once_per_generator_state():
    """Each random LPIPS trunk is built once per torch generator state and copied after that.

    Building it runs torchvision's whole VGG16 initialisation, its 120M-weight classifier included (seconds,
    and most runs build it again from the same seed). The same generator state always gives the same weights
    and leaves the same state behind, so a copy plus that state is exactly what a fresh build would give.
    """
    import copy

    import torch

    from ldm_core.models import pretrained
    from stage_a_vae import perceptual

    build = pretrained.build_random_lpips
    built: dict = {}

    def build_or_copy(net: str = "vgg"):
        key = (net, torch.get_rng_state().numpy().tobytes())
        if key not in built:
            module = build(net)
            if len(built) >= 4:  # a few trunks of 60 MB each
                built.pop(next(iter(built)))
            built[key] = (copy.deepcopy(module), torch.get_rng_state())
            return module
        module, state = built[key]
        torch.set_rng_state(state)
        return copy.deepcopy(module)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrained, "build_random_lpips", build_or_copy)
        patch.setattr(perceptual, "build_random_lpips", build_or_copy)
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "loss_curves: the test looks at images/loss_curves.png, so runs draw it")


@pytest.fixture(autouse=True)
def loss_curves_only_where_looked_at(request, monkeypatch):
    """Training runs of a test skip drawing images/loss_curves.png unless it is marked `loss_curves`.

    Matplotlib lays out a panel per logged value, most of a tiny run's time, and only the tests marked look at
    the picture (tests/test_metric_history.py draws it directly). Module-scoped runs are set up before this
    fixture and always draw it.
    """
    if request.node.get_closest_marker("loss_curves") is None:
        from ldm_core.training.metric_history import MetricHistory

        monkeypatch.setattr(MetricHistory, "save_curves", lambda self, path, keys, title: None)
