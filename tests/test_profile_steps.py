"""`benchmarks/profile_steps.py`: the demo's two training steps under the profiler, split by op family.

Seconds say nothing here (a shared CPU, one step); what is asserted is structure that could break: every
family is reported, the families add up to the step, the FLOP count is the convolutions' and matmuls' work,
and the op names land in the family they belong to.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from benchmarks import profile_steps


def _event(name, parent=None):
    return SimpleNamespace(name=name, cpu_parent=parent)


def test_ops_fall_into_their_families_and_ranges_win_over_names():
    assert profile_steps.family_of(_event("aten::convolution_backward")) == "conv backward"
    assert profile_steps.family_of(_event("aten::mkldnn_convolution")) == "conv forward"
    assert profile_steps.family_of(_event("aten::native_group_norm")) == "GroupNorm"
    assert profile_steps.family_of(_event("aten::_scaled_dot_product_flash_attention_for_cpu")) == "attention"
    assert profile_steps.family_of(_event("aten::addmm")) == "matmul (linear)"
    assert profile_steps.family_of(_event("aten::silu")) == "element-wise"
    assert profile_steps.family_of(_event("aten::as_strided")) == "other ops"
    # An element-wise op inside the optimizer's or the EMA's range is counted there.
    step = _event("Optimizer.step#AdamW.step")
    assert profile_steps.family_of(_event("aten::mul", _event("aten::_fused_adamw_", step))) == "optimizer"
    assert profile_steps.family_of(_event("aten::lerp_", _event("ldm.ema.step"))) == "EMA"


def test_both_stages_profile_into_families_that_add_up_to_the_step(tmp_path):
    # 16 training images a stage (Stage B encodes them into its latent cache) and one profiled step: the least
    # that runs every part.
    tiny = ["stage_a.data.shapes_count=24", "stage_a.train.batch_size=4", "stage_b.data.shapes_count=24",
            "stage_b.data.val_count=8", "stage_b.train.batch_size=8"]
    data = profile_steps.run(tmp_path, warmup=0, steps=1, overrides=tiny, peak_seconds=0.1, isolate=False)
    saved = json.loads((tmp_path / "profile_steps.json").read_text())
    assert saved["stages"].keys() == {"a", "b"} and (tmp_path / "profile_steps.md").is_file()
    for stage, result in data["stages"].items():
        families = result["family_seconds"]
        assert list(families) == list(profile_steps.FAMILY_ORDER)
        assert all(seconds >= 0 for seconds in families.values())
        # The ops' self times plus the remainder are the step (the remainder is clipped at zero).
        assert sum(families.values()) >= result["seconds_per_step"] * 0.999
        assert families["conv forward"] > 0 and families["conv backward"] > 0
        assert result["flops_per_step"] > 0 and result["achieved_gflops"] > 0
    assert data["stages"]["a"]["batch"] == 4 and data["stages"]["b"]["batch"] == 8
    # Stage A's step at 64 px does far more convolution work than Stage B's on 8x8 latents at twice the batch.
    assert data["stages"]["a"]["flops_per_step"] > data["stages"]["b"]["flops_per_step"]
