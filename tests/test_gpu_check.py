"""`benchmarks/gpu_check/` (`make gpu-check`) in its tiny mode on this CPU: the same code the GPU runs.

Every section runs and lands in the JSON; the Stage A mixed-precision checks pass under bf16 and fp16 (with
the grad scaler); the FLOP and utilisation figures agree with each other and with the work each path does;
a section that raises is recorded while the run goes on, and the file on disk already holds the earlier
sections when a later one starts; the time guard skips what the budget cannot cover. Seconds say nothing
here (tiny models, a shared CPU); only counts and structure are asserted.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import plans


def _run(out, *extra) -> tuple[int, dict]:
    code = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out), *extra])
    return code, json.loads((out / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    code, report = _run(out)
    return code, report, out


def _results(report: dict, section: str) -> dict:
    return report["sections"][section]["results"]


def _checks(report: dict, prefix: str = "") -> dict[str, dict]:
    return {c["name"]: c for c in gpu_check.all_checks(report) if c["name"].startswith(prefix)}


def test_every_section_runs_and_is_written_with_its_seconds(tiny):
    code, report, out = tiny
    assert code == 0
    assert report["mode"] == "tiny" and report["complete"] is True
    assert list(report["sections"]) == list(gpu_check.SECTION_NAMES)
    for name, entry in report["sections"].items():
        assert entry["status"] == "ok", (name, entry.get("error"))
        assert entry["seconds"] >= 0 and isinstance(entry["results"], dict), name
    assert "| measure |" in (out / "gpu_check.md").read_text()
    machine = _results(report, "machine")
    assert machine["torch"] and "float32_matmul_precision" in machine["tf32"]


def test_every_check_has_a_boolean_ok_and_none_fails_on_this_cpu(tiny):
    _, report, _ = tiny
    checks = gpu_check.all_checks(report)
    assert len(checks) >= 19  # 9 per precision, the fp16 scaler check, the decode checks
    for c in checks:
        assert isinstance(c["name"], str) and isinstance(c["ok"], bool) and "detail" in c
    assert [c["name"] for c in checks if not c["ok"]] == []


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_stage_a_correctness_checks_pass_under_mixed_precision(tiny, precision):
    _, report, _ = tiny
    checks = _checks(report, f"{precision}:")
    for wanted in ("every loss finite", "parameters and optimizer states still fp32",
                   "no discriminator gradients or optimizer step before disc_start",
                   "discriminator gradients present and stepped after disc_start",
                   "autoencoder gradients untouched by the discriminator step",
                   "adaptive weight finite and positive", "below fp16's 65,504", f"ran in {precision}"):
        found = [c for name, c in checks.items() if wanted in name]
        assert len(found) == 1 and found[0]["ok"], (precision, wanted, found)
    # The raw step records the checks are made from.
    result = _results(report, "stage_a_correctness")
    steps = result["precisions"][precision]["steps"]
    before = [s for s in steps if s["step"] < result["disc_start"]]
    after = [s for s in steps if s["step"] >= result["disc_start"]]
    assert before and after
    assert all(s["disc_grads_after_ae_step"] == 0 and not s["d_stepped"] for s in before)
    assert all(s["disc_grads_after_d_step"] > 0 and s["d_stepped"] and s["ae_grads_unchanged_by_d_step"] for s in after)
    assert all(math.isfinite(v) for s in steps for v in s["losses"].values())
    peaks = result["precisions"][precision]["activation_peaks"]
    assert {"encoder.down_blocks.0", "encoder.mid_block", "decoder.up_blocks.3", "decoder.conv_out"} <= set(peaks)
    assert all(0 < v < gpu_check.FP16_MAX for v in peaks.values())


def test_fp16_scaler_steps_only_optimizers_with_gradients(tiny):
    _, report, _ = tiny
    steps = _results(report, "stage_a_correctness")["precisions"]["fp16"]["steps"]
    assert all(s["scale"] > 0 for s in steps)
    assert [s["d_stepped"] for s in steps] == [s["disc_on"] for s in steps]
    assert _checks(report)["fp16: the grad scaler stepped exactly the optimizers with gradients"]["ok"]


def _timed_rows(report: dict) -> list[dict]:
    rows = [w for name in ("stage_a_speed", "stage_b_speed", "sampling") for w in _results(report, name)["rows"]]
    return [w for w in rows if "skipped" not in w]


def test_utilisation_is_achieved_flops_over_the_measured_bf16_peak(tiny):
    _, report, _ = tiny
    peak = _results(report, "limits")["bf16_matmul_tflops"] * 1e12
    assert peak > 0
    rows = _timed_rows(report)
    assert len(rows) >= 14
    for w in rows:
        assert "error" not in w, w
        assert w["flops_per_step"] > 0 and w["step_s"] > 0, w
        assert w["bf16_peak_tflops"] * 1e12 == pytest.approx(peak)
        assert w["images_per_s"] == pytest.approx(w["batch"] / w["step_s"])
        assert w["achieved_tflops"] * 1e12 == pytest.approx(w["flops_per_step"] / w["step_s"])
        assert w["utilisation"] == pytest.approx(w["flops_per_step"] / w["step_s"] / peak)


def test_the_flop_counts_show_the_work_each_path_does(tiny):
    _, report, _ = tiny
    a = {(w["path"], w["phase"], w["precision"], w["memory_format"]): w for w in _results(report, "stage_a_speed")["rows"]
         if "flops_per_step" in w}
    ours_after = a["ours", "after disc_start", "bf16", "contiguous"]["flops_per_step"]
    ours_before = a["ours", "before disc_start", "bf16", "contiguous"]["flops_per_step"]
    ae_only = a["ours: autoencoder only (no LPIPS)", "before disc_start", "bf16", "contiguous"]["flops_per_step"]
    ldm = a["LDM as written", "any step", "fp32", "contiguous"]["flops_per_step"]
    # LPIPS and then the discriminator each add work; LDM's step runs the autoencoder twice and the
    # discriminator from step 0, so it does more than ours in either phase.
    assert ae_only < ours_before < ours_after < ldm
    assert ours_before < 0.75 * ldm
    assert a["ours", "after disc_start", "bf16", "channels_last"]["flops_per_step"] == ours_after
    assert set(_results(report, "stage_a_speed")["vs_ldm"]) == {
        f"ours_{x}_over_ldm_{y}" for x in ("after", "before") for y in ("fp32", "bf16")}
    b = _results(report, "stage_b_speed")["rows"]
    ours = {w["batch"]: w["flops_per_step"] for w in b if w["path"] == "ours"}
    reference = next(w for w in b if w["path"] == "diffusers text-to-image")
    assert ours[4] == pytest.approx(2 * ours[2], rel=0.02)  # the step's work grows with the batch
    assert reference["flops_per_step"] > ours[reference["batch"]]  # it encodes every batch through the VAE


def test_demo_section_reports_wall_time_and_the_demo_quality_figures(tiny):
    _, report, out = tiny
    demo = _results(report, "demo")
    assert demo["returncode"] == 0 and demo["wall_s"] > 0
    assert demo["stage_a"]["steps"] == 2 and demo["stage_b"]["steps"] == 2
    summary = demo["summary"]
    assert summary["heldout_psnr"] > 0 and summary["bicubic_psnr"] > 0
    assert 0 <= summary["samples_validity"] <= 1 and 0 <= summary["reconstructions_valid"] <= 1
    assert (out / "demo" / "summary.json").is_file()


def test_a_failing_section_is_recorded_and_the_file_is_rewritten_after_every_section(tmp_path, monkeypatch):
    def boom(runner):
        raise RuntimeError("injected failure")

    def read_the_file(runner):  # what a run cut at this point would have left
        return {"on_disk": json.loads((runner.out / "gpu_check.json").read_text())}

    monkeypatch.setitem(gpu_check.SECTIONS, "limits", boom)
    monkeypatch.setitem(gpu_check.SECTIONS, "demo", read_the_file)
    code, report = _run(tmp_path, "--sections", "demo,machine,limits")
    assert code == 1  # a section raised
    assert list(report["sections"]) == ["machine", "limits", "demo"]  # the sections' order, only those asked for
    seen = report["sections"]["demo"]["results"]["on_disk"]
    assert seen["complete"] is False
    assert seen["sections"]["machine"]["status"] == "ok" and seen["sections"]["machine"]["results"]["torch"]
    assert seen["sections"]["limits"]["status"] == "error"
    assert "RuntimeError: injected failure" in seen["sections"]["limits"]["error"]
    assert seen["sections"]["demo"] == {"status": "pending"}
    assert report["sections"]["demo"]["status"] == "ok" and report["complete"] is True


def test_the_time_guard_skips_what_the_budget_cannot_cover(tmp_path, monkeypatch):
    code, report = _run(tmp_path / "none", "--sections", "limits,stage_b_speed", "--budget-s", "0")
    assert code == 0
    for entry in report["sections"].values():
        assert entry["status"] == "skipped" and "budget" in entry["reason"] and "results" not in entry
    # A section that needs more than is left is skipped, and timed rows leave later sections their minimum.
    plan = dataclasses.replace(plans.TINY, min_s={"demo": 1000.0}, row_s=1.0)
    monkeypatch.setattr(plans, "TINY", plan)
    code, report = _run(tmp_path / "some", "--sections", "stage_b_speed,demo", "--budget-s", "100")
    assert report["sections"]["demo"]["status"] == "skipped"
    assert "needs at least 1000 s" in report["sections"]["demo"]["reason"]
    rows = report["sections"]["stage_b_speed"]["results"]["rows"]
    assert rows and all(w.get("skipped") == "budget" for w in rows)
