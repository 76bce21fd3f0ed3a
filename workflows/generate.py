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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from ldm_core.image_grids import save_grid
from ldm_core.randomness import image_generator
from pipelines.latent_diffusion import LatentDiffusionPipeline
from stage_b_diffusion.noise_schedule import SAMPLERS, make_sampler, sampler_name

__all__ = ["LABELS_FILE", "generate_images", "write_labels_file", "save_grid", "add_arguments",
           "main"]

LABELS_FILE = "labels.json"  # read by evaluation.shapes_score.score_folder


def _labels_for(indices: Sequence[int], class_labels, num_images: int, num_classes: int) -> Optional[list]:
    """Per-image labels: None, one label for all, one per image, or (conditional model, none given) i mod K."""
    if class_labels is None:
        return [i % num_classes for i in indices] if num_classes else None
    if isinstance(class_labels, (int, str)):
        return [class_labels] * len(indices)
    class_labels = list(class_labels)
    if len(class_labels) != num_images:
        raise ValueError(f"Got {len(class_labels)} class labels for {num_images} images; give one label or one per image.")
    return [class_labels[i] for i in indices]


def write_labels_file(out_dir: Union[str, Path], labels: dict[str, Union[str, int]],
                      class_names: Optional[Sequence[str]], guidance_scale: float) -> Path:
    """Write `out_dir/labels.json`: the class each image file was generated for.

    Parameters:
        labels: image file name (inside out_dir) -> requested class name, or class id for unnamed classes.
        class_names: the model's class names in id order, or None.
        guidance_scale: the classifier-free guidance weight the images were drawn with.
    """
    path = Path(out_dir) / LABELS_FILE
    record = {"class_names": list(class_names) if class_names is not None else None,
              "guidance_scale": float(guidance_scale), "labels": dict(sorted(labels.items()))}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def generate_images(pipeline: LatentDiffusionPipeline, num_images: int, *, seed: int, batch_size: int,
                    num_inference_steps: int, out_dir: Union[str, Path], accelerator=None, class_labels=None,
                    guidance_scale: float = 1.0, eta: float = 0.0) -> list[Path]:
    """Generate images 0..num_images-1 into `out_dir` as image_{i:05d}.png, plus grid.png of all of them.

    Parameters:
        pipeline: the loaded pipeline, already on its device, with the sampler to use.
        num_images, seed: image i comes from `image_generator(seed, i)`.
        batch_size: images per pipeline call on each process.
        accelerator: optional `accelerate.Accelerator`; images are split between its processes and the main
            process writes the grid once every process has finished.
        class_labels: None (a class-conditional model then cycles through its classes, image i gets i mod K),
            one id or name for every image, or one per image.
        guidance_scale, eta: passed to the pipeline.

    A class-conditional pipeline also gets `labels.json` (see `write_labels_file`); an unconditional one
    removes a stale one.

    Returns the paths of all num_images PNG files.
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError("num_images and batch_size must be positive.")
    # Resolve every image's class before any work, so a bad name fails fast with the pipeline's message.
    requested = _labels_for(range(num_images), class_labels, num_images, pipeline.num_classes)
    class_ids = pipeline.resolve_class_labels(requested, num_images)
    if guidance_scale != 1.0 and class_ids is None:
        raise ValueError("guidance_scale != 1 needs a class-conditional U-Net and class_labels.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    is_main = accelerator is None or accelerator.is_main_process
    if is_main:
        # A labels.json left by an earlier run would pair these images with the wrong classes.
        (out_dir / LABELS_FILE).unlink(missing_ok=True)
    indices = list(range(num_images))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices) as mine:
            indices = list(mine)
    paths = [out_dir / f"image_{i:05d}.png" for i in range(num_images)]
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images = pipeline(
            batch_size=len(chunk), num_inference_steps=num_inference_steps,
            generator=[image_generator(seed, i) for i in chunk], eta=eta, output_type="pil",
            class_labels=_labels_for(chunk, class_labels, num_images, pipeline.num_classes),
            guidance_scale=guidance_scale).images
        for i, image in zip(chunk, images):
            image.save(paths[i])
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main:
        grid = []
        for path in paths:
            with Image.open(path) as im:
                grid.append(im.convert("RGB"))
        save_grid(grid, out_dir / "grid.png")
        if class_ids is not None:
            names = pipeline.config.class_names
            labels = {path.name: (names[k] if names else k) for path, k in zip(paths, class_ids.tolist())}
            write_labels_file(out_dir, labels, names, guidance_scale)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `ldm generate`."""
    parser.add_argument("--model", required=True, help="pipeline folder (RUN/pipeline, with model_index.json)")
    parser.add_argument("--num-images", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--scheduler", choices=list(SAMPLERS), default=None,
                        help="sampler (default: the one saved with the pipeline); dpmsolver++ suits 15-25 steps")
    parser.add_argument("--seed", type=int, default=0, help="image i always comes from (seed, i)")
    parser.add_argument("--out", required=True, help="output folder for image_NNNNN.png and grid.png")
    parser.add_argument("--batch-size", type=int, default=16, help="images per U-Net batch on each process")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (ignored by other samplers)")
    parser.add_argument("--class", dest="class_label", default=None,
                        help="class name or id for a class-conditional model (default: cycle through classes)")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance weight (1 = none; needs a class-conditional model)")
    parser.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: Accelerate's choice)")


def load_pipeline(model_dir: Union[str, Path]) -> LatentDiffusionPipeline:
    """Load a saved pipeline folder, with a clear error if it is not one."""
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a pipeline folder (no model_index.json). Point --model at the "
                                f"'pipeline' folder of a Stage B run (it holds model_index.json, vae/, unet/, scheduler/).")
    return LatentDiffusionPipeline.from_pretrained(model_dir)


def main(args: argparse.Namespace) -> int:
    """Run `ldm generate` (launch with `accelerate launch -m workflows.cli generate ...` for several GPUs)."""
    from accelerate import Accelerator

    from ldm_core.accelerator import cpu_only

    accelerator = Accelerator(cpu=args.device == "cpu" or cpu_only())
    device = torch.device(args.device) if args.device else accelerator.device
    pipeline = load_pipeline(args.model)
    if args.scheduler:
        pipeline.scheduler = make_sampler(args.scheduler, pipeline.scheduler.config)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=not accelerator.is_main_process)
    label = args.class_label
    if label is not None and label.isdigit() and label not in (pipeline.config.class_names or []):
        label = int(label)
    paths = generate_images(pipeline, args.num_images, seed=args.seed, batch_size=args.batch_size,
                            num_inference_steps=args.steps, out_dir=args.out, accelerator=accelerator,
                            class_labels=label, guidance_scale=args.guidance_scale, eta=args.eta)
    if accelerator.is_main_process:
        labels_file = Path(args.out) / LABELS_FILE
        classes = f"class {label}" if label is not None else "each class in turn"
        extra = f" and {labels_file} ({classes}, guidance {args.guidance_scale:g})" if labels_file.is_file() else ""
        print(f"Wrote {len(paths)} images ({sampler_name(pipeline.scheduler)}, {args.steps} steps), "
              f"{Path(args.out) / 'grid.png'}{extra}")
    return 0
