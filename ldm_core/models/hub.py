"""Models by name: a Hugging Face Hub id resolved into a local folder through `huggingface_hub`'s cache.

Every command that reads a model folder accepts, in its place, a Hub id: `org/name`, optionally with a
revision and a subfolder, in the form `huggingface_hub`'s file system uses (`org/name@revision/subfolder`,
an `hf://` prefix allowed). A path that exists on this machine is always a path. The id is resolved
once, where the command reads its arguments (`resolve_model_argument`); everything below receives the
local folder and checks it as it checks any folder (`ldm_core.models.pretrained`).

What is fetched: only the files the model needs, each named exactly (`config.json` and
`diffusion_pytorch_model.safetensors` of an autoencoder, at the repository's root or in its `vae/`
subfolder; `model_index.json` and the three components of a pipeline), into the standard cache
(`HF_HUB_CACHE`, by default `~/.cache/huggingface/hub`). Online, the repository's file list is read
first, so a repository that holds code in the model's folder, or its weights only as pickles, is
refused before anything is downloaded. Offline (`HF_HUB_OFFLINE=1`), the cached snapshot is used without
touching the network, and the same local checks refuse what they refuse in any folder; a model that is
not cached gets one line naming it and the command that fetches it (docs/hub.md).
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm_core.models.pretrained import CODE_SUFFIXES, PICKLE_SUFFIXES, UnsafeModelFolderError

logger = logging.getLogger("ldm.hub")

AUTOENCODER, PIPELINE = "autoencoder", "pipeline"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# The sharded form of WEIGHTS (diffusers' save_pretrained with a max_shard_size): -00001-of-00002.safetensors.
_SHARD = re.compile(r"diffusion_pytorch_model-\d+-of-\d+\.safetensors")
# A pipeline's components and the files each needs (pipelines/latent_diffusion.py reads exactly these).
_PIPELINE_FILES = {"vae": ("config.json", WEIGHTS), "unet": ("config.json", WEIGHTS),
                   "scheduler": ("scheduler_config.json",)}
# huggingface_hub's rules for a repository id: two names of letters, digits and - _ . joined by one slash.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REFERENCE = re.compile(rf"^(?:hf://)?(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^/@]+))?(?:/(?P<subfolder>[^@]+?))?/?$")


class HubError(OSError):
    """A Hub id that cannot be resolved (offline and not cached, unreachable, no such repository or file);
    the message says what is missing and how to get it."""


@dataclass(frozen=True)
class HubReference:
    """`org/name[@revision][/subfolder]`: a model on the Hugging Face Hub."""

    repo_id: str
    revision: Optional[str] = None
    subfolder: Optional[str] = None

    @property
    def repository(self) -> str:
        """`org/name`, or `org/name@revision` when one is given."""
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def __str__(self) -> str:
        return self.repository + (f"/{self.subfolder}" if self.subfolder else "")


def parse_hub_reference(text: str) -> Optional[HubReference]:
    """The Hub reference `text` spells, or None when it cannot be one (`./x`, `/abs`, `a`, `a/b/../c`).

    A revision that itself holds a slash (`refs/pr/3`) is written URL-encoded, as in `huggingface_hub`'s
    file system: `org/name@refs%2Fpr%2F3`.
    """
    match = _REFERENCE.match(str(text))
    if match is None or ".." in match.group("repo") or ".." in (match.group("subfolder") or ""):
        return None
    revision = match.group("revision")
    return HubReference(match.group("repo"), revision.replace("%2F", "/") if revision else None,
                        match.group("subfolder"))


def resolve_model_argument(value: str | Path, *, kind: str, option: str) -> Path:
    """The local folder a command's model argument names: the path itself when it exists here, else the
    Hub model `value` names, fetched into (or found in) the Hugging Face cache.

    Parameters:
        value: what the user typed (a path, or `org/name[@revision][/subfolder]`).
        kind: "autoencoder" (an `AutoencoderKL`: the repository's root, or its `vae/` subfolder when the
            root holds none) or "pipeline" (a `LatentDiffusionPipeline` folder).
        option: the flag, for messages ("--vae", "--model").

    Raises:
        FileNotFoundError: not a path here and not a Hub id.
        HubError: the Hub model cannot be had (the message gives the fetch command or the local route).
        UnsafeModelFolderError: the repository holds code in the model's folder, or pickle-only weights.
    """
    text = str(value)
    path = Path(text).expanduser()
    if path.exists():
        return path
    reference = parse_hub_reference(text)
    if reference is None:
        raise FileNotFoundError(f"{option} {text}: no such folder here, and not a Hugging Face Hub id "
                                f"(org/name[@revision][/subfolder]).")
    return fetch_model(reference, kind=kind, option=option)


def fetch_model(reference: HubReference, *, kind: str, option: str = "--model") -> Path:
    """The local folder of a Hub model, fetched on first use; see `resolve_model_argument`."""
    from huggingface_hub import is_offline_mode

    if kind not in (AUTOENCODER, PIPELINE):
        raise ValueError(f"kind must be {AUTOENCODER!r} or {PIPELINE!r}, not {kind!r}.")
    if is_offline_mode():
        return _from_cache(reference, kind, option)
    return _download(reference, kind, option)


def fetch_command(reference: HubReference, kind: str, folder: Optional[str] = None) -> str:
    """The `hf download` command that fetches exactly what `fetch_model` would, on a machine with internet."""
    args = ["hf", "download", reference.repo_id]
    if reference.revision:
        args += ["--revision", reference.revision]
    for pattern in fetch_patterns(kind, folder if folder is not None else reference.subfolder):
        args += ["--include", pattern]
    return shlex.join(args)


def fetch_patterns(kind: str, folder: Optional[str]) -> list[str]:
    """The files of a model, by exact name (no wildcard, so no other component and no fp16 variant comes
    along); `folder` None means "not known yet": an autoencoder at the root or in vae/."""
    if kind == PIPELINE:
        base = folder or ""
        return [_join(base, "model_index.json")] + [_join(_join(base, component), name)
                                                    for component, names in _PIPELINE_FILES.items() for name in names]
    folders = [folder] if folder is not None else ["", "vae"]
    return [_join(sub, name) for sub in folders for name in ("config.json", WEIGHTS)]


# --------------------------------------------------------------------------------------------------
# Online: list the repository, refuse what would be refused locally, fetch the exact files.


def _download(reference: HubReference, kind: str, option: str) -> Path:
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        # The library's own metadata timeout (HF_HUB_ETAG_TIMEOUT, 10 s by default): an unreachable Hub is
        # reported in seconds, not after the operating system's connect timeout.
        info = HfApi().model_info(reference.repo_id, revision=reference.revision,
                                  timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - huggingface_hub and httpx raise a different type per failure
        raise _hub_failure(err, reference, kind, option) from None
    files = sorted(s.rfilename for s in info.siblings or [])
    folder = _model_folder(files, reference, kind)
    wanted = _files_to_fetch(files, folder, reference, kind)
    logger.info("Fetching %s (commit %s): %s", reference, (info.sha or "?")[:12], ", ".join(wanted))
    try:
        # By the name the user gave (not the commit), so the cache records it (refs/) for offline use later.
        snapshot = snapshot_download(reference.repo_id, revision=reference.revision, allow_patterns=wanted)
    except Exception as err:  # noqa: BLE001 - as above, during the download itself
        raise _hub_failure(err, reference, kind, option) from None
    return Path(snapshot) / folder


def _model_folder(files: list[str], reference: HubReference, kind: str) -> str:
    """Where in the repository the model lies: the named subfolder, else (an autoencoder) the root when it
    holds a config.json, else vae/."""
    marker = "model_index.json" if kind == PIPELINE else "config.json"
    candidates = [reference.subfolder] if reference.subfolder else [""] + (["vae"] if kind == AUTOENCODER else [])
    for folder in candidates:
        if (f"{folder}/{marker}" if folder else marker) in files:
            return folder
    where = " or ".join(f"{c}/{marker}" if c else marker for c in candidates)
    hint = ("name the subfolder that holds the autoencoder: org/name/SUBFOLDER" if kind == AUTOENCODER else
            "give a repository saved by LatentDiffusionPipeline.save_pretrained")
    raise HubError(f"{reference.repository} has no {where} on "
                   f"the Hub, so it holds no diffusers {'AutoencoderKL' if kind == AUTOENCODER else 'pipeline'} "
                   f"there; {hint}.")


def _files_to_fetch(files: list[str], folder: str, reference: HubReference, kind: str) -> list[str]:
    """The exact files to fetch; refuses code in any folder that would be read, and pickle-only weights."""
    weight_folders = [folder] if kind == AUTOENCODER else [_join(folder, "vae"), _join(folder, "unet")]
    read_folders = weight_folders if kind == AUTOENCODER else [folder, *weight_folders, _join(folder, "scheduler")]
    for sub in read_folders:
        code = [f for f in files if f.rpartition("/")[0] == sub and f.endswith(CODE_SUFFIXES)]
        if code:
            raise UnsafeModelFolderError(
                f"{reference.repo_id} holds code in the folder the model is read from ({', '.join(code[:3])}). "
                f"Model folders are read as data only and code in them is never run; this one is refused.")
    wanted = [p for p in fetch_patterns(kind, folder) if p in files]
    for sub in weight_folders:
        inside = [f for f in files if f.rpartition("/")[0] == sub]
        names = [f.rpartition("/")[2] for f in inside]
        shards = [f for f in inside if _SHARD.fullmatch(f.rpartition("/")[2])]
        if WEIGHTS in names:
            continue
        if shards and WEIGHTS_INDEX in names:  # diffusers' sharded save: the index and its shards
            wanted += [_join(sub, WEIGHTS_INDEX), *shards]
            continue
        pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise UnsafeModelFolderError(
                f"{reference.repo_id} holds the weights in {sub or 'its root'} only as pickle files "
                f"({', '.join(pickled[:3])}); only safetensors weights are read, because unpickling can run "
                f"code. Ask its owner for safetensors weights, or convert them in a trusted environment and give "
                f"the local folder.")
        variants = [n for n in names if n.endswith(".safetensors")]
        raise HubError(f"{reference.repo_id} has no {WEIGHTS} in {sub or 'its root'}"
                       + (f" (only {', '.join(variants[:3])})" if variants else "")
                       + "; give a repository saved with diffusers' save_pretrained in full precision.")
    return sorted(set(wanted))


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _hub_failure(err: Exception, reference: HubReference, kind: str, option: str) -> Exception:
    """One line for what went wrong talking to the Hub, with what to do."""
    from huggingface_hub import errors

    if isinstance(err, (UnsafeModelFolderError, HubError)):
        return err
    name = reference.repository
    if isinstance(err, errors.GatedRepoError):
        return HubError(f"{name} is gated on the Hub: accept its terms on its page, log in with `hf auth login`, "
                        f"and run the command again.")
    if isinstance(err, errors.RevisionNotFoundError):
        return HubError(f"{name}: the Hub has no revision {reference.revision!r} of {reference.repo_id}.")
    if isinstance(err, errors.RepositoryNotFoundError):
        return HubError(f"{option} {reference}: no such folder here, and no model {reference.repo_id} on the Hub "
                        f"(or it is private: log in with `hf auth login`).")
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    return HubError(f"{option} {reference}: the Hugging Face Hub cannot be reached ({type(err).__name__}: {reason}). "
                    f"{_offline_route(reference, kind, option)}")


# --------------------------------------------------------------------------------------------------
# Offline: the cached snapshot, or one line on how to get it.


def _from_cache(reference: HubReference, kind: str, option: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        # The patterns limit huggingface_hub's completeness check to the model's own files.
        snapshot = Path(snapshot_download(reference.repo_id, revision=reference.revision, local_files_only=True,
                                          allow_patterns=fetch_patterns(kind, reference.subfolder)))
    except Exception as err:  # noqa: BLE001 - not cached, an incomplete snapshot, a revision not cached
        raise HubError(f"{option} {reference}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and this "
                       f"machine is offline (HF_HUB_OFFLINE=1). {_offline_route(reference, kind, option)}") from None
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    try:
        folder = _model_folder(files, reference, kind)
    except HubError:
        raise HubError(f"{option} {reference}: the cached snapshot {snapshot} holds no "
                       f"{'autoencoder' if kind == AUTOENCODER else 'pipeline'} (no "
                       f"{' or '.join(fetch_patterns(kind, reference.subfolder)[:2])}). "
                       f"{_offline_route(reference, kind, option)}") from None
    return snapshot / folder


def _offline_route(reference: HubReference, kind: str, option: str) -> str:
    local = reference.repo_id.rpartition("/")[2]
    return (f"On a machine with internet run `{fetch_command(reference, kind)} --local-dir {local}`, copy {local}/ "
            f"here and give {option} {local}{'/' + reference.subfolder if reference.subfolder else ''} (or fetch "
            f"it into this machine's cache with the same command without --local-dir while online).")


def describe_model_source(folder: str | Path) -> str:
    """`org/name@commit/subfolder` for a folder inside the Hugging Face cache, else the folder as given:
    where a model came from, for run records and model cards."""
    parts = Path(folder).parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            repo = part[len("models--"):].replace("--", "/")
            rest = "/".join(parts[i + 3:])
            return f"{repo}@{parts[i + 2]}" + (f"/{rest}" if rest else "")
    return str(folder)


def hub_repo_id(folder: str | Path) -> Optional[str]:
    """`org/name` for a folder inside the Hugging Face cache, else None."""
    source = describe_model_source(folder)
    return source.partition("@")[0] if source != str(folder) else None
