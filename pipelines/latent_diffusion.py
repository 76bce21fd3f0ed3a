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
fetches only the pipeline's config, scheduler and safetensors files from the Hub, refuses `custom_pipeline` /
`trust_remote_code`, and checks the folder before loading it (`ldm_core.models.pipeline_folders`: no Python
files or pickle-only weights, only the three stock diffusers components in `model_index.json`, weights that
are exactly the tensors of their configs), then reads the weights with safetensors.

The settings of a call (steps, guidance, eta, class labels) are checked by `check_inputs` before any work,
with the rules of `ldm_core.sampling`, which `ldm generate` applies to its flags before it loads a model.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ldm_core.models.hub import PIPELINE, HubReference, fetch_model, parse_hub_reference, resolve_model_argument
from ldm_core.models.latent_scale import unscale_latents
from ldm_core.models.pipeline_folders import PipelineFolder, check_pipeline_parts, inspect_pipeline_folder
from ldm_core.models.pretrained import load_checked_model_folder
from ldm_core.sampling import DEFAULT_SAMPLING_STEPS, check_sampling_arguments, class_ids_for

# from_pretrained options that would load code from the folder or the Hub.
_CODE_OPTIONS = ("custom_pipeline", "custom_revision", "trust_remote_code")
_OUTPUT_TYPES = ("pil", "np", "pt", "latent")

ClassLabels = Union[int, str, Sequence[Union[int, str]], torch.Tensor, None]


def _loading_options(kwargs: dict) -> dict:
    """`from_pretrained`'s keyword arguments without the options that would load code, which are refused."""
    kwargs = dict(kwargs)
    for option in _CODE_OPTIONS:
        if kwargs.get(option):
            raise ValueError(f"{option} is not supported: a LatentDiffusionPipeline is built from stock diffusers "
                             f"classes only, and no code is loaded from a model folder.")
        kwargs.pop(option, None)
    if kwargs.pop("use_safetensors", True) is not True:
        raise ValueError("use_safetensors must stay True: pickle weight files can run code when loaded.")
    return kwargs


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

    The parts must belong together (`check_pipeline_parts`): a pipeline loaded from a folder is built here
    too, so this is where a folder's mismatched U-Net and VAE, or class names, are refused.
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, scheduler: SchedulerMixin,
                 class_names: Optional[list[str]] = None):
        super().__init__()
        check_pipeline_parts(unet_in_channels=unet.config.in_channels, unet_out_channels=unet.config.out_channels,
                             vae_latent_channels=vae.config.latent_channels,
                             num_class_embeds=unet.config.num_class_embeds, class_names=class_names)
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

        The folder's files are checked first (`ldm_core.models.pipeline_folders.inspect_pipeline_folder`), then
        loaded as `from_pipeline_folder` does.

        Raises:
            FileNotFoundError: not a pipeline folder.
            UnsafeModelFolderError: code, pickle-only weights, or a `model_index.json` naming anything but
                stock diffusers components (`ldm_core.models.pipeline_folders.check_model_index`).
            ModelFolderError: a config that is not JSON or describes another class, or weights that do not
                match their config; the message names the file.
            ValueError: a code-loading option was passed, or the U-Net does not fit the VAE.
        """
        options = _loading_options(kwargs)
        revision = options.pop("revision", None)
        reference = parse_hub_reference(str(pretrained_model_name_or_path))
        if revision and reference is not None and not Path(pretrained_model_name_or_path).exists():
            folder = fetch_model(HubReference(reference.repo_id, revision, reference.subfolder), kind=PIPELINE)
        else:
            folder = resolve_model_argument(pretrained_model_name_or_path, kind=PIPELINE,
                                            option="pretrained_model_name_or_path")
        return cls._load(inspect_pipeline_folder(folder, cls.__name__), options)

    @classmethod
    def from_pipeline_folder(cls, folder: PipelineFolder, **kwargs):
        """Load a folder that `inspect_pipeline_folder(path, cls.__name__)` has checked, without checking its
        files again (`ldm generate` checks the folder, then its flags against it, then loads it).

        vae/ and unet/ are loaded from safetensors only, and must fill every tensor of their models
        (`ldm_core.models.pretrained.load_checked_model_folder`; diffusers alone would start missing tensors
        from random values with only a warning). `kwargs` as for `from_pretrained`.
        """
        return cls._load(folder, _loading_options(kwargs))

    @classmethod
    def _load(cls, folder: PipelineFolder, options: dict):
        dtype = {"torch_dtype": options["torch_dtype"]} if options.get("torch_dtype") is not None else {}
        components = {name: load_checked_model_folder(folder.component_class(name), folder.path / name,
                                                      what=f"{name}/ folder of the pipeline", **dtype)
                      for name in ("vae", "unet")}
        return super().from_pretrained(folder.path, use_safetensors=True, local_files_only=True, **components,
                                       **options)

    @property
    def num_classes(self) -> int:
        """K for a class-conditional U-Net (embedding id K is the null class), 0 for an unconditional one."""
        embeds = self.unet.config.num_class_embeds
        return 0 if embeds is None else embeds - 1

    def check_inputs(self, batch_size: int, num_inference_steps: int, generator, eta: float, output_type: str,
                     latents: Optional[torch.Tensor], class_labels: ClassLabels, guidance_scale: float,
                     decode_batch_size: int) -> Optional[torch.Tensor]:
        """Refuse arguments `__call__` cannot sample with, before any work (the sampling settings with
        `ldm_core.sampling.check_sampling_arguments`); return the class ids of `class_labels` (see
        `resolve_class_labels`)."""
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type {output_type!r}: use pil, np, pt or latent.")
        if batch_size < 1 or decode_batch_size < 1:
            raise ValueError("batch_size and decode_batch_size must be positive.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} images; pass one per image.")
        if latents is not None and tuple(latents.shape) != self._latent_shape(batch_size):
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this U-Net needs "
                             f"{self._latent_shape(batch_size)}.")
        check_sampling_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                                 num_train_timesteps=self.scheduler.config.get("num_train_timesteps"),
                                 conditional=bool(self.num_classes))
        return self.resolve_class_labels(class_labels, batch_size)

    def resolve_class_labels(self, class_labels: ClassLabels, batch_size: int) -> Optional[torch.Tensor]:
        """Class ids (batch_size,) from ints or class names; one value is repeated over the batch. None for an
        unconditional U-Net; ValueError for a label it does not know (`ldm_core.sampling.class_ids_for`)."""
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.tolist()
        ids = class_ids_for(class_labels, batch_size, self.num_classes, self.config.class_names)
        return self._class_ids(ids)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = DEFAULT_SAMPLING_STEPS,
                 generator: Union[torch.Generator, list[torch.Generator], None] = None, eta: float = 0.0,
                 output_type: str = "pil", return_dict: bool = True, latents: Optional[torch.Tensor] = None,
                 class_labels: ClassLabels = None, guidance_scale: float = 1.0, decode_batch_size: int = 8,
                 inputs_checked: bool = False) -> Union[ImagePipelineOutput, tuple]:
        r"""
        Generate `batch_size` images.

        Parameters:
            batch_size: number of images.
            num_inference_steps: denoising steps, 1 to the training steps (default
                `ldm_core.sampling.DEFAULT_SAMPLING_STEPS`, 20, as for `ldm generate --steps`).
            generator: one generator, or a list with one per image so image i depends only on its own
                generator (then results do not depend on how images are batched).
            eta: DDIM's eta (Song et al. 2021) in [0, 1]; passed only to schedulers whose `step` accepts it.
            output_type: "pil", "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in [0, 1], or "latent"
                (the scaled latents, not decoded).
            latents: optional starting noise ~ N(0, I), (B, C, h, w), used instead of drawing it (multiplied
                by the scheduler's `init_noise_sigma`, as diffusers pipelines do).
            class_labels: for a class-conditional U-Net: one id or name, or one per image.
            guidance_scale: classifier-free guidance weight w (Ho & Salimans 2022):
                eps = eps_uncond + w * (eps_cond - eps_uncond); 1 is the plain conditional model.
            decode_batch_size: images decoded at once, to bound the decoder's memory.
            inputs_checked: the caller has already checked these settings against this pipeline (with
                `check_inputs`, or `ldm_core.sampling`'s rules as `ldm generate` does) and passes `class_labels`
                as class ids, one per image; the checks are skipped. For a loop that draws many batches with
                the same settings, as scikit-learn's forests check their input once and call each tree with
                `check_input=False`.

        Returns [`ImagePipelineOutput`] with `.images`, or a 1-tuple when `return_dict` is False.
        """
        if inputs_checked:
            class_ids = self._class_ids(class_labels)
        else:
            class_ids = self.check_inputs(batch_size, num_inference_steps, generator, eta, output_type, latents,
                                          class_labels, guidance_scale, decode_batch_size)
        guided = class_ids is not None and guidance_scale != 1.0
        if guided:  # the null class (id K) first: one U-Net call gives the unconditional and conditional noise
            class_ids = torch.cat([torch.full_like(class_ids, self.num_classes), class_ids])
        with self._inference():
            # 1. Starting noise, one draw per image generator.
            latents = self.prepare_latents(batch_size, generator, latents)
            # 2. Denoise along the scheduler's timesteps, with classifier-free guidance when asked for.
            self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
            step_kwargs = self._step_kwargs(generator, eta)
            for t in self.progress_bar(self.scheduler.timesteps):
                if guided:
                    uncond, cond = self._predict(torch.cat([latents, latents]), t, class_ids).chunk(2)
                    prediction = uncond + guidance_scale * (cond - uncond)
                else:
                    prediction = self._predict(latents, t, class_ids)
                latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
            self._refuse_non_finite(latents, num_inference_steps, guidance_scale)
            # 3. Undo the latent scaling and decode.
            if output_type == "latent":
                images = latents
            else:
                images = self._decode(unscale_latents(latents, self.vae.config), output_type, decode_batch_size)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # ------------------------------------------------------------------------------------- the steps of __call__

    def _latent_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (batch_size, self.unet.config.in_channels, *hw)

    def _class_ids(self, ids) -> Optional[torch.Tensor]:
        return None if ids is None else torch.as_tensor(ids, dtype=torch.long, device=self._execution_device)

    @contextmanager
    def _inference(self):
        """Sampling is inference: run the models in eval mode (a U-Net handed over from a training loop may be
        in train mode, where kernels and dropout differ) and give them back in the mode they came in."""
        modes = {m: m.training for m in (self.unet, self.vae)}
        try:
            for module in modes:
                module.eval()
            yield
        finally:
            for module, training in modes.items():
                module.train(training)

    def prepare_latents(self, batch_size: int, generator, latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Starting noise ~ N(0, I) drawn with `generator` (or the given `latents`), times the scheduler's
        `init_noise_sigma`, on the execution device in the U-Net's dtype."""
        device, dtype = self._execution_device, self.unet.dtype
        if latents is None:
            latents = randn_tensor(self._latent_shape(batch_size), generator=generator, device=device, dtype=dtype)
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _step_kwargs(self, generator, eta: float) -> dict:
        # Like diffusers' prepare_extra_step_kwargs: only pass what this scheduler's step accepts.
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _predict(self, latents: torch.Tensor, t, class_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The U-Net's prediction (noise or velocity) for `latents` at timestep t, after the scheduler's input
        scaling."""
        return self.unet(self.scheduler.scale_model_input(latents, t), t, class_labels=class_ids).sample

    def _refuse_non_finite(self, latents: torch.Tensor, num_inference_steps: int, guidance_scale: float) -> None:
        # NaN or inf latents decode to black or noise images that look like a result; stop instead.
        if not torch.isfinite(latents).all():
            raise FloatingPointError(f"The latents became NaN or infinite after {num_inference_steps} "
                                     f"{type(self.scheduler).__name__} steps (guidance_scale={guidance_scale:g}); "
                                     f"check that the model's weights are finite, or use fp32 and another sampler.")

    def _decode(self, z: torch.Tensor, output_type: str, decode_batch_size: int):
        """Images from unscaled latents z, `decode_batch_size` at a time: "pt" (B, 3, H, W) in [0, 1], "np"
        (B, H, W, 3) in [0, 1] or "pil"."""
        z = z.to(self.vae.dtype)
        decoded = [self.vae.decode(chunk).sample for chunk in z.split(decode_batch_size)]
        images = (torch.cat(decoded).float().clamp(-1, 1) + 1) / 2
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images
