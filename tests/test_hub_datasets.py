"""Datasets by Hub name, `--data hf:org/name[:split]` (ldm_core/data/sources.py), against a stand-in Hub on
127.0.0.1 (tests/loopback.py): loaded through `datasets.load_dataset` into a cache in a temporary folder,
then read from that cache with the network off, and streamed when asked.

Each step runs in its own process, because `datasets` and `huggingface_hub` read HF_ENDPOINT, HF_HOME and
HF_HUB_OFFLINE when they are imported, as they do for a user.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loopback import FakeHub

ROOT = Path(__file__).resolve().parent.parent


def parquet(colours: list[int], labels: list[int]) -> bytes:
    """A parquet file with an Image column and a ClassLabel column, as datasets writes them."""
    import datasets

    cells = []
    for value in colours:
        buffer = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
    out = io.BytesIO()
    datasets.Dataset.from_dict({"image": cells, "label": labels}, features=features).to_parquet(out)
    return out.getvalue()


@pytest.fixture(scope="module")
def hub():
    stand_in = FakeHub()
    stand_in.add("org/tiny-shapes", {
        "README.md": b"---\nlicense: mit\n---\n",
        "data/train-00000-of-00001.parquet": parquet([10, 20, 30, 200, 210, 220], [0, 0, 0, 1, 1, 1]),
        "data/test-00000-of-00001.parquet": parquet([40, 50, 230, 240], [0, 0, 1, 1]),
    }, repo_type="dataset")
    with stand_in.running() as url:
        stand_in.url = url
        yield stand_in


def run_python(code: str, home: Path, url: str, *, offline: bool) -> dict:
    """Run `code` in a fresh process against the stand-in Hub; it prints one JSON line, returned here."""
    env = dict(os.environ, HF_HOME=str(home), HF_ENDPOINT=url, HF_HUB_OFFLINE="1" if offline else "0")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


READ = """
import json
from ldm_core.data.image_files import DataError
from ldm_core.data.sources import open_image_source
out = {}
for spec in %r:
    try:
        source = open_image_source(spec)
        out[spec] = {"n": len(source), "labels": source.labels.tolist(), "classes": source.class_names,
                     "first": int(source.open(0).getpixel((0, 0))[0])}
    except DataError as err:
        out[spec] = {"error": str(err)}
print(json.dumps(out))
"""


def test_a_hub_dataset_by_name_online_then_offline_from_the_cache(hub, tmp_path):
    specs = ["hf:org/tiny-shapes", "hf:org/tiny-shapes:test", "hf:org/tiny-shapes:validation"]
    online = run_python(READ % (specs,), tmp_path / "hf", hub.url, offline=False)
    assert online["hf:org/tiny-shapes"] == {"n": 6, "labels": [0, 0, 0, 1, 1, 1], "classes": ["dark", "light"],
                                            "first": 10}
    assert online["hf:org/tiny-shapes:test"]["n"] == 4 and online["hf:org/tiny-shapes:test"]["first"] == 40
    assert "validation" in online["hf:org/tiny-shapes:validation"]["error"]
    assert "train" in online["hf:org/tiny-shapes:validation"]["error"]  # the known splits are named
    served = len(hub.served)

    offline = run_python(READ % (specs[:2],), tmp_path / "hf", "http://127.0.0.1:9", offline=True)
    assert offline == {k: online[k] for k in specs[:2]}
    assert len(hub.served) == served


def test_offline_a_dataset_not_cached_is_one_line_with_the_fetch_command(hub, tmp_path):
    result = run_python(READ % (["hf:org/never-fetched:test"],), tmp_path / "empty", hub.url, offline=True)
    message = result["hf:org/never-fetched:test"]["error"]
    assert "not in the datasets cache" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message
    assert ("datasets.load_dataset('org/never-fetched', split='test').save_to_disk('never-fetched')" in message)


def test_a_name_on_no_hub_is_a_clear_error(hub, tmp_path):
    result = run_python(READ % (["hf:org/missing"],), tmp_path / "hf", hub.url, offline=False)
    assert "no dataset org/missing on the Hugging Face Hub" in result["hf:org/missing"]["error"]


def test_streaming_reads_in_order_without_converting_the_dataset(hub, tmp_path):
    code = """
import json
from ldm_core.data.streaming import iter_image_batches
from ldm_core.data.sources import open_image_source
source = open_image_source("hf:org/tiny-shapes:test", streaming=True)
batches = list(iter_image_batches("hf:org/tiny-shapes:test", 16, 3, streaming=True))
print(json.dumps({"streaming": source.streaming, "sizes": [len(b[1]) for b in batches],
                  "names": [n for b in batches for n in b[2]], "firsts": [int(b[1][0, 0, 0, 0]) for b in batches]}))
"""
    out = run_python(code, tmp_path / "hf", hub.url, offline=False)
    assert out["streaming"] is True and out["sizes"] == [3, 1] and out["firsts"] == [40, 240]
    assert not (tmp_path / "hf" / "datasets" / "org___tiny-shapes").exists()  # nothing converted to Arrow


def test_bench_recon_reads_a_hub_split_by_name_offline(hub, tmp_path):
    """`ldm bench-recon --data hf:org/name:split` from the cache with the network off."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, layers_per_block=1,
                  latent_channels=4).save_pretrained(tmp_path / "vae")
    run_python(READ % (["hf:org/tiny-shapes:test"],), tmp_path / "hf", hub.url, offline=False)  # warms the cache
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "workflows.cli", "bench-recon", "--vae", str(tmp_path / "vae"),
                             "--data", "hf:org/tiny-shapes:test", "--resolution", "16", "--metrics", "psnr",
                             "--out", str(tmp_path / "bench" / "results.json"), "--no-progress"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "bench" / "results.json").read_text())["meta"]
    assert meta["data"] == "hf:org/tiny-shapes:test" and "N=4 images" in result.stdout
