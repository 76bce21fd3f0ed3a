"""Class-conditional generation end to end: labels from data, null-class dropout, classifier-free guidance,
`ldm generate --class`, and the class match that `ldm eval-samples` reports on builtin:shapes."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import shapes_score
from evaluation.eval_samples import run_eval_samples, summary_text
from evaluation.shapes_score import read_requested_classes, score_folder, score_image
from workflows.cli import main
from ldm_core.config.settings import load_config
from ldm_core.data.image_files import DataError
from ldm_core.data.in_memory import load_dataset
from ldm_core.data.shapes import SHAPE_CLASSES, make_shapes
from workflows import generate
from ldm_core.randomness import image_generator
from workflows.generate import generate_images, write_labels_file
from pipelines.latent_diffusion import LatentDiffusionPipeline
from ldm_core.data.training_images import TrainingImages
from stage_b_diffusion.config import StageBConfig
from stage_b_diffusion.objective import drop_class_labels
from stage_b_diffusion.train import _training_labels
from test_pipeline import make_pipeline  # the tiny pipeline shared with the pipeline tests


# ----------------------------------------------------------------------------- labels from data


def test_folder_labels_follow_first_level_subfolders_at_any_depth(tmp_path, write_image):
    red, blue = np.full((8, 8, 3), (200, 0, 0), np.uint8), np.full((8, 8, 3), (0, 0, 200), np.uint8)
    files = {"zebra/a.png": red, "ant/x/y/deep.png": blue, "ant/b.png": red, "moth/x/c.png": blue,
             "zebra/q/r/s/t.png": blue}
    for name, array in files.items():
        write_image(tmp_path / name, array)
    cache = tmp_path.parent / f"{tmp_path.name}_cache"
    for cache_dir in (None, cache, cache):  # decoded; decoded and cached; read from the cache
        result = load_dataset(str(tmp_path), 8, progress=False, cache_dir=cache_dir)
        assert result.class_names == ["ant", "moth", "zebra"]
        expected = [result.class_names.index(name.split("/")[0]) for name in result.names]
        assert sorted(result.names) == sorted(files) and result.labels.tolist() == expected
        # Each label belongs to its own image: the pixels read for a name are that file's pixels.
        for image, name in zip(result.images, result.names):
            assert np.array_equal(image[:, 0, 0], files[name][0, 0])
    assert list(cache.glob("*.npy"))


def test_builtin_shapes_labels_are_the_drawn_shape():
    data = load_dataset("builtin:shapes", 64, shapes_count=12, shapes_seed=5, progress=False)
    assert data.class_names == list(SHAPE_CLASSES)
    # The independent exact scorer recognises each image as the class its label names.
    assert [score_image(image).shape for image in data.images] == [SHAPE_CLASSES[k] for k in data.labels]


def test_unconditional_is_the_default_and_num_classes_switches_labels_on():
    shapes = load_dataset("builtin:shapes", 64, shapes_count=9, shapes_seed=0, progress=False)
    default = load_config(StageBConfig, None, ["data.shapes_count=9", "data.val_count=3"])
    images = TrainingImages("builtin:shapes", default.data, None, seed=0, progress=False)
    assert default.model.num_classes == 0 and default.model.class_dropout == 0.1
    assert _training_labels(default, images) == (None, None)
    labels, names = _training_labels(load_config(StageBConfig, None, ["model.num_classes=3"]), images)
    assert names == list(SHAPE_CLASSES) and labels.tolist() == shapes.labels[images.train_idx].tolist()
    with pytest.raises(ValueError, match="Set model.num_classes=3"):
        _training_labels(load_config(StageBConfig, None, ["model.num_classes=2"]), images)


# ----------------------------------------------------------------------------- null-class dropout


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_null_class_dropout_rate_is_p(p):
    n, null = 40_000, 5
    labels = torch.arange(n) % null
    dropped = drop_class_labels(labels, null, p, torch.Generator().manual_seed(1))
    changed = dropped != labels
    assert (dropped[changed] == null).all() and torch.equal(dropped[~changed], labels[~changed])
    # Binomial(n, p): the count stays within 5 standard deviations of n p (fails with probability < 1e-6).
    sd = math.sqrt(n * p * (1 - p))
    assert abs(changed.sum().item() - n * p) < 5 * sd
    for k in range(null):  # no class is favoured: each class is dropped at rate p too
        per_class = changed[labels == k]
        assert abs(per_class.sum().item() - len(per_class) * p) < 5 * math.sqrt(len(per_class) * p * (1 - p))
    # Independent draws: a different generator state gives a different set of dropped labels.
    other = drop_class_labels(labels, null, p, torch.Generator().manual_seed(2)) != labels
    assert not torch.equal(changed, other)


# ----------------------------------------------------------------------------- guidance, numerically


def _guided_prediction(pipe, latents, labels, w):
    """The noise prediction the scheduler receives in a one-step run from `latents` at guidance weight w."""
    received, step = [], pipe.scheduler.step
    pipe.scheduler.step = lambda out, t, x, **kw: (received.append((out.clone(), t)), step(out, t, x, **kw))[1]
    try:
        pipe(batch_size=len(labels), num_inference_steps=1, latents=latents, class_labels=labels,
             guidance_scale=w, output_type="latent")
    finally:
        pipe.scheduler.step = step
    assert len(received) == 1
    return received[0]


@pytest.fixture(scope="module")
def conditional_pipe():
    return make_pipeline(num_classes=3)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guidance_scale_matches_independent_unet_calls(conditional_pipe, w):
    """w = 0 is exactly the unconditional (null-class) prediction, w = 1 the conditional one, and other w
    extrapolate eps_u + w (eps_c - eps_u) (Ho & Salimans 2022, eq. 6, whose w is this w - 1), each against
    separate U-Net calls."""
    pipe = conditional_pipe
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    got, t = _guided_prediction(pipe, latents, ["class2", "class0"], w)
    with torch.no_grad():
        cond = pipe.unet(latents, t, class_labels=torch.tensor([2, 0])).sample
        uncond = pipe.unet(latents, t, class_labels=torch.tensor([3, 3])).sample  # 3 = the null class
    expected = {0.0: uncond, 1.0: cond}.get(w, uncond + w * (cond - uncond))
    # Batched and separate U-Net calls may round differently in the last bits.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The class makes a difference far above that tolerance, so the check above could fail.
    assert (cond - uncond).abs().max() > 1e-2


def test_unknown_class_name_is_a_clear_error_before_any_image(conditional_pipe, tmp_path):
    pipe = conditional_pipe
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="Unknown class name 'dog'. Known classes: class0, class1, class2"):
        generate_images(pipe, 2, seed=0, batch_size=1, num_inference_steps=1, out_dir=out, class_labels="dog")
    with pytest.raises(ValueError, match="Unknown class name 'dog'"):
        generate_images(pipe, 2, seed=0, batch_size=1, num_inference_steps=1, out_dir=out,
                        class_labels=["class1", "dog"])
    assert not out.exists()


# ----------------------------------------------------------------------------- save, load, ldm generate --class


@pytest.fixture(scope="module")
def shapes_pipeline(tmp_path_factory):
    """A tiny class-conditional pipeline whose classes are the shape classes, saved and reloaded."""
    folder = tmp_path_factory.mktemp("pipe") / "pipeline"
    make_pipeline(num_classes=3, class_names=list(SHAPE_CLASSES)).save_pretrained(folder)
    return folder


def test_save_load_keeps_class_names(shapes_pipeline):
    index = json.loads((shapes_pipeline / "model_index.json").read_text())
    assert index["class_names"] == list(SHAPE_CLASSES)
    loaded = LatentDiffusionPipeline.from_pretrained(shapes_pipeline)
    assert loaded.config.class_names == list(SHAPE_CLASSES) and loaded.num_classes == 3
    assert loaded.resolve_class_labels(["triangle", "circle"], 2).tolist() == [2, 0]


def _generate(model, out, *extra):
    return main(["generate", "--model", str(model), "--num-images", "2", "--steps", "1", "--scheduler", "ddim",
                 "--seed", "4", "--batch-size", "2", "--device", "cpu", "--out", str(out), *extra])


def test_generate_class_name_round_trip_and_labels_file(shapes_pipeline, tmp_path, capsys):
    out = tmp_path / "squares"
    assert _generate(shapes_pipeline, out, "--class", "square", "--guidance-scale", "2") == 0
    record = json.loads((out / "labels.json").read_text())
    assert record == {"class_names": list(SHAPE_CLASSES), "guidance_scale": 2.0,
                      "labels": {"image_00000.png": "square", "image_00001.png": "square"}}
    assert "labels.json (class square, guidance 2)" in capsys.readouterr().out

    # The name reached the U-Net as id 1: the same images as asking the reloaded pipeline for id 1 directly.
    pipe = LatentDiffusionPipeline.from_pretrained(shapes_pipeline)
    pipe.set_progress_bar_config(disable=True)

    def direct(label):
        return pipe(batch_size=2, num_inference_steps=1, generator=[image_generator(4, i) for i in range(2)],
                    class_labels=label, guidance_scale=2.0, output_type="np").images

    written = np.stack([np.asarray(Image.open(out / f"image_{i:05d}.png"), dtype=int) for i in range(2)])
    assert np.abs(written - np.round(direct(1) * 255)).max() <= 1
    assert np.abs(written - np.round(direct(0) * 255)).max() > 1
    # A numeric --class is an id; without --class the classes cycle, recorded by name.
    assert _generate(shapes_pipeline, tmp_path / "ids", "--class", "2") == 0
    assert set(json.loads((tmp_path / "ids" / "labels.json").read_text())["labels"].values()) == {"triangle"}
    assert _generate(shapes_pipeline, tmp_path / "cycle") == 0
    assert json.loads((tmp_path / "cycle" / "labels.json").read_text())["labels"] == {
        "image_00000.png": "circle", "image_00001.png": "square"}

    # eval-samples reads labels.json and prints the class match.
    assert main(["eval-samples", "--dataset", "builtin:shapes", str(out)]) == 0
    assert "class match (shows the requested class)" in capsys.readouterr().out
    shapes = json.loads((out / "eval.json").read_text())["shapes"]
    assert shapes["conditioning"]["guidance_scale"] == 2.0 and list(shapes["class_match_by_class"]) == ["square"]


def test_generate_unknown_class_and_stale_labels(shapes_pipeline, tmp_path, capsys):
    out = tmp_path / "out"
    assert _generate(shapes_pipeline, out, "--class", "hexagon") == 2
    err = capsys.readouterr().err
    assert "Unknown class name 'hexagon'. Known classes: circle, square, triangle" in err
    assert not out.exists()  # refused before any work
    # A second run into the folder is refused (its images would be scored with these); with overwrite an
    # unconditional run removes the labels.json the earlier conditional run left.
    assert _generate(shapes_pipeline, out, "--class", "circle") == 0 and (out / "labels.json").is_file()
    plain = make_pipeline()
    with pytest.raises(ValueError, match="already holds"):
        generate_images(plain, 2, seed=0, batch_size=2, num_inference_steps=1, out_dir=out)
    assert (out / "labels.json").is_file()
    generate_images(plain, 2, seed=0, batch_size=2, num_inference_steps=1, out_dir=out, overwrite=True)
    assert not (out / "labels.json").exists()


# ----------------------------------------------------------------------------- labels.json -> class_match


def _write_samples(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"image_{i:05d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / name)
    return names


def test_class_match_from_labels_file_is_exact(tmp_path):
    images, labels, _ = make_shapes(12, seed=7)
    images[10] = images[10][:, :1, :1]  # a flat image: no shape, invalid
    names = _write_samples(tmp_path, images)
    truth = [SHAPE_CLASSES[k] for k in labels]
    # Ask for the drawn class for images 0-5 and 10, for the next class for 6-9 and 11.
    requested = [t if i < 6 or i == 10 else SHAPE_CLASSES[(labels[i] + 1) % 3] for i, t in enumerate(truth)]
    write_labels_file(tmp_path, dict(zip(names, requested)), list(SHAPE_CLASSES), 3.0)
    assert generate.LABELS_FILE == shapes_score.LABELS_FILE

    result = run_eval_samples(tmp_path, dataset="builtin:shapes")["shapes"]
    assert result["n"] == 12 and result["n_valid"] == 11
    assert result["class_match"] == pytest.approx(6 / 12)
    assert result["class_match_among_valid"] == pytest.approx(6 / 11)
    for name in SHAPE_CLASSES:  # the per-class breakdown, counted independently
        mine = [i for i in range(12) if requested[i] == name]
        hits = [i for i in mine if i != 10 and truth[i] == name]
        entry = result["class_match_by_class"][name]
        assert entry["n"] == len(mine) and entry["class_match"] == pytest.approx(len(hits) / len(mine))
        shown = {c: sum(truth[i] == c for i in mine if i != 10) for c in SHAPE_CLASSES}
        assert entry["shown"] == {**shown, "invalid": int(10 in mine)}
    assert result["conditioning"] == {"labels_file": "labels.json", "guidance_scale": 3.0,
                                      "class_names": list(SHAPE_CLASSES)}
    line = summary_text({"folder": str(tmp_path), "shapes": result, "fid": {"value": None, "reason": "x"}})
    assert "50.0% of all images (54.5% of valid ones) at guidance 3" in line

    # Without labels.json: no class match.
    (tmp_path / "labels.json").unlink()
    assert "class_match" not in score_folder(tmp_path)


def test_labels_file_with_ids_and_bad_labels_files(tmp_path):
    images, labels, _ = make_shapes(3, seed=2)
    names = _write_samples(tmp_path, images)
    write_labels_file(tmp_path, dict(zip(names, labels.tolist())), list(SHAPE_CLASSES), 1.0)
    assert read_requested_classes(tmp_path)["labels"] == dict(zip(names, (SHAPE_CLASSES[k] for k in labels)))
    assert score_folder(tmp_path)["class_match"] == 1.0

    write_labels_file(tmp_path, dict(zip(names, ["circle", "dog", "square"])), ["circle", "dog", "square"], 1.0)
    with pytest.raises(DataError, match="asks for class 'dog', which is not a builtin:shapes class"):
        score_folder(tmp_path)
    write_labels_file(tmp_path, dict(zip(names, [0, 1, 2])), None, 1.0)
    with pytest.raises(DataError, match="the shapes scorer needs class names"):
        score_folder(tmp_path)
    write_labels_file(tmp_path, {names[0]: "circle", names[1]: "square"}, list(SHAPE_CLASSES), 1.0)
    with pytest.raises(DataError, match=r"1 image\(s\) not listed in it \(image_00002.png\)"):
        score_folder(tmp_path)
    write_labels_file(tmp_path, {**dict.fromkeys(names, "circle"), "image_00009.png": "circle"},
                      list(SHAPE_CLASSES), 1.0)
    with pytest.raises(DataError, match=r"1 listed image\(s\) missing \(image_00009.png\)"):
        score_folder(tmp_path)
    (tmp_path / "labels.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a labels file written by `ldm generate`"):
        score_folder(tmp_path)
