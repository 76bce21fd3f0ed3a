"""Pretrained weights fetched on first use through torch hub's own mechanism, and model folders and weight
files read as data.

A weight file is looked for at an explicit path first, then in torch hub's checkpoint cache
(`$TORCH_HOME/hub/checkpoints/`, where torchvision and the lpips package look too). When it is not there,
it is downloaded into that cache with `torch.hub.download_url_to_file`, under its upstream name, with the
sha256 check torchvision's file names carry; the download goes to a temporary file that is checked and
only then renamed into place, so a cut download or a wrong file leaves nothing behind. Offline
(`HF_HUB_OFFLINE=1`, the switch the Hugging Face libraries use) nothing is downloaded and the error says
which file is missing, the command that fetches it and where to put it (docs/hub.md). A file that is there
but is not that file (random bytes, text, another network's tensors) is refused with its name. A diffusers
model folder is checked the same way before it is loaded: its config must be a JSON object describing the
expected class, and its weights exactly the tensors that config builds (diffusers itself would fill missing
tensors with random values and only log a warning).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger("ldm.weights")

# docs/commands.md, "Pretrained weights": the files, with the names their upstream loaders expect.
VGG16_FILE = "vgg16-397923af.pth"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
INCEPTION_FID_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class RemoteWeights:
    """Where a weights file comes from. `sha256_prefix`: the start of its sha256, checked on download
    (torchvision names its files after it and checks it itself); None where the publisher states none
    (torch-fidelity's Inception file, which torch-fidelity downloads unchecked), and then the file is checked
    by loading it."""

    description: str
    url: str
    sha256_prefix: Optional[str]


REMOTE_WEIGHTS = {
    VGG16_FILE: RemoteWeights("torchvision's VGG16 ImageNet weights",
                              "https://download.pytorch.org/models/vgg16-397923af.pth", "397923af"),
    ALEXNET_FILE: RemoteWeights("torchvision's AlexNet ImageNet weights",
                                "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79"),
    INCEPTION_FID_FILE: RemoteWeights(
        "the FID Inception-v3 weights used by torch-fidelity and torchmetrics",
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        None),
}


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file is not on this machine and cannot be fetched now; the message says which,
    how to fetch it and where to put it."""


class WeightsFileError(ValueError):
    """A weights file exists but is not the file it should be; the message names it and what it should be."""


def expected_weights(filename: str) -> str:
    """`filename` and where it comes from, for messages about a file that should have been it."""
    remote = REMOTE_WEIGHTS.get(filename)
    return f"{filename}, {remote.description} ({remote.url})" if remote else filename


def torch_hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(filename: str, explicit_path: Optional[str | os.PathLike] = None, *,
                 option_hint: str = "", check: Optional[Callable[[Path], Any]] = None) -> Path:
    """Return the path of `filename`: `explicit_path`, else torch hub's cache, else downloaded into it.

    Parameters:
        filename: one of `REMOTE_WEIGHTS` (or another file name, then only looked for).
        explicit_path: a path the user gave; it must exist (nothing is downloaded in its place).
        option_hint: the config key or CLI flag that accepts an explicit path, for messages.
        check: raises `WeightsFileError` when a freshly downloaded file is not the expected one (the
            file is then removed); used for files without a published hash.

    Raises:
        MissingWeightsError: no such explicit file; or not cached and offline, or the download failed
            (the message gives the command that fetches it elsewhere and where to put it).
        WeightsFileError: the download was not the expected file (hash or `check`); nothing is kept.
    """
    if explicit_path:
        path = Path(explicit_path).expanduser()
        if path.is_file():
            return path
        raise MissingWeightsError(f"The weights file {path} does not exist (expected {expected_weights(filename)}).")
    cached = torch_hub_checkpoint_dir() / filename
    if cached.is_file():
        return cached
    remote = REMOTE_WEIGHTS.get(filename)
    route = _fetch_route(filename, cached, option_hint)
    if remote is None:
        raise MissingWeightsError(f"Missing pretrained weights: {filename}. Put it at {cached}{route}.")
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        raise MissingWeightsError(f"Missing pretrained weights: {filename} ({remote.description}), and this machine "
                                  f"is offline (HF_HUB_OFFLINE=1). {route}")
    return download_weights(filename, cached, remote, option_hint=option_hint, check=check)


def _fetch_route(filename: str, cached: Path, option_hint: str) -> str:
    remote = REMOTE_WEIGHTS.get(filename)
    if remote is None:
        return f", or pass its path with {option_hint}" if option_hint else ""
    local = f", or pass its path with {option_hint}" if option_hint else ""
    return (f"Fetch it where there is internet with `curl -L -o {filename} {remote.url}` and put it at "
            f"{cached}{local}; online, it is downloaded there on first use.")


def download_weights(filename: str, destination: Path, remote: RemoteWeights, *, option_hint: str = "",
                     check: Optional[Callable[[Path], Any]] = None) -> Path:
    """Download `remote` to `destination` with torch hub (`torch.hub.download_url_to_file`, its progress bar
    and sha256 prefix check), through a temporary file in the same folder that is renamed into place only
    once it is whole and checked. A stalled connection fails after `HF_HUB_DOWNLOAD_TIMEOUT` seconds."""
    from huggingface_hub import constants

    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=destination.parent, prefix=f".{filename}.", suffix=".download")
    os.close(handle)
    partial = Path(partial)
    logger.info("Downloading %s (first use) from %s into %s", filename, remote.url, destination.parent)
    try:
        try:
            with _socket_timeout(constants.HF_HUB_DOWNLOAD_TIMEOUT):
                torch.hub.download_url_to_file(remote.url, str(partial), hash_prefix=remote.sha256_prefix,
                                               progress=True)
        except RuntimeError as err:  # torch hub's hash check
            raise WeightsFileError(f"The download of {filename} from {remote.url} is not that file ({err}); "
                                   f"nothing was kept. {_fetch_route(filename, destination, option_hint)}") from None
        except OSError as err:  # URLError, HTTPError, timeouts, refused connections, a full disk
            reason = " ".join(str(getattr(err, "reason", None) or err).split()) or type(err).__name__
            raise MissingWeightsError(f"Could not download {filename} from {remote.url} ({reason}); nothing was "
                                      f"kept. {_fetch_route(filename, destination, option_hint)}") from None
        if check is not None:
            check(partial)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


@contextmanager
def _socket_timeout(seconds: float):
    """torch hub opens its connection without a timeout; this bounds every connect and read."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def load_state_dict(path: Path, *, expected: Optional[str] = None) -> dict:
    """Read a weights file safely: safetensors directly, anything else with `weights_only=True`.

    Parameters:
        path: the file.
        expected: what the file should be (e.g. `expected_weights(ALEXNET_FILE)`), for the message.

    Raises:
        WeightsFileError: the bytes are not a weights file (random bytes, text, a cut file), the file holds
            Python objects other than tensors (refused: unpickling them can run code), or it holds
            something other than a state dict (a mapping of tensor names to tensors).
        OSError: the operating system refused to read it (the message names the path).
    """
    path = Path(path)
    should = f" It should be {expected}." if expected else ""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        if err.errno is not None:  # permissions, a folder, an I/O error: the path is the problem
            raise
        raise WeightsFileError(f"The weights file {path} cannot be read: {short_reason(err)}.{should}") from None
    except Exception as err:  # noqa: BLE001 - torch.load and safetensors raise a different type per kind of bad bytes
        raise WeightsFileError(f"The weights file {path} is not a weights file this project can read: "
                               f"{_load_failure(err)}.{should}") from None
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"The weights file {path} holds a {type(state).__name__}, not a state dict (a "
                               f"mapping from tensor names to tensors).{should}")
    return dict(state)


def _load_failure(err: BaseException) -> str:
    """Why torch.load / safetensors could not read a file, in a few words."""
    text = str(err)
    if isinstance(err, EOFError) or not text.strip():
        return "the file is empty or cut short"
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.(?:\s|$)|\n|$)", text, flags=re.S)
    if match:
        detail = " ".join(match.group(1).split())
        if "global" in detail.lower():
            return (f"it holds Python objects, not only tensors ({detail}); such files are refused because "
                    f"unpickling them can run code (torch.load with weights_only=True)")
        return f"its bytes are not a PyTorch weights file ({detail})"
    if type(err).__name__ == "SafetensorError":
        return f"it is not a valid safetensors file ({short_reason(err)})"
    return f"its bytes are not a PyTorch or safetensors weights file ({type(err).__name__}: {short_reason(err)})"


def short_reason(err: BaseException, limit: int = 200) -> str:
    """The first line of an error, without web addresses (messages point at local files, never downloads)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = re.sub(r"\s*\(?https?://\S+\)?", "", lines[0] if lines else type(err).__name__).strip()
    return (text[:limit] + "...") if len(text) > limit else text.rstrip(".")


# --------------------------------------------------------------------------------------------------
# Model folders (diffusers `save_pretrained` layout) are data. Python files in one are never imported
# (diffusers would, for custom pipelines and components, given trust_remote_code), and weights are only
# read from safetensors, because unpickling a .bin/.pt/.ckpt file can run code.

CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeModelFolderError(ValueError):
    """A model folder holds code, or weights only in a pickle format; the message says what to do."""


def check_model_folder(folder: str | os.PathLike, *, what: str = "model folder") -> Path:
    """Refuse a model folder that ships code or whose weights are not safetensors; return its path.

    Every file under `folder` is looked at: any Python source or extension module is refused (a folder
    that needs code to load is not a folder this project loads), and so is any subfolder whose weights
    exist only as pickle files. Folders with no weights at all (a scheduler's) are fine.

    Parameters:
        folder: the folder given by the user.
        what: how to name it in messages (e.g. "pipeline folder", "--vae folder").

    Raises:
        FileNotFoundError: `folder` is not a folder.
        UnsafeModelFolderError: code or pickle-only weights were found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"The {what} {folder} does not exist or is not a folder.")
    files = [p for p in folder.rglob("*") if p.is_file()]
    code = sorted(p.relative_to(folder).as_posix() for p in files if p.suffix in CODE_SUFFIXES)
    if code:
        raise UnsafeModelFolderError(
            f"The {what} {folder} contains code ({', '.join(code[:5])}). Model folders are loaded as data "
            f"only and code in them is never run; remove those files (after checking where they came from).")
    for sub in sorted({p.parent for p in files}):
        names = [p for p in files if p.parent == sub]
        pickled = [p.name for p in names if p.suffix in PICKLE_SUFFIXES]
        if pickled and not any(p.suffix == ".safetensors" for p in names):
            raise UnsafeModelFolderError(
                f"{sub} holds weights only as pickle files ({', '.join(sorted(pickled))}); only safetensors "
                f"weights are read, because unpickling can run code. Re-save the model with diffusers' "
                f"save_pretrained (safetensors is its default) in a trusted environment.")
    return folder


class ModelFolderError(ValueError):
    """A model folder whose config or weights cannot be used; the message names the file and what is wrong."""


_RESAVE = "re-save the model with save_pretrained, or copy the folder again from where it was made"


def _a(name: str) -> str:
    """'an AutoencoderKL', 'a UNet2DModel', 'a DDIMScheduler'."""
    return f"an {name}" if name[:1] in ("A", "E", "I", "O") else f"a {name}"


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def read_config_file(path: str | os.PathLike, *, hint: str = "") -> dict:
    """Read a model's JSON config (config.json, scheduler_config.json) and require a JSON object.

    diffusers reads these files itself and answers a file that is not JSON, or that is a JSON list, with
    errors about downloading the model; this reads them first so the message names the file.

    Parameters:
        path: the config file.
        hint: what the user should give instead, appended to the message when the file is absent.

    Raises:
        ModelFolderError: absent, not UTF-8 text, not JSON, or not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(f"{path.parent} has no {path.name}, so it is not a saved diffusers model "
                               f"folder{hint}.")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelFolderError(f"{path} is not a text file (its bytes are not UTF-8), so it is not a model "
                               f"config; {_RESAVE}.") from None
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                               f"{_RESAVE}.") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path} holds a JSON {_json_kind(value)}, not an object of model settings; "
                               f"{_RESAVE}.")
    return value


def read_model_config(folder: str | os.PathLike, model_class: type, *, hint: str = "") -> dict:
    """`folder`'s config (config.json for models), required to describe a `model_class`.

    Parameters:
        folder: a diffusers model folder (as written by `save_pretrained`).
        model_class: the diffusers class the folder must hold, e.g. `AutoencoderKL`.
        hint: what the user should give instead (e.g. "; give the vae/ folder of a Stage A run").

    Raises:
        ModelFolderError: see `read_config_file`, or the config names another class.
    """
    folder = Path(folder)
    path = folder / getattr(model_class, "config_name", "config.json")
    config = read_config_file(path, hint=hint)
    found = config.get("_class_name", model_class.__name__)
    if found != model_class.__name__:
        raise ModelFolderError(f"{path} describes {_a(found)}, not {_a(model_class.__name__)}{hint}."
                               if isinstance(found, str) else
                               f"{path}: _class_name is {found!r}, not {model_class.__name__!r}; {_RESAVE}.")
    return config


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files diffusers would read for `folder`: one file, or the shards of an index."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    single = folder / SAFETENSORS_WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = read_config_file(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFolderError(f"{index} has no weight_map of tensor names to files; {_RESAVE}.")
        shards = sorted({folder / str(name) for name in weight_map.values()})
        absent = [p.name for p in shards if not p.is_file()]
        if absent:
            raise ModelFolderError(f"{index} lists weight files that are not there ({', '.join(absent[:3])}); "
                                   f"{_RESAVE}.")
        return shards
    raise ModelFolderError(f"{folder} has a config but no weights file ({SAFETENSORS_WEIGHTS_NAME}); {_RESAVE}.")


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers only (no tensor is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except OSError as err:
            if err.errno is not None:
                raise
            raise ModelFolderError(f"{path} is not a readable safetensors file ({short_reason(err)}); "
                                   f"{_RESAVE}.") from None
        except Exception as err:  # noqa: BLE001 - safetensors' Rust errors have no common Python base
            raise ModelFolderError(f"{path} is not a readable safetensors file ({short_reason(err)}); "
                                   f"{_RESAVE}.") from None
    return shapes


def _sample(keys, n: int = 2) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _mismatch_message(weights: str, config_path: Path, missing, unexpected, reshaped) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) the config needs are missing ({_sample(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) are not part of the model it describes ({_sample(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} tensor(s) have another shape ({'; '.join(reshaped[:2])})")
    return (f"The weights in {weights} do not match {config_path}: {', '.join(parts)}. The config and the "
            f"weights come from different models; {_RESAVE}.")


def check_model_weights(model_class: type, folder: str | os.PathLike, config: dict) -> list[Path]:
    """Check, before loading, that `folder`'s weights are exactly the tensors `model_class(**config)` has.

    diffusers' `from_pretrained` fills tensors the file lacks with random values and only logs a
    warning (so a U-Net folder given as an autoencoder, or weights from another config, would load as a
    random model). The expected names and shapes come from the model built on the meta device
    (accelerate's `init_empty_weights`: no memory, no computation) and are compared with the safetensors
    headers, after the renaming of deprecated attention keys diffusers applies on load
    (`ModelMixin._fix_state_dict_keys_on_load`).

    Returns the weight files. Raises ModelFolderError naming the files and what does not match.
    """
    from accelerate import init_empty_weights

    folder = Path(folder)
    config_path = folder / getattr(model_class, "config_name", "config.json")
    files = _weight_files(folder)
    found = _tensor_shapes(files)
    try:
        with init_empty_weights():
            model = model_class.from_config(config)
    except Exception as err:  # noqa: BLE001 - a constructor fed bad settings raises anything
        raise ModelFolderError(f"{config_path}: {_a(model_class.__name__)} cannot be built from these settings "
                               f"({type(err).__name__}: {short_reason(err)}); {_RESAVE}.") from None
    fix = getattr(model, "_fix_state_dict_keys_on_load", None)
    if callable(fix) and len(files) == 1:  # diffusers renames these keys for unsharded files only
        try:
            fix(found)
        except Exception:  # noqa: BLE001 - a private helper; without it the comparison is stricter, not wrong
            pass
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ignored = getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(k for k in set(found) - set(expected) if not any(re.search(p, k) for p in ignored))
    reshaped = [f"{k}: {found[k]} in the file, {expected[k]} in the config"
                for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    if missing or unexpected or reshaped:
        weights = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} files)"
        raise ModelFolderError(_mismatch_message(weights, config_path, missing, unexpected, reshaped))
    return files


def load_model_folder(model_class: type, folder: str | os.PathLike, *, what: str = "model folder",
                      hint: str = "", **kwargs):
    """Load a diffusers model folder as data only, refusing any config or weights that do not fit.

    The checks, in order: no code and no pickle-only weights (`check_model_folder`), a config that is a
    JSON object describing `model_class` (`read_model_config`), weights that are exactly the model's
    tensors (`check_model_weights`); then `model_class.from_pretrained` reads the safetensors weights
    from this folder only, and its loading report is checked again.

    Parameters:
        model_class: e.g. `diffusers.AutoencoderKL`.
        folder: the folder.
        what, hint: how to name the folder in messages, and what the user should give instead.
        **kwargs: passed to `from_pretrained` (e.g. `torch_dtype`).

    Raises:
        FileNotFoundError, UnsafeModelFolderError, ModelFolderError.
    """
    folder = check_model_folder(folder, what=what)
    config = read_model_config(folder, model_class, hint=hint)
    check_model_weights(model_class, folder, config)
    return load_checked_model_folder(model_class, folder, what=what, **kwargs)


def load_checked_model_folder(model_class: type, folder: str | os.PathLike, *, what: str = "model folder", **kwargs):
    """The loading half of `load_model_folder`, for a folder whose files its checks have already passed (a
    pipeline folder's vae/ and unet/ are checked with the whole folder, before anything is loaded:
    `ldm_core.models.pipeline_folders.inspect_pipeline_folder`).

    Reads the safetensors weights from this folder only and checks diffusers' loading report: every tensor
    of the model filled, none left over. Raises ModelFolderError.
    """
    folder = Path(folder)
    try:
        model, info = model_class.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                  output_loading_info=True, **kwargs)
    except OSError as err:
        if err.errno is not None:
            raise
        raise ModelFolderError(f"The {what} {folder} could not be loaded: {short_reason(err)}.") from None
    except (ValueError, RuntimeError, TypeError, KeyError) as err:
        raise ModelFolderError(f"The {what} {folder} could not be loaded: {short_reason(err)}.") from None
    missing, unexpected = info.get("missing_keys") or [], info.get("unexpected_keys") or []
    reshaped = [f"{k}: {a} in the file, {b} in the config" for k, a, b in info.get("mismatched_keys") or []]
    if missing or unexpected or reshaped:
        raise ModelFolderError(_mismatch_message(str(folder), folder / "config.json", missing, unexpected, reshaped))
    if info.get("error_msgs"):
        raise ModelFolderError(f"The {what} {folder} could not be loaded: {short_reason(info['error_msgs'][0])}.")
    return model


# --------------------------------------------------------------------------------------------------
# LPIPS: the lpips package ships its small linear heads but has torchvision fetch the ImageNet trunk, unchecked
# and with no offline message, when it is built. So the module is built with a random trunk (`pnet_rand=True`,
# nothing is fetched) and torchvision's weights are copied in from the file `find_weights` gives.

LPIPS_TRUNK_FILES = {"vgg": VGG16_FILE, "alex": ALEXNET_FILE}


def build_pretrained_lpips(net: str, weights_path: Optional[str | os.PathLike] = None, *, option_hint: str = ""):
    """`lpips.LPIPS(net=net)` with its ImageNet trunk from torchvision's file (a path given, torch hub's cache,
    or downloaded there on first use), frozen, in eval mode.

    Raises MissingWeightsError (naming the file, how to fetch it and where to put it) when the trunk file is
    absent and cannot be downloaded now.
    """
    if net not in LPIPS_TRUNK_FILES:
        raise ValueError(f"Unknown LPIPS backbone {net!r}; choose one of {', '.join(LPIPS_TRUNK_FILES)}.")
    path = find_weights(LPIPS_TRUNK_FILES[net], weights_path, option_hint=option_hint)
    expected = expected_weights(LPIPS_TRUNK_FILES[net])
    state = load_state_dict(path, expected=f"{expected}, for the LPIPS {net} trunk")
    module = build_random_lpips(net)
    load_lpips_trunk(module, state, source=f"The weights file {path}")
    return module


def build_random_lpips(net: str = "vgg"):
    """LPIPS with the package's linear heads and a randomly initialised trunk (nothing is downloaded)."""
    import warnings

    import lpips

    with warnings.catch_warnings():
        # lpips still calls torchvision with the deprecated `pretrained=` argument; nothing is fetched.
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        module = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    return module.eval().requires_grad_(False)


def load_lpips_trunk(module, state_dict: dict, source: str = "state dict") -> None:
    """Copy torchvision `features.N.*` tensors into an LPIPS module's trunk.

    lpips keeps torchvision's layer indices inside its slices (`slice3.10.weight` is torchvision's
    `features.10.weight`). Every trunk tensor must be present with the right shape; otherwise ValueError
    names the problem, so a wrong or truncated file is never half-loaded.
    """
    net = getattr(module, "pnet_type", "")
    expected_file = LPIPS_TRUNK_FILES.get(net, "the torchvision ImageNet weights")
    should = f"expected the file {expected_weights(expected_file)}"
    trunk = module.net.state_dict()
    mapped, missing = {}, []
    for name, param in trunk.items():
        match = re.match(r"^slice\d+\.(\d+)\.(weight|bias)$", name)
        if match is None:
            raise ValueError(f"Unexpected parameter {name!r} in the LPIPS trunk; this lpips version's layout "
                             f"is not supported.")
        key = f"features.{match.group(1)}.{match.group(2)}"
        if key not in state_dict:
            missing.append(key)
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(param.shape):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise WeightsFileError(f"{source} does not fit the LPIPS {net} trunk: {key} is {found}, the trunk "
                                   f"needs {tuple(param.shape)} ({should}).")
        mapped[name] = value.to(param.dtype)
    if missing:
        raise WeightsFileError(f"{source} does not fit the LPIPS {net} trunk: key {missing[0]!r} is missing "
                               f"({len(missing)} of its {len(trunk)} tensors are; {should}).")
    module.net.load_state_dict(mapped, strict=True)  # every trunk tensor replaced, none left random
