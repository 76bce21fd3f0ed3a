"""Bad command-line input to `ldm generate`, `ldm eval-samples` and `ldm bench-recon`, and what the commands
leave in their output folders.

Every bad input gets exit code 2 and one line `ldm <command>: error: ...` naming the flag or file, never a
traceback, and writes nothing. A generate run that fails leaves an existing output folder as it was; a
second run into a folder that holds files is refused unless --overwrite is given; bench-recon writes its
results for a folder with a file name that is not UTF-8 and says how many images it had to enlarge.

Everything is tiny (32 px images, 4x4 latents, one denoising step) and nothing is downloaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import report
from pipelines.latent_diffusion import LatentDiffusionPipeline
from test_bench_recon import _tiny_vae  # the tiny AutoencoderKL of the bench-recon tests
from test_pipeline import make_pipeline  # the tiny pipeline of the pipeline tests
from workflows.cli import main


@pytest.fixture(autouse=True)
def no_download(monkeypatch, tmp_path_factory):
    """An empty torch hub cache and every download path made to fail loudly."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "empty_torch_home"))

    def forbidden(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", forbidden)


def _edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _write_png(path: Path, size: int, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def things(tmp_path_factory) -> dict[str, Path]:
    """Good and bad models, weight files, folders; the keys are the {placeholders} of the table below."""
    root = tmp_path_factory.mktemp("things")
    t = {"root": root}
    t["pipe"] = root / "pipe"
    make_pipeline(num_classes=3, class_names=["circle", "square", "triangle"]).save_pretrained(t["pipe"])
    t["plain_pipe"] = root / "plain_pipe"
    make_pipeline().save_pretrained(t["plain_pipe"])
    t["vae"] = root / "vae"
    _tiny_vae(0).save_pretrained(t["vae"])

    # Model folders whose config or weights do not fit.
    t["unet_as_vae"] = t["pipe"] / "unet"  # a U-Net folder where an autoencoder is expected
    for name, change in [("vae_list", "[1, 2]"), ("vae_not_json", "{not json"), ("vae_mismatch", None)]:
        shutil.copytree(t["vae"], root / name)
        t[name] = root / name
        if change is None:
            _edit_json(root / name / "config.json", layers_per_block=2)  # the weights have 1 per block
        else:
            (root / name / "config.json").write_text(change)
    for name, part, edit in [("pipe_unet_list", "unet/config.json", "[]"),
                             ("pipe_vae_not_json", "vae/config.json", "nope{"),
                             ("pipe_unet_mismatch", "unet/config.json", None),
                             ("pipe_scheduler_list", "scheduler/scheduler_config.json", "[3]")]:
        shutil.copytree(t["pipe"], root / name)
        t[name] = root / name
        if edit is None:
            _edit_json(root / name / part, layers_per_block=3)
        else:
            (root / name / part).write_text(edit)

    # Weight files that are not what --lpips-weights / --fid-weights should be.
    weights = root / "weights"
    weights.mkdir()
    t["random_bytes"] = weights / "random.pth"
    t["random_bytes"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    t["text_file"] = weights / "notes.pth"
    t["text_file"].write_text("these are not weights\n")
    t["unrelated"] = weights / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, t["unrelated"])

    # Folders and files for the output and data flags.
    t["samples"] = root / "samples"
    for i in range(3):
        _write_png(t["samples"] / f"image_{i:05d}.png", 32, seed=i)
    t["empty"] = root / "empty"
    t["empty"].mkdir()
    t["a_file"] = root / "a_file.txt"
    t["a_file"].write_text("not a folder\n")
    t["busy"] = root / "busy"  # an output folder that already holds a file
    t["busy"].mkdir()
    (t["busy"] / "notes.txt").write_text("mine\n")
    t["missing"] = root / "does-not-exist"
    return t


GEN = ["generate", "--model", "{pipe}", "--num-images", "2", "--steps", "1", "--device", "cpu"]
EVAL = ["eval-samples", "{samples}", "--out", "{out}/eval.json"]
BENCH = ["bench-recon", "--vae", "{vae}", "--data", "builtin:shapes", "--resolution", "32", "--num-images", "2",
         "--metrics", "psnr", "--no-progress"]

# (arguments, a substring the one-line message must contain)
CASES = [
    # ldm generate: values checked before anything is loaded or written
    (GEN + ["--out", "{out}", "--steps", "0"], "--steps"),
    (GEN + ["--out", "{out}", "--steps", "5000"], "--steps=5000 is more than the 1000 steps"),
    (GEN + ["--out", "{out}", "--num-images", "0"], "--num-images"),
    (GEN + ["--out", "{out}", "--batch-size", "0"], "--batch-size"),
    (GEN + ["--out", "{out}", "--seed", "-1"], "--seed"),
    (GEN + ["--out", "{out}", "--guidance-scale", "nan"], "--guidance-scale"),
    (GEN + ["--out", "{out}", "--guidance-scale", "-2"], "--guidance-scale"),
    (GEN + ["--out", "{out}", "--eta", "1.5"], "--eta"),
    (GEN + ["--out", "{out}", "--class", "dog"], "Unknown class name 'dog'. Known classes: circle, square"),
    (GEN + ["--out", "{out}", "--class", "7"], "--class"),
    (["generate", "--model", "{plain_pipe}", "--out", "{out}", "--class", "0"], "--class"),
    (["generate", "--model", "{plain_pipe}", "--out", "{out}", "--guidance-scale", "3"], "--guidance-scale"),
    (GEN + ["--out", "{out}", "--device", "cuda:7" if not torch.cuda.device_count() >= 8 else "cuda:99"],
     "--device"),
    (GEN + ["--out", "{out}", "--device", "nonsense"], "--device"),
    # ldm generate: the model folder
    (["generate", "--model", "{missing}", "--out", "{out}"], "does-not-exist"),
    (["generate", "--model", "{vae}", "--out", "{out}"], "model_index.json"),
    (["generate", "--model", "{pipe_unet_list}", "--out", "{out}"], "unet/config.json holds a JSON list"),
    (["generate", "--model", "{pipe_vae_not_json}", "--out", "{out}"], "vae/config.json is not valid JSON"),
    (["generate", "--model", "{pipe_unet_mismatch}", "--out", "{out}"], "unet/diffusion_pytorch_model.safetensors"),
    (["generate", "--model", "{pipe_scheduler_list}", "--out", "{out}"], "scheduler_config.json"),
    # ldm generate: the output folder
    (GEN + ["--out", "{a_file}"], "a_file.txt"),
    (GEN + ["--out", "{a_file}/samples"], "Not a directory"),
    (GEN + ["--out", "{busy}"], "--overwrite"),
    (GEN + ["--out", "{pipe}/samples", "--overwrite"], "inside the --model folder"),
    # ldm eval-samples
    (["eval-samples", "{missing}", "--out", "{out}/eval.json"], "does-not-exist"),
    (["eval-samples", "{empty}", "--out", "{out}/eval.json"], "empty"),
    (EVAL + ["--dataset", "imagenet"], "--dataset"),
    (EVAL + ["--reference", "{missing}"], "does-not-exist"),
    (EVAL + ["--reference", "builtin:shapes", "--num-reference", "1"], "--num-reference"),
    (EVAL + ["--reference", "builtin:shapes", "--fid-weights", "{random_bytes}"], "random.pth"),
    (EVAL + ["--reference", "builtin:shapes", "--fid-weights", "{text_file}"], "notes.pth"),
    (EVAL + ["--reference", "builtin:shapes", "--fid-weights", "{unrelated}"], "unrelated.pth"),
    (EVAL + ["--reference", "builtin:shapes", "--fid-weights", "{missing}"], "does-not-exist"),
    (["eval-samples", "{samples}", "--out", "{empty}"], "--out"),
    # ldm bench-recon: model folders and weight files
    (BENCH + ["--out", "{out}/r.json", "--vae", "{unet_as_vae}"], "describes a UNet2DModel, not an AutoencoderKL"),
    (BENCH + ["--out", "{out}/r.json", "--vae", "{vae_list}"], "config.json holds a JSON list"),
    (BENCH + ["--out", "{out}/r.json", "--vae", "{vae_not_json}"], "config.json is not valid JSON"),
    (BENCH + ["--out", "{out}/r.json", "--vae", "{vae_mismatch}"], "diffusion_pytorch_model.safetensors"),
    (BENCH + ["--out", "{out}/r.json", "--metrics", "lpips", "--lpips-weights", "{random_bytes}"], "random.pth"),
    (BENCH + ["--out", "{out}/r.json", "--metrics", "lpips", "--lpips-weights", "{text_file}"], "notes.pth"),
    (BENCH + ["--out", "{out}/r.json", "--metrics", "lpips", "--lpips-weights", "{unrelated}"], "unrelated.pth"),
    (BENCH + ["--out", "{out}/r.json", "--metrics", "rfid", "--fid-weights", "{random_bytes}"], "random.pth"),
    (BENCH + ["--out", "{out}/r.json", "--metrics", "rfid", "--fid-weights", "{unrelated}"], "unrelated.pth"),
    # ldm bench-recon: values, data and output
    (BENCH + ["--out", "{out}/r.json", "--resolution", "0"], "--resolution"),
    (BENCH + ["--out", "{out}/r.json", "--resolution", "36"], "--resolution 36"),
    (BENCH + ["--out", "{out}/r.json", "--batch-size", "0"], "--batch-size"),
    (BENCH + ["--out", "{out}/r.json", "--seed", "-1"], "--seed"),
    (BENCH + ["--out", "{out}/r.json", "--num-images", "1"], "--num-images"),
    (BENCH + ["--out", "{out}/r.json", "--metrics", ""], "--metrics"),
    (BENCH + ["--out", "{out}/r.json", "--data", "{missing}"], "does-not-exist"),
    (BENCH + ["--out", "{out}/r.json", "--data", "{empty}"], "empty"),
    (BENCH + ["--out", "{empty}"], "--out"),
    (BENCH + ["--out", "{a_file}/r.json"], "Not a directory"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[f"{a[0]}:{e[:40]}" for a, e in CASES])
def test_bad_input_is_one_line_naming_the_flag_or_file(things, tmp_path, capsys, argv, expected):
    places = {key: str(value) for key, value in things.items()} | {"out": str(tmp_path / "out")}
    args = [arg.format(**places) for arg in argv]
    before = {p.name: sorted(os.listdir(p)) for p in (things["busy"], things["samples"], things["empty"])}
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ldm {args[0]}: error: "), err
    assert expected in lines[0], lines[0]
    assert "huggingface.co" not in lines[0]
    # Nothing was written: no output, no staging folder, no file added to the folders the case names.
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())
    assert before == {p.name: sorted(os.listdir(p)) for p in (things["busy"], things["samples"], things["empty"])}
    assert not [p for p in things["root"].iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- ldm generate's output folder


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _generate(model: Path, out: Path, *extra: str) -> int:
    return main(["generate", "--model", str(model), "--num-images", "2", "--steps", "1", "--batch-size", "2",
                 "--device", "cpu", "--out", str(out), *extra])


def test_failed_generate_leaves_the_existing_output_folder_untouched(things, tmp_path, capsys, monkeypatch):
    out = tmp_path / "samples"
    assert _generate(things["pipe"], out) == 0
    before = _hashes(out)
    assert "labels.json" in before and "grid.png" in before
    # Refused while checking the arguments...
    assert _generate(things["pipe"], out, "--overwrite", "--steps", "0") == 2
    assert _hashes(out) == before
    # ...and failing in the middle of sampling, after the first batch was written.
    calls = []
    real_call = LatentDiffusionPipeline.__call__

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise FloatingPointError("the latents became NaN at step 1")
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", failing)
    capsys.readouterr()
    assert _generate(things["pipe"], out, "--overwrite", "--seed", "5", "--batch-size", "1") == 2
    assert "NaN" in capsys.readouterr().err
    assert len(calls) == 2 and _hashes(out) == before  # labels.json and every image kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]  # no staging folder left beside it


def test_second_generate_needs_overwrite_and_then_leaves_only_the_new_images(things, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["generate", "--model", str(things["pipe"]), "--num-images", "3", "--steps", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    (out / "notes.txt").write_text("kept\n")
    (out / "eval.json").write_text("{}\n")  # the scores of the earlier images, as eval-samples writes them
    before = _hashes(out)
    assert set(before) == {"image_00000.png", "image_00001.png", "image_00002.png", "grid.png", "labels.json",
                           "notes.txt", "eval.json"}
    capsys.readouterr()
    assert _generate(things["plain_pipe"], out, "--seed", "3") == 2
    err = capsys.readouterr().err
    assert "already holds 7 file(s)" in err and "--overwrite" in err and _hashes(out) == before
    assert _generate(things["plain_pipe"], out, "--seed", "3", "--overwrite") == 0
    after = _hashes(out)
    # The unconditional run's two images and grid; the third image, labels.json and the scores of the earlier
    # run are gone.
    assert set(after) == {"image_00000.png", "image_00001.png", "grid.png", "notes.txt"}
    assert after["notes.txt"] == before["notes.txt"] and after["image_00000.png"] != before["image_00000.png"]
    fresh = tmp_path / "fresh"
    assert _generate(things["plain_pipe"], fresh, "--seed", "3") == 0
    assert {k: v for k, v in after.items() if k != "notes.txt"} == _hashes(fresh)


# ----------------------------------------------------------------------------- ldm bench-recon's results


def test_bench_recon_writes_results_for_a_non_utf8_name_and_counts_upscaled_images(things, tmp_path, capsys, caplog,
                                                                                     monkeypatch):
    data = tmp_path / "images"
    data.mkdir()
    _write_png(data / os.fsdecode(b"caf\xe9_\xff.png"), 40, seed=1)  # Latin-1 bytes: not UTF-8
    _write_png(data / "plain.png", 48, seed=2)
    _write_png(data / "tiny.png", 8, seed=3)  # smaller than --resolution 32: enlarged
    out = tmp_path / "bench" / "results.json"
    with caplog.at_level(logging.WARNING, logger="ldm.bench"):
        rc = main(["bench-recon", "--vae", str(things["vae"]), "--data", str(data), "--resolution", "32",
                   "--metrics", "psnr,ssim", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "upscaled: 1 of the 3 images was smaller than 32px" in captured.out
    warnings = [r.getMessage() for r in caplog.records if r.name == "ldm.bench"]
    assert len(warnings) == 1 and "1 of the 3 images was smaller than --resolution 32" in warnings[0]
    assert "tiny.png" in warnings[0]

    document = json.loads(out.read_bytes().decode("utf-8"))
    assert document["meta"]["upscaled"]["count"] == 1 and document["meta"]["upscaled"]["n"] == 3
    assert document["meta"]["upscaled"]["names"] == ["tiny.png"]
    assert [m["name"] for m in document["models"]] == ["bicubic-f8", "vae"]
    csv_text = out.with_name("results_per_image.csv").read_bytes().decode("utf-8")
    assert "caf\\xe9_\\xff.png,False" in csv_text and "tiny.png,True" in csv_text
    assert out.with_name("results.md").read_text(encoding="utf-8").startswith("| model |")
    # Only the finished files, no temporary ones.
    finished = ["results.json", "results.md", "results_examples_bicubic-f8.png", "results_examples_vae.png",
                "results_per_image.csv"]
    assert sorted(p.name for p in out.parent.iterdir()) == finished

    # A run that fails while writing its results (here: the disk fills up at the example images) leaves
    # the earlier results as they were, and no temporary file.
    before = _hashes(out.parent)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[2]))

    monkeypatch.setattr(report, "save_reconstruction_grid", disk_full)
    assert main(["bench-recon", "--vae", str(things["vae"]), "--data", str(data), "--resolution", "32",
                 "--metrics", "psnr", "--out", str(out), "--no-progress"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert _hashes(out.parent) == before


def test_eval_samples_fid_leaves_out_the_grid(things, tmp_path):
    from evaluation.eval_samples import run_eval_samples
    from test_bench_recon import TinyFeatures

    folder = tmp_path / "samples"
    shutil.copytree(things["samples"], folder)
    _write_png(folder / "grid.png", 96, seed=9)  # what `ldm generate` writes beside the images
    result = run_eval_samples(folder, reference=str(things["samples"]), fid_feature_net=TinyFeatures(),
                              device="cpu", out=tmp_path / "eval.json")
    assert result["fid"]["n_generated"] == result["fid"]["n_reference"] == 3
    assert abs(result["fid"]["value"]) < 1e-3  # the same three images on both sides
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "samples"]
