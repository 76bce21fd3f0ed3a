"""Crash-safe checkpoints, retention, resume resolution, deterministic batches and random draws."""

import json

import numpy as np
import pytest
import torch

from ldm_core.training.checkpoints import (CheckpointError, list_checkpoints, load_checkpoint, resolve_resume,
                                 save_checkpoint)
from ldm_core.data.step_batches import StepBatches
from ldm_core.randomness import step_generator


def _save(root, step, keep=2, fp="abc"):
    model = {"w": torch.full((2, 2), float(step))}
    state = {"opt": {"lr": 0.1, "buf": [torch.ones(3) * step]}, "history": [{"step": step, "loss": 1.0}]}
    return save_checkpoint(root, step, {"model": model}, state, {"fingerprint": fp}, keep=keep)


def test_round_trip_and_latest(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10)
    _save(root, 20)
    ck = load_checkpoint(resolve_resume(tmp_path, "latest"), expected_fingerprint="abc")
    assert ck.step == 20
    assert torch.equal(ck.models["model"]["w"], torch.full((2, 2), 20.0))
    assert torch.equal(ck.state["opt"]["buf"][0], torch.ones(3) * 20)


def test_retention_keeps_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _save(root, step, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-0000003", "step-0000004"]


def test_half_written_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 5)
    # A run killed while writing step 6 leaves a temporary folder and possibly a folder without meta.json.
    (root / ".step-0000006.tmp-123").mkdir()
    (root / "step-0000007").mkdir()
    (root / "step-0000007" / "model.safetensors").write_bytes(b"partial")
    assert resolve_resume(tmp_path, "latest").name == "step-0000005"
    (root / "latest").unlink()  # even without the pointer
    assert resolve_resume(tmp_path, "latest").name == "step-0000005"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(root / "step-0000007"))


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path):
    assert resolve_resume(tmp_path, "latest") is None
    assert resolve_resume(tmp_path, None) is None


def test_missing_resume_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))


def test_checkpoint_from_other_config_is_refused(tmp_path):
    path = _save(tmp_path / "checkpoints", 3, fp="one")
    with pytest.raises(CheckpointError, match="different model configuration"):
        load_checkpoint(path, expected_fingerprint="two")
    assert json.loads((path / "meta.json").read_text())["step"] == 3


def test_training_state_is_read_with_weights_only(tmp_path):
    path = _save(tmp_path / "checkpoints", 1)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"payload": Evil()}, path / "training_state.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(path)


def test_step_batches_are_a_function_of_the_step():
    indices = np.arange(100, 150)
    a = StepBatches(indices, batch_size=4, world_size=1, rank=0, seed=3, flip=True)
    b = StepBatches(indices, batch_size=4, world_size=1, rank=0, seed=3, flip=True)
    for step in (0, 5, 11, 12, 40):
        ia, fa = a(step)
        ib, fb = b(step)
        assert np.array_equal(ia, ib) and np.array_equal(fa, fb)
    # One epoch (12 steps of 4 from 50 images) visits distinct images only.
    seen = np.concatenate([a(s)[0] for s in range(a.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == 48
    assert set(seen.tolist()) <= set(indices.tolist())
    assert not np.array_equal(a(0)[0], a(12)[0])  # a new permutation next epoch
    flips = np.concatenate([a(s)[1] for s in range(a.steps_per_epoch)])
    assert 0 < flips.mean() < 1


def test_step_batches_shard_the_global_batch():
    indices = np.arange(64)
    single = StepBatches(indices, batch_size=8, world_size=1, rank=0, seed=0, flip=False)
    r0 = StepBatches(indices, batch_size=4, world_size=2, rank=0, seed=0, flip=False)
    r1 = StepBatches(indices, batch_size=4, world_size=2, rank=1, seed=0, flip=False)
    for step in range(3):
        assert np.array_equal(np.concatenate([r0(step)[0], r1(step)[0]]), single(step)[0])


def test_too_few_images_for_a_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatches(np.arange(3), batch_size=4, world_size=1, rank=0, seed=0, flip=False)


def test_step_generator_is_reproducible_and_distinct():
    draw = lambda *a: torch.randn(4, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 7, 0), draw(0, 7, 0))
    assert not torch.equal(draw(0, 7, 0), draw(0, 8, 0))
    assert not torch.equal(draw(0, 7, 0), draw(0, 7, 1))
    assert not torch.equal(draw(0, 7, 0), draw(1, 7, 0))


def test_a_setting_added_since_a_run_was_saved_does_not_block_its_resume_at_its_default(tmp_path):
    """A run saved before data.reexpose existed resumes with it at its default, and not with another value."""
    import yaml

    from ldm_core.config.settings import load_config, save_config
    from ldm_core.training.run_folder import RunFolderError, check_resume_changes
    from stage_a_vae.config import StageAConfig

    config = load_config(StageAConfig, None, [])
    save_config(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["data"]["reexpose"]  # as an older version wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert check_resume_changes(tmp_path, config) == {}
    with pytest.raises(RunFolderError, match=r"data.reexpose: None -> 0.5"):
        check_resume_changes(tmp_path, load_config(StageAConfig, None, ["data.reexpose=0.5"]))
