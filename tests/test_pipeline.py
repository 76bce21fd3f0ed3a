"""LatentDiffusionPipeline and `ldm generate`: save/load, per-image seeding, guidance, samplers, errors."""

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from PIL import Image

from ldm_core.randomness import image_generator
from workflows.generate import generate_images
from pipelines.latent_diffusion import LatentDiffusionPipeline
from stage_b_diffusion.config import DiffusionConfig, UNetModelConfig
from stage_b_diffusion.noise_schedule import SAMPLERS, build_noise_scheduler, make_sampler
from stage_b_diffusion.architectures import build_unet


def make_pipeline(num_classes: int = 0, sampler: str = "ddim", class_names=None) -> LatentDiffusionPipeline:
    """A tiny pipeline (32 px images, 4x4 latents); classes named class0.. unless `class_names` are given."""
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=4,
                        layers_per_block=1, sample_size=32, scaling_factor=0.7)
    unet = build_unet(UNetModelConfig(preset="unet-tiny", num_classes=num_classes), latent_channels=4,
                      latent_size=4)
    scheduler = make_sampler(sampler, build_noise_scheduler(DiffusionConfig()))
    names = class_names or [f"class{k}" for k in range(num_classes)] or None
    pipe = LatentDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler, class_names=names)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seeds, **kwargs):
    gens = [image_generator(0, i) for i in seeds]
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(batch_size=len(seeds), generator=gens, **kwargs).images


def test_save_and_reload_gives_identical_images(tmp_path):
    pipe = make_pipeline()
    before = run(pipe, [0, 1], output_type="np")
    pipe.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"model_index.json", "vae", "unet", "scheduler"}
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "LatentDiffusionPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(loaded, [0, 1], output_type="np"), before)
    assert before.shape == (2, 32, 32, 3) and 0 <= before.min() and before.max() <= 1


def test_components_load_with_plain_diffusers_classes(tmp_path):
    pipe = make_pipeline(num_classes=2)
    pipe.save_pretrained(tmp_path)
    vae = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae")
    unet = UNet2DModel.from_pretrained(tmp_path, subfolder="unet")
    sched = DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert vae.config.scaling_factor == 0.7 and unet.config.num_class_embeds == 3
    assert sched.config.clip_sample is False
    for a, b in zip(pipe.unet.parameters(), unet.parameters()):
        assert torch.equal(a, b)
    assert LatentDiffusionPipeline.from_pretrained(tmp_path).config.class_names == ["class0", "class1"]


def test_image_depends_only_on_its_own_seed_not_the_batch():
    pipe = make_pipeline(sampler="ddpm")  # DDPM steps draw fresh noise too: per-image generators matter there
    together = run(pipe, [0, 1, 2], output_type="pt")
    alone = torch.cat([run(pipe, [i], output_type="pt") for i in range(3)])
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    assert not torch.allclose(together[0], together[1])
    g1, g2 = image_generator(5, 3), image_generator(5, 3)
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    assert not torch.equal(torch.randn(4, generator=image_generator(5, 4)), torch.randn(4, generator=image_generator(6, 3)))


class FakeAccelerator:
    """Two-process Accelerate stand-in: this object plays one rank."""

    num_processes = 2

    def __init__(self, rank):
        self.process_index, self.is_main_process = rank, rank == 0

    @contextmanager
    def split_between_processes(self, items):
        half = (len(items) + 1) // 2
        yield items[:half] if self.process_index == 0 else items[half:]

    def wait_for_everyone(self):
        pass


def read(paths):
    return np.stack([np.asarray(Image.open(p)) for p in paths]).astype(int)


def test_generate_images_same_for_any_batching_and_process_split(tmp_path):
    pipe = make_pipeline()
    single = generate_images(pipe, 5, seed=0, batch_size=2, num_inference_steps=2, out_dir=tmp_path / "one")
    assert [p.name for p in single] == [f"image_{i:05d}.png" for i in range(5)]
    assert (tmp_path / "one" / "grid.png").is_file()
    # Rank 1 first, so only the main rank's final pass can write a complete grid.
    for rank in (1, 0):
        split = generate_images(pipe, 5, seed=0, batch_size=3, num_inference_steps=2, out_dir=tmp_path / "two",
                                accelerator=FakeAccelerator(rank))
    a, b = read(single), read(split)
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99  # float noise can only flip a rounding
    assert (tmp_path / "two" / "grid.png").is_file()
    other = generate_images(pipe, 1, seed=1, batch_size=1, num_inference_steps=2, out_dir=tmp_path / "seed1")
    assert np.abs(read(other) - a[:1]).mean() > 1


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_in_the_pipeline(name):
    pipe = make_pipeline(sampler=name)
    latents = run(pipe, [0, 1], output_type="latent", eta=0.5)
    assert latents.shape == (2, 4, 4, 4) and torch.isfinite(latents).all()


def test_output_types_and_decode_slices():
    pipe = make_pipeline()
    pt = run(pipe, [0, 1, 2], output_type="pt", decode_batch_size=1)
    torch.testing.assert_close(run(pipe, [0, 1, 2], output_type="pt", decode_batch_size=8), pt, rtol=0, atol=1e-5)
    assert pt.shape == (3, 3, 32, 32)
    pil = run(pipe, [0], output_type="pil")
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    latents = run(pipe, [0], output_type="latent")
    decoded = pipe.vae.decode(latents / 0.7).sample.clamp(-1, 1)
    torch.testing.assert_close((decoded + 1) / 2, pt[:1], rtol=0, atol=1e-5)  # scaling factor undone
    with pytest.raises(ValueError, match="pil, np, pt or latent"):
        run(pipe, [0], output_type="jpg")


def record_guidance(pipe, **kwargs):
    """Run one DDIM step recording the U-Net's (inputs, outputs) and what the scheduler received."""
    calls, seen = [], []
    hook = pipe.unet.register_forward_hook(
        lambda mod, args, kw, out: calls.append((args[0].clone(), kw["class_labels"].clone(), out.sample.clone())),
        with_kwargs=True)
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda out, t, x, **kw: (seen.append(out.clone()), step(out, t, x, **kw))[1]
    try:
        run(pipe, [0, 1], num_inference_steps=1, output_type="latent", **kwargs)
    finally:
        hook.remove()
        pipe.scheduler.step = step
    return calls, seen


def test_classifier_free_guidance():
    pipe = make_pipeline(num_classes=3)
    calls, seen = record_guidance(pipe, class_labels=["class2", "class0"], guidance_scale=1.0)
    assert calls[0][1].tolist() == [2, 0] and torch.equal(seen[0], calls[0][2])  # plain conditional
    for w in (0.0, 3.0):
        calls, seen = record_guidance(pipe, class_labels=["class2", "class0"], guidance_scale=w)
        inputs, labels, out = calls[0]
        assert len(calls) == 1 and labels.tolist() == [3, 3, 2, 0]  # one batched call, null class first
        assert torch.equal(inputs[:2], inputs[2:])
        uncond, cond = out[:2], out[2:]
        torch.testing.assert_close(seen[0], uncond + w * (cond - uncond))
        if w == 0.0:
            torch.testing.assert_close(seen[0], uncond)


def test_class_label_errors():
    pipe = make_pipeline(num_classes=2)
    with pytest.raises(ValueError, match="Unknown class name 'dog'. Known classes: class0, class1"):
        run(pipe, [0], class_labels="dog")
    with pytest.raises(ValueError, match=r"out of range: use 0..1"):
        run(pipe, [0], class_labels=2)
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        run(pipe, [0])
    plain = make_pipeline()
    with pytest.raises(ValueError, match="unconditional"):
        run(plain, [0], class_labels=0)
    with pytest.raises(ValueError, match="guidance_scale != 1 needs a class-conditional"):
        run(plain, [0], guidance_scale=2.0)


def test_conditional_generate_cycles_through_classes(tmp_path):
    pipe = make_pipeline(num_classes=2)
    seen = []
    hook = pipe.unet.register_forward_hook(lambda m, a, kw, o: seen.append(kw["class_labels"].tolist()),
                                           with_kwargs=True)
    generate_images(pipe, 3, seed=0, batch_size=3, num_inference_steps=1, out_dir=tmp_path)
    hook.remove()
    assert seen == [[0, 1, 0]]


def test_models_run_in_eval_mode_and_keep_their_mode():
    pipe = make_pipeline()
    pipe.unet.train()
    pipe.vae.eval()
    modes = []
    hook = pipe.unet.register_forward_hook(lambda m, a, o: modes.append(m.training))
    run(pipe, [0], output_type="latent")
    hook.remove()
    assert modes == [False, False] and pipe.unet.training and not pipe.vae.training


def test_plain_diffusers_components_and_a_hand_written_dpm_solver_reproduce_the_pipeline(tmp_path):
    """A saved folder sampled by plain diffusers models and the paper's DPM-Solver++(2M) loop gives the
    latents and images the pipeline gives under diffusers' DPMSolverMultistepScheduler: the saved schedule,
    latent scale and prediction type are the ones the pipeline samples with."""
    from evaluation.reference_sampler import (alphas_cumprod_from_config, dpm_solver_pp_2m, sample_saved_pipeline,
                                              sampling_timesteps)

    pipe = make_pipeline(sampler="dpmsolver++")
    torch.manual_seed(1)  # a U-Net whose output is far from zero, so every term of the solver matters
    for p in pipe.unet.parameters():
        p.data.normal_(0, 0.05)
    pipe.save_pretrained(tmp_path)
    gens = [image_generator(0, i) for i in range(3)]
    noise = torch.cat([torch.randn((1, 4, 4, 4), generator=g) for g in gens])
    ours = pipe(batch_size=3, latents=noise, num_inference_steps=20, output_type="pt").images
    plain = sample_saved_pipeline(tmp_path, noise, num_steps=20)
    assert ours.shape == plain.shape == (3, 3, 32, 32)
    torch.testing.assert_close(plain, ours, atol=2e-4, rtol=0)

    our_latents = pipe(batch_size=3, latents=noise, num_inference_steps=20, output_type="latent").images
    unet = UNet2DModel.from_pretrained(tmp_path, subfolder="unet")
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    alphas_cumprod = alphas_cumprod_from_config(config)

    def latents(steps, prediction_type="epsilon"):
        timesteps = sampling_timesteps(config["num_train_timesteps"], steps, config["timestep_spacing"])
        return dpm_solver_pp_2m(unet, noise, alphas_cumprod, timesteps, prediction_type)

    torch.testing.assert_close(latents(20), our_latents, atol=1e-4, rtol=1e-4)
    # The comparison is sharp: another step count or prediction type moves the latents well past it.
    assert (latents(19) - our_latents).abs().max() > 1e-2
    assert (latents(20, "v_prediction") - our_latents).abs().max() > 1e-2


def test_hand_written_sampler_reproduces_guided_class_conditional_sampling(tmp_path):
    """Classifier-free guidance written independently (two U-Net calls, the null class the last embedding)
    gives the pipeline's guided latents and images (one batched call); the guidance and the labels matter."""
    from evaluation.reference_sampler import (alphas_cumprod_from_config, dpm_solver_pp_2m, sample_saved_pipeline,
                                              sampling_timesteps)

    pipe = make_pipeline(num_classes=3, sampler="dpmsolver++")
    torch.manual_seed(1)
    for p in pipe.unet.parameters():
        p.data.normal_(0, 0.05)
    pipe.save_pretrained(tmp_path)
    noise = torch.cat([torch.randn((1, 4, 4, 4), generator=image_generator(0, i)) for i in range(3)])
    labels = torch.tensor([2, 0, 1])
    guided = dict(num_inference_steps=10, class_labels=labels, guidance_scale=3.0)
    ours = pipe(batch_size=3, latents=noise, output_type="pt", **guided).images
    plain = sample_saved_pipeline(tmp_path, noise, num_steps=10, class_labels=labels, guidance_scale=3.0)
    torch.testing.assert_close(plain, ours, atol=2e-4, rtol=0)

    our_latents = pipe(batch_size=3, latents=noise, output_type="latent", **guided).images
    config = pipe.scheduler.config
    timesteps = sampling_timesteps(config.num_train_timesteps, 10, config.timestep_spacing)

    def latents(class_labels, guidance_scale):
        return dpm_solver_pp_2m(pipe.unet, noise, alphas_cumprod_from_config(config), timesteps,
                                class_labels=class_labels, guidance_scale=guidance_scale)

    torch.testing.assert_close(latents(labels, 3.0), our_latents, atol=1e-4, rtol=1e-4)
    assert (latents(labels, 1.0) - our_latents).abs().max() > 1e-2
    assert (latents(labels.roll(1), 3.0) - our_latents).abs().max() > 1e-2
    with pytest.raises(ValueError, match="class-conditional U-Net: give class_labels"):
        sample_saved_pipeline(tmp_path, noise, num_steps=10)


# ----------------------------------------------------------------------------- each check once, one default


def _count_calls(monkeypatch, *functions) -> dict:
    """Replace each function, wherever one of the project's modules holds it, by one that counts its calls."""
    import sys

    counts = dict.fromkeys((f.__name__ for f in functions), 0)
    for function in functions:
        def counting(*args, _function=function, **kwargs):
            counts[_function.__name__] += 1
            return _function(*args, **kwargs)

        for name, module in list(sys.modules.items()):
            if name.split(".")[0] in ("ldm_core", "pipelines", "workflows", "evaluation", "stage_b_diffusion") \
                    and getattr(module, function.__name__, None) is function:
                monkeypatch.setattr(module, function.__name__, counting)
    return counts


def _checks(monkeypatch) -> dict:
    from ldm_core import sampling
    from ldm_core.models import pipeline_folders, pretrained
    from workflows import generate

    return _count_calls(monkeypatch, sampling.check_sampling_arguments, sampling.class_ids_for,
                        pipeline_folders.check_model_index, pretrained.check_model_folder, pretrained.read_model_config,
                        pretrained.check_model_weights, pipeline_folders.check_pipeline_parts,
                        generate.check_generate_counts, generate.check_output_folder)


def test_ldm_generate_checks_every_flag_and_the_folder_once(tmp_path, monkeypatch):
    """However many batches: the flags against the saved folder before it is loaded, the folder's files
    before it is loaded (loading does not read them again), the parts where the pipeline is built."""
    from workflows.cli import main

    make_pipeline(num_classes=2).save_pretrained(tmp_path / "pipe")
    counts = _checks(monkeypatch)
    assert main(["generate", "--model", str(tmp_path / "pipe"), "--num-images", "3", "--batch-size", "1",
                 "--steps", "1", "--class", "class1", "--guidance-scale", "2", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("image_*.png"))) == 3
    assert counts == {"check_sampling_arguments": 1, "class_ids_for": 1, "check_model_index": 1,
                      "check_model_folder": 1, "read_model_config": 2, "check_model_weights": 2,  # vae/, unet/
                      "check_pipeline_parts": 1, "check_generate_counts": 1, "check_output_folder": 1}


def test_python_callers_are_checked_once_per_call(tmp_path, monkeypatch):
    make_pipeline(num_classes=2).save_pretrained(tmp_path / "pipe")
    counts = _checks(monkeypatch)
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert (counts["check_model_folder"], counts["check_model_weights"], counts["check_pipeline_parts"]) == (1, 2, 1)
    generate_images(pipe, 3, seed=0, batch_size=1, num_inference_steps=1, out_dir=tmp_path / "out")
    assert (counts["check_sampling_arguments"], counts["class_ids_for"], counts["check_output_folder"]) == (1, 1, 1)
    run(pipe, [0, 1], class_labels="class1")
    assert (counts["check_sampling_arguments"], counts["class_ids_for"]) == (2, 2)


def test_one_default_number_of_sampling_steps():
    """`ldm generate --steps`, the pipeline's __call__, both configs' sections and the reference sampler share
    DEFAULT_SAMPLING_STEPS; the demo's preset asks for 50 evaluation steps itself."""
    import inspect
    from pathlib import Path

    from evaluation.reference_sampler import sample_saved_pipeline
    from ldm_core.config.settings import load_config
    from ldm_core.sampling import DEFAULT_SAMPLING_STEPS
    from workflows.cli import build_parser
    from workflows.config import LDMConfig

    assert DEFAULT_SAMPLING_STEPS == 20
    assert inspect.signature(LatentDiffusionPipeline.__call__).parameters["num_inference_steps"].default == 20
    assert inspect.signature(sample_saved_pipeline).parameters["num_steps"].default == 20
    assert build_parser().parse_args(["generate", "--model", "m", "--out", "o"]).steps == 20
    config = LDMConfig()
    assert config.stage_b.sampling.num_inference_steps == config.evaluation.num_inference_steps == 20
    demo = load_config(LDMConfig, Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert demo.evaluation.num_inference_steps == 50 and demo.stage_b.sampling.num_inference_steps == 20
