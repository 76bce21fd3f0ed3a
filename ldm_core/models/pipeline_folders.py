"""Pipeline folders (diffusers' `model_index.json`, `vae/`, `unet/`, `scheduler/` layout): what may be in one,
what it holds, and whether its U-Net and autoencoder belong together.

A folder is checked from its files alone (`inspect_pipeline_folder`), before anything is loaded: a command
can then check its own arguments against the model it describes (class names, training steps) in a
second, and `LatentDiffusionPipeline` loads the folder without checking it again. Whether the parts fit each
other (`check_pipeline_parts`) is checked where a pipeline is built from them, which every loaded folder
passes through too.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import diffusers
from diffusers import AutoencoderKL, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm_core.models.pretrained import (ModelFolderError, UnsafeModelFolderError, check_model_folder,
                                        check_model_weights, read_config_file, read_model_config, short_reason)

# The only components a saved folder may name, each a class of the diffusers package.
COMPONENT_BASES = {"vae": AutoencoderKL, "unet": UNet2DModel, "scheduler": SchedulerMixin}

# What to give instead, appended to messages about a folder given as a pipeline.
PIPELINE_FOLDER_HINT = ("; give the 'pipeline' folder of a Stage B run (it holds model_index.json, vae/, unet/, "
                        "scheduler/)")


def check_model_index(folder: Union[str, os.PathLike], class_name: str = "LatentDiffusionPipeline", *,
                      what: str = "") -> dict:
    """Read `folder/model_index.json` and refuse anything but `class_name` with stock diffusers parts.

    diffusers resolves each `[library, class]` pair of `model_index.json` itself; a pair naming another
    library, or a file next to the component, is a route to code this project never takes. `what` names
    the folder in messages (e.g. "--model folder").

    Raises:
        FileNotFoundError: no model_index.json.
        UnsafeModelFolderError: another pipeline class, an unknown component, or a component class that
            is not the expected diffusers class.
    """
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{what + ' ' if what else ''}{folder} is not a pipeline folder (no "
                                f"model_index.json). Give the 'pipeline' folder of a Stage B run (it holds "
                                f"model_index.json, vae/, unet/, scheduler/).")
    try:
        index = json.loads(index_file.read_text())
    except ValueError as err:
        raise UnsafeModelFolderError(f"{index_file} is not valid JSON ({err}); re-save the pipeline.") from None
    if not isinstance(index, dict) or index.get("_class_name") != class_name:
        found = index.get("_class_name") if isinstance(index, dict) else index
        raise UnsafeModelFolderError(f"{index_file} describes {found!r}, not a {class_name}; this loader only "
                                     f"reads folders saved by {class_name}.save_pretrained.")
    for name, value in index.items():
        if name.startswith("_") or name == "class_names":
            continue
        base = COMPONENT_BASES.get(name)
        stock = isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == "diffusers"
        cls = getattr(diffusers, value[1], None) if stock and isinstance(value[1], str) else None
        if base is None or not (isinstance(cls, type) and issubclass(cls, base)):
            expected = (f'["diffusers", a {base.__name__} class]' if base is not None
                        else f"no entry (the components are {', '.join(COMPONENT_BASES)})")
            raise UnsafeModelFolderError(f"{index_file}: {name!r} is {value!r}; expected {expected}. This loader "
                                         f"only builds stock diffusers components.")
    missing = [name for name in COMPONENT_BASES if name not in index]
    if missing:
        raise UnsafeModelFolderError(f"{index_file} lacks the component(s) {', '.join(missing)}; re-save the pipeline.")
    return index


def check_pipeline_parts(*, unet_in_channels: int, unet_out_channels: int, vae_latent_channels: int,
                         num_class_embeds: Optional[int], class_names) -> None:
    """Refuse a U-Net and autoencoder that were not trained together, or class names that do not fit the U-Net.

    A U-Net is trained on one autoencoder's latents; any other VAE decodes nonsense or fails deep inside.
    A class-conditional U-Net has `num_class_embeds` = K + 1 (K classes and the null class of guidance);
    its class names, if given, are K strings in id order.

    Raises ValueError saying which part to change.
    """
    if unet_in_channels != vae_latent_channels or unet_out_channels != vae_latent_channels:
        raise ValueError(f"The U-Net takes {unet_in_channels} and predicts {unet_out_channels} latent channels but "
                         f"the VAE has latent_channels={vae_latent_channels}: they were not trained together. Use "
                         f"the VAE the U-Net was trained on (the vae/ folder of the same pipeline).")
    if class_names is None:
        return
    num_classes = 0 if num_class_embeds is None else num_class_embeds - 1
    if not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names) \
            or len(class_names) != num_classes:
        has = "no class embedding" if num_class_embeds is None else f"{num_classes} classes"
        raise ValueError(f"The class names {class_names!r} do not fit the U-Net, which has {has}: give one name "
                         f"per class, in id order, or none (a saved pipeline keeps them as class_names in "
                         f"model_index.json; re-save it).")


def _setting(cls: type, config: dict, key: str):
    """`config[key]`, or the default of `cls.__init__` when the saved config leaves it out."""
    if key in config:
        return config[key]
    return inspect.signature(cls.__init__).parameters[key].default


@dataclass(frozen=True)
class PipelineFolder:
    """What a saved pipeline folder holds, read from its JSON files and weight headers (nothing is loaded).

    Built by `inspect_pipeline_folder`, so a command can check its own arguments against the model
    (class names, training steps) before it loads anything heavy.
    """

    path: Path
    index: dict
    vae_config: dict
    unet_config: dict
    scheduler: SchedulerMixin

    def component_class(self, name: str) -> type:
        """The diffusers class `model_index.json` names for component `name` ("vae", "unet", "scheduler")."""
        return getattr(diffusers, self.index[name][1])

    @property
    def num_classes(self) -> int:
        embeds = _setting(self.component_class("unet"), self.unet_config, "num_class_embeds")
        return 0 if embeds is None else int(embeds) - 1

    @property
    def class_names(self) -> Optional[list[str]]:
        """The saved class names; None when there are none, or when they are not a list of names (the
        pipeline refuses those when it is built: `check_parts`)."""
        names = self.index.get("class_names")
        return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def check_parts(self) -> None:
        """`check_pipeline_parts` on the saved configs, for a command that checks a folder without building
        the pipeline (building it checks the same)."""
        unet, vae = self.component_class("unet"), self.component_class("vae")
        check_pipeline_parts(unet_in_channels=_setting(unet, self.unet_config, "in_channels"),
                             unet_out_channels=_setting(unet, self.unet_config, "out_channels"),
                             vae_latent_channels=_setting(vae, self.vae_config, "latent_channels"),
                             num_class_embeds=_setting(unet, self.unet_config, "num_class_embeds"),
                             class_names=self.index.get("class_names"))


def inspect_pipeline_folder(folder: Union[str, os.PathLike], class_name: str = "LatentDiffusionPipeline", *,
                            what: str = "pipeline folder") -> PipelineFolder:
    """Check a saved pipeline folder's files without loading its weights; return what it holds.

    The checks, in order: `check_model_index`, `check_model_folder` (no code, no pickle-only weights),
    each component's config a JSON object of the class `model_index.json` names, the scheduler buildable
    from its config, and the weights of vae/ and unet/ exactly the tensors their configs describe
    (`check_model_weights`). `what` names the folder in messages (e.g. "--model folder").

    Raises:
        FileNotFoundError: not a pipeline folder.
        UnsafeModelFolderError, ModelFolderError: the message names the file and what is wrong.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"The {what} {folder} does not exist. Give the 'pipeline' folder of a Stage B run, "
                                f"or the Hub id of one.")
    index = check_model_index(folder, class_name, what=what)
    check_model_folder(folder, what=what)
    classes = {name: getattr(diffusers, index[name][1]) for name in COMPONENT_BASES}
    vae_config = read_model_config(folder / "vae", classes["vae"], hint=PIPELINE_FOLDER_HINT)
    unet_config = read_model_config(folder / "unet", classes["unet"], hint=PIPELINE_FOLDER_HINT)
    scheduler_file = folder / "scheduler" / classes["scheduler"].config_name
    scheduler_config = read_config_file(scheduler_file, hint=PIPELINE_FOLDER_HINT)
    try:
        scheduler = classes["scheduler"].from_config(scheduler_config)
    except Exception as err:  # noqa: BLE001 - a scheduler fed bad settings raises anything
        raise ModelFolderError(f"{scheduler_file}: a {classes['scheduler'].__name__} cannot be built from these "
                               f"settings ({type(err).__name__}: {short_reason(err)}); re-save the pipeline.") from None
    check_model_weights(classes["vae"], folder / "vae", vae_config)
    check_model_weights(classes["unet"], folder / "unet", unet_config)
    return PipelineFolder(folder, index, vae_config, unet_config, scheduler)
