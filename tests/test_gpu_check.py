"""`benchmarks/gpu_check/` (`make gpu-check`) in its tiny mode on this CPU: the same code the GPU runs.

Every section runs and lands in the JSON; both trainers run under bf16 and the correctness checks read from
their runs pass (fp16 needs CUDA: its checks are skipped here, and the logic that reads a grad scaler is
checked on made-up checkpoints); the FLOP and utilisation figures agree with each other and with the work
each path does; the CPU figures shown beside the demo are those docs/demo.md publishes; a section that
raises is recorded while the run goes on, and the file on disk already holds the earlier sections when a
later one starts; the time guard skips what the budget cannot cover. Seconds say nothing here (tiny models,
a shared CPU); only counts and structure are asserted.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import plans, references, trainer_runs

ROOT = Path(__file__).resolve().parent.parent


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
    assert len(checks) >= 18  # 9 of Stage A's and 5 of Stage B's under bf16, fp16's two, the decode checks
    for c in checks:
        assert isinstance(c["name"], str) and isinstance(c["ok"], bool) and "detail" in c
    assert [c["name"] for c in checks if not c["ok"] and not c.get("skipped")] == []
    # Only what needs CUDA is skipped: fp16, which the trainers refuse on a CPU.
    assert sorted(c["name"] for c in checks if c.get("skipped")) == ["fp16: train_unet ran", "fp16: train_vae ran"]


STAGE_A_CHECKS = ("train_vae ran its 2 steps and every logged loss is finite",
                  "parameters and optimizer states still fp32",
                  "no discriminator loss or optimizer step before disc_start", "discriminator trained after disc_start",
                  "adaptive weight finite and positive", "the autoencoder's weights changed between steps 1 and 2",
                  "ran in bf16 under Accelerate's autocast", "below fp16's 65,504",
                  "the exported vae/ loads and reconstructs held-out shapes finitely")
STAGE_B_CHECKS = ("train_unet ran its 2 steps and every logged loss is finite",
                  "parameters and optimizer states still fp32", "the U-Net's weights changed between steps 1 and 2",
                  "ran in bf16 under Accelerate's autocast", "the exported pipeline/ loads and samples finite images")


@pytest.mark.parametrize("section, wanted", [("stage_a_correctness", STAGE_A_CHECKS),
                                             ("stage_b_correctness", STAGE_B_CHECKS)])
def test_the_real_trainers_pass_their_checks_under_bf16(tiny, section, wanted):
    _, report, out = tiny
    checks = {c["name"]: c for c in _results(report, section)["checks"] if c["name"].startswith("bf16:")}
    for name in wanted:
        found = [c for n, c in checks.items() if name in n]
        assert len(found) == 1 and found[0]["ok"], (section, name, found)
    run = Path(_results(report, section)["precisions"]["bf16"]["run"])
    assert run.is_relative_to(out) and (run / "metrics.json").is_file()
    assert not (run / "checkpoints").exists()  # read, then removed: they are only for the checks


def test_stage_a_run_records_what_the_checks_are_made_from(tiny):
    _, report, _ = tiny
    result = _results(report, "stage_a_correctness")
    assert result["trainer"] == "stage_a_vae.train.train_vae" and result["disc_start"] == 1
    bf16 = result["precisions"]["bf16"]
    rows = bf16["steps"]  # metrics.json's history: the update of step s is logged as s + 1
    assert [r["step"] for r in rows] == [1, 2]
    assert "d_loss" not in rows[0] and {"d_loss", "d_weight", "logits_real", "logits_fake"} <= rows[1].keys()
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert bf16["training_convolutions"]["dtypes"].get("bfloat16", 0) > 0
    peaks = bf16["activation_peaks"]
    assert {"encoder.down_blocks.0", "encoder.mid_block", "decoder.up_blocks.3", "decoder.conv_out"} <= set(peaks)
    assert all(0 < v < gpu_check.FP16_MAX for v in peaks.values())
    assert bf16["scaler"] is None and "fp16" not in result["precisions"]


def test_stage_b_trains_on_the_autoencoder_stage_a_exported(tiny):
    _, report, _ = tiny
    result = _results(report, "stage_b_correctness")
    assert result["autoencoder"] == "the stage_a_correctness section's export"
    rows = result["precisions"]["bf16"]["steps"]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def _checkpoint(step: int, weights: float, scale=None):
    from ldm_core.training.checkpoints import Checkpoint

    state = {"opt": {"state": {0: {"exp_avg": torch.zeros(2)}}}, "history": []}
    if scale is not None:
        state["scaler"] = {"scale": scale}
    return Checkpoint(Path(f"step-{step}"), step, {"net": {"w": torch.full((2,), weights)}}, state, {})


def test_the_fp16_grad_scaler_is_read_from_the_checkpoints():
    # 65,536 halved 5 times before step 4 and 3 more times before step 8: 5 and 3 skipped steps.
    run = trainer_runs.FinishedRun(Path("run"), {"steps": 8}, [], [_checkpoint(4, 1.0, 2.0 ** 11),
                                                                  _checkpoint(8, 2.0, 2.0 ** 8)])
    record = trainer_runs.scaler_record(run)
    assert record["skipped_steps"] == {4: 5, 8: 3}
    assert trainer_runs.scaler_check(run, record)["ok"]
    assert trainer_runs.updated_check("fp16", "the weights", "net", run, 3)["ok"]
    # Unchanged weights fail, unless the scaler skipped every step between the checkpoints: then a correct
    # trainer leaves them as they were, and the check says so instead of failing.
    frozen = dataclasses.replace(run, checkpoints=[_checkpoint(4, 1.0, 2.0 ** 11), _checkpoint(8, 1.0, 2.0 ** 7)])
    skipped = trainer_runs.updated_check("fp16", "the weights", "net", frozen, 4)
    assert skipped["skipped"] and not skipped["ok"] and "skipped" in skipped["detail"]
    failed = trainer_runs.updated_check("fp16", "the weights", "net", frozen, 2)
    assert not failed["ok"] and not failed.get("skipped")
    # An overflowing gradient norm is the scaler's business under fp16; any other non-finite value fails.
    rows = [{"step": 1, "loss": 1.0, "grad_norm": math.inf}, {"step": 2, "loss": 0.5, "grad_norm": 3.0}]
    two = trainer_runs.FinishedRun(Path("run"), {"steps": 2}, rows, [])
    assert trainer_runs.ran_and_finite_check("fp16", "train_unet", two, 2)["ok"]
    assert not trainer_runs.ran_and_finite_check("bf16", "train_unet", two, 2)["ok"]


def test_fp16_is_refused_only_without_cuda():
    assert trainer_runs.precisions(torch.device("cuda")) == [("bf16", None), ("fp16", None)]
    (_, bf16), (_, fp16) = trainer_runs.precisions(torch.device("cpu"))
    assert bf16 is None and "needs CUDA" in fp16


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
    cpu = demo["cpu_reference"]  # read from docs/demo.md, and not compared with a 2-step demo
    assert cpu["source"] == "docs/demo.md" and cpu["missing"] == [] and cpu["comparable"] is False


def test_the_cpu_demo_figures_are_those_docs_demo_md_publishes():
    figures = references.cpu_demo_figures()
    assert figures["missing"] == [] and figures["measured"] and "core" in figures["machine"]
    assert 0 < figures["stage_a_minutes"] < figures["wall_minutes"]
    assert figures["bicubic_psnr"] < figures["heldout_psnr"] < 100
    assert all(0 < figures[k] <= 1 for k in ("reconstructions_valid", "samples_validity",
                                             "samples_plain_diffusers_validity"))
    # The README states the same demo.
    assert f"**{figures['wall_minutes']:g} minutes**" in (ROOT / "README.md").read_text()


def test_a_page_without_the_figures_gives_none(tmp_path):
    page = tmp_path / "docs" / "demo.md"
    page.parent.mkdir()
    page.write_text("# The demo\n\n## Results\n\nMeasured 2027-01-01 on a 2-core CPU, torch 3: "
                    "**9.5 minutes** wall time.\n\n## Later\n")
    figures = references.cpu_demo_figures(page)
    assert figures["wall_minutes"] == 9.5 and figures["measured"] == "2027-01-01"
    assert "stage_a_minutes" in figures["missing"] and "heldout_psnr" not in figures
    gone = references.cpu_demo_figures(tmp_path / "nowhere.md")
    assert "error" in gone and "wall_minutes" in gone["missing"]


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


def test_each_file_of_the_check_is_short_and_so_is_each_function():
    for path in sorted((ROOT / "benchmarks" / "gpu_check").glob("*.py")):
        source = path.read_text()
        assert len(source.splitlines()) <= 500, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, f"{path.name}: {node.name}"
