"""Data layer: decoding every kind of file, bad files, labels, splitting, the batches of each step, streaming
and the cache."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.data import image_files as data_module
from ldm_core.data.step_batches import StepBatches, train_val_split
from ldm_core.data.image_files import BadImageError, DataError, list_image_files, load_image_uint8
from ldm_core.data.in_memory import load_dataset
from ldm_core.data.streaming import iter_image_batches
from ldm_core.image_values import to_model_input, to_uint8
from ldm_core.data.shapes import make_shapes

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(h, w, colour):
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (h, w, 3)).copy()


def good_folder(root, write_image, count=3, size=24):
    for i in range(count):
        write_image(root / f"img_{i}.png", solid(size, size, (10 * i, 100, 200)))
    return root


def pixel(chw, y, x):
    return tuple(int(v) for v in chw[:, y, x])


# ----------------------------------------------------------------------------- bad files


def test_bad_files_are_skipped_with_one_warning_each(tmp_path, bad_files, write_image, caplog):
    folder = bad_files["text"].parent
    good_folder(folder, write_image)
    with caplog.at_level(logging.INFO, logger="ldm.data"):
        result = load_dataset(str(folder), 16, progress=False)
    assert len(result) == 3 and result.images.shape == (3, 3, 16, 16)
    assert result.names == ["img_0.png", "img_1.png", "img_2.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(bad_files)
    for path in bad_files.values():
        assert sum(path.name in w for w in warnings) == 1
    report = result.report
    assert report.total_files == 7 and len(report.skipped) == 4
    assert report.skipped_kinds == {"empty": 1, "truncated": 2, "unreadable": 1}
    assert report.summary().startswith("3 images loaded from 7 files: 4 skipped (")
    assert any(report.summary() in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


@pytest.mark.parametrize("kind", ["text", "truncated_png", "truncated_jpeg", "empty"])
def test_each_bad_file_raises_bad_image_error(bad_files, kind):
    with pytest.raises(BadImageError) as info:
        load_image_uint8(bad_files[kind], 16)
    assert str(info.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [40, 50])  # 1600 px: Pillow only warns; 2500 px: Pillow raises
def test_decompression_bombs_are_refused(tmp_path, write_image, monkeypatch, side):
    path = write_image(tmp_path / "bomb.png", solid(side, side, RED))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImageError, match="decompression bomb") as info:
        load_image_uint8(path, 16)
    assert info.value.kind == "decompression bomb"


def test_empty_folder_missing_path_and_all_bad_folder(tmp_path, bad_files):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No image files in .*empty.*Supported extensions"):
        load_dataset(str(tmp_path / "empty"), 16, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere"), 16, progress=False)
    with pytest.raises(DataError, match="is a file"):
        load_dataset(str(bad_files["text"]), 16, progress=False)
    with pytest.raises(DataError, match=r"No usable image in .*bad: 4 files, all skipped"):
        load_dataset(str(bad_files["text"].parent), 16, progress=False)
    with pytest.raises(DataError, match="builtin:shapes"):
        load_dataset("builtin:faces", 16)


# ----------------------------------------------------------------------------- modes


def test_modes_convert_to_rgb_with_correct_colours(tmp_path):
    cases = []
    Image.new("L", (8, 8), 100).save(tmp_path / "gray.png")
    cases.append(("gray.png", (100, 100, 100)))
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    rgba.paste((200, 0, 0, 0), (0, 0, 8, 8))  # fully transparent red: composited on white
    rgba.save(tmp_path / "clear.png")
    cases.append(("clear.png", (255, 255, 255)))
    Image.new("RGBA", (8, 8), (0, 0, 255, 255)).save(tmp_path / "opaque.png")
    cases.append(("opaque.png", BLUE))
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    cases.append(("palette.png", (12, 34, 56)))
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    cases.append(("cmyk.tif", RED))
    Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    cases.append(("deep.png", (128, 128, 128)))
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), GREEN)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    cases.append(("anim.gif", RED))
    for name, colour in cases:
        array, upscaled = load_image_uint8(tmp_path / name, 8)
        assert array.dtype == np.uint8 and array.shape == (3, 8, 8) and array.flags.c_contiguous, name
        assert not upscaled
        assert np.array_equal(array, np.broadcast_to(np.array(colour, np.uint8)[:, None, None],
                                                     (3, 8, 8))), name


def test_sixteen_bit_values_are_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 257, 65535, 32896]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    array, _ = load_image_uint8(tmp_path / "ramp.png", 4)
    assert array[0, 0].tolist() == [0, 1, 255, 128]


def test_exif_orientation_is_applied(tmp_path):
    # 40 wide x 20 tall, left half red, right half blue. Orientation 6 means "rotate 90 degrees
    # clockwise to display": the left half ends up on top. Without the rotation the centre crop would
    # be split left/right instead.
    image = np.concatenate([solid(20, 20, RED), solid(20, 20, BLUE)], axis=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image).save(tmp_path / "rotated.png", exif=exif)
    array, _ = load_image_uint8(tmp_path / "rotated.png", 20)
    assert pixel(array, 2, 10) == RED and pixel(array, 17, 10) == BLUE
    assert pixel(array, 2, 2) == pixel(array, 2, 17) == RED


def test_small_images_are_upscaled_and_counted(tmp_path, write_image):
    write_image(tmp_path / "a_small.png", solid(16, 16, RED))
    write_image(tmp_path / "b_big.png", solid(64, 48, GREEN))
    array, upscaled = load_image_uint8(tmp_path / "a_small.png", 32)
    assert upscaled and array.shape == (3, 32, 32) and pixel(array, 5, 5) == RED
    result = load_dataset(str(tmp_path), 32, progress=False)
    assert result.report.upscaled == 1
    assert "1 upscaled" in result.report.summary()


def test_shorter_side_resize_and_centre_crop_geometry(tmp_path, write_image):
    # Wide: three 32-px vertical bands (red, green, blue), 96 x 32. At R=16 the short side halves and
    # the centre 16 columns of the 48-wide result are the green band.
    wide = np.concatenate([solid(32, 32, RED), solid(32, 32, GREEN), solid(32, 32, BLUE)], axis=1)
    write_image(tmp_path / "wide.png", wide)
    array, upscaled = load_image_uint8(tmp_path / "wide.png", 16)
    assert not upscaled
    # Independent two-step computation: resize the whole image, then crop.
    reference = np.asarray(Image.fromarray(wide).resize((48, 16), Image.Resampling.BICUBIC))[:, 16:32]
    assert np.abs(array.transpose(1, 2, 0).astype(int) - reference.astype(int)).max() <= 1
    assert np.array_equal(array[:, :, 3:13], np.broadcast_to(np.array(GREEN, np.uint8)[:, None, None],
                                                             (3, 16, 10)))
    # Tall: horizontal bands; the crop keeps the middle band.
    tall = np.concatenate([solid(30, 30, RED), solid(30, 30, GREEN), solid(30, 30, BLUE)], axis=0)
    write_image(tmp_path / "tall.png", tall)
    array, _ = load_image_uint8(tmp_path / "tall.png", 30)
    assert pixel(array, 15, 15) == GREEN and pixel(array, 2, 0) == GREEN and pixel(array, 27, 29) == GREEN


# ----------------------------------------------------------------------------- folders and labels


def test_list_image_files_is_sorted_recursive_and_survives_symlink_loops(tmp_path, write_image):
    write_image(tmp_path / "b" / "x.PNG", solid(4, 4, RED))
    write_image(tmp_path / "a.jpg", solid(4, 4, RED))
    (tmp_path / "readme.txt").write_text("not an image")
    os.symlink(tmp_path, tmp_path / "b" / "loop")
    files = list_image_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.jpg", "b/x.PNG"]


def test_labels_from_first_level_subfolders(tmp_path, write_image):
    write_image(tmp_path / "dog" / "1.png", solid(8, 8, RED))
    write_image(tmp_path / "cat" / "deep" / "2.png", solid(8, 8, GREEN))
    write_image(tmp_path / "cat" / "3.png", solid(8, 8, BLUE))
    result = load_dataset(str(tmp_path), 8, progress=False)
    assert result.class_names == ["cat", "dog"]
    assert result.names == ["cat/3.png", "cat/deep/2.png", "dog/1.png"]
    assert result.labels.dtype == np.int64 and result.labels.tolist() == [0, 0, 1]
    write_image(tmp_path / "loose.png", solid(8, 8, RED))
    result = load_dataset(str(tmp_path), 8, progress=False)
    assert result.labels is None and result.class_names is None


def test_builtin_shapes():
    result = load_dataset("builtin:shapes", 64, shapes_count=30, shapes_seed=3)
    images, labels, _ = make_shapes(30, 3)
    assert np.array_equal(result.images, images) and np.array_equal(result.labels, labels)
    assert result.class_names == ["circle", "square", "triangle"] and result.source == "builtin:shapes"
    resized = load_dataset("builtin:shapes", 32, shapes_count=30, shapes_seed=3)
    expected = np.asarray(Image.fromarray(images[4].transpose(1, 2, 0)).resize(
        (32, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert resized.images.shape == (30, 3, 32, 32) and np.array_equal(resized.images[4], expected)


# ----------------------------------------------------------------------------- split and ranges


def test_train_val_split():
    train, val = train_val_split(100, 10, seed=1)
    again_train, again_val = train_val_split(100, 10, seed=1)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert len(val) == 10 and not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(100))
    assert not np.array_equal(val, train_val_split(100, 10, seed=2)[1])
    train, val = train_val_split(5, 64, seed=0)  # clipped: one training image remains
    assert len(train) == 1 and len(val) == 4
    with pytest.raises(DataError):
        train_val_split(0, 1, seed=0)


def test_value_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = to_model_input(x)
    assert y.dtype == torch.float32 and y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(to_uint8(y), x)
    assert to_uint8(torch.tensor([-3.0, 0.0, 2.0])).tolist() == [0, 128, 255]
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(y)


# ----------------------------------------------------------------------------- the batches of each step
# A step's batch is a function of the step, so a resumed run draws the batches it would have drawn.


def test_step_batches_are_a_function_of_the_step():
    indices = np.arange(100, 150)
    a = StepBatches(indices, batch_size=4, world_size=1, rank=0, seed=3, flip=True)
    b = StepBatches(indices, batch_size=4, world_size=1, rank=0, seed=3, flip=True)
    for step in (0, 5, 11, 12, 40):
        ia, fa = a(step)
        ib, fb = b(step)
        assert np.array_equal(ia, ib) and np.array_equal(fa, fb)
    # One epoch (12 steps of 4 from 50 images) visits distinct images only.
    seen = np.concatenate([a(s)[0] for s in range(a.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == 48
    assert set(seen.tolist()) <= set(indices.tolist())
    assert not np.array_equal(a(0)[0], a(12)[0])  # a new permutation next epoch
    flips = np.concatenate([a(s)[1] for s in range(a.steps_per_epoch)])
    assert 0 < flips.mean() < 1


def test_step_batches_shard_the_global_batch():
    indices = np.arange(64)
    single = StepBatches(indices, batch_size=8, world_size=1, rank=0, seed=0, flip=False)
    r0 = StepBatches(indices, batch_size=4, world_size=2, rank=0, seed=0, flip=False)
    r1 = StepBatches(indices, batch_size=4, world_size=2, rank=1, seed=0, flip=False)
    for step in range(3):
        assert np.array_equal(np.concatenate([r0(step)[0], r1(step)[0]]), single(step)[0])


def test_too_few_images_for_a_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatches(np.arange(3), batch_size=4, world_size=1, rank=0, seed=0, flip=False)


# ----------------------------------------------------------------------------- streaming


def test_iter_image_batches_shards_and_skips(tmp_path, write_image, bad_files, caplog):
    folder = bad_files["text"].parent
    for i in range(7):
        write_image(folder / f"g{i}.png", solid(12, 12, (i * 30, 0, 0)))
    single = list(iter_image_batches(str(folder), 8, batch_size=3))
    indices = np.concatenate([b[0] for b in single])
    assert indices.tolist() == list(range(7)) and [len(b[0]) for b in single] == [3, 3, 1]
    assert sum((b[2] for b in single), []) == [f"g{i}.png" for i in range(7)]
    shards = [list(iter_image_batches(str(folder), 8, batch_size=2, rank=r, world_size=2))
              for r in (0, 1)]
    merged = {}
    for rank, batches in enumerate(shards):
        for idx, images, names, _ in batches:
            assert all(k % 2 == rank for k in idx)
            merged.update({int(k): (img, n) for k, img, n in zip(idx, images, names)})
    images_single = np.concatenate([b[1] for b in single])
    assert sorted(merged) == list(range(7))
    assert all(np.array_equal(merged[k][0], images_single[k]) for k in range(7))
    limited = list(iter_image_batches(str(folder), 8, batch_size=10, limit=4))
    assert limited[0][0].tolist() == [0, 1, 2, 3]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        list(iter_image_batches(str(folder), 8, batch_size=4))
    assert sum("notes.png" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(DataError, match="does not exist"):
        iter_image_batches(str(tmp_path / "missing"), 8, batch_size=2)


def test_iter_image_batches_builtin_matches_load_dataset():
    full = load_dataset("builtin:shapes", 32, shapes_count=10, progress=False)
    batches = list(iter_image_batches("builtin:shapes", 32, batch_size=4, rank=1, world_size=2,
                                      shapes_count=10))
    idx = np.concatenate([b[0] for b in batches])
    assert idx.tolist() == [1, 3, 5, 7, 9]
    assert np.array_equal(np.concatenate([b[1] for b in batches]), full.images[idx])
    assert batches[0][2][0] == "shapes_000001"


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_and_bad_cache_files_are_not(tmp_path, write_image, monkeypatch, caplog):
    folder = good_folder(tmp_path / "images", write_image, count=4)
    cache = tmp_path / "cache"
    first = load_dataset(str(folder), 16, cache_dir=cache, progress=False)
    (npy,) = cache.glob("*.npy")
    assert not list(cache.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(data_module, "load_image_uint8", no_decoding)
    second = load_dataset(str(folder), 16, cache_dir=cache, progress=False)
    assert isinstance(second.images, np.memmap) and np.array_equal(second.images, first.images)
    assert second.names == first.names and second.report.summary() == first.report.summary()
    monkeypatch.undo()

    # A half-written array (cut short) is detected and rebuilt.
    npy.write_bytes(npy.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        third = load_dataset(str(folder), 16, cache_dir=cache, progress=False)
    assert any("unusable cache" in r.getMessage() for r in caplog.records)
    assert np.array_equal(third.images, first.images)
    # Garbage in place of the array is not used either.
    npy.write_bytes(b"garbage" * 1000)
    assert np.array_equal(load_dataset(str(folder), 16, cache_dir=cache, progress=False).images,
                          first.images)
    # A changed file changes the key: a second cache entry appears.
    write_image(folder / "img_0.png", solid(30, 30, RED))
    changed = load_dataset(str(folder), 16, cache_dir=cache, progress=False)
    assert pixel(changed.images[0], 8, 8) == RED and len(list(cache.glob("*.npy"))) == 2


def test_shuffle_channels_reorders_each_image_alone_and_reproducibly():
    from ldm_core.data.step_batches import shuffle_channels
    from ldm_core.randomness import seeded_generator

    # Channel c of image i holds the value 10 * i + c, so every output channel names its source.
    batch = (torch.arange(64)[:, None] * 10 + torch.arange(3)[None, :]).float()[:, :, None, None].expand(64, 3, 4, 4)
    out = shuffle_channels(batch, seeded_generator(0, 5, 0, 1))
    assert torch.equal(out, shuffle_channels(batch, seeded_generator(0, 5, 0, 1)))  # same stream, same orders
    sources = out[:, :, 0, 0] - batch[:, :1, 0, 0]
    orders = {tuple(int(v) for v in row) for row in sources}
    assert all(sorted(order) == [0, 1, 2] for order in orders)  # a permutation of the image's own channels
    assert len(orders) == 6  # 64 images draw all six orders of RGB
    assert torch.equal(out.sum(dim=1), batch.sum(dim=1))  # nothing but the order changes


def test_reexpose_moves_each_images_mean_and_contrast_alone_and_reproducibly():
    from ldm_core.data.step_batches import reexpose
    from ldm_core.randomness import seeded_generator

    torch.manual_seed(0)
    batch = torch.rand(64, 3, 8, 8) * 0.5 - 0.25  # mid-tones only, as a few photographs give
    assert torch.equal(reexpose(batch, seeded_generator(0, 3, 0, 2), 0.0), batch)  # off: untouched
    out = reexpose(batch, seeded_generator(0, 3, 0, 2), 1.0)
    assert torch.equal(out, reexpose(batch, seeded_generator(0, 3, 0, 2), 1.0))  # same stream, same exposures
    assert out.min() >= -1 and out.max() <= 1
    # Black and white now occur (clipped), and the images' means span the range instead of sitting at 0.
    assert (out == -1).any() and (out == 1).any() and out.mean(dim=(1, 2, 3)).std() > 0.3
    # Where nothing is clipped, an image is an affine map of itself with one gain for its three channels.
    for x, y in zip(batch, out):
        inside = (y > -1) & (y < 1)
        if inside.all():
            dx, dy = x - x.mean(), y - y.mean()
            gain = (dx * dy).sum() / dx.square().sum()
            assert 0.5 - 1e-6 <= gain <= 2 + 1e-6 and torch.allclose(dy, gain * dx, atol=1e-5)
    half = reexpose(batch, seeded_generator(0, 3, 0, 2), 0.5)
    changed = [not torch.equal(a, b) for a, b in zip(half, batch)]
    assert 16 < sum(changed) < 48  # about half of 64


def test_resaturate_reaches_the_edges_of_the_colour_cube_and_keeps_grey():
    from ldm_core.data.step_batches import resaturate
    from ldm_core.randomness import seeded_generator

    torch.manual_seed(1)
    batch = torch.rand(64, 3, 8, 8) * 0.6 - 0.3  # muted colours, as photographs have
    assert torch.equal(resaturate(batch, seeded_generator(0, 4, 0, 3), 0.0), batch)
    out = resaturate(batch, seeded_generator(0, 4, 0, 3), 1.0)
    assert torch.equal(out, resaturate(batch, seeded_generator(0, 4, 0, 3), 1.0))
    assert out.min() >= -1 and out.max() <= 1 and ((out == -1) | (out == 1)).any()
    # A grey pixel stays grey; where nothing clips, each pixel's mean over its channels is kept.
    grey = torch.zeros(4, 3, 2, 2) + torch.linspace(-0.5, 0.5, 4)[:, None, None, None]
    assert torch.equal(resaturate(grey, seeded_generator(0, 4, 0, 3), 1.0), grey)
    inside = ((out > -1) & (out < 1)).all(dim=1)
    torch.testing.assert_close(out.mean(dim=1)[inside], batch.mean(dim=1)[inside], atol=1e-5, rtol=0)
    spread = lambda x: (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2))  # noqa: E731 - chroma per image
    assert (spread(out) / spread(batch)).max() > 2 and (spread(out) / spread(batch)).min() < 1  # up and down
