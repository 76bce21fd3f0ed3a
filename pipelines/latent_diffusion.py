"""`LatentDiffusionPipeline`: unconditional or class-conditional image generation in a KL latent space.

It composes three stock diffusers components (AutoencoderKL, UNet2DModel, any scheduler) in one
`__call__`, like diffusers' `DDPMPipeline` and its deprecated, VQ-only `LDMPipeline`: draw latent noise,
denoise it with the scheduler, undo the latent scaling, decode.

Saved folders have diffusers' standard layout (`model_index.json`, `vae/`, `unet/`, `scheduler/`) and
every component loads with plain diffusers classes, e.g. `AutoencoderKL.from_pretrained(folder,
subfolder="vae")`. The pipeline itself loads with `LatentDiffusionPipeline.from_pretrained(folder)` from
this package. `diffusers.DiffusionPipeline.from_pretrained(folder)` alone cannot: it looks
`model_index.json`'s `_class_name` up inside the diffusers package, and its `custom_pipeline=<file>`
route executes that file as remote code (it demands `trust_remote_code=True`), which this project does not
rely on. No code is ever stored in, or run from, a model folder: `LatentDiffusionPipeline.from_pretrained`
reads only local folders, refuses `custom_pipeline` / `trust_remote_code`, refuses a folder holding
Python files or pickle-only weights, accepts in `model_index.json` only the three stock diffusers
components, and reads weights with safetensors.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import diffusers
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ldm_core.latent_stats import unscale_latents
from ldm_core.pretrained import UnsafeModelFolderError, check_model_folder

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

ClassLabels = Union[int, str, Sequence[Union[int, str]], torch.Tensor, None]


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
        channels = vae.config.latent_channels
        if unet.config.in_channels != channels or unet.config.out_channels != channels:
            # A U-Net is trained on one autoencoder's latents; any other VAE decodes nonsense or fails deep inside.
            raise ValueError(f"The U-Net takes {unet.config.in_channels} and predicts {unet.config.out_channels} "
                             f"latent channels but the VAE has latent_channels={channels}: they were not trained together. "
                             f"Use the VAE the U-Net was trained on (the vae/ folder of the same pipeline).")
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
            pretrained_model_name_or_path: a local pipeline folder (nothing is downloaded).
            **kwargs: passed to `DiffusionPipeline.from_pretrained` (e.g. `torch_dtype`), except the options
                that load code (`custom_pipeline`, `custom_revision`, `trust_remote_code`), which are refused,
                and `use_safetensors`, which is always True.

        Raises:
            FileNotFoundError: not a pipeline folder.
            UnsafeModelFolderError: see `check_model_index` and `ldm_core.pretrained.check_model_folder`.
            ValueError: a code-loading option was passed, or the U-Net does not fit the VAE.
        """
        for option in _CODE_OPTIONS:
            if kwargs.get(option):
                raise ValueError(f"{option} is not supported: a LatentDiffusionPipeline is built from stock diffusers "
                                 f"classes only, and no code is loaded from a model folder.")
            kwargs.pop(option, None)
        if kwargs.pop("use_safetensors", True) is not True:
            raise ValueError("use_safetensors must stay True: pickle weight files can run code when loaded.")
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"The pipeline folder {folder} does not exist. Give the 'pipeline' folder of a "
                                    f"Stage B run; models are never downloaded.")
        check_model_index(folder, cls.__name__)
        check_model_folder(folder, what="pipeline folder")
        return super().from_pretrained(folder, use_safetensors=True, local_files_only=True, **kwargs)

    @property
    def num_classes(self) -> int:
        """K for a class-conditional U-Net (embedding id K is the null class), 0 for an unconditional one."""
        embeds = self.unet.config.num_class_embeds
        return 0 if embeds is None else embeds - 1

    def resolve_class_labels(self, class_labels: ClassLabels, batch_size: int) -> Optional[torch.Tensor]:
        """Class ids (batch_size,) from ints or class names; one value is repeated over the batch."""
        if class_labels is None:
            if self.num_classes:
                names = self.config.class_names or list(range(self.num_classes))
                raise ValueError(f"This U-Net is class-conditional: pass class_labels (ids 0..{self.num_classes - 1} "
                                 f"or names {', '.join(map(str, names))}).")
            return None
        if not self.num_classes:
            raise ValueError("class_labels were given but this U-Net is unconditional (no class embedding).")
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.tolist()
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels] * batch_size
        if len(class_labels) != batch_size:
            raise ValueError(f"Got {len(class_labels)} class labels for a batch of {batch_size} images.")
        names = list(self.config.class_names or [])
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(f"Unknown class name {label!r}. Known classes: "
                                     f"{', '.join(names) if names else '(none named; use ids 0..' + str(self.num_classes - 1) + ')'}.")
                label = names.index(label)
            if not 0 <= int(label) < self.num_classes:
                raise ValueError(f"Class id {label} is out of range: use 0..{self.num_classes - 1}.")
            ids.append(int(label))
        return torch.tensor(ids, dtype=torch.long, device=self._execution_device)

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
        if batch_size < 1 or num_inference_steps < 1 or decode_batch_size < 1:
            raise ValueError("batch_size, num_inference_steps and decode_batch_size must be positive.")
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
