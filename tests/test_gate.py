"""`edgedistill gate`: exit 0 when the model holds, 1 when it got worse, 2 on bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgedistill.cli import app

CPU = "Test CPU @ 2 GHz"


def make_report(**changes) -> dict:
    """A small but complete report.json (what `edgedistill report` writes, reduced)."""
    arts = [
        {"name": "torch-fp32", "format": "torch", "precision": "fp32", "top1": 90.0, "n": 200, "bytes": 6_000_000,
         "params": 1_500_000, "macs": 5_500_000},
        {"name": "onnx-fp32", "format": "onnx", "precision": "fp32", "top1": 90.0, "n": 200, "bytes": 6_100_000,
         "params": 1_500_000, "macs": 5_500_000},
        {"name": "onnx-int8-u8s8", "format": "onnx-qdq", "precision": "int8", "top1": 89.0, "n": 200,
         "bytes": 1_800_000, "params": 1_500_000, "macs": 5_500_000},
    ]
    latency = [
        {"artifact": a["name"], "runtime": "torch-cpu" if a["format"] == "torch" else "ort-cpu", "host": "ci",
         "cpu": CPU, "gpu": None, "batch": b, "threads": 2, "p50_ms": p50 * b, "p99_ms": p50 * b * 1.5,
         "throughput_ips": 1000 / p50}
        for a, p50 in zip(arts, (5.0, 1.0, 0.8)) for b in (1, 8)
    ]
    rep = {"schema": "edgedistill.report/1", "run": "runs/demo", "artifacts": arts, "latency": latency,
           "models": {"student": {"arch": "mobilenetv3_small_100"}}}
    for path, value in changes.items():  # "onnx-int8-u8s8.top1" -> value, "latency.ort-cpu.onnx-fp32.1" -> p50
        if path.startswith("latency."):
            _, runtime, name, batch = path.split(".", 3)
            for r in rep["latency"]:
                if r["runtime"] == runtime and r["artifact"] == name and r["batch"] == int(batch):
                    r["p50_ms"] = value
        else:
            name, key = path.rsplit(".", 1)
            next(a for a in rep["artifacts"] if a["name"] == name)[key] = value
    return rep


def write(tmp_path: Path, name: str, doc: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def baseline(tmp_path) -> Path:
    base = tmp_path / "baselines" / "demo.json"
    result = CliRunner().invoke(app, ["gate", str(write(tmp_path, "base-report.json", make_report())),
                                      "--baseline", str(base), "--update-baseline", "--max-drop", "1.0"])
    assert result.exit_code == 0, result.output
    return base


def gate(tmp_path, report: dict, baseline: Path, *args):
    return CliRunner().invoke(app, ["gate", str(write(tmp_path, "report.json", report)), "--baseline", str(baseline),
                                    *args])


def test_update_baseline_writes_a_small_baseline(baseline):
    doc = json.loads(baseline.read_text())
    assert doc["schema"] == "edgedistill.baseline/1"
    assert doc["artifacts"]["onnx-int8-u8s8"]["top1"] == 89.0 and doc["artifacts"]["onnx-fp32"]["bytes"] == 6_100_000
    assert doc["budgets"]["max_drop"] == 1.0 and len(doc["latency"]) == 6


def test_equal_report_passes(tmp_path, baseline):
    result = gate(tmp_path, make_report(), baseline)
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and "FAIL" not in result.output


@pytest.mark.parametrize("changes, args, failed_check", [
    ({"onnx-int8-u8s8.top1": 87.5}, [], "accuracy"),                           # 1.5 points > max drop 1.0
    ({"onnx-int8-u8s8.bytes": 2_500_000}, ["--max-size-mb", "2", "--artifact", "onnx-int8-u8s8"], "size"),
    ({"latency.ort-cpu.onnx-int8-u8s8.1": 2.0}, [], "latency-regression"),    # 2.5x slower than 0.8 ms
    ({}, ["--max-latency-ms", "0.5", "--artifact", "onnx-int8-u8s8"], "latency"),
    ({"onnx-int8-u8s8.top1": 88.7}, [], "dominated"),                          # within max drop, no smaller: dominated
    ({"onnx-int8-u8s8.bytes": 2_000_000}, [], "dominated"),                    # bigger, not more accurate
])
def test_worse_report_fails(tmp_path, baseline, changes, args, failed_check):
    result = gate(tmp_path, make_report(**changes), baseline, *args)
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output
    fails = [line for line in result.output.splitlines() if "FAIL " in line or line.startswith("│ FAIL")]
    assert any(f" {failed_check} " in line for line in fails), result.output


def test_tradeoffs_and_noise_pass(tmp_path, baseline):
    # Smaller and slightly less accurate (within max drop): a trade-off, not a regression.
    result = gate(tmp_path, make_report(**{"onnx-int8-u8s8.top1": 88.5, "onnx-int8-u8s8.bytes": 1_500_000}), baseline)
    assert result.exit_code == 0, result.output
    # 10% slower is within the default noise tolerance (30%).
    result = gate(tmp_path, make_report(**{"latency.ort-cpu.onnx-int8-u8s8.1": 0.88}), baseline)
    assert result.exit_code == 0, result.output
    # ... but not within a 5% tolerance.
    result = gate(tmp_path, make_report(**{"latency.ort-cpu.onnx-int8-u8s8.1": 0.88}), baseline,
                  "--latency-tolerance", "5")
    assert result.exit_code == 1
    # A tie within --accuracy-noise is not dominance.
    result = gate(tmp_path, make_report(**{"onnx-int8-u8s8.top1": 88.9}), baseline, "--accuracy-noise", "0.2")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("field, value", [("cpu", "Some Other CPU"),
                                          # same model name, another ISA: an AVX2-only EPYC vs a VNNI one
                                          ("cpu_features", "avx2, 2 cores")])
def test_latency_on_another_machine_is_not_compared(tmp_path, baseline, field, value):
    rep = make_report(**{"latency.ort-cpu.onnx-int8-u8s8.1": 50.0})
    for r in rep["latency"]:
        r[field] = value
    result = gate(tmp_path, rep, baseline, "--format", "github")
    assert result.exit_code == 0, result.output
    assert "::notice title=edgedistill gate: latency-regression" in result.output
    assert "another machine" in result.output


def test_report_latency_rows_name_the_cpu_features():
    from edgedistill.report.build import cpu_features

    isa = {"avx2": True, "avx512f": True, "avx512_vnni": True, "amx_int8": False, "int8_dot": True}
    assert cpu_features({"model": "AMD EPYC", "isa": isa, "affinity_cores": 2}) == "avx2+avx512f+avx512_vnni, 2 cores"
    assert cpu_features({"model": "AMD EPYC"}) is None


def test_unreliable_latency_is_not_compared(tmp_path, baseline):
    rep = make_report(**{"latency.ort-cpu.onnx-int8-u8s8.1": 50.0})
    for r in rep["latency"]:
        r["unreliable"] = r["artifact"] == "onnx-int8-u8s8"  # what `bench` marks when p90/p50 stays high
    result = gate(tmp_path, rep, baseline, "--format", "json")
    assert result.exit_code == 0, result.output
    checks = [c for c in json.loads(result.output)["checks"] if c["check"] == "latency-regression"]
    skipped = [c for c in checks if c["artifact"] == "onnx-int8-u8s8"]
    assert skipped and all(c["status"] == "skip" and "unreliable" in c["detail"] for c in skipped)
    assert any(c["status"] == "pass" for c in checks)  # reliable rows are still compared


def test_missing_artifact_fails(tmp_path, baseline):
    rep = make_report()
    rep["artifacts"] = [a for a in rep["artifacts"] if a["name"] != "onnx-int8-u8s8"]
    result = gate(tmp_path, rep, baseline)
    assert result.exit_code == 1 and "missing" in result.output


def test_github_annotations(tmp_path, baseline, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = gate(tmp_path, make_report(**{"onnx-int8-u8s8.top1": 80.0}), baseline, "--format", "github")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("::error ")]
    assert any("accuracy (onnx-int8-u8s8)" in line and "80.00%25" in line for line in errors), result.output
    assert errors[-1].startswith("::error title=edgedistill gate failed::")
    assert "FAILED" in summary.read_text()
    result = gate(tmp_path, make_report(), baseline, "--format", "github")
    assert result.exit_code == 0 and "::notice title=edgedistill gate passed::" in result.output


def test_json_format(tmp_path, baseline):
    result = gate(tmp_path, make_report(**{"onnx-int8-u8s8.top1": 80.0}), baseline, "--format", "json")
    assert result.exit_code == 1
    doc = json.loads(result.output)
    assert doc["passed"] is False and any(c["check"] == "accuracy" and c["status"] == "fail" for c in doc["checks"])


def test_update_baseline_replaces_and_keeps_budgets(tmp_path, baseline):
    better = make_report(**{"onnx-int8-u8s8.top1": 89.6})
    result = gate(tmp_path, better, baseline, "--update-baseline")
    assert result.exit_code == 0 and "baseline written" in result.output
    doc = json.loads(baseline.read_text())
    assert doc["artifacts"]["onnx-int8-u8s8"]["top1"] == 89.6 and doc["budgets"]["max_drop"] == 1.0
    # the old report is now dominated by the new baseline
    assert gate(tmp_path, make_report(), baseline).exit_code == 1


def test_a_full_report_is_accepted_as_baseline(tmp_path):
    base = write(tmp_path, "base.json", make_report())
    assert gate(tmp_path, make_report(), base).exit_code == 0


@pytest.mark.parametrize("kind", ["missing", "not-json", "wrong-schema", "no-artifacts"])
def test_bad_inputs_exit_2_naming_the_file(tmp_path, baseline, kind):
    path = tmp_path / f"{kind}.json"
    if kind == "not-json":
        path.write_text("{not json")
    elif kind == "wrong-schema":
        path.write_text(json.dumps({**make_report(), "schema": "edgedistill.report/99"}))
    elif kind == "no-artifacts":
        path.write_text(json.dumps({"schema": "edgedistill.report/1"}))
    result = CliRunner().invoke(app, ["gate", str(path), "--baseline", str(baseline)])
    assert result.exit_code == 2, result.output
    assert f"{kind}.json" in " ".join(result.output.split())
    # a bad baseline names the baseline
    bad_base = write(tmp_path, "bad-base.json", {"schema": "nope"})
    result = gate(tmp_path, make_report(), bad_base)
    assert result.exit_code == 2 and "bad-base.json" in " ".join(result.output.split())
    result = gate(tmp_path, make_report(), tmp_path / "absent-base.json")
    assert result.exit_code == 2 and "--update-baseline" in " ".join(result.output.split())


def test_run_gate_api(tmp_path):
    from edgedistill.report.gate import run_gate

    base = write(tmp_path, "b.json", make_report())
    worse = write(tmp_path, "w.json", make_report(**{"onnx-fp32.top1": 85.0}))
    res = run_gate(worse, base, max_drop=2.0)
    assert not res.passed and {c.artifact for c in res.failures} == {"onnx-fp32"}
    assert copy.deepcopy(res.to_dict())["budgets"]["max_drop"] == 2.0


def test_different_image_counts_are_stated(tmp_path, baseline):
    """Top-1 on 100 images against a baseline's 200 is still compared, but the gate says so."""
    changes = {f"{a}.n": 100 for a in ("torch-fp32", "onnx-fp32", "onnx-int8-u8s8")}
    result = gate(tmp_path, make_report(**changes), baseline, "--format", "json")
    assert result.exit_code == 0, result.output
    checks = json.loads(result.output)["checks"]
    images = [c for c in checks if c["check"] == "images"]
    assert {c["artifact"] for c in images} == {"torch-fp32", "onnx-fp32", "onnx-int8-u8s8"}
    assert all(c["status"] == "skip" and "100 images here and on 200" in c["detail"] for c in images)
    acc = [c for c in checks if c["check"] == "accuracy"]
    assert acc and all("different image sets" in c["detail"] for c in acc)
    result = gate(tmp_path, make_report(**changes), baseline, "--format", "github")
    assert "::notice title=edgedistill gate: images (onnx-int8-u8s8)::" in result.output
    # The same counts: no notice at all.
    same = json.loads(gate(tmp_path, make_report(), baseline, "--format", "json").output)["checks"]
    assert not [c for c in same if c["check"] == "images"]
