"""`edgedistill report`: every artifact joined with its size, MACs, accuracy and latency; plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from benchutil import make_export
from typer.testing import CliRunner

from edgedistill.cli import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def export_dir(evaluated_run) -> Path:
    return make_export(evaluated_run)


@pytest.fixture(scope="module")
def device_results(export_dir, tmp_path_factory) -> Path:
    """A results file as the device kit writes it (here: the kit's own bench, on this CPU)."""
    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")
    doc = kit.bench_export(export_dir, ["ort-cpu"], [1, 4], threads=1, warmup=1, runs=5, log=lambda m: None)
    for r in doc["results"]:
        r["host"] = "jetson-test"  # pretend it came from another machine
    doc["environment"]["host"] = "jetson-test"
    return kit.write_results(doc, tmp_path_factory.mktemp("device") / "bench-jetson.json")


@pytest.fixture(scope="module")
def report(evaluated_run, export_dir, device_results, tmp_path_factory):
    from edgedistill.bench import bench_export
    from edgedistill.report import build_report

    bench_export(export_dir, runtimes="ort-cpu,torch-cpu", batches=(1,), threads=1, runs=5, warmup=1, show=False)
    out = tmp_path_factory.mktemp("report")
    path = build_report(evaluated_run, [device_results], export_dir=export_dir, out_dir=out)
    return path, json.loads(path.read_text())


def test_report_joins_every_artifact(report, export_dir):
    path, rep = report
    assert rep["schema"] == "edgedistill.report/1"
    manifest = json.loads((export_dir / "manifest.json").read_text())
    names = {a["name"] for a in rep["artifacts"]}
    assert names >= {a["name"] for a in manifest["artifacts"]} | {"torch-fp32"}
    for a in rep["artifacts"]:
        assert a["top1"] is not None and a["params"] > 0 and a["macs"] > 0 and a["size_mb"] > 0, a
        assert a["drop_vs_fp32"] is not None
    # Every (artifact, runtime) timed here and on the "device" is in the summary.
    keys = {(s["artifact"], s["runtime"], s["host"]) for s in rep["summary"]}
    timed = {a["name"] for a in manifest["artifacts"] if a.get("file")}
    for name in timed:
        assert (name, "ort-cpu", "jetson-test") in keys
    assert any(k[0] == "torch-fp32" and k[1] == "torch-cpu" for k in keys)
    for s in rep["summary"]:
        if s["runtime"]:
            assert s["p50_ms"] <= s["p99_ms"] and s["throughput_ips"] > 0
    # int8 is smaller than fp32; MACs are the same graph's
    by = {a["name"]: a for a in rep["artifacts"]}
    int8 = [a for a in rep["artifacts"] if a["precision"] == "int8"]
    assert int8 and all(a["bytes"] < by["onnx-fp32"]["bytes"] / 2 for a in int8)
    assert by["onnx-fp32"]["macs"] == by["torch-fp32"]["macs"] == int8[0]["macs"]
    assert rep["environment"]["bench"] and rep["environment"]["report"]["versions"]["torch"]
    # Every latency says what it measured (on the CPU: the host wall time of the call).
    assert rep["latency"] and all(r["clock"] == "host" for r in rep["latency"])

    md = path.with_name("report.md").read_text()
    for name in names:
        assert f"`{name}`" in md
    assert "accuracy_vs_size.png" in md and "jetson-test" in md and "MMACs" in md and "`cuda-events`" in md


def test_plots_exist_and_are_not_trivial(report):
    path, rep = report
    for key in ("accuracy_vs_size", "accuracy_vs_latency"):
        png = path.parent / rep["plots"][key]
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 15_000, (png, len(data))
        import matplotlib.image as mpimg

        img = mpimg.imread(png)
        assert img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # drawn, not blank


def test_macs_torch_and_onnx_agree(evaluated_run, export_dir):
    from edgedistill.runfolder.load import load_run_classifier
    from edgedistill.report.macs import onnx_macs, torch_macs

    model = load_run_classifier(evaluated_run)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    shape = manifest["input"]["shape"]
    fp32 = next(a for a in manifest["artifacts"] if a["name"] == "onnx-fp32")
    assert torch_macs(model, shape) == onnx_macs(export_dir / fp32["file"]) > 1_000_000


def test_torch_macs_are_conv_and_linear_multiply_accumulates():
    """torch's FLOP counter (2 FLOPs per MAC) gives the usual conv + linear count, nothing else."""
    import torch.nn as nn

    from edgedistill.report.macs import torch_macs

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    expected = 8 * 16 * 16 * 3 * 3 * 3 + 8 * 8 * 8 * (8 // 4) * 3 * 3 + 8 * 10
    assert torch_macs(model, (3, 16, 16)) == torch_macs(model, (-1, 3, 16, 16)) == expected
    assert model.training  # the model's mode is restored


def test_teacher_side_by_side(evaluated_run, export_dir, tmp_path):
    from edgedistill.report import build_report

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run, ignore=shutil.ignore_patterns("export*", "checkpoint.pt", "report"))
    ev = json.loads((run / "eval.json").read_text())
    s = ev["student"]
    ev["teacher"] = {**s, "arch": "resnet50", "params": s["params"] * 10, "linear_top1": s["linear_top1"] + 5,
                     "knn_top1": s["knn_top1"] + 4}
    (run / "eval.json").write_text(json.dumps(ev))
    path = build_report(run, export_dir=export_dir)
    rep = json.loads(path.read_text())
    assert rep["models"]["comparison"]["params_pct_of_teacher"] == pytest.approx(10.0)
    assert rep["models"]["comparison"]["top1_gap"] == pytest.approx(5.0)
    md = path.with_name("report.md").read_text()
    assert "10.0% of the teacher's parameters" in md and "| teacher | resnet50 |" in md
    assert (path.parent / "accuracy_vs_size.png").is_file()


def test_report_cli_errors(evaluated_run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other/1"}))
    result = CliRunner().invoke(app, ["report", str(evaluated_run), "--device-results", str(bad),
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "bad.json" in result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path / "no-run")])
    assert result.exit_code == 2


def test_stale_bench_results_are_skipped(export_dir, device_results, tmp_path, caplog):
    """A bench file records the manifest it timed: after a re-export (a new manifest) the report
    must not join the previous model's latency."""
    import logging

    from edgedistill.kit import load_kit_module
    from edgedistill.deploy.manifest import bench_results as _bench_docs

    kit = load_kit_module("edgekit")
    exp = tmp_path / "export"
    shutil.copytree(export_dir, exp, ignore=shutil.ignore_patterns("bench*.json"))
    doc = kit.read_results(device_results)
    doc["export"] = {**doc.get("export", {}), "manifest_sha256": kit.file_sha256(exp / "manifest.json")}
    kit.write_results(doc, exp / "bench.json")
    fresh = _bench_docs(exp, [])
    assert [s for s, _ in fresh] == [str(exp / "bench.json")]

    manifest = json.loads((exp / "manifest.json").read_text())
    manifest["created"] = "re-exported"
    (exp / "manifest.json").write_text(json.dumps(manifest))
    stale: list[str] = []
    with caplog.at_level(logging.WARNING):
        assert _bench_docs(exp, [], stale) == []
    assert stale == [str(exp / "bench.json")]
    assert "stale" in caplog.text and "bench.json" in caplog.text
