"""`ldm bench-recon` end to end on tiny autoencoders, and `ldm eval-samples`' FID plumbing."""

import csv
import hashlib
import json
import urllib.request

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from evaluation.bench_recon import collect_shard, finalize, make_plan, run_bench_recon
from evaluation.eval_samples import run_eval_samples
from evaluation.reconstructors import Reconstructor
from ldm_core.data.streaming import iter_image_batches
from ldm_core.image_values import to_model_input
from ldm_core.models.pretrained import INCEPTION_FID_FILE

RES = 32


def _tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         norm_num_groups=4, block_out_channels=(8, 16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    """A run folder (holding vae/) and a plain diffusers AutoencoderKL folder."""
    root = tmp_path_factory.mktemp("models")
    _tiny_vae(0).save_pretrained(root / "run-a" / "vae")
    _tiny_vae(1).save_pretrained(root / "plain-b")
    return root / "run-a", root / "plain-b"


@pytest.fixture
def no_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    def forbidden(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", forbidden)


class Identity(Reconstructor):
    name = "identity"

    def reconstruct(self, x, indices):
        return x.clone(), None


class TinyFeatures(torch.nn.Module):
    """Random features standing in for Inception: structural tests only."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 128 - 1)).mean(dim=(2, 3))


def _array_source(images, batch_size):
    """Batches of an in-memory uint8 array, sharded like ldm_core.data.streaming (image k -> process k % n)."""
    def source(rank, world_size):
        idx = np.arange(rank, len(images), world_size)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            yield chunk, images[chunk], [f"img{k}" for k in chunk]
    return source


def _images(n=8, seed=0):
    return next(iter_image_batches("builtin:shapes", RES, n, shapes_count=n, shapes_seed=seed))[1]


def test_identity_model_hits_the_psnr_cap_and_ssim_one_and_rfid_zero(no_download):
    images = _images(8)
    results = run_bench_recon([Identity()], "in-memory", RES, metrics=("psnr", "ssim", "rfid"),
                              batch_source=_array_source(images, 3), fid_feature_net=TinyFeatures(),
                              progress=False, device="cpu")
    baseline, identity = results["models"]
    assert baseline["name"] == "bicubic-f8" and identity["name"] == "identity"
    m = identity["metrics"]
    assert m["psnr"] == {"mean": 100.0, "std": 0.0, "n": 8, "impl": m["psnr"]["impl"], "reason": None}
    assert m["ssim"]["mean"] == pytest.approx(1.0, abs=1e-9) and m["ssim"]["n"] == 8
    assert abs(m["rfid"]["mean"]) < 1e-5 and m["rfid"]["n"] == 8
    # Plain resampling by f=8 loses detail: far from the cap, and an rFID far above the identity's (the
    # random 8-feature stand-in for Inception gives small distances: 4.7e-4 on these shapes).
    assert baseline["metrics"]["psnr"]["mean"] < 40 and baseline["metrics"]["rfid"]["mean"] > 1e-4
    assert m["msssim"]["mean"] is None and "not requested" in m["msssim"]["reason"]


def test_report_files_schema_and_missing_weights(no_download, vae_dirs, tmp_path, capsys):
    from workflows.cli import main

    run_dir, plain_dir = vae_dirs
    out = tmp_path / "bench" / "results.json"
    rc = main(["bench-recon", "--vae", str(run_dir), "--vae", str(plain_dir), "--data", "builtin:shapes",
               "--resolution", str(RES), "--num-images", "6", "--batch-size", "4", "--out", str(out),
               "--no-progress", "--save-recon", str(tmp_path / "recon")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| model | rFID | PSNR ± std | SSIM ± std | LPIPS ± std | HF kept | chroma kept | img/s |" in table
    assert "alexnet-owt-7be5be79.pth" in table and INCEPTION_FID_FILE in table

    doc = json.loads(out.read_text())
    meta = doc["meta"]
    for key, kind in [("models", list), ("data", str), ("resolution", int), ("crop", str), ("latent", str),
                      ("seed", int), ("dtype", str), ("device", str), ("versions", dict),
                      ("psnr_cap_db", float), ("files", dict)]:
        assert isinstance(meta[key], kind), key
    assert meta["latent"] == "mode" and meta["dtype"] == "fp32" and meta["versions"]["torch"]
    names = [m["name"] for m in doc["models"]]
    assert names == ["bicubic-f8", "run-a", "plain-b"]
    weights = run_dir / "vae" / "diffusion_pytorch_model.safetensors"
    assert doc["models"][1]["weights_sha256"] == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}
    for model in doc["models"]:
        assert set(model["metrics"]) == {"psnr", "ssim", "msssim", "lpips", "rfid"}
        for metric in model["metrics"].values():
            assert set(metric) >= {"mean", "std", "n", "impl", "reason"}
        assert model["metrics"]["psnr"]["n"] == 6 and isinstance(model["metrics"]["psnr"]["mean"], float)
        assert model["metrics"]["lpips"]["mean"] is None
        assert "alexnet-owt-7be5be79.pth" in model["metrics"]["lpips"]["reason"]
        assert "--lpips-weights" in model["metrics"]["lpips"]["reason"]
        assert INCEPTION_FID_FILE in model["metrics"]["rfid"]["reason"]
        assert "160" in model["metrics"]["msssim"]["reason"]
        assert model["throughput"]["images_per_s"] > 0 and model["peak_memory"]["method"]
    stats = doc["models"][1]["latent_stats"]
    assert len(stats["channel_mean"]) == 4 and stats["implied_scaling_factor"] == pytest.approx(1 / stats["std"])
    assert doc["models"][0]["latent_stats"] is None

    rows = list(csv.DictReader(open(out.with_name("results_per_image.csv"))))
    assert len(rows) == 18 and {r["model"] for r in rows} == set(names)
    for name in names:
        assert out.with_name(f"results_examples_{name}.png").is_file()
    assert len(list((tmp_path / "recon" / "reference").glob("*.png"))) == 6
    assert len(list((tmp_path / "recon" / "run-a").glob("*.png"))) == 6


def test_metrics_and_latent_stats_match_an_independent_computation(no_download, vae_dirs):
    run_dir, _ = vae_dirs
    images = _images(6, seed=3)
    results = run_bench_recon([str(run_dir)], "in-memory", RES, metrics=("psnr",), progress=False,
                              batch_source=_array_source(images, 4), device="cpu")
    vae = AutoencoderKL.from_pretrained(run_dir / "vae").eval()
    with torch.no_grad():
        z = vae.encode(to_model_input(torch.from_numpy(images))).latent_dist.mode()
        y = vae.decode(z).sample
    rec = ((y.clamp(-1, 1) + 1) * 127.5).round().numpy()
    mse = ((rec - images.astype(np.float64)) ** 2).reshape(6, -1).mean(1)
    psnr = 10 * np.log10(255 ** 2 / mse)
    entry = results["models"][1]
    assert entry["metrics"]["psnr"]["mean"] == pytest.approx(psnr.mean(), abs=1e-3)
    assert entry["metrics"]["psnr"]["std"] == pytest.approx(psnr.std(), abs=1e-3)
    stats = entry["latent_stats"]
    assert np.allclose(stats["channel_mean"], z.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(stats["channel_std"], z.std(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert stats["std"] == pytest.approx(z.std().item(), abs=1e-5)


def test_two_shards_give_the_same_numbers_as_one_process(no_download, vae_dirs):
    images = _images(10, seed=4)
    plan = make_plan([str(vae_dirs[1])], "in-memory", RES, metrics=("psnr", "ssim", "rfid"),
                     latent="sample", seed=7, batch_source=_array_source(images, 3),
                     fid_feature_net=TinyFeatures(), device="cpu")
    one = finalize(plan, [collect_shard(plan, 0, 1)])
    two = finalize(plan, [collect_shard(plan, 0, 2), collect_shard(plan, 1, 2)])
    for a, b in zip(one["models"], two["models"]):
        assert [r["index"] for r in a["rows"]] == list(range(10)) == [r["index"] for r in b["rows"]]
        for ra, rb in zip(a["rows"], b["rows"]):
            assert ra["psnr"] == pytest.approx(rb["psnr"], abs=1e-3)
        for name in ("psnr", "ssim", "rfid"):
            assert a["metrics"][name]["n"] == b["metrics"][name]["n"] == 10
            assert a["metrics"][name]["mean"] == pytest.approx(b["metrics"][name]["mean"], rel=1e-4, abs=1e-6)
    sa, sb = one["models"][1]["latent_stats"], two["models"][1]["latent_stats"]
    assert np.allclose(sa["channel_mean"], sb["channel_mean"], atol=1e-6) and sa["n_values"] == sb["n_values"]


def test_sampled_latents_are_seeded_and_differ_from_the_mode(no_download, vae_dirs):
    images = _images(4, seed=5)
    source = _array_source(images, 4)

    def psnrs(latent, seed):
        res = run_bench_recon([str(vae_dirs[0])], "x", RES, metrics=("psnr",), latent=latent, seed=seed,
                              batch_source=source, progress=False, device="cpu")
        return [r["psnr"] for r in res["models"][1]["rows"]]

    assert psnrs("sample", 1) == psnrs("sample", 1)
    assert psnrs("sample", 1) != psnrs("sample", 2) != psnrs("mode", 0)


def test_bad_input_is_explained(vae_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder"):
        make_plan([str(tmp_path)], "builtin:shapes", RES)
    with pytest.raises(ValueError, match="divisible"):
        make_plan([str(vae_dirs[0])], "builtin:shapes", 36)
    with pytest.raises(ValueError, match="Unknown metric"):
        make_plan([str(vae_dirs[0])], "builtin:shapes", RES, metrics=("psnr", "fid"))


def test_eval_samples_fid_and_missing_weights(no_download, tmp_path):
    from PIL import Image

    folder = tmp_path / "samples"
    folder.mkdir()
    for k, image in enumerate(_images(6, seed=9)):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{k:03d}.png")
    missing = run_eval_samples(folder, reference="builtin:shapes", out=tmp_path / "eval.json")
    assert missing["fid"]["value"] is None and INCEPTION_FID_FILE in missing["fid"]["reason"]
    assert json.loads((tmp_path / "eval.json").read_text())["fid"]["reason"] == missing["fid"]["reason"]
    same = run_eval_samples(folder, reference=str(folder), fid_feature_net=TinyFeatures(), device="cpu")
    assert abs(same["fid"]["value"]) < 1e-3 and same["fid"]["n_reference"] == same["fid"]["n_generated"] == 6
