"""Typed configs: YAML presets, key=value overrides, and errors that name the key, also through the
training commands, before any work."""

import dataclasses

import pytest
import yaml

from ldm_core.config.settings import (ConfigError, fingerprint, fingerprint_parts, load_config, resumable_keys,
                                      save_config, valid_keys)
from ldm_core.config.preset_files import available_presets, config_path
from workflows.cli import DEBUG_ENV, main
from workflows.config import LDMConfig
from stage_a_vae.config import StageAConfig
from stage_b_diffusion.config import StageBConfig

from tiny_runs import SMOKE_B, STAGE_B, run_cli


def test_defaults_then_yaml_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  max_steps: 50\n  lr: 0.001\nloss:\n  kl_weight: 1.0e-5\n")
    cfg = load_config(StageAConfig, preset, ["train.max_steps=2000", "loss.kl_weight=1e-6"])
    assert cfg.train.max_steps == 2000  # command line wins over the file
    assert cfg.loss.kl_weight == pytest.approx(1e-6)
    assert cfg.train.lr == pytest.approx(1e-3)  # from the file
    assert cfg.train.adam_beta1 == 0.5 and cfg.train.adam_beta2 == 0.9  # Stage A defaults (LDM)
    assert isinstance(cfg.train.max_steps, int)


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(StageAConfig, None, ["train.max_step=10"])
    msg = str(err.value)
    assert "train.max_step" in msg and "max_steps" in msg and "batch_size" in msg


def test_unknown_section_in_yaml(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("trian:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match="'trian'.*Valid keys in top level: data, ema, loss, model, train"):
        load_config(StageAConfig, preset)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(StageAConfig, None, ["train.max_steps=many"])


@pytest.mark.parametrize("override, key", [
    ("train.lr=-0.1", "train.lr"),
    ("data.resolution=60", "data.resolution"),
    ("loss.reconstruction=l3", "loss.reconstruction"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
])
def test_impossible_values_are_refused(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(StageAConfig, None, [override])


def test_a_latent_input_scale_must_be_positive():
    with pytest.raises(ConfigError, match=r"diffusion\.input_scale"):
        load_config(StageBConfig, None, ["diffusion.input_scale=0"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(StageAConfig, None, ["train.max_steps"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(StageAConfig, tmp_path / "nope.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(StageBConfig, None, ["train.max_steps=7", "diffusion.snr_gamma=5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(StageBConfig, tmp_path / "config.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert set(yaml.safe_load((tmp_path / "config.yaml").read_text())) == {
        "model", "diffusion", "data", "train", "ema", "sampling"}


def test_every_shipped_preset_loads():
    schema = {"vae": StageAConfig, "unet": StageBConfig}
    presets = available_presets()
    assert {"demo.yaml", "vae/kl-f8-small.yaml", "unet/unet-small.yaml"} <= set(presets)
    for name in presets:
        cls = schema.get(name.split("/")[0], LDMConfig)
        load_config(cls, config_path(name))


def test_the_keys_a_resume_may_change_are_those_marked_on_their_fields():
    # The list ldm_core/training/run_folder.py held before the marks moved onto the fields, and the
    # discriminator's schedule and the trackers added since.
    expected = {"train.lr", "train.disc_lr", "train.disc_lr_schedule", "train.max_steps", "train.lr_warmup_steps",
                "train.lr_schedule",
                "train.time_budget_minutes", "train.log_every", "train.validate_every", "train.checkpoint_every",
                "train.keep_checkpoints", "train.progress_bar", "train.nonfinite_loss", "train.max_nonfinite_skips",
                "train.report_to",
                "train.mixed_precision", "train.max_grad_norm", "train.fused_optimizer", "train.channels_last",
                "train.latent_stats_images", "ema.export_ema", "sampling.", "data.image_cache_dir",
                "data.latent_cache_dir", "data.num_workers", "data.decoded_cache_mb"}
    stage_a, stage_b = resumable_keys(StageAConfig), resumable_keys(StageBConfig)
    assert set(stage_a) | set(stage_b) == expected
    assert "train.disc_lr" not in stage_b and "sampling." in stage_b and "data.image_cache_dir" in stage_a
    # A subclass's own default keeps the base field's mark.
    assert "train.lr" in stage_b and "train.lr_warmup_steps" in stage_b
    # Nothing a checkpoint's tensors depend on may change on resume.
    for cls in (StageAConfig, StageBConfig):
        marked = [k for k in valid_keys(cls) if k.split(".")[0] in ("model", "loss", "diffusion")
                  or k == "data.resolution"]
        assert not [k for k in marked if k.startswith(resumable_keys(cls))]


def test_the_fingerprint_covers_the_marked_sections_and_the_resolution():
    a, b = StageAConfig(), StageBConfig()
    assert fingerprint_parts(a) == [a.model, a.loss, a.data.resolution]
    assert fingerprint_parts(b) == [b.model, b.diffusion, b.data.resolution]
    assert a.model_fingerprint() == fingerprint(a.model, a.loss, a.data.resolution)
    assert b.model_fingerprint() == fingerprint(b.model, b.diffusion, b.data.resolution)


def test_the_discriminator_learning_rate_falls_back_to_lr():
    assert load_config(StageAConfig, None, ["train.lr=3e-4"]).train.disc_learning_rate == pytest.approx(3e-4)
    assert load_config(StageAConfig, None, ["train.disc_lr=1e-5"]).train.disc_learning_rate == pytest.approx(1e-5)


def _restated(data: dict, below: dict, prefix: str = ""):
    """Dotted keys of `data` whose value is the one `below` already has (a base preset's or the default)."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _restated(value, below[key], f"{prefix}{key}.")
        elif key != "base" and value == below[key]:
            yield f"{prefix}{key}"


def test_shipped_presets_state_only_what_differs_from_the_defaults():
    schema = {"vae": StageAConfig, "unet": StageBConfig}
    for name in available_presets():
        cls = schema.get(name.split("/")[0], LDMConfig)
        data = yaml.safe_load(config_path(name).read_text())
        below = dataclasses.asdict(cls())
        for section, stage in (("stage_a", StageAConfig), ("stage_b", StageBConfig)):
            if cls is LDMConfig and "base" in data.get(section, {}):
                below[section] = dataclasses.asdict(load_config(stage, data[section]["base"]))
        # A preset names its architecture even where that is the default: the file is named after it.
        assert [k for k in _restated(data, below) if k != "model.preset"] == [], name


def test_valid_keys_are_dotted_and_complete():
    keys = valid_keys(LDMConfig)
    assert "stage_a.loss.kl_weight" in keys and "stage_b.diffusion.beta_end" in keys
    assert all(not k.endswith(".") for k in keys)


def test_no_off_yes_stay_strings_so_mixed_precision_no_works_unquoted(tmp_path):
    from stage_a_vae.config import StageAConfig

    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  mixed_precision: no\n  progress_bar: false\n")
    from_file = load_config(StageAConfig, preset)
    assert from_file.train.mixed_precision == "no" and from_file.train.progress_bar is False
    from_override = load_config(StageAConfig, None, ["train.mixed_precision=no", "train.progress_bar=true",
                                                     "model.block_out_channels=[8,16,32,32]",
                                                     "model.posterior_logvar_init=null"])
    assert from_override.train.mixed_precision == "no" and from_override.train.progress_bar is True
    assert from_override.model.block_out_channels == [8, 16, 32, 32]
    assert from_override.model.posterior_logvar_init is None


def test_a_base_key_starts_a_section_from_a_preset_or_file(tmp_path):
    (tmp_path / "stage_b.yaml").write_text("base: unet/unet-small\ntrain:\n  max_steps: 7\n")
    (tmp_path / "job.yaml").write_text("stage_b:\n  base: stage_b.yaml\n  sampling:\n    sample_every: 3\n"
                                       "evaluation:\n  num_images: 5\n")
    cfg = load_config(LDMConfig, tmp_path / "job.yaml")
    preset = load_config(StageBConfig, "unet/unet-small")
    assert cfg.stage_b.train.max_steps == 7 and cfg.stage_b.sampling.sample_every == 3
    assert cfg.evaluation.num_images == 5
    # Everything the job does not state comes from the preset.
    assert cfg.stage_b.train.lr == preset.train.lr and cfg.stage_b.model == preset.model
    assert cfg.stage_b.train.batch_size == preset.train.batch_size != StageBConfig().train.batch_size
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loop"):
        load_config(LDMConfig, tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("stage_a:\n  base: vae/no-such-preset\n")
    with pytest.raises(ConfigError, match="no-such-preset"):
        load_config(LDMConfig, tmp_path / "missing.yaml")


def test_the_demo_names_its_stage_presets_instead_of_restating_them():
    demo = load_config(LDMConfig, "demo.yaml")
    assert demo.stage_a == load_config(StageAConfig, "vae/kl-f8-mini")
    unet = load_config(StageBConfig, "unet/unet-small")
    # Inherited from the preset: the noise schedule and what the demo does not state.
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        assert getattr(demo.stage_b.diffusion, key) == getattr(unet.diffusion, key), key
    assert demo.stage_b.train.lr_schedule == unet.train.lr_schedule
    assert demo.stage_b.ema.enabled is False and unet.ema.enabled is True
    # What the demo changes, it states.
    assert demo.stage_b.train.max_steps != unet.train.max_steps and demo.stage_b.model.norm_num_groups == 8


# ----------------------------------------------------------------------------- through the commands
# Every training command checks the whole resolved config before any work, and answers a bad value with
# one line naming the key or file, no traceback, and no run folder.


# (command, extra arguments, expected part of the one-line message). The stage B commands name a
# --vae that does not exist: the config is checked before the VAE is looked at.
BAD_VALUES = [
    ("train-vae", ["train.log_every=0"], "train.log_every=0"),
    ("train-vae", ["train.validate_every=0"], "train.validate_every=0"),
    ("train-vae", ["train.seed=-1"], "train.seed=-1"),
    ("train-vae", ["train.adam_beta1=1.5"], "train.adam_beta1=1.5"),
    ("train-vae", ["train.disc_adam_beta2=1.0"], "train.disc_adam_beta2=1.0"),
    ("train-vae", ["model.preset=kl-f8-huge"], "model.preset='kl-f8-huge'"),
    ("train-vae", ["loss.disc_channels=0"], "loss.disc_channels=0"),
    ("train-vae", ["data.resolution=0"], "data.resolution=0"),
    ("train-vae", ["train.mixed_precision=fp16"], "fp16 needs a CUDA GPU"),
    ("train-vae", ["train.max_steps=[1"], "override 'train.max_steps=[1'"),
    ("train-vae", ["trian.max_steps=2"], "Unknown config key 'trian'"),
    ("train-unet", ["sampling.sample_every=0"], "sampling.sample_every=0"),
    ("train-unet", ["sampling.scheduler=fastest"], "sampling.scheduler='fastest'"),
    ("train-unet", ["sampling.num_inference_steps=5000"], "sampling.num_inference_steps=5000"),
    ("train-unet", ["model.preset=unet-xl"], "model.preset='unet-xl'"),
    ("train-unet", ["diffusion.num_train_timesteps=0"], "diffusion.num_train_timesteps=0"),
    ("train", ["stage_b.data.resolution=32"], "stage_b.data.resolution=32"),
    ("train", ["evaluation.num_images=0"], "evaluation.num_images=0"),
    ("train", ["evaluation.recon_images=1"], "evaluation.recon_images=1"),
    ("train", ["stage_b.train.mixed_precision=fp16"], "stage_b.train.mixed_precision=fp16"),
]


@pytest.mark.parametrize("command,extra,expected", BAD_VALUES, ids=[f"{c}:{e[0]}" for c, e, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_it_before_any_work(tmp_path, capsys, command, extra, expected):
    out = tmp_path / "run"
    vae = ["--vae", tmp_path / "no-vae"] if command == "train-unet" else []
    rc, err = run_cli(capsys, [command, *vae, "--data", "builtin:shapes", "--out", out, *extra])
    assert rc == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("content,expected", [
    (b"train:\n  max_steps: [1, 2\n", "not valid YAML at line"),
    (b"\x00\x9f\x92\x96binary\xff\xfe", "not valid YAML"),
    (b"- a list\n- not a mapping\n", "must hold a mapping"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path, capsys, content, expected):
    config = tmp_path / "broken.yaml"
    config.write_bytes(content)
    rc, err = run_cli(capsys, ["train-vae", "--config", config, "--data", "builtin:shapes", "--out", tmp_path / "r"])
    assert rc == 2 and expected in err and str(config) in err and "Traceback" not in err, err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    # With --debug (or its environment variable) the error leaves `main`, so Python prints its traceback.
    argv = ["train-vae", "--data", "builtin:shapes", "--out", str(tmp_path / "r"), "train.log_every=0"]
    with pytest.raises(ConfigError, match="train.log_every=0"):
        main(["--debug", *argv])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="train.log_every=0"):
        main(argv)
    assert not (tmp_path / "r").exists()


def test_stage_b_refuses_bad_sampling_values_before_encoding(tmp_path, capsys):
    # The sampling section used to be read only when the first grid was drawn, after training.
    rc, err = run_cli(capsys, ["train-unet", "--vae", tmp_path / "no-vae", "--data", "builtin:shapes",
                               "--out", tmp_path / "run", "--config", SMOKE_B, *STAGE_B,
                               "sampling.grid_images=0"])
    assert rc == 2 and "sampling.grid_images=0" in err
