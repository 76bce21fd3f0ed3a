"""The Markdown summary of a report (`OUT/gpu_check.md`), and the checks gathered from its sections."""

from __future__ import annotations

from typing import Any

from benchmarks.gpu_check.references import REFERENCE_FIGURES
from benchmarks.harness import markdown_table

COLUMNS = [("what", "measure"), ("precision", "precision"), ("batch", "batch"), ("value", "ours"),
           ("utilisation", "of bf16 matmul peak"), ("anchor", "anchor")]


def all_checks(report: dict) -> list[dict]:
    return [c for entry in report["sections"].values() for c in entry.get("results", {}).get("checks", [])]


def _limit_rows(limits: dict) -> list[dict[str, Any]]:
    if "bf16_matmul_tflops" not in limits:
        return []
    return [{"what": f"bf16 matmul {limits['matmul_size']}^3", "value": f"{limits['bf16_matmul_tflops']:.4g} TFLOP/s",
             "anchor": "~790 of 989 TFLOP/s (H100/H200)"},
            {"what": "device-to-device copy (read + write)",
             "value": f"{limits['copy_read_plus_write_gb_per_s']:.4g} GB/s", "anchor": "4,800 GB/s nominal (H200)"}]


def _timed_rows(sections: dict) -> list[dict[str, Any]]:
    rows = []
    for name, anchor in (("stage_a_speed", "20-35% (conv nets)"), ("stage_b_speed", "20-35%; SD-2 U-Net ~137 img/s/A100"),
                         ("sampling", "")):
        for w in sections.get(name, {}).get("rows", []):
            label = w.get("what") or f"{w.get('path')}, {w.get('phase', '')}".strip(", ")
            extra = ", ".join(str(w[k]) for k in ("memory_format", "compiled") if w.get(k) and w[k] != "contiguous")
            value = (f"{w['calls_per_s']:.4g} steps/s" if w.get("what") == "U-Net forward" and "calls_per_s" in w
                     else f"{w['images_per_s']:.4g} img/s" if "images_per_s" in w else
                     f"skipped: {w['skipped']}" if "skipped" in w else f"error: {w.get('error')}")
            if "compile_s" in w:
                value += f" (compile {w['compile_s']:.0f} s)"
            rows.append({"what": f"{name}: {label}" + (f" [{extra}]" if extra else ""), "precision": w.get("precision"),
                         "batch": w.get("batch"), "value": value, "utilisation": w.get("utilisation"),
                         "anchor": anchor})
    return rows


def _ratio_rows(sections: dict) -> list[dict[str, Any]]:
    rows = []
    a = sections.get("stage_a_speed", {})
    for key, ratio in a.get("vs_ldm", {}).items():
        rows.append({"what": f"stage A speed-up, {key.replace('_', ' ')}", "value": f"{ratio:.3g}x"})
    if a.get("time_split"):
        t = a["time_split"]
        rows.append({"what": "stage A time split (autoencoder / LPIPS / discriminator)",
                     "value": f"{t['autoencoder_fraction']:.0%} / {t['lpips_fraction']:.0%} / {t['discriminator_fraction']:.0%}"})
    b = sections.get("stage_b_speed", {})
    if b.get("ours_over_text_to_image"):
        rows.append({"what": "stage B speed-up over diffusers text-to-image", "value": f"{b['ours_over_text_to_image']:.3g}x"})
    for what, ratio in sections.get("sampling", {}).get("bf16_speedup_over_fp32", {}).items():
        rows.append({"what": f"sampling: {what}, bf16 over fp32", "value": f"{ratio:.3g}x"})
    return rows


def _cpu_anchor(cpu: dict, *keys: str, template: str) -> str:
    """The CPU demo's figures as docs/demo.md states them, or what is missing; nothing for the tiny demo."""
    if not cpu.get("comparable"):
        return ""
    if any(cpu.get(k) is None for k in keys):
        return f"CPU: not stated in {cpu.get('source')}"
    return template.format(**cpu) + f" ({cpu.get('source')}, {cpu.get('measured')})"


def _demo_rows(demo: dict) -> list[dict[str, Any]]:
    if not demo.get("summary"):
        return []
    d, cpu = demo["summary"], demo.get("cpu_reference") or {}
    return [{"what": "demo wall time", "value": f"{d['wall_minutes']:.3g} min",
             "anchor": _cpu_anchor(cpu, "wall_minutes", template="CPU {wall_minutes} min")},
            {"what": "demo held-out PSNR / samples valid",
             "value": f"{d['heldout_psnr']:.4g} dB / {d['samples_validity']:.1%}",
             "anchor": _cpu_anchor(cpu, "heldout_psnr", "samples_validity",
                                   template="CPU {heldout_psnr} dB / {samples_validity:.1%}")}]


def summary_markdown(report: dict) -> str:
    sections = {k: v.get("results", {}) for k, v in report["sections"].items()}
    rows = (_limit_rows(sections.get("limits", {})) + _timed_rows(sections) + _ratio_rows(sections)
            + _demo_rows(sections.get("demo", {})))
    checks = all_checks(report)
    failed = [c["name"] for c in checks if not c["ok"] and not c.get("skipped")]
    status = ", ".join(f"{k} {v['status']}" for k, v in report["sections"].items())
    return (f"# gpu_check ({report['mode']}, {report['device']})\n\n{markdown_table(rows, COLUMNS)}\n\n"
            f"Checks: {sum(c['ok'] for c in checks)} passed, {len(failed)} failed, "
            f"{sum(bool(c.get('skipped')) for c in checks)} skipped" + (f" (failed: {'; '.join(failed)})" if failed else "")
            + f". Sections: {status}.\n\nAnchors: " + " ".join(f"{v}." for v in REFERENCE_FIGURES.values()) + "\n")
