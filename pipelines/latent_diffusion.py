"""`LatentDiffusionPipeline`: unconditional or class-conditional image generation in a KL latent space.

It composes three stock diffusers components (AutoencoderKL, UNet2DModel, any scheduler) in one
`__call__`, like diffusers' `DDPMPipeline` and its deprecated, VQ-only `LDMPipeline`: draw latent noise,
denoise it with the scheduler, undo the latent scaling, decode.

Saved folders have diffusers' standard layout (`model_index.json`, `vae/`, `unet/`, `scheduler/`) and
every component loads with plain diffusers classes, e.g. `AutoencoderKL.from_pretrained(folder,
subfolder="vae")`. The pipeline itself loads with `LatentDiffusionPipeline.from_pretrained(folder_or_hub_id)` from
this package (a Hub id is fetched on first use: `ldm_core.models.hub`). `diffusers.DiffusionPipeline.from_pretrained(folder)` alone cannot: it looks
`model_index.json`'s `_class_name` up inside the diffusers package, and its `custom_pipeline=<file>`
route executes that file as remote code (it demands `trust_remote_code=True`), which this project does not
rely on. No code is ever stored in, or run from, a model folder: `LatentDiffusionPipeline.from_pretrained`
fetches only the pipeline's config, scheduler and safetensors files from the Hub, refuses `custom_pipeline` / `trust_remote_code`, refuses a folder holding
Python files or pickle-only weights, accepts in `model_index.json` only the three stock diffusers
components, and reads weights with safetensors.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ldm_core.models.hub import PIPELINE, HubReference, fetch_model, parse_hub_reference, resolve_model_argument
from ldm_core.models.latent_scale import unscale_latents
from ldm_core.models.pretrained import (ModelFolderError, UnsafeModelFolderError, check_model_folder, check_model_weights,
                                 load_model_folder, read_config_file, read_model_config, short_reason)

# The only components a saved folder may name, each a class of the diffusers package.
_COMPONENT_BASES = {"vae": AutoencoderKL, "unet": UNet2DModel, "scheduler": SchedulerMixin}
# from_pretrained options that would load code from the folder or the Hub.
_CODE_OPTIONS = ("custom_pipeline", "custom_revision", "trust_remote_code")


def check_model_index(folder: Union[str, os.PathLike], class_name: str = "LatentDiffusionPipeline") -> dict:
    """Read `folder/model_index.json` and refuse anything but `class_name` with stock diffusers parts.

    diffusers resolves each `[library, class]` pair of `model_index.json` itself; a pair naming another
    library, or a file next to the component, is a route to code this project never takes.

    Raises:
        FileNotFoundError: no model_index.json.
        UnsafeModelFolderError: another pipeline class, an unknown component, or a component class that
            is not the expected diffusers class.
    """
    index_file = Path(folder) / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} is not a pipeline folder (no model_index.json). Give the 'pipeline' "
                                f"folder of a Stage B run (it holds model_index.json, vae/, unet/, scheduler/).")
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
        base = _COMPONENT_BASES.get(name)
        stock = isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == "diffusers"
        cls = getattr(diffusers, value[1], None) if stock and isinstance(value[1], str) else None
        if base is None or not (isinstance(cls, type) and issubclass(cls, base)):
            expected = (f'["diffusers", a {base.__name__} class]' if base is not None
                        else f"no entry (the components are {', '.join(_COMPONENT_BASES)})")
            raise UnsafeModelFolderError(f"{index_file}: {name!r} is {value!r}; expected {expected}. This loader "
                                         f"only builds stock diffusers components.")
    missing = [name for name in _COMPONENT_BASES if name not in index]
    if missing:
        raise UnsafeModelFolderError(f"{index_file} lacks the component(s) {', '.join(missing)}; re-save the pipeline.")
    return index


_PIPELINE_HINT = ("; give the 'pipeline' folder of a Stage B run (it holds model_index.json, vae/, unet/, "
                  "scheduler/)")


def check_latent_channels(unet_in: int, unet_out: int, vae_latent: int) -> None:
    """A U-Net is trained on one autoencoder's latents; any other VAE decodes nonsense or fails deep inside."""
    if unet_in != vae_latent or unet_out != vae_latent:
        raise ValueError(f"The U-Net takes {unet_in} and predicts {unet_out} latent channels but the VAE has "
                         f"latent_channels={vae_latent}: they were not trained together. Use the VAE the U-Net "
                         f"was trained on (the vae/ folder of the same pipeline).")


def check_sampling_arguments(*, num_inference_steps, guidance_scale=1.0, eta=0.0,
                             num_train_timesteps: Optional[int] = None, conditional: Optional[bool] = None,
                             names: Optional[dict] = None) -> None:
    """Refuse sampling settings that would fail, or give NaN images, only once sampling has started.

    Parameters:
        num_inference_steps: 1 .. `num_train_timesteps` (diffusers' DDPM and DDIM schedulers raise past the
            training steps; the other samplers repeat timesteps there).
        guidance_scale: finite and >= 0 (0 is the unconditional model, 1 the plain conditional one); a value
            other than 1 needs a class-conditional U-Net (`conditional`, when known).
        eta: DDIM's eta (Song et al. 2021) in [0, 1]: above 1 the DDIM variance exceeds 1 - alpha_{t-1} and
            the step takes the square root of a negative number.
        names: how to call each argument in messages (e.g. {"num_inference_steps": "--steps"}).

    Raises ValueError naming the argument and its allowed range.
    """
    label = {"num_inference_steps": "num_inference_steps", "guidance_scale": "guidance_scale", "eta": "eta",
             **(names or {})}
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"{label['num_inference_steps']} must be a whole number of at least 1, got {steps!r}.")
    if num_train_timesteps is not None and steps > num_train_timesteps:
        raise ValueError(f"{label['num_inference_steps']}={steps} is more than the {num_train_timesteps} steps the "
                         f"model was trained with; use 1..{num_train_timesteps} (15-50 is usual).")
    for key, value, upper in (("guidance_scale", guidance_scale, None), ("eta", eta, 1.0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0 \
                or (upper is not None and value > upper):
            allowed = "a number from 0 to 1" if upper is not None else "a finite number >= 0 (1 = no guidance)"
            raise ValueError(f"{label[key]} must be {allowed}, got {value!r}.")
    if conditional is False and guidance_scale != 1.0:
        raise ValueError(f"{label['guidance_scale']} != 1 needs a class-conditional U-Net (got {guidance_scale:g}); "
                         f"this U-Net is unconditional, so leave {label['guidance_scale']} at 1.")


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

    @property
    def num_classes(self) -> int:
        embeds = self.unet_config.get("num_class_embeds")
        return 0 if embeds is None else int(embeds) - 1

    @property
    def class_names(self) -> Optional[list[str]]:
        return self.index.get("class_names")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)


def inspect_pipeline_folder(folder: Union[str, os.PathLike],
                            class_name: str = "LatentDiffusionPipeline") -> PipelineFolder:
    """Check a saved pipeline folder without loading its weights; return what it holds.

    Runs every check `LatentDiffusionPipeline.from_pretrained` relies on: `check_model_index`,
    `check_model_folder` (no code, no pickle-only weights), each component's config a JSON object of the
    class `model_index.json` names, the scheduler buildable from its config, the U-Net's latent channels
    equal to the VAE's, class names fitting the class embedding, and the weights of vae/ and unet/
    exactly the tensors their configs describe (`check_model_weights`).

    Raises:
        FileNotFoundError: not a pipeline folder.
        UnsafeModelFolderError, ModelFolderError, ValueError: the message names the file and what is wrong.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"The pipeline folder {folder} does not exist. Give the 'pipeline' folder of a "
                                f"Stage B run; models are never downloaded.")
    index = check_model_index(folder, class_name)
    check_model_folder(folder, what="pipeline folder")
    classes = {name: getattr(diffusers, index[name][1]) for name in _COMPONENT_BASES}
    vae_config = read_model_config(folder / "vae", classes["vae"], hint=_PIPELINE_HINT)
    unet_config = read_model_config(folder / "unet", classes["unet"], hint=_PIPELINE_HINT)
    scheduler_file = folder / "scheduler" / classes["scheduler"].config_name
    scheduler_config = read_config_file(scheduler_file, hint=_PIPELINE_HINT)
    try:
        scheduler = classes["scheduler"].from_config(scheduler_config)
    except Exception as err:  # noqa: BLE001 - a scheduler fed bad settings raises anything
        raise ModelFolderError(f"{scheduler_file}: a {classes['scheduler'].__name__} cannot be built from these "
                               f"settings ({type(err).__name__}: {short_reason(err)}); re-save the pipeline.") from None
    check_model_weights(classes["vae"], folder / "vae", vae_config)
    check_model_weights(classes["unet"], folder / "unet", unet_config)
    # The configs are now known to build their models; absent fields take the classes' defaults.
    check_latent_channels(_setting(classes["unet"], unet_config, "in_channels"),
                          _setting(classes["unet"], unet_config, "out_channels"),
                          _setting(classes["vae"], vae_config, "latent_channels"))
    info = PipelineFolder(folder, index, vae_config, unet_config, scheduler)
    names = info.class_names
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                              or len(names) != info.num_classes):
        raise ModelFolderError(f"{folder / 'model_index.json'}: class_names is {names!r}, which does not fit the "
                               f"U-Net's {info.num_classes} classes ({folder / 'unet' / 'config.json'}); re-save "
                               f"the pipeline.")
    return info

ClassLabels = Union[int, str, Sequence[Union[int, str]], torch.Tensor, None]


def class_ids_for(class_labels, batch_size: int, num_classes: int, class_names: Optional[Sequence[str]] = None,
                  *, option: str = "class_labels") -> Optional[list[int]]:
    """Class ids for a batch from ints or class names; one value is repeated over the batch.

    Works from the model's class count and names alone, so a command can check a requested class
    before it loads the model. `option` names the argument in messages (e.g. "--class").

    Returns None for an unconditional model given no labels. Raises ValueError naming the known classes.
    """
    names = list(class_names or [])
    known = (', '.join(names) if names else f'(none named; use ids 0..{num_classes - 1})')
    if class_labels is None:
        if num_classes:
            raise ValueError(f"This U-Net is class-conditional: pass {option} (ids 0..{num_classes - 1} or names "
                             f"{', '.join(map(str, names or range(num_classes)))}).")
        return None
    if not num_classes:
        raise ValueError(f"This U-Net is unconditional (no class embedding), so it takes no {option}; leave "
                         f"{option} out.")
    if isinstance(class_labels, (int, str)):
        class_labels = [class_labels] * batch_size
    if len(class_labels) != batch_size:
        raise ValueError(f"Got {len(class_labels)} class labels for a batch of {batch_size} images.")
    ids = []
    for label in class_labels:
        if isinstance(label, str):
            if label not in names:
                raise ValueError(f"Unknown class name {label!r}. Known classes: {known}; pass one of them as {option}.")
            label = names.index(label)
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= int(label) < num_classes:
            raise ValueError(f"Class id {label} is out of range: use 0..{num_classes - 1} ({option}).")
        ids.append(int(label))
    return ids


class LatentDiffusionPipeline(DiffusionPipeline):
    r"""
    Generate images by denoising latents of a KL autoencoder with a `UNet2DModel`.

    Parameters:
        vae ([`AutoencoderKL`]): decodes latents to images; `vae.config.scaling_factor` (and
            `shift_factor`, if set) define the U-Net's latent space: scaled = (z - shift) * scaling_factor.
        unet ([`UNet2DModel`]): predicts the noise (or velocity, per the scheduler's `prediction_type`).
            With `num_class_embeds = K + 1` it is class-conditional with K classes and a null class K.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler built from the training schedule.
        class_names (`list[str]`, *optional*): names of the K classes, saved in `model_index.json`.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, scheduler: SchedulerMixin,
                 class_names: Optional[list[str]] = None):
        super().__init__()
        check_latent_channels(unet.config.in_channels, unet.config.out_channels, vae.config.latent_channels)
        num_embeds = unet.config.num_class_embeds
        if class_names is not None and (num_embeds is None or len(class_names) != num_embeds - 1):
            raise ValueError(f"{len(class_names)} class names given but the U-Net has "
                             f"{'no class embedding' if num_embeds is None else f'{num_embeds - 1} classes'}.")
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names) if class_names is not None else None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load a folder written by `save_pretrained`, without running or unpickling anything from it.

        Parameters:
            pretrained_model_name_or_path: a local pipeline folder, or a Hugging Face Hub id
                (`org/name[@revision]`) whose files are fetched on first use into the Hugging Face cache
                (`ldm_core.models.hub`: only the config, scheduler and safetensors files of the pipeline).
            revision: the Hub revision, as in diffusers (also writable as `org/name@revision`).
            **kwargs: passed to `DiffusionPipeline.from_pretrained` (e.g. `torch_dtype`), except the options
                that load code (`custom_pipeline`, `custom_revision`, `trust_remote_code`), which are refused,
                and `use_safetensors`, which is always True.

        The folder is checked first (`inspect_pipeline_folder`), and vae/ and unet/ are loaded with
        `ldm_core.models.pretrained.load_model_folder`, which refuses weights that do not fill every tensor of the
        model (diffusers alone would start missing tensors from random values with only a warning).

        Raises:
            FileNotFoundError: not a pipeline folder.
            UnsafeModelFolderError: see `check_model_index` and `ldm_core.models.pretrained.check_model_folder`.
            ModelFolderError: a config that is not JSON or describes another class, or weights that do not
                match their config; the message names the file.
            ValueError: a code-loading option was passed, or the U-Net does not fit the VAE.
        """
        for option in _CODE_OPTIONS:
            if kwargs.get(option):
                raise ValueError(f"{option} is not supported: a LatentDiffusionPipeline is built from stock diffusers "
                                 f"classes only, and no code is loaded from a model folder.")
            kwargs.pop(option, None)
        if kwargs.pop("use_safetensors", True) is not True:
            raise ValueError("use_safetensors must stay True: pickle weight files can run code when loaded.")
        revision = kwargs.pop("revision", None)
        reference = parse_hub_reference(str(pretrained_model_name_or_path))
        if revision and reference is not None and not Path(pretrained_model_name_or_path).exists():
            folder = fetch_model(HubReference(reference.repo_id, revision, reference.subfolder), kind=PIPELINE)
        else:
            folder = resolve_model_argument(pretrained_model_name_or_path, kind=PIPELINE,
                                            option="pretrained_model_name_or_path")
        info = inspect_pipeline_folder(folder, cls.__name__)
        dtype = {"torch_dtype": kwargs["torch_dtype"]} if kwargs.get("torch_dtype") is not None else {}
        components = {name: load_model_folder(getattr(diffusers, info.index[name][1]), folder / name,
                                              what=f"{name}/ folder of the pipeline", hint=_PIPELINE_HINT, **dtype)
                      for name in ("vae", "unet")}
        return super().from_pretrained(folder, use_safetensors=True, local_files_only=True, **components, **kwargs)

    @property
    def num_classes(self) -> int:
        """K for a class-conditional U-Net (embedding id K is the null class), 0 for an unconditional one."""
        embeds = self.unet.config.num_class_embeds
        return 0 if embeds is None else embeds - 1

    def check_inputs(self, num_inference_steps: int, guidance_scale: float = 1.0, eta: float = 0.0,
                     names: Optional[dict] = None) -> None:
        """Refuse settings this pipeline cannot sample with (see `check_sampling_arguments`), before any work."""
        check_sampling_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                                 num_train_timesteps=self.scheduler.config.get("num_train_timesteps"),
                                 conditional=bool(self.num_classes), names=names)

    def resolve_class_labels(self, class_labels: ClassLabels, batch_size: int) -> Optional[torch.Tensor]:
        """Class ids (batch_size,) from ints or class names; one value is repeated over the batch."""
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.tolist()
        ids = class_ids_for(class_labels, batch_size, self.num_classes, self.config.class_names)
        return None if ids is None else torch.tensor(ids, dtype=torch.long, device=self._execution_device)

    def _step_kwargs(self, generator, eta: float) -> dict:
        # Like diffusers' prepare_extra_step_kwargs: only pass what this scheduler's step accepts.
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 50,
                 generator: Union[torch.Generator, list[torch.Generator], None] = None, eta: float = 0.0,
                 output_type: str = "pil", return_dict: bool = True, latents: Optional[torch.Tensor] = None,
                 class_labels: ClassLabels = None, guidance_scale: float = 1.0, decode_batch_size: int = 8
                 ) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Generate `batch_size` images.

        Parameters:
            batch_size: number of images.
            num_inference_steps: denoising steps.
            generator: one generator, or a list with one per image so image i depends only on its own
                generator (then results do not depend on how images are batched).
            eta: DDIM's eta (Song et al. 2021); passed only to schedulers whose `step` accepts it.
            output_type: "pil", "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in [0, 1], or "latent"
                (the scaled latents, not decoded).
            latents: optional starting noise ~ N(0, I), (B, C, h, w), used instead of drawing it (multiplied
                by the scheduler's `init_noise_sigma`, as diffusers pipelines do).
            class_labels: for a class-conditional U-Net: one id or name, or one per image.
            guidance_scale: classifier-free guidance weight w (Ho & Salimans 2022):
                eps = eps_uncond + w * (eps_cond - eps_uncond); 1 is the plain conditional model.
            decode_batch_size: images decoded at once, to bound the decoder's memory.

        Returns [`ImagePipelineOutput`] with `.images`, or a 1-tuple when `return_dict` is False.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"Unknown output_type {output_type!r}: use pil, np, pt or latent.")
        if batch_size < 1 or decode_batch_size < 1:
            raise ValueError("batch_size and decode_batch_size must be positive.")
        self.check_inputs(num_inference_steps, guidance_scale, eta)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} images; pass one per image.")
        # Sampling is inference: run the models in eval mode (a U-Net handed over from a training loop may be
        # in train mode, where kernels and dropout differ) and give them back in the mode they came in.
        modes = {m: m.training for m in (self.unet, self.vae)}
        try:
            for module in modes:
                module.eval()
            return self._generate(batch_size, num_inference_steps, generator, eta, output_type, return_dict,
                                  latents, class_labels, guidance_scale, decode_batch_size)
        finally:
            for module, training in modes.items():
                module.train(training)

    def _generate(self, batch_size, num_inference_steps, generator, eta, output_type, return_dict, latents,
                  class_labels, guidance_scale, decode_batch_size):
        device = self._execution_device
        labels = self.resolve_class_labels(class_labels, batch_size)
        guided = labels is not None and guidance_scale != 1.0
        if guidance_scale != 1.0 and labels is None:
            raise ValueError("guidance_scale != 1 needs a class-conditional U-Net and class_labels.")

        # 1. Starting noise, one draw per image generator.
        size = self.unet.config.sample_size
        hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        shape = (batch_size, self.unet.config.in_channels, *hw)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this U-Net needs {shape}.")
        latents = latents.to(device=device, dtype=self.unet.dtype) * self.scheduler.init_noise_sigma
        if guided:
            null = torch.full_like(labels, self.num_classes)
            model_labels = torch.cat([null, labels])
        else:
            model_labels = labels

        # 2. Denoise.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = self._step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            # One U-Net call for the unconditional and conditional predictions together.
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            prediction = self.unet(model_input, t, class_labels=model_labels).sample
            if guided:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample

        # NaN or inf latents decode to black or noise images that look like a result; stop instead.
        if not torch.isfinite(latents).all():
            raise FloatingPointError(f"The latents became NaN or infinite after {num_inference_steps} "
                                     f"{type(self.scheduler).__name__} steps (guidance_scale={guidance_scale:g}); "
                                     f"check that the model's weights are finite, or use fp32 and another sampler.")

        # 3. Decode.
        if output_type == "latent":
            images = latents
        else:
            z = unscale_latents(latents, self.vae.config).to(self.vae.dtype)
            decoded = [self.vae.decode(chunk).sample for chunk in z.split(decode_batch_size)]
            images = (torch.cat(decoded).float().clamp(-1, 1) + 1) / 2
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
