"""`ldm push FOLDER org/name`: upload a saved autoencoder or pipeline, with its model card, to the Hub.

FOLDER is a model folder (an autoencoder's `config.json` or a pipeline's `model_index.json`) or a run
folder holding exactly one of them (`RUN/vae/` after Stage A, `RUN/pipeline/` after Stage B). The folder is
checked as any model folder is read (no code, safetensors weights, config and weights that agree), then
uploaded with `huggingface_hub` in one commit (`HfApi.create_repo`, `HfApi.create_commit` with every file of
the folder but hidden ones), so the repository holds the whole folder or none of it. Log in first with
`hf auth login` (or set HF_TOKEN).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ldm_core.models.model_card import CARD_FILE

logger = logging.getLogger("ldm.push")


def model_folder_to_push(path: str | Path) -> Path:
    """The model folder `path` names: itself, or the one model folder (vae/ or pipeline/) of a run folder.

    Raises FileNotFoundError (not a folder, or no model in it) or ValueError (a run with both stages)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; give a model folder (RUN/vae, RUN/pipeline) or a run folder.")
    if (path / "config.json").is_file() or (path / "model_index.json").is_file():
        return path
    found = [p for p in (path / "vae", path / "pipeline", path / "stage_a" / "vae", path / "stage_b" / "pipeline")
             if (p / "config.json").is_file() or (p / "model_index.json").is_file()]
    if not found:
        raise FileNotFoundError(f"{path} holds no model: no config.json or model_index.json, and no vae/ or pipeline/ "
                                f"folder with one. Give RUN/vae (an autoencoder) or RUN/pipeline (a pipeline).")
    if len(found) > 1:
        raise ValueError(f"{path} holds {len(found)} models ({', '.join(str(p) for p in found)}); give the one to "
                         f"push.")
    return found[0]


def check_folder(folder: Path) -> str:
    """Check `folder` as it would be checked when read back; returns its kind ("autoencoder" or "pipeline")."""
    from ldm_core.models.autoencoder_folders import read_vae_folder
    from ldm_core.models.pipeline_folders import inspect_pipeline_folder

    if (folder / "model_index.json").is_file():
        # Its files, and the fit of its parts that building the pipeline would check: nothing is loaded.
        inspect_pipeline_folder(folder).check_parts()
        return "pipeline"
    read_vae_folder(folder)
    return "autoencoder"


def upload_operations(folder: Path) -> list:
    """One `CommitOperationAdd` per file of `folder`, at its path inside it; hidden files and folders are left out."""
    from huggingface_hub import CommitOperationAdd

    files = [p for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                message: str | None = None) -> str:
    """Upload `folder` (see `model_folder_to_push`) to the model repository `repo_id`, creating it if needed.
    Returns the commit's URL."""
    from huggingface_hub import HfApi, is_offline_mode

    from ldm_core.models.hub import HubError, parse_hub_reference

    folder = model_folder_to_push(folder)
    kind = check_folder(folder)
    reference = parse_hub_reference(repo_id)
    if reference is None or reference.subfolder or reference.revision:
        raise ValueError(f"{repo_id!r} is not a Hub repository id; give org/name (your user or organisation, and "
                         f"the new model's name).")
    if is_offline_mode():
        raise HubError(f"ldm push needs the network and this machine is offline (HF_HUB_OFFLINE=1). Copy {folder} to "
                       f"a machine with internet and run `ldm push {folder.name} {repo_id}` there.")
    if not (folder / CARD_FILE).is_file():
        logger.warning("%s has no model card (%s): the repository will have none. Folders saved by ldm train-vae / "
                       "train-unet carry one.", folder, CARD_FILE)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id, operations=upload_operations(folder), revision=revision,
                                   commit_message=message or f"Upload {kind} with two-stage-ldm")
    except Exception as err:  # noqa: BLE001 - network, authentication and permission errors alike
        reason = " ".join(str(err).split())[:240] or type(err).__name__
        status = getattr(getattr(err, "response", None), "status_code", None)
        advice = ("Log in with `hf auth login` (a token with write access to it) and try again." if status in (401, 403)
                  else "Check the connection to the Hub and run it again (the upload is one commit: it lands "
                       "whole or not at all).")
        raise HubError(f"Could not upload {folder} to {repo_id} ({type(err).__name__}: {reason}). {advice}") from None
    return str(getattr(commit, "commit_url", commit))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="RUN/vae, RUN/pipeline, or a run folder holding one of them")
    parser.add_argument("repo_id", help="the Hub model repository to create or update, org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--message", default=None, help="commit message")


def main(args: argparse.Namespace) -> int:
    url = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision, message=args.message)
    print(f"Uploaded to {url}")
    return 0
