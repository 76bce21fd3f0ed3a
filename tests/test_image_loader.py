"""Streamed training images: every input format gives the folder's images in the folder's order, resume
and two-process sharding are exact, random crops are fresh at every draw, and bad data is skipped and counted."""

import io
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.data.step_batches import StepBatches
from ldm_core.config.settings import DataConfig
from ldm_core.data.image_files import BadImageError, DataError
from ldm_core.data.sources import open_image_source, source_kind
from ldm_core.data.training_images import TrainingImages, choose_loader

COUNT = 12


def photo(i: int) -> Image.Image:
    """A smooth, image-like picture of a size that needs resizing and cropping (no two alike)."""
    rng = np.random.default_rng(i)
    h, w = 40 + 4 * (i % 3), 48 + 2 * (i % 5)
    y, x = np.mgrid[0:h, 0:w] / 10.0
    channels = [np.sin(x * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(0.5, 2)) for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8))


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """The same COUNT images as a folder (two classes), as WebDataset shards and as Hugging Face datasets."""
    import datasets
    import webdataset

    root = tmp_path_factory.mktemp("formats")
    folder = root / "folder"
    names, pngs = [], []
    for i in range(COUNT):
        name = f"{'cat' if i % 2 else 'dog'}/img{i:03d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        photo(i).save(folder / name)
        names.append(name)
    names.sort()  # the folder's order: sorted relative paths
    pngs = [(folder / n).read_bytes() for n in names]
    shards = root / "shards"
    shards.mkdir()
    for s in range(3):
        with webdataset.TarWriter(str(shards / f"train-{s:04d}.tar")) as sink:
            for k in range(s * 4, s * 4 + 4):
                sink.write({"__key__": names[k][:-4].replace("/", "_"), "png": pngs[k]})
    labels = datasets.ClassLabel(names=["cat", "dog"])
    features = datasets.Features({"image": datasets.Image(), "label": labels})
    table = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in pngs],
                                        "label": [labels.str2int(n.split("/")[0]) for n in names]}, features=features)
    table.save_to_disk(str(root / "saved"))
    table.to_parquet(str(root / "images.parquet"))
    return {"folder": str(folder), "webdataset": str(shards / "train-{0000..0002}.tar"),
            "saved": str(root / "saved"), "parquet": str(root / "images.parquet")}


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp(tmp_path, monkeypatch):
    """datasets converts parquet into its cache folder; keep that inside the test's own folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def data_config(**changes) -> DataConfig:
    values = dict(resolution=32, val_count=2, flip=True, loader="stream", num_workers=0, crop="center")
    values.update(changes)
    return DataConfig(**values)


def step_batches(batch_size=3, world_size=1, rank=0):
    return lambda indices, flip: StepBatches(indices, batch_size, world_size, rank, seed=5, flip=flip)


def batches(spec, steps=range(4), **changes):
    images = TrainingImages(spec, data_config(**changes), step_batches(), seed=5, progress=False)
    out = [images.batch(step, torch.device("cpu")) for step in steps]
    images.close()
    return [x for x, _ in out], [i for _, i in out]


def test_source_kind_follows_the_data_argument(formats):
    assert source_kind("builtin:shapes") == "shapes"
    assert source_kind(formats["webdataset"]) == "webdataset"
    assert source_kind(formats["saved"]) == "huggingface" and source_kind(formats["parquet"]) == "huggingface"
    assert source_kind("hf:" + formats["folder"]) == "huggingface"
    assert source_kind(formats["folder"]) == "folder"
    assert source_kind("builtin:shapes-unseen-colours") == "shapes"
    with pytest.raises(DataError, match="builtin:shapes and builtin:shapes-unseen-colours"):
        source_kind("builtin:circles")


def test_the_unseen_colours_set_reads_alike_through_both_loaders():
    from ldm_core.data.in_memory import load_dataset
    from ldm_core.data.shapes import make_shapes

    spec = "builtin:shapes-unseen-colours"
    expected, labels, _ = make_shapes(12, seed=3, colours="unseen")
    held = load_dataset(spec, 64, shapes_count=12, shapes_seed=3, progress=False)
    assert np.array_equal(held.images, expected) and np.array_equal(held.labels, labels) and held.source == spec
    source = open_image_source(spec, shapes_count=12, shapes_seed=3)
    assert np.array_equal(np.asarray(source.open(5)).transpose(2, 0, 1), expected[5])
    assert source.fingerprint() != open_image_source("builtin:shapes", shapes_count=12, shapes_seed=3).fingerprint()


@pytest.mark.parametrize("kind", ["webdataset", "saved", "parquet"])
@pytest.mark.parametrize("crop", ["center", "random_resized"])
def test_every_format_gives_the_folders_images_in_the_folders_order(formats, kind, crop):
    expected, expected_idx = batches(formats["folder"], crop=crop)
    got, got_idx = batches(formats[kind], crop=crop)
    for a, b, i, j in zip(expected, got, expected_idx, got_idx):
        assert np.array_equal(i, j) and torch.equal(a, b)


def test_labels_come_from_subfolders_and_class_label_columns(formats):
    folder = open_image_source(formats["folder"])
    for kind in ("saved", "parquet"):
        source = open_image_source(formats[kind])
        assert source.class_names == folder.class_names == ["cat", "dog"]
        assert np.array_equal(source.labels, folder.labels)


def test_streamed_batches_equal_the_in_memory_ones_with_worker_processes(formats):
    memory, memory_idx = batches(formats["folder"], loader="memory")
    streamed, streamed_idx = batches(formats["folder"], loader="stream", num_workers=2)
    for a, b, i, j in zip(memory, streamed, memory_idx, streamed_idx):
        assert np.array_equal(i, j) and torch.equal(a, b)
    shapes_memory, _ = batches("builtin:shapes", loader="memory", resolution=64, shapes_count=32)
    shapes_stream, _ = batches("builtin:shapes", loader="stream", resolution=64, shapes_count=32)
    assert all(torch.equal(a, b) for a, b in zip(shapes_memory, shapes_stream))


def test_a_resumed_loader_draws_the_batches_it_would_have_drawn(formats):
    straight, _ = batches(formats["webdataset"], steps=range(7), crop="random", num_workers=2)
    resumed, _ = batches(formats["webdataset"], steps=range(5, 7), crop="random", num_workers=2)
    assert torch.equal(resumed[0], straight[5]) and torch.equal(resumed[1], straight[6])


def test_two_processes_read_disjoint_halves_of_the_global_batch(formats):
    spec, cfg = formats["folder"], data_config(crop="random")
    whole = TrainingImages(spec, cfg, step_batches(batch_size=4), seed=5, progress=False)
    ranks = [TrainingImages(spec, cfg, step_batches(batch_size=2, world_size=2, rank=r), seed=5, progress=False)
             for r in range(2)]
    for step in range(3):
        x, idx = whole.batch(step, torch.device("cpu"))
        parts = [r.batch(step, torch.device("cpu")) for r in ranks]
        assert not set(parts[0][1]) & set(parts[1][1])
        assert np.array_equal(np.concatenate([p[1] for p in parts]), idx)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)  # crops are seeded by global position


def test_random_crops_are_fresh_at_every_draw(formats):
    cfg = data_config(crop="random_resized", flip=False, val_count=0)
    images = TrainingImages(formats["folder"], cfg, step_batches(batch_size=COUNT), seed=5, progress=False)
    first, idx0 = images.batch(0, torch.device("cpu"))
    second, idx1 = images.batch(1, torch.device("cpu"))  # the next epoch: every image again
    order0, order1 = np.argsort(idx0), np.argsort(idx1)
    assert np.array_equal(idx0[order0], idx1[order1])
    differs = [not torch.equal(first[a], second[b]) for a, b in zip(order0, order1)]
    assert all(differs)
    centre = TrainingImages(formats["folder"], data_config(flip=False, val_count=0), step_batches(batch_size=COUNT),
                            seed=5, progress=False)
    assert torch.equal(centre.batch(0, torch.device("cpu"))[0][order0[0]],
                       centre.batch(1, torch.device("cpu"))[0][order1[0]])


def test_random_scaled_crops_draw_their_side_log_uniformly_and_never_enlarge():
    from ldm_core.data.crops import ImageTransform

    image, R = Image.new("RGB", (1024, 512)), 32
    rng = np.random.default_rng(0)
    boxes = [ImageTransform(R, "random_scaled", min_scale=1 / 64)._box(image, rng) for _ in range(4000)]
    sides = np.array([(right - left, bottom - top) for left, top, right, bottom in boxes])
    assert np.allclose(sides[:, 0], sides[:, 1])  # squares: no change of aspect ratio
    assert all(0 <= b[0] and 0 <= b[1] and b[2] <= 1024 and b[3] <= 512 for b in boxes)
    # Side fraction of the shorter side log-uniform in [1/8, 1]: each of the three octaves holds a third.
    octaves = np.histogram(np.log2(sides[:, 0] / 512), bins=[-3, -2, -1, 0])[0] / len(sides)
    assert np.allclose(octaves, 1 / 3, atol=0.03), octaves
    # A range reaching below R px is cut at R: the crop is never enlarged.
    small = [ImageTransform(R, "random_scaled", min_scale=1e-4)._box(Image.new("RGB", (100, 64)), rng)
             for _ in range(500)]
    assert min(b[2] - b[0] for b in small) >= R - 1e-9


def test_a_corrupt_tar_member_and_a_corrupt_file_are_skipped_and_counted(formats, tmp_path, caplog):
    import webdataset

    good = io.BytesIO()
    photo(0).save(good, format="PNG")
    with webdataset.TarWriter(str(tmp_path / "mixed.tar")) as sink:
        for k in range(6):
            sink.write({"__key__": f"s{k}", "png": b"not a png at all" if k == 2 else good.getvalue()})
    folder = tmp_path / "folder"
    folder.mkdir()
    for k in range(6):
        (folder / f"s{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken" if k == 2 else good.getvalue())
    for spec in (str(tmp_path / "mixed.tar"), str(folder)):
        caplog.clear()
        cfg = data_config(val_count=0, flip=False)
        with caplog.at_level(logging.WARNING, logger="ldm.data"):
            images = TrainingImages(spec, cfg, step_batches(batch_size=6), seed=5, progress=False)
            x, idx = images.batch(0, torch.device("cpu"))
            images.batch(1, torch.device("cpu"))
        assert x.shape[0] == 6 and 2 not in idx  # replaced by another training image
        assert len(images.skipped) == 1 and list(images.skipped.values()) in (["corrupt"], ["unreadable"])
        assert images.summary()["skipped_while_streaming"] == 1
        assert sum("skipping" in r.message for r in caplog.records) == 1  # one warning, not one per draw


def test_a_shard_that_cannot_be_opened_is_named_and_the_rest_is_used(formats, tmp_path, caplog):
    shards = formats["webdataset"].replace("{0000..0002}", "{0000..0003}")  # 0003 does not exist
    with caplog.at_level(logging.WARNING, logger="ldm.data"):
        source = open_image_source(shards)
    assert len(source) == COUNT and any("train-0003.tar" in r.message for r in caplog.records)
    (tmp_path / "bad.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError, match="No readable WebDataset shard.*bad.tar"):
        open_image_source(str(tmp_path / "bad.tar"))


def test_auto_holds_small_centre_cropped_folders_in_memory_and_streams_the_rest():
    assert choose_loader("auto", "folder", 1000, 64, "center")[0] == "memory"
    assert choose_loader("auto", "shapes", 4096, 64, "center")[0] == "memory"
    assert choose_loader("auto", "folder", 100_000, 256, "center")[0] == "stream"  # 18.3 GiB decoded
    assert choose_loader("auto", "folder", 1000, 64, "random")[0] == "stream"
    assert choose_loader("auto", "webdataset", 10, 64, "center")[0] == "stream"
    with pytest.raises(DataError, match="data.loader=stream"):
        choose_loader("memory", "folder", 10, 64, "random")
    with pytest.raises(DataError, match="streamed"):
        choose_loader("memory", "huggingface", 10, 64, "center")


def test_decoded_images_are_kept_within_their_budget_and_change_no_crop(formats):
    from ldm_core.data.loader import DrawnImages
    from ldm_core.data.crops import ImageTransform

    source = open_image_source(formats["folder"])
    opened = []
    original = source.open
    source.open = lambda i: (opened.append(i), original(i))[1]
    transform, pool = ImageTransform(32, "random_resized"), np.arange(COUNT)
    draws = [(0, i % 4, False, [1, k]) for k, i in enumerate(range(12))]  # images 0-3, three times each
    plain = [DrawnImages(source, transform, pool)[d]["image"] for d in draws]
    assert len(opened) == 12
    opened.clear()
    cached = DrawnImages(source, transform, pool, decoded_cache_bytes=10**8)
    assert all(torch.equal(a, cached[d]["image"]) for a, d in zip(plain, draws))
    assert sorted(opened) == [0, 1, 2, 3]  # each decoded once
    opened.clear()
    one_image = photo(0).width * photo(0).height * 3
    small = DrawnImages(source, transform, pool, decoded_cache_bytes=one_image * 2)  # room for two of the four
    for d in draws:
        small[d]
    assert len(opened) == 12 and small._decoded_bytes <= one_image * 2


def test_shards_read_cls_labels_and_name_a_sample_without_an_image(tmp_path):
    import webdataset

    good = io.BytesIO()
    photo(0).save(good, format="PNG")
    with webdataset.TarWriter(str(tmp_path / "labelled.tar")) as sink:
        for k in range(5):
            sink.write({"__key__": f"s{k}", "png": good.getvalue(), "cls": str(k % 3).encode()})
        sink.write({"__key__": "text_only", "txt": b"no image here", "cls": b"1"})
    source = open_image_source(str(tmp_path / "labelled.tar"))
    assert source.labels.tolist() == [0, 1, 2, 0, 1, 1] and source.class_names == ["0", "1", "2"]
    assert np.array_equal(np.asarray(source.open(3)), np.asarray(Image.open(io.BytesIO(good.getvalue())).convert("RGB")))
    with pytest.raises(BadImageError, match="'text_only' has no image member"):
        source.open(5)
    # A worker gets its own copy (no descriptors travel) that reads the same bytes.
    clone = pickle.loads(pickle.dumps(source))
    assert np.array_equal(np.asarray(clone.open(4)), np.asarray(source.open(4)))
