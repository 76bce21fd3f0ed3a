"""Typed configuration: dataclasses with defaults, YAML presets, and `key=value` overrides.

Configs are data that typed code reads (no `target:` import strings). OmegaConf structured configs do
the merging and type conversion; this module adds the error messages a user needs: an unknown key or a
wrong type names the key and lists the valid ones.

Each setting is declared once, on its dataclass field: its default, its check (the class's
`__post_init__`), and in the field's metadata what it means for a run beyond its value (`RESUMABLE`,
`FINGERPRINTED`). A YAML preset states only what differs from these defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Optional, Sequence, Type, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says which key and what is allowed."""


# What a setting means for a run beyond its value, as field metadata (`field(..., metadata=RESUMABLE)`),
# read by `resumable_keys` and `fingerprint_parts`; on a section field it covers every key in the section.
# RESUMABLE: may change when a run is resumed (how long it trains, its learning rate and schedule, how it
# logs, checkpoints and samples, its precision, where it caches). Any other key defines the run (data,
# batch, seed, optimiser betas, EMA decay...) and ldm_core/training/run_folder.py refuses a resume that changes it.
RESUMABLE = MappingProxyType({"resumable": True})
# FINGERPRINTED: shapes a checkpoint's tensors or gives them their meaning; part of the model fingerprint
# a resumed checkpoint must match (ldm_core/training/checkpoints.py `check_resumable`).
FINGERPRINTED = MappingProxyType({"fingerprint": True})
# ADDED_AT_DEFAULT: a key added to a fingerprinted section after checkpoints were written with it; at its
# default it is left out of the fingerprint, so those checkpoints still resume.
ADDED_AT_DEFAULT = MappingProxyType({"omit_at_default": True})


def redefault(base: Type[Any], name: str, default: Any) -> Any:
    """A subclass's own default for field `name` of dataclass `base`, keeping that field's metadata."""
    return field(default=default, metadata=base.__dataclass_fields__[name].metadata)


def resumable_keys(cls: Type[Any], prefix: str = "") -> tuple[str, ...]:
    """The dotted keys of dataclass `cls` marked `RESUMABLE`, in field order; a marked section gives its
    prefix with a trailing dot ("sampling."), standing for every key in it."""
    keys: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = dataclasses.is_dataclass(hints[f.name])
        if f.metadata.get("resumable"):
            keys.append(f"{prefix}{f.name}." if section else f"{prefix}{f.name}")
        elif section:
            keys.extend(resumable_keys(hints[f.name], f"{prefix}{f.name}."))
    return tuple(keys)


def fingerprint_parts(config: Any) -> list[Any]:
    """The values (whole sections or single keys) of `config` marked `FINGERPRINTED`, in field order."""
    parts: list[Any] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("fingerprint"):
            parts.append(value)
        elif dataclasses.is_dataclass(value):
            parts.extend(fingerprint_parts(value))
    return parts


@dataclass
class DataConfig:
    """How images are read and split. `resolution` must divide by the autoencoder's factor f."""

    resolution: int = field(default=64, metadata=FINGERPRINTED)
    # Random horizontal flips for training (the validation split is never flipped).
    flip: bool = True
    # Held-out images for validation metrics, taken deterministically from `split_seed`.
    val_count: int = 64
    split_seed: int = 0
    # Number of images drawn when `--data builtin:shapes` is used.
    shapes_count: int = 4096
    shapes_seed: int = 0
    # How training images reach the step (ldm_core/data/training_images.py): "memory" decodes the dataset once
    # into one uint8 array, "stream" decodes each batch in DataLoader workers, "auto" streams unless the
    # decoded dataset is a folder or the shapes, centre-cropped, and small (docs/data.md).
    loader: str = "auto"
    # Training crop (ldm_core/data/crops.py): center | random (LDM's ImageNet crop) | random_resized
    # (torchvision's RandomResizedCrop, area fraction in [crop_min_scale, 1]) | random_scaled (a square whose
    # area fraction is log-uniform in [crop_min_scale, 1]). Validation and the latent cache use the centre crop.
    crop: str = "center"
    crop_min_scale: float = 0.35
    # DataLoader worker processes when streaming (0 decodes in the training process).
    num_workers: int = field(default=2, metadata=RESUMABLE)
    # Decoded images each streaming process keeps (MiB, most recently used): a few large photographs are
    # decoded once and cropped afresh at every draw; a large dataset simply misses. 0 turns it off.
    decoded_cache_mb: int = field(default=256, metadata=RESUMABLE)
    # Hugging Face datasets: the image and label columns (default: the first Image and ClassLabel columns).
    image_column: Optional[str] = None
    label_column: Optional[str] = None

    def __post_init__(self) -> None:
        _require(self.loader in ("auto", "memory", "stream"), "data.loader", self.loader, "auto, memory or stream")
        _require(self.crop in ("center", "random", "random_resized", "random_scaled"), "data.crop", self.crop,
                 "center, random, random_resized or random_scaled")
        _require(0.0 < self.crop_min_scale <= 1.0, "data.crop_min_scale", self.crop_min_scale, "in (0, 1]")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "0 or more")
        _require(self.decoded_cache_mb >= 0, "data.decoded_cache_mb", self.decoded_cache_mb, "0 or more")
        _require(self.resolution > 0, "data.resolution", self.resolution, "a positive integer")
        _require(self.val_count >= 0, "data.val_count", self.val_count, "0 or more")
        _require(self.split_seed >= 0, "data.split_seed", self.split_seed, "0 or more")
        _require(self.shapes_seed >= 0, "data.shapes_seed", self.shapes_seed, "0 or more")
        _require(self.shapes_count > 0, "data.shapes_count", self.shapes_count, "a positive integer")


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights (diffusers `EMAModel`)."""

    enabled: bool = True
    decay: float = 0.9999
    # EMA warm-up of diffusers: decay = 1 - (1 + step / inv_gamma) ** -power, capped at `decay`.
    use_warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 0.75
    # Save EMA weights (not the raw ones) as the run's model.
    export_ema: bool = field(default=True, metadata=RESUMABLE)

    def __post_init__(self) -> None:
        _require(0.0 <= self.decay < 1.0, "ema.decay", self.decay, "in [0, 1)")
        _require(self.inv_gamma > 0, "ema.inv_gamma", self.inv_gamma, "a positive number")
        _require(self.power > 0, "ema.power", self.power, "a positive number")


# Learning-rate schedules after the warm-up (ldm_core/training/optimization.py).
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    """The training loop shared by both stages (Accelerate)."""

    batch_size: int = 8  # per process
    max_steps: int = field(default=1000, metadata=RESUMABLE)  # optimizer steps
    # Stop early (after a checkpoint) once this many minutes of training have passed; 0 = no budget.
    time_budget_minutes: float = field(default=0.0, metadata=RESUMABLE)
    lr: float = field(default=1e-4, metadata=RESUMABLE)
    lr_warmup_steps: int = field(default=0, metadata=RESUMABLE)
    lr_schedule: str = field(default="constant", metadata=RESUMABLE)  # constant | cosine | linear (after warm-up)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = field(default=1.0, metadata=RESUMABLE)  # 0 disables clipping
    mixed_precision: str = field(default="no", metadata=RESUMABLE)  # no | fp16 | bf16
    seed: int = 0
    checkpoint_every: int = field(default=500, metadata=RESUMABLE)
    keep_checkpoints: int = field(default=2, metadata=RESUMABLE)
    log_every: int = field(default=10, metadata=RESUMABLE)
    # Where logged values go besides metrics.json (Accelerate's trackers): tensorboard | wandb | all | none.
    # Weights & Biases needs the wandb package (pip install 'two-stage-ldm[wandb]') and an account, or
    # WANDB_MODE=offline; its files go to RUN/logs/wandb/.
    report_to: str = field(default="tensorboard", metadata=RESUMABLE)
    validate_every: int = field(default=250, metadata=RESUMABLE)
    progress_bar: bool = field(default=True, metadata=RESUMABLE)
    # What a NaN or inf loss does: "stop" (after keeping the last good checkpoint) or "skip" the step,
    # at most `max_nonfinite_skips` times in a run before stopping anyway.
    nonfinite_loss: str = field(default="stop", metadata=RESUMABLE)
    max_nonfinite_skips: int = field(default=10, metadata=RESUMABLE)
    # Speed options, each measured by benchmarks/ (docs/performance.md): fused Adam kernels and the
    # channels-last memory format for convolutions.
    fused_optimizer: bool = field(default=True, metadata=RESUMABLE)
    channels_last: bool = field(default=False, metadata=RESUMABLE)
    # Images encoded to measure the latent scale (1/std): by Stage A when it ends, by Stage B when its VAE
    # folder carries no measured scale.
    latent_stats_images: int = field(default=1024, metadata=RESUMABLE)

    def __post_init__(self) -> None:
        _require(self.nonfinite_loss in ("stop", "skip"), "train.nonfinite_loss", self.nonfinite_loss,
                 "stop or skip")
        _require(self.max_nonfinite_skips >= 0, "train.max_nonfinite_skips", self.max_nonfinite_skips, "0 or more")
        _require(self.batch_size > 0, "train.batch_size", self.batch_size, "a positive integer")
        _require(self.max_steps > 0, "train.max_steps", self.max_steps, "a positive integer")
        _require(self.lr > 0, "train.lr", self.lr, "a positive number")
        _require(self.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps",
                 self.gradient_accumulation_steps, "a positive integer")
        _require(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", self.lr_schedule,
                 f"one of {', '.join(LR_SCHEDULES)}")
        _require(self.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision",
                 self.mixed_precision, "one of no, fp16, bf16")
        _require(self.report_to in REPORT_TO, "train.report_to", self.report_to, f"one of {', '.join(REPORT_TO)}")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "1 or more")
        _require(self.checkpoint_every > 0, "train.checkpoint_every", self.checkpoint_every,
                 "a positive integer")
        for key in ("log_every", "validate_every", "latent_stats_images"):
            _require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive integer")
        for key in ("seed", "lr_warmup_steps", "weight_decay", "max_grad_norm", "time_budget_minutes"):
            _require(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "0 or more")
        for key in ("adam_beta1", "adam_beta2"):
            _require(0.0 <= getattr(self, key) < 1.0, f"train.{key}", getattr(self, key), "in [0, 1)")


# train.report_to -> Accelerate's `log_with`.
REPORT_TO = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}.")


# --------------------------------------------------------------------------------------------------
# Paths named in configs. A config is data that may come from someone else; a relative path in it must
# not make a run write outside its own folder (`../../somewhere`).


def check_relative_path(key: str, value: str) -> None:
    """Refuse an empty path, a NUL byte, or a relative path with a '..' component (ConfigError)."""
    if not value or "\0" in value:
        raise ConfigError(f"{key}={value!r} is not a usable path; give a folder name or leave it unset.")
    path = Path(value)
    if not path.is_absolute() and ".." in path.parts:
        raise ConfigError(f"{key}={value!r} climbs out of the run folder with '..'. Give a path inside the "
                          f"run folder (e.g. {key}=cache) or an absolute path.")


def resolve_run_path(run_dir: str | Path, value: str | Path, key: str) -> Path:
    """Where a config path points for writing: relative paths are taken inside `run_dir`.

    The resolved path (symbolic links followed) of a relative value must lie inside the resolved run
    folder, so neither '..' nor a link placed in the run folder can redirect writes elsewhere. Absolute
    values are returned unchanged: the user named that place explicitly.

    Parameters:
        run_dir: the run folder (`--out`).
        value: the path from the config.
        key: the config key, for the error message.

    Raises:
        ConfigError: the path escapes the run folder.
    """
    check_relative_path(key, str(value))
    value = Path(value).expanduser()
    if value.is_absolute():
        return value
    root = Path(run_dir).resolve()
    target = (root / value).resolve()
    if target != root and root not in target.parents:
        raise ConfigError(f"{key}={str(value)!r} resolves to {target}, outside the run folder {root} (through "
                          f"a symbolic link). Give a path inside the run folder or an absolute path.")
    return target


# --------------------------------------------------------------------------------------------------
# Loading


def valid_keys(cls: Type[Any], prefix: str = "") -> list[str]:
    """Every dotted key a dataclass accepts, nested sections expanded."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            keys.extend(valid_keys(sub, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _open_config(path: str | Path) -> tuple[str, Any]:
    """(origin for messages, binary file object) of what `--config` names.

    An existing file wins; otherwise `path` is looked up as a preset shipped with the package, so
    `configs/vae/kl-f8-small.yaml`, `vae/kl-f8-small.yaml` and `vae/kl-f8-small` work from any folder.

    Raises:
        ConfigError: neither a file nor a preset; the message lists the presets.
    """
    candidate = Path(path)
    if candidate.is_file():
        return str(candidate), open(candidate, "rb")
    # Imported here: preset_files imports ConfigError from this module.
    from ldm_core.config import preset_files

    found = preset_files.find_preset(str(path))
    if found is not None:
        name, resource = found
        return f"preset {name}", resource.open("rb")
    what = "is not a file" if candidate.exists() else "does not exist"
    raise ConfigError(f"Config file {path} {what}, and no preset has that name. Give the path of a YAML file "
                      f"or a preset name, with or without configs/ and .yaml (for example vae/kl-f8-small). "
                      f"Presets: {preset_files.describe_presets()}.")


BASE_KEY = "base"


def _read_config_file(path: str | Path) -> tuple[str, dict]:
    """(origin for messages, mapping) of a YAML config file or preset name."""
    origin, stream = _open_config(path)
    with stream as fh:
        data = _read_yaml(fh, origin) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {origin} must hold a mapping of keys to values.")
    return origin, data


def _expand_bases(data: dict, origin: str, folder: Path, depth: int = 0) -> dict:
    """Replace every `base: NAME` in a mapping (at any level) by that file's or preset's content, with the
    mapping's own keys on top: `stage_b: {base: unet/unet-small, train: {max_steps: 1500}}` is the preset
    with one change. NAME is a file (relative to the including file) or a preset name."""
    if depth > 8:
        raise ConfigError(f"{origin}: '{BASE_KEY}:' files include each other in a loop.")
    out = {k: _expand_bases(v, origin, folder, depth) if isinstance(v, dict) else v for k, v in data.items()
           if k != BASE_KEY}
    if BASE_KEY not in data:
        return out
    name = data[BASE_KEY]
    if not isinstance(name, str):
        raise ConfigError(f"{origin}: '{BASE_KEY}: {name!r}' must name a YAML file or a preset.")
    local = folder / name
    base_origin, base = _read_config_file(local if local.is_file() else name)
    base_folder = local.parent if local.is_file() else Path(name).parent
    return _merge_dicts(_expand_bases(base, base_origin, base_folder, depth + 1), out)


def _merge_dicts(below: dict, above: dict) -> dict:
    """`above` on top of `below`, nested mappings merged key by key."""
    merged = dict(below)
    for key, value in above.items():
        merged[key] = (_merge_dicts(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else value)
    return merged


def load_config(cls: Type[T], path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, then a YAML file, then `key=value` overrides, in that order.

    `path` is a YAML file or, when no such file exists, the name of a shipped preset
    (`configs/vae/kl-f8-small.yaml`, `vae/kl-f8-small.yaml`, `vae/kl-f8-small`). Inside it, a mapping with
    a `base:` key starts from that file or preset (see `_expand_bases`).

    Raises ConfigError naming the offending key and listing the valid keys of its section.
    """
    schema = OmegaConf.structured(cls)
    layers = []
    if path is not None:
        origin, data = _read_config_file(path)
        layers.append((origin, OmegaConf.create(_expand_bases(data, origin, Path(path).parent))))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"Override {bad[0]!r} is not of the form key=value "
                          f"(for example train.max_steps=2000).")
    if overrides:
        layers.append(("command line", OmegaConf.create(_dotlist_to_dict(overrides))))
    for origin, layer in layers:
        _check_keys(cls, OmegaConf.to_container(layer), origin)
        try:
            schema = OmegaConf.merge(schema, layer)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            raise ConfigError(f"Config key {key!r} (from {origin}) has a value of the wrong type: "
                              f"{str(err).splitlines()[0].rstrip('.')}. {_expected_value(cls, key)}") from None
    try:
        return OmegaConf.to_object(schema)
    except ConfigError:
        raise
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        raise ConfigError(f"Invalid configuration: {err}") from None


class _YAML12Loader(yaml.SafeLoader):
    """YAML as YAML 1.2 reads booleans: only true/false. YAML 1.1 (PyYAML's and OmegaConf's default) also
    turns yes/no/on/off into booleans, so `train.mixed_precision=no`, a documented value, would arrive
    as False."""


_YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "tTfF":
    _YAML12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                        [_first])


# PyYAML's float pattern needs a dot ("1.0e-6"); "1e-6", which every config example uses, is a float too.
_YAML12Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def _read_yaml(stream, origin: str) -> Any:
    """One YAML document through `_YAML12Loader`, a SafeLoader: plain data only, never Python objects.

    A file that is not YAML (a syntax error, binary bytes, two documents) is a ConfigError naming
    `origin` and, where PyYAML knows it, the line and column.
    """
    loader = None
    try:
        loader = _YAML12Loader(stream)  # reads the first bytes already: a binary file fails here
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or getattr(err, "reason", None) or str(err).splitlines()[0]
        raise ConfigError(f"{origin} is not valid YAML{where}: {problem}. Fix it, or give a YAML file of "
                          f"key: value lines (see configs/).") from None
    finally:
        if loader is not None:
            loader.dispose()


def _dotlist_to_dict(overrides: Sequence[str]) -> dict:
    """`a.b=value` overrides as a nested dict, each value read as YAML 1.2 (numbers, lists, null, strings)."""
    tree: dict = {}
    for item in overrides:
        key, _, text = item.partition("=")
        node = tree
        *parents, leaf = key.strip().split(".")
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override {item!r} sets a key inside {name!r}, which another override sets "
                                  f"to a value.")
        node[leaf] = _read_yaml(text, f"override {item!r}") if text.strip() else ""
    return tree


def _expected_value(cls: Type[Any], dotted: str) -> str:
    """'It must be an int, e.g. train.max_steps=1000 (the default).' for a dotted key of `cls`."""
    section, default = cls, None
    hint: Any = None
    for name in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(section)} if dataclasses.is_dataclass(section) else {}
        if name not in fields:
            return f"Valid keys: {', '.join(valid_keys(cls))}"
        hint = typing.get_type_hints(section)[name]
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        section = hint
    type_name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    example = f" (default {dotted}={default})" if default is not None else ""
    return f"It must be of type {type_name}{example}."


def _check_keys(cls: Type[Any], data: Any, origin: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            section = prefix.rstrip(".") or "top level"
            raise ConfigError(
                f"Unknown config key {full!r} (from {origin}). Valid keys in {section}: "
                f"{', '.join(sorted(names))}. All valid keys: {', '.join(valid_keys(cls))}")
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"Config key {full!r} (from {origin}) is a section; give its keys, "
                                  f"e.g. {valid_keys(sub, full + '.')[0]}=...")
            _check_keys(sub, value, origin, full + ".")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(to_dict(config), fh, sort_keys=False)


__all__ = ["ConfigError", "DataConfig", "EMAConfig", "TrainConfig", "load_config", "save_config",
           "to_dict", "valid_keys", "field", "check_relative_path", "resolve_run_path", "RESUMABLE",
           "FINGERPRINTED", "ADDED_AT_DEFAULT", "redefault", "resumable_keys", "fingerprint_parts", "fingerprint"]


def fingerprint(*sections: Any) -> str:
    """A short hash of the config sections that define a checkpoint's shapes and semantics (those
    `fingerprint_parts` finds); keys marked ADDED_AT_DEFAULT count only when they leave their default."""
    blob = json.dumps([_fingerprinted(s) for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fingerprinted(value: Any) -> Any:
    """`dataclasses.asdict(value)` without the ADDED_AT_DEFAULT keys that hold their default."""
    if not dataclasses.is_dataclass(value):
        return value
    return {f.name: _fingerprinted(getattr(value, f.name)) for f in dataclasses.fields(value)
            if not (f.metadata.get("omit_at_default") and getattr(value, f.name) == f.default)}

