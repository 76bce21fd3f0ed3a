"""Where training images come from, read one image at a time by index: a folder, WebDataset tar shards,
a local Hugging Face dataset, or the built-in shapes.

Every source is random access (`open(i)` decodes image i), holds no decoded pixels and is picklable, so
DataLoader workers can read it and the image of a training position is a function of the position
whatever the format: the same images in the same order from a folder and from the shards made of it.

`--data` chooses the source:
- ``builtin:shapes``: the procedural dataset (`ldm_core/data/shapes.py`);
- a path with ``.tar`` or a brace range: WebDataset shards, e.g. ``'shards/train-{000000..000099}.tar'``,
  read with `wids` (webdataset's indexed reader): one sample per key, the image from its first member
  whose extension is an image type, an optional integer label from ``.cls``;
- ``hf:PATH``, or a folder written by `datasets.save_to_disk`, or ``.parquet`` files: a local Hugging
  Face dataset (`datasets.load_from_disk`, or `load_dataset("parquet" | "imagefolder")`), the image from
  its first `Image` column (or `data.image_column`), labels from its first `ClassLabel` column (or
  `data.label_column`);
- ``hf:NAME[:SPLIT]`` where NAME is not a path here: a dataset on the Hugging Face Hub
  (`datasets.load_dataset(NAME, split=SPLIT)`, downloaded and memory-mapped by `datasets` into its cache on
  first use; from the cache offline), or, for readers that take each image once in order (`ldm bench-recon`,
  `ldm eval-samples`), streamed without a download when asked (`streaming=True`);
- any other folder: image files searched recursively, labels from first-level subfolders.
"""

from __future__ import annotations

import bisect
import functools
import glob
import hashlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image

from ldm_core.data.image_files import (BUILTIN_SHAPES, IMAGE_EXTENSIONS, SHAPES_COLOUR_SETS, BadImageError, DataError, decode_rgb,
                                  require_image_files)
from ldm_core.data.shapes import SHAPE_CLASSES, make_shapes

logger = logging.getLogger("ldm.data")

SHAPES_SIZE = 64  # the shapes are defined at 64x64 (ldm_core/data/shapes.py)
_IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in sorted(IMAGE_EXTENSIONS))


class ImageSource:
    """A random-access dataset of images. Subclasses set `kind`, `spec`, `labels`, `class_names`."""

    kind = ""
    spec = ""
    labels: Optional[np.ndarray] = None  # int64 (N,), or None
    class_names: Optional[list[str]] = None

    def __len__(self) -> int:
        raise NotImplementedError

    def in_order(self) -> Iterator[tuple[str, Callable[[], Image.Image]]]:
        """Every image in order, as (name, a call that decodes it): how readers that take each image once go
        through a source, a stream included (the calls may run on other threads)."""
        for index in range(len(self)):
            yield self.name(index), functools.partial(self.open, index)

    def name(self, index: int) -> str:
        """A stable name of image `index` for warnings and reports."""
        raise NotImplementedError

    def open(self, index: int) -> Image.Image:
        """Image `index` decoded to RGB; raises `BadImageError` when it cannot be used."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest that changes whenever the images may have changed (names, sizes, times, versions)."""
        raise NotImplementedError


class ShapesSource(ImageSource):
    kind = "shapes"

    def __init__(self, count: int, seed: int, spec: str = BUILTIN_SHAPES):
        self.spec, self.count, self.seed = spec, int(count), int(seed)
        self.images, self.labels, _ = make_shapes(self.count, self.seed, SHAPES_SIZE, SHAPES_COLOUR_SETS[spec])
        self.class_names = list(SHAPE_CLASSES)

    def __len__(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return f"shapes_{index:06d}"

    def open(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index].transpose(1, 2, 0))

    def fingerprint(self) -> str:
        # v2: colours from the whole RGB cube (v1 had an eight-colour palette).
        return hashlib.sha256(f"shapes-v2|{self.count}|{self.seed}|{SHAPES_COLOUR_SETS[self.spec]}".encode()).hexdigest()


class FolderSource(ImageSource):
    kind = "folder"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.spec = str(self.root)
        self.files = require_image_files(self.root)
        self.names = [path.relative_to(self.root).as_posix() for path in self.files]
        self.labels, self.class_names = folder_labels(self.names)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return self.names[index]

    def open(self, index: int) -> Image.Image:
        return decode_rgb(self.files[index])

    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"folder|")
        hash_file_list(digest, self.root, self.files)
        return digest.hexdigest()


def hash_file_list(digest, root: Path, files: list[Path]) -> None:
    """Add the folder, and each file's relative name, size and modification time, to `digest`."""
    # os.fsencode gives back the exact bytes of names that are not valid UTF-8 (str.encode would fail).
    digest.update(os.fsencode(root.resolve()))
    for path in files:
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a broken link: skipped when decoded; (-1, -1) still marks it
            size = mtime = -1
        digest.update(b"|" + os.fsencode(path.relative_to(root).as_posix()) + f"|{size}|{mtime}".encode())


class TarShardSource(ImageSource):
    """WebDataset shards, indexed once at start-up and then read by offset.

    `wids` (webdataset's indexed reader) parses each shard's headers and groups its members into samples;
    of each sample only the offset and size of its image member are kept (16 bytes a sample, so an index
    of a million images is 16 MB) and, when the sample has one, its ``.cls`` label. A read is one `pread`
    of the image's bytes from a kept file descriptor: random access over thousands of shards never parses
    a header again. A shard that cannot be opened is named in a warning and left out.
    """

    kind = "webdataset"
    _OPEN_FILES = 64  # descriptors kept open per process; reopening a file costs microseconds, not a parse

    def __init__(self, pattern: str):
        import braceexpand

        self.spec = pattern
        paths = [p for part in braceexpand.braceexpand(pattern) for p in (sorted(glob.glob(part)) or [part])]
        self.shards: list[str] = []
        self.sizes: list[int] = []
        offsets, lengths, keys, labels, bad = [], [], [], [], []
        for path in paths:
            try:
                shard = _index_shard(path)
            except Exception as err:  # wids raises assertion, OS and parse errors alike
                bad.append(path)
                logger.warning("skipping WebDataset shard %s: it cannot be opened (%s)", path, _reason(err))
                continue
            self.shards.append(path)
            self.sizes.append(len(shard["offsets"]))
            offsets += shard["offsets"]
            lengths += shard["lengths"]
            keys += shard["keys"]
            labels += shard["labels"]
        if not self.shards:
            raise DataError(f"No readable WebDataset shard in {pattern!r} ({len(paths)} named, "
                            f"{len(bad)} unreadable: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}).")
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64).tolist()
        self.offsets = np.asarray(offsets, dtype=np.int64)  # -1: the sample has no image member
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.keys = keys
        if all(label is not None for label in labels):
            self.labels = np.asarray(labels, dtype=np.int64)
            self.class_names = [str(c) for c in range(int(self.labels.max()) + 1)]
        elif any(label is not None for label in labels):
            logger.warning("%s: only %d of %d samples have a .cls label; training unconditionally",
                           pattern, sum(label is not None for label in labels), len(labels))
        self.skipped_shards = bad
        self._files: dict[int, int] = {}
        self._lock = threading.Lock()  # evaluation decodes on a thread pool; files are opened and closed here

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}  # file descriptors belong to the process: each worker opens its own
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def _descriptor(self, shard: int) -> int:
        with self._lock:
            fd = self._files.pop(shard, None)  # re-inserted below: the dict's order is least recently used first
            if fd is None:
                if len(self._files) >= self._OPEN_FILES:
                    os.close(self._files.pop(next(iter(self._files))))
                fd = os.open(self.shards[shard], os.O_RDONLY)
            self._files[shard] = fd
            return fd

    def name(self, index: int) -> str:
        shard, local = self._locate(index)
        return f"{Path(self.shards[shard]).name}#{local}"

    def open(self, index: int) -> Image.Image:
        shard, _ = self._locate(index)
        if self.offsets[index] < 0:
            raise BadImageError(f"sample {self.keys[index]!r} has no image member", kind="no image")
        try:
            data = os.pread(self._descriptor(shard), int(self.lengths[index]), int(self.offsets[index]))
        except OSError as err:
            raise BadImageError(f"tar member unreadable: {_reason(err)}", kind="unreadable") from None
        if len(data) != self.lengths[index]:
            raise BadImageError("tar member unreadable: the shard is shorter than its index", kind="unreadable")
        return decode_rgb(data)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"webdataset")
        for path, count in zip(self.shards, self.sizes):
            st = os.stat(path)
            digest.update(f"|{os.path.abspath(path)}|{count}|{st.st_size}|{st.st_mtime_ns}".encode())
        return digest.hexdigest()


def _index_shard(path: str) -> dict:
    """One shard's samples, from wids's index: each sample's key, the byte range of its image, its label."""
    import wids

    samples = wids.wids.IndexedTarSamples(path=path)
    try:
        members = samples.reader.by_index  # (name, header offset, size) of every file, in tar order
        shard = {"offsets": [], "lengths": [], "keys": [], "labels": []}
        for indexes in samples.samples:
            by_suffix = {}
            for i in indexes:
                name, header, size = members[i]
                key, suffix = wids.wids.splitname(name)
                by_suffix[suffix.lower().lstrip(".")] = (header + 512, size)  # the data follows its 512-byte header
            image = next((by_suffix[s] for s in _IMAGE_SUFFIXES if s in by_suffix), (-1, 0))
            label = None
            if "cls" in by_suffix:
                start, size = by_suffix["cls"]
                label = int(bytes(samples.reader.mmapped_file[start:start + size]).decode().strip())
            shard["offsets"].append(image[0])
            shard["lengths"].append(image[1])
            shard["keys"].append(key)
            shard["labels"].append(label)
        return shard
    finally:
        samples.close()


def _reason(err: Exception) -> str:
    return str(err) or type(err).__name__


# A dataset on the Hub, `hf:NAME[:SPLIT]`: NAME is `org/name` (or a legacy name without an org, which the
# Hub redirects), SPLIT one of the dataset's splits (default: train, else its first).
_HUB_DATASET = re.compile(r"^(?P<name>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?::(?P<split>[\w.-]+))?$")


def hub_dataset_name(path: str) -> Optional[tuple[str, Optional[str]]]:
    """(name, split) when the part after `hf:` names a Hub dataset rather than a path here, else None."""
    match = _HUB_DATASET.match(path)
    if match is None or Path(path).expanduser().exists() or path.startswith((".", "~")):
        return None
    return match.group("name"), match.group("split")


class HFDatasetSource(ImageSource):
    kind = "huggingface"

    def __init__(self, path: str, image_column: Optional[str] = None, label_column: Optional[str] = None,
                 streaming: bool = False):
        import datasets

        self.spec = path
        self.streaming = False
        location = Path(path).expanduser()
        hub = hub_dataset_name(path)
        try:
            if (location / "state.json").is_file() or (location / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(location))
            elif location.suffix == ".parquet" or (location.is_dir() and any(location.glob("**/*.parquet"))):
                files = [str(location)] if location.is_file() else sorted(map(str, location.glob("**/*.parquet")))
                loaded = datasets.load_dataset("parquet", data_files=files, split="train")
            elif location.is_dir():
                loaded = datasets.load_dataset("imagefolder", data_dir=str(location), split="train")
            elif hub is not None:
                loaded = _load_hub_dataset(*hub, streaming=streaming)
                self.streaming = streaming
            else:
                raise DataError(f"Hugging Face dataset {path} does not exist.")
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"Cannot open {path} as a Hugging Face dataset: {_reason(err)}") from None
        if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            split = "train" if "train" in loaded else sorted(loaded)[0]
            loaded = loaded[split]
        features = loaded.features
        images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
        self.image_column = image_column or (images[0] if images else None)
        if self.image_column not in features:
            raise DataError(f"{path} has no image column{f' named {image_column!r}' if image_column else ''}; "
                            f"its columns are {', '.join(features)}. Set data.image_column.")
        # Raw bytes, so that our decoder and its bad-image rules apply as for files.
        self.dataset = loaded.cast_column(self.image_column, datasets.Image(decode=False))
        classes = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
        self.label_column = label_column or (classes[0] if classes else None)
        if self.label_column is not None:
            if self.label_column not in features:
                raise DataError(f"{path} has no column {label_column!r} (data.label_column); its columns "
                                f"are {', '.join(features)}.")
            feature = features[self.label_column]
            if not self.streaming:  # a stream's labels are only known as it is read
                self.labels = np.asarray(self.dataset[self.label_column], dtype=np.int64)
            self.class_names = (list(feature.names) if isinstance(feature, datasets.ClassLabel)
                                else None if self.streaming else [str(c) for c in range(int(self.labels.max()) + 1)])

    def __len__(self) -> int:
        if self.streaming:
            raise DataError(f"hf:{self.spec} is read as a stream, so its images are only reachable in order; "
                            f"read it without streaming for random access (training).")
        return len(self.dataset)

    def name(self, index: int) -> str:
        return f"{Path(self.spec).name}[{index}]"

    def open(self, index: int) -> Image.Image:
        return self._decode(self.dataset[int(index)][self.image_column])

    def in_order(self) -> Iterator[tuple[str, Callable[[], Image.Image]]]:
        if not self.streaming:
            yield from super().in_order()
            return
        for index, row in enumerate(self.dataset):
            yield self.name(index), functools.partial(self._decode, row[self.image_column])

    @staticmethod
    def _decode(cell) -> Image.Image:
        data = cell.get("bytes") if isinstance(cell, dict) else None
        if data is None and isinstance(cell, dict) and cell.get("path"):
            return decode_rgb(cell["path"])
        if data is None:
            raise BadImageError("empty image cell", kind="empty")
        return decode_rgb(data)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"hf|{self.dataset._fingerprint}|{len(self.dataset)}".encode()).hexdigest()


def _load_hub_dataset(name: str, split: Optional[str], *, streaming: bool):
    """`datasets.load_dataset(name, split=split)` with one-line errors for what a user can fix."""
    import datasets
    from huggingface_hub import is_offline_mode

    shown = f"hf:{name}" + (f":{split}" if split else "")
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as err:
        raise DataError(f"--data {shown}: no such folder here, and no dataset {name} on the Hugging Face Hub "
                        f"({_reason(err)}; a private or gated one needs `hf auth login`).") from None
    except ConnectionError as err:  # offline and not cached, or the Hub unreachable
        where = ("this machine is offline (HF_HUB_OFFLINE=1)" if is_offline_mode()
                 else f"the Hub cannot be reached ({_reason(err)})")
        split_arg = f", split={split!r}" if split else ""
        raise DataError(f"--data {shown}: not in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) and {where}. "
                        f"Where there is internet run `python -c \"import datasets; datasets.load_dataset({name!r}"
                        f"{split_arg}).save_to_disk('{name.rpartition('/')[2]}')\"`, copy that folder here and give "
                        f"--data {name.rpartition('/')[2]}.") from None
    except ValueError as err:  # an unknown split names the known ones
        raise DataError(f"--data {shown}: {_reason(err)}") from None


def folder_labels(names: list[str]) -> tuple[Optional[np.ndarray], Optional[list[str]]]:
    """Class ids from first-level subfolders, when every image lies in one."""
    parts = [name.split("/") for name in names]
    if not parts or any(len(p) < 2 for p in parts):
        return None, None
    class_names = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(class_names)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64), class_names


def source_kind(spec: str) -> str:
    """Which source `--data` names: shapes, webdataset, huggingface or folder (see the module docstring)."""
    if spec.startswith("builtin:"):
        if spec not in SHAPES_COLOUR_SETS:
            raise DataError(f"Unknown built-in dataset {spec!r}; the built-in datasets are "
                            f"{' and '.join(SHAPES_COLOUR_SETS)}.")
        return "shapes"
    if spec.startswith("hf:"):  # a local dataset, or one on the Hub
        return "huggingface"
    if ".tar" in spec or ("{" in spec and ".." in spec):
        return "webdataset"
    location = Path(spec).expanduser()
    if location.suffix == ".parquet" or (location / "state.json").is_file() or (location / "dataset_dict.json").is_file():
        return "huggingface"
    return "folder"


def hub_dataset_id(spec: str) -> Optional[str]:
    """The Hub dataset `--data` names (`hf:org/name[:split]` -> org/name), or None for any other source."""
    named = hub_dataset_name(spec[3:]) if spec.startswith("hf:") else None
    return named[0] if named else None


def data_identity(spec: str) -> str:
    """What `--data` names, the same from any working folder: a built-in set or a Hub dataset by its name, a
    path by its absolute path."""
    if spec.startswith("builtin:") or (spec.startswith("hf:") and hub_dataset_name(spec[3:]) is not None):
        return spec
    return str(Path(spec).expanduser().resolve())


def open_image_source(spec: str | Path, *, shapes_count: int = 4096, shapes_seed: int = 0,
                      image_column: Optional[str] = None, label_column: Optional[str] = None,
                      streaming: bool = False) -> ImageSource:
    """The `ImageSource` that `--data` names (see the module docstring).

    `streaming` reads a Hub dataset as a stream (no download; images only in order, `in_order`); every
    other source is read as it always is.

    Raises:
        DataError: a missing path, no images, no readable shard, or a dataset without an image column.
    """
    spec = str(spec)
    kind = source_kind(spec)
    if kind == "shapes":
        return ShapesSource(shapes_count, shapes_seed, spec)
    if kind == "webdataset":
        return TarShardSource(spec)
    if kind == "huggingface":
        return HFDatasetSource(spec[3:] if spec.startswith("hf:") else spec, image_column, label_column, streaming)
    return FolderSource(spec)
