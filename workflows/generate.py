"""`ldm generate`: images from noise with a saved `LatentDiffusionPipeline`, one PNG per image plus a grid.

Image i is a function of (seed, i) alone: its noise comes from its own generator, so the same image
appears whatever the batch size, the number of processes, or which process draws it. Generators live on
the CPU (diffusers' `randn_tensor` then moves the noise), so the noise is also the same on every device.

A class-conditional model also gets `labels.json` beside the images: the class each image was asked for,
the guidance scale and the model's class names, so `ldm eval-samples` can check the images against the
requested classes:

    {"class_names": ["circle", "square", "triangle"], "guidance_scale": 3.0,
     "labels": {"image_00000.png": "circle", "image_00001.png": "square", ...}}

A label is the class name, or the class id when the model's classes have no names.

The images, grid.png and labels.json of one run always belong together, because `ldm eval-samples`
scores whatever image files a folder holds:

- every argument is checked once, before anything is written: `ldm generate` checks its flags against the
  model's files before it loads the model, `generate_images` its arguments against the loaded pipeline,
  and the batches are then drawn without checking them again;
- an output folder that already holds files is refused unless `overwrite` (`--overwrite`) is given, and
  then only the files an earlier `ldm generate` wrote there (image_NNNNN.png, grid.png, labels.json) are
  replaced; other files are kept;
- everything is written into a hidden staging folder beside the output folder (`.NAME.ldm-generate-partial`)
  and moved into place only once every image, the grid and labels.json are there, so a failed run leaves
  the output folder as it was.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import logging
import numbers
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from ldm_core.atomic_files import write_atomic
from ldm_core.images.grids import save_grid
from ldm_core.models.hub import PIPELINE, resolve_model_argument
from ldm_core.models.pipeline_folders import inspect_pipeline_folder
from ldm_core.randomness import image_generator
from ldm_core.sample_folder import GRID_FILE, IMAGE_NAME, LABELS_FILE, SCORES_FILE, image_file_name
from ldm_core.sampling import DEFAULT_SAMPLING_STEPS, check_sampling_arguments, class_ids_for
from pipelines.latent_diffusion import LatentDiffusionPipeline
from stage_b_diffusion.noise_schedule import SAMPLERS, make_sampler, sampler_name

__all__ = ["LABELS_FILE", "GRID_FILE", "generate_images", "image_file_name", "write_labels_file", "save_grid",
           "add_arguments", "check_generate_counts", "check_output_folder", "check_sampling_request",
           "generated_files", "main", "resolve_device"]

logger = logging.getLogger("ldm.generate")

_STAGING_SUFFIX = ".ldm-generate-partial"
# How arguments are named in messages: Python keywords by default, flags for the command line.
_API_NAMES = {"out": "out_dir", "overwrite": "overwrite=True", "num_images": "num_images",
              "batch_size": "batch_size", "seed": "seed", "num_inference_steps": "num_inference_steps",
              "guidance_scale": "guidance_scale", "eta": "eta", "class_labels": "class_labels"}
_FLAGS = {"out": "--out", "overwrite": "--overwrite", "num_images": "--num-images", "batch_size": "--batch-size",
          "seed": "--seed", "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale", "eta": "--eta",
          "class_labels": "--class"}


def generated_files(folder: Union[str, Path]) -> list[Path]:
    """The files an earlier `ldm generate` wrote in `folder` (image_NNNNN.png, grid.png, labels.json), and the
    eval.json that `ldm eval-samples` scored from them: images, labels and scores are replaced together."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (IMAGE_NAME.fullmatch(p.name) or p.name in (GRID_FILE, LABELS_FILE, SCORES_FILE)))


def _printable(path: Union[str, Path]) -> str:
    """A path as text that any terminal or UTF-8 file accepts: bytes that are not UTF-8 become \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_output_folder(out_dir: Union[str, Path], overwrite: bool = False, *,
                        names: Optional[dict] = None) -> Path:
    """Refuse an output folder that cannot be written, or that already holds files (unless `overwrite`).

    Nothing is created here. Images from two runs in one folder would be scored together by
    `ldm eval-samples`, so a folder with any entry in it is refused; with `overwrite` the files an earlier
    `ldm generate` wrote there are replaced when the new ones are complete, and other files are kept.

    Raises:
        ValueError: `out_dir` is a file, or holds files and `overwrite` is False.
        NotADirectoryError, PermissionError: a parent is a file, or the folder cannot be written
            (`ldm` prints these with the path).
    """
    label = {**_API_NAMES, **(names or {})}
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{label['out']} {_printable(out_dir)} is a file, not a folder; give a folder for the images.")
    # The staging folder is created beside out_dir, so the nearest existing parent must be writable too.
    for parent in (out_dir, *out_dir.absolute().parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(out_dir))
            if parent != out_dir and not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out_dir))
            if parent != out_dir:
                break
    if out_dir.is_dir():
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out_dir))
        entries = sorted(os.listdir(out_dir))
        if entries and not overwrite:
            shown = ", ".join(_printable(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ValueError(f"{label['out']} {_printable(out_dir)} already holds {len(entries)} file(s) ({shown}); "
                             f"new images there would be mixed with them and scored together. Choose a new or empty "
                             f"folder, or pass {label['overwrite']} to replace the image_NNNNN.png, grid.png and "
                             f"labels.json an earlier `ldm generate` wrote there (other files are kept).")
    return out_dir


def check_generate_counts(*, num_images, batch_size, seed, names: Optional[dict] = None) -> None:
    """num_images >= 1, batch_size >= 1, seed >= 0, all whole numbers; ValueError names the argument."""
    label = {**_API_NAMES, **(names or {})}
    for key, value, low in (("num_images", num_images, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{label[key]} must be a whole number of at least {low}, got {value!r}.")


def check_sampling_request(*, num_images: int, class_labels, num_inference_steps, guidance_scale, eta,
                           num_train_timesteps: Optional[int], num_classes: int, class_names: Optional[Sequence[str]],
                           names: Optional[dict] = None) -> Optional[list[int]]:
    """Check the sampling settings and every image's class against the model; return each image's class id.

    The rules are the pipeline's (`ldm_core.sampling`); this applies them to a whole run, from the model's
    training steps, class count and class names alone, so `ldm generate` can run it on a saved folder
    before loading it. `class_labels` as for `generate_images`; `names` as for `check_output_folder`.

    Returns the class id of images 0..num_images-1, or None for an unconditional model.
    """
    label = {**_API_NAMES, **(names or {})}
    check_sampling_arguments(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                             num_train_timesteps=num_train_timesteps, conditional=bool(num_classes),
                             names={key: label[key] for key in ("num_inference_steps", "guidance_scale", "eta")})
    requested = _requested_labels(class_labels, num_images, num_classes)
    return class_ids_for(requested, num_images, num_classes, class_names, option=label["class_labels"])


def _staging_folder(out_dir: Path) -> Path:
    """Beside out_dir, on the same file system, so moving it into place is a rename."""
    return out_dir.parent / f".{out_dir.name}{_STAGING_SUFFIX}"


def _requested_labels(class_labels, num_images: int, num_classes: int) -> Optional[list]:
    """Each image's label: None, one label for all, one per image, or (conditional model, none given) i mod K."""
    if class_labels is None:
        return [i % num_classes for i in range(num_images)] if num_classes else None
    if isinstance(class_labels, (int, str)):
        return [class_labels] * num_images
    class_labels = list(class_labels)
    if len(class_labels) != num_images:
        raise ValueError(f"Got {len(class_labels)} class labels for {num_images} images; give one label or one per image.")
    return class_labels


def write_labels_file(out_dir: Union[str, Path], labels: dict[str, Union[str, int]],
                      class_names: Optional[Sequence[str]], guidance_scale: float) -> Path:
    """Write `out_dir/labels.json`, the class each image file was generated for, replacing any earlier one
    atomically (a reader sees the old file or the new one, never half of one).

    Parameters:
        labels: image file name (inside out_dir) -> requested class name, or class id for unnamed classes.
        class_names: the model's class names in id order, or None.
        guidance_scale: the classifier-free guidance weight the images were drawn with.
    """
    import json

    path = Path(out_dir) / LABELS_FILE
    record = {"class_names": list(class_names) if class_names is not None else None,
              "guidance_scale": float(guidance_scale), "labels": dict(sorted(labels.items()))}
    return write_atomic(path, json.dumps(record, indent=2) + "\n")


def _publish(staging: Path, out_dir: Path) -> None:
    """Move a complete staging folder's files into out_dir, replacing what an earlier run wrote there."""
    if not out_dir.exists():
        os.replace(staging, out_dir)  # one rename: the folder appears complete or not at all
        return
    for old in generated_files(out_dir):
        old.unlink()
    # Images first, the grid and labels.json last: a folder with labels.json always has its images.
    for new in sorted(staging.iterdir(), key=lambda p: (p.name in (GRID_FILE, LABELS_FILE), p.name)):
        os.replace(new, out_dir / new.name)
    staging.rmdir()


def generate_images(pipeline: LatentDiffusionPipeline, num_images: int, *, seed: int, batch_size: int,
                    num_inference_steps: int, out_dir: Union[str, Path], accelerator=None, class_labels=None,
                    guidance_scale: float = 1.0, eta: float = 0.0, overwrite: bool = False) -> list[Path]:
    """Generate images 0..num_images-1 into `out_dir` as image_{i:05d}.png, plus grid.png of all of them.

    Parameters:
        pipeline: the loaded pipeline, already on its device, with the sampler to use.
        num_images, seed: image i comes from `image_generator(seed, i)`.
        batch_size: images per pipeline call on each process.
        accelerator: optional `accelerate.Accelerator`; images are split between its processes, and the main
            process writes the grid and moves the folder into place once every process has finished.
        class_labels: None (a class-conditional model then cycles through its classes, image i gets i mod K),
            one id or name for every image, or one per image.
        guidance_scale, eta: passed to the pipeline.
        overwrite: allow an `out_dir` that already holds files; the files an earlier run wrote there
            (image_NNNNN.png, grid.png, labels.json) are replaced, others kept. See `check_output_folder`.

    A class-conditional pipeline also gets `labels.json` (see `write_labels_file`). Every argument is
    checked before anything is written; the files are written beside `out_dir` and moved into it only
    when all of them are there (see the module docstring), so on any error `out_dir` is unchanged.

    Returns the paths of all num_images PNG files (they exist once the main process has returned).
    """
    check_generate_counts(num_images=num_images, batch_size=batch_size, seed=seed)
    class_ids = check_sampling_request(num_images=num_images, class_labels=class_labels,
                                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                                       num_train_timesteps=pipeline.scheduler.config.get("num_train_timesteps"),
                                       num_classes=pipeline.num_classes, class_names=pipeline.config.class_names)
    out_dir = check_output_folder(out_dir, overwrite)
    return _draw_images(pipeline, num_images, seed=seed, batch_size=batch_size,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                        class_ids=class_ids, out_dir=out_dir, accelerator=accelerator)


def _draw_images(pipeline: LatentDiffusionPipeline, num_images: int, *, seed: int, batch_size: int,
                 num_inference_steps: int, guidance_scale: float, eta: float, class_ids: Optional[list[int]],
                 out_dir: Path, accelerator) -> list[Path]:
    """`generate_images` once its arguments are checked: the pipeline is called batch by batch with
    `inputs_checked=True`, so nothing is checked twice."""
    is_main = accelerator is None or accelerator.is_main_process
    staging = _staging_folder(out_dir)
    names = [image_file_name(i) for i in range(num_images)]
    indices = list(range(num_images))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices) as mine:
            indices = list(mine)
    try:
        # Every process creates it (whichever comes first); what a crashed earlier run left there is either
        # overwritten below or removed by the main process before the folder is moved into place.
        staging.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            images = pipeline(
                batch_size=len(chunk), num_inference_steps=num_inference_steps,
                generator=[image_generator(seed, i) for i in chunk], eta=eta, output_type="pil",
                class_labels=None if class_ids is None else [class_ids[i] for i in chunk],
                guidance_scale=guidance_scale, inputs_checked=True).images
            for i, image in zip(chunk, images):
                image.save(staging / names[i])
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if is_main:
            _finish(staging, names, pipeline, class_ids, guidance_scale)
            _publish(staging, out_dir)
    except BaseException:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator is not None:
        accelerator.wait_for_everyone()  # no process returns before the folder is in place
    return [out_dir / name for name in names]


def _finish(staging: Path, names: list[str], pipeline, class_ids, guidance_scale: float) -> None:
    """Check every image is in the staging folder, drop anything else, write grid.png and labels.json."""
    absent = [name for name in names if not (staging / name).is_file()]
    if absent:
        raise RuntimeError(f"{len(absent)} image(s) were not written to {staging} ({', '.join(absent[:3])}); "
                           f"a process stopped early. Nothing was moved into the output folder.")
    wanted = set(names)
    for stray in staging.iterdir():
        if stray.name in wanted:
            continue
        if stray.is_dir() and not stray.is_symlink():
            shutil.rmtree(stray)
        else:
            stray.unlink()
    grid = []
    for name in names:
        with Image.open(staging / name) as im:
            grid.append(im.convert("RGB"))
    save_grid(grid, staging / GRID_FILE)
    if class_ids is not None:
        class_names = pipeline.config.class_names
        labels = {name: (class_names[k] if class_names else k) for name, k in zip(names, class_ids)}
        write_labels_file(staging, labels, class_names, guidance_scale)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `ldm generate`."""
    parser.add_argument("--model", required=True,
                        help="pipeline folder (RUN/pipeline, with model_index.json), or a Hugging Face Hub id of one "
                             "fetched on first use (org/name[@revision])")
    parser.add_argument("--num-images", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--steps", type=int, default=DEFAULT_SAMPLING_STEPS,
                        help=f"denoising steps, 1 to the model's training steps (default {DEFAULT_SAMPLING_STEPS})")
    parser.add_argument("--scheduler", choices=list(SAMPLERS), default=None,
                        help="sampler (default: the one saved with the pipeline); dpmsolver++ suits 15-25 steps")
    parser.add_argument("--seed", type=int, default=0, help="image i always comes from (seed, i); 0 or more")
    parser.add_argument("--out", required=True,
                        help="output folder for image_NNNNN.png, grid.png (and labels.json); must be new or empty")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow an --out that holds files: replace the image_NNNNN.png, grid.png and "
                             "labels.json an earlier `ldm generate` wrote there (other files are kept)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per U-Net batch on each process")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta from 0 to 1 (ignored by other samplers)")
    parser.add_argument("--class", dest="class_label", default=None,
                        help="class name or id for a class-conditional model (default: cycle through classes)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance weight, 0 or more (1 = none; other values need a "
                             "class-conditional model)")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: Accelerate's choice)")


def resolve_device(spec: str, option: str = "--device") -> torch.device:
    """The torch device named by `spec`, refused with a one-line reason when this machine has no such device.

    `torch.device` accepts any well-formed name (cuda:7 on a machine with one GPU, or without a driver),
    and the failure would come only when the model is moved there.
    """
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {spec!r} is not a device name; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a driver; does not initialise CUDA
        if count == 0:
            raise ValueError(f"{option} {spec}: this machine has no CUDA device that PyTorch can use; "
                             f"use {option} cpu.")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{option} {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} {spec}: Apple's MPS backend is not available on this machine; use {option} cpu.")
        return device
    raise ValueError(f"{option} {spec}: {device.type} devices are not supported; use cpu, cuda, cuda:N or mps.")


def _class_flag(text: Optional[str], class_names: Optional[Sequence[str]]):
    """--class as the pipeline takes it: a name, or an id when it is digits and not a name."""
    if text is not None and text.isdigit() and text not in (class_names or []):
        return int(text)
    return text


def main(args: argparse.Namespace) -> int:
    """Run `ldm generate` (launch with `accelerate launch -m workflows.cli generate ...` for several GPUs).

    Every flag is checked once, against the model's files, before the model is loaded, so a wrong value is
    refused in a second instead of after minutes of sampling; the loaded pipeline is not checked again.
    """
    from accelerate import Accelerator

    from ldm_core.training.accelerator import cpu_only

    device = resolve_device(args.device) if args.device else None
    check_generate_counts(num_images=args.num_images, batch_size=args.batch_size, seed=args.seed, names=_FLAGS)
    model_dir = resolve_model_argument(args.model, kind=PIPELINE, option="--model")
    model = inspect_pipeline_folder(model_dir, what="--model folder")  # its files, once: loading skips these checks
    scheduler = make_sampler(args.scheduler, model.scheduler.config) if args.scheduler else model.scheduler
    label = _class_flag(args.class_label, model.class_names)
    class_ids = check_sampling_request(num_images=args.num_images, class_labels=label, num_inference_steps=args.steps,
                                       guidance_scale=args.guidance_scale, eta=args.eta,
                                       num_train_timesteps=scheduler.config.num_train_timesteps,
                                       num_classes=model.num_classes, class_names=model.class_names, names=_FLAGS)
    out = check_output_folder(args.out, args.overwrite, names=_FLAGS)
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise ValueError(f"--out {_printable(out)} is inside the --model folder {_printable(args.model)}; write the "
                         f"images to a folder of their own (a model folder holds only the model).")
    if args.eta and "eta" not in inspect.signature(scheduler.step).parameters:
        logger.warning("--eta %g is ignored: the %s sampler has no eta (only ddim uses it).", args.eta,
                       sampler_name(scheduler))

    accelerator = Accelerator(cpu=(device is not None and device.type == "cpu") or cpu_only())
    pipeline = LatentDiffusionPipeline.from_pipeline_folder(model)
    if args.scheduler:
        pipeline.scheduler = make_sampler(args.scheduler, pipeline.scheduler.config)
    pipeline.to(device or accelerator.device)
    pipeline.set_progress_bar_config(disable=not accelerator.is_main_process)
    paths = _draw_images(pipeline, args.num_images, seed=args.seed, batch_size=args.batch_size,
                         num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta,
                         class_ids=class_ids, out_dir=out, accelerator=accelerator)
    if accelerator.is_main_process:
        labels_file = out / LABELS_FILE
        classes = f"class {label}" if label is not None else "each class in turn"
        extra = (f" and {_printable(labels_file)} ({classes}, guidance {args.guidance_scale:g})"
                 if labels_file.is_file() else "")
        print(f"Wrote {len(paths)} images ({sampler_name(pipeline.scheduler)}, {args.steps} steps), "
              f"{_printable(out / GRID_FILE)}{extra}")
    return 0
