"""`edgedistill bench`: every artifact on ONNX Runtime CPU and the torch student, sane numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from benchutil import make_export
from typer.testing import CliRunner

from edgedistill.cli import app


@pytest.fixture(scope="module")
def export_dir(evaluated_run) -> Path:
    return make_export(evaluated_run)


def _text(result) -> str:
    out = result.output
    try:
        out += result.stderr
    except (ValueError, AttributeError):
        pass
    return " ".join(out.split())  # rich wraps long lines


def test_bench_export_api(export_dir, tmp_path):
    from edgedistill.bench import bench_export

    out = bench_export(export_dir, runtimes="ort-cpu,torch-cpu", batches=(1, 4), threads=1, runs=5, warmup=1,
                       out=tmp_path / "bench.json", show=False)
    doc = json.loads(Path(out).read_text())
    assert doc["schema"] == "edgedistill.bench/1" and doc["skipped"] == []
    manifest = json.loads((export_dir / "manifest.json").read_text())
    timed = {a["name"] for a in manifest["artifacts"] if a.get("file")}
    rows = {(r["artifact"], r["runtime"], r["batch"]): r for r in doc["results"]}
    for batch in (1, 4):
        assert ("torch-fp32", "torch-cpu", batch) in rows
        for name in timed:
            assert (name, "ort-cpu", batch) in rows
    assert len(rows) == len(doc["results"]) == 2 * (len(timed) + 1)
    n = len(np.load(export_dir / "sample_labels.npy"))
    for r in doc["results"]:
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"], r
        assert r["throughput_ips"] > 0 and r["runs"] == 5 and r["warmup"] == 1 and r["threads"] == 1
        assert r["precision"] in ("fp32", "fp16", "int8") and r["top1_n"] == n
    # Real images through every runtime: the fp32 ONNX file and the torch student agree on them.
    assert rows[("onnx-fp32", "ort-cpu", 1)]["top1"] == rows[("torch-fp32", "torch-cpu", 1)]["top1"]
    assert doc["environment"]["torch"]["version"] and doc["environment"]["cpu"]["model"]
    assert doc["settings"]["batches"] == [1, 4]


def test_torch_runner_sets_its_threads():
    import torch
    import torch.nn as nn

    from edgedistill.bench.torch_runtime import TorchRunner
    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")
    before = torch.get_num_threads()
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x.flatten(1)

    runner = TorchRunner(Probe(), "torch-cpu")
    assert isinstance(runner, kit.Runner) and runner.threads == kit.default_threads()  # explicit, not torch's
    stats = kit.measure(runner, np.ones((2, 3, 4, 4), np.float32), warmup=1, runs=3, time_s=None)
    assert set(seen) == {runner.threads} and stats["runs"] == 3 and "unreliable" in stats
    assert torch.get_num_threads() == before  # restored
    assert TorchRunner(Probe(), "torch-cpu", threads=1).threads == 1


def test_bench_cli_skips_absent_runtimes(export_dir, tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["bench", str(export_dir), "--runtime", "ort-cpu,ort-cuda,tensorrt", "--batch", "2",
                                      "--runs", "3", "--warmup", "1", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, _text(result)
    doc = json.loads(out.read_text())
    assert {r["runtime"] for r in doc["results"]} == {"ort-cpu"} and {r["batch"] for r in doc["results"]} == {2}
    skipped = {s["runtime"]: s["reason"] for s in doc["skipped"]}
    assert "ort-cuda" in skipped and "tensorrt" in skipped and all(skipped.values())


def test_bench_time_budget(export_dir, tmp_path):
    from edgedistill.bench import bench_export

    out = bench_export(export_dir, runtimes="ort-cpu", batches=(1,), runs=None, time_s=0.2, warmup=1,
                       artifacts=["onnx-fp32"], out=tmp_path / "t.json", show=False)
    (row,) = json.loads(Path(out).read_text())["results"]
    assert row["artifact"] == "onnx-fp32" and row["runs"] >= 5


@pytest.mark.parametrize("args, message", [
    (["--runtime", "ort-gpu"], "unknown runtime"),
    (["--batch", "0"], "batch"),
    (["--artifact", "nope"], "unknown artifact"),
])
def test_bench_bad_arguments(export_dir, args, message):
    result = CliRunner().invoke(app, ["bench", str(export_dir), "--runs", "2", *args])
    assert result.exit_code == 2, _text(result)
    assert message in _text(result)


def test_bench_missing_export(tmp_path):
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "manifest.json is missing" in _text(result)


def test_result_tables_merge_by_cpu_class(tmp_path, monkeypatch):
    """bench/int8_devices.py and bench/demo_spread.py `table`: what this machine measured replaces
    only its own class's rows (accuracy: the CPU class; timings: the timing class, `+amx` on AMX); the
    committed rows of another class (and schema-1/2 entries, which held one class) are kept."""
    from conftest import bench_script

    devices = bench_script("int8_devices")
    work, result = tmp_path / "devices", tmp_path / "int8_devices.json"
    work.mkdir()
    monkeypatch.setattr(devices, "WORK", work)
    monkeypatch.setattr(devices, "RESULT", result)
    vnni = {"run": "runs/int8/s", "cpu_class": "x86-vnni", "rows": [
        {"runtime": "ort-cpu", "threads": 1, "file": "fp32", "median_ms": 1.0, "speedup_vs_fastest_fp32": 1.0,
         "spread_max_min": 1.1, "unreliable": False}]}
    accuracy = {"run": "runs/int8/s", "rows": {"x86-vnni": {"drop": 0.1}}}
    result.write_text(json.dumps({"schema": "edgedistill.int8_devices/1",
                                  "students": {"s": {"latency": vnni, "accuracy": accuracy}}}))
    (work / "s.latency.x86-avx2.json").write_text(json.dumps({**vnni, "cpu_class": "x86-avx2"}))
    (work / "s.latency.x86-vnni+amx.json").write_text(json.dumps({**vnni, "timed_on": "x86-vnni+amx"}))
    avx2_accuracy = {"run": "runs/int8/s", "cpu_class": "x86-avx2", "rows": {"x86-avx2": {"drop": 0.4}}}
    (work / "s.accuracy.x86-avx2.json").write_text(json.dumps(avx2_accuracy))
    monkeypatch.setattr(devices, "markdown", lambda doc: "")
    devices.table()
    entry = json.loads(result.read_text())["students"]["s"]
    assert set(entry["latency"]) == {"x86-vnni", "x86-avx2", "x86-vnni+amx"} and entry["latency"]["x86-vnni"] == vnni
    # accuracy by the class of the machine that scored it: the committed (schema-1/2, VNNI) rows kept beside
    assert entry["accuracy"] == {"x86-vnni": {**accuracy, "cpu_class": "x86-vnni"}, "x86-avx2": avx2_accuracy}
    devices.table()  # merging again changes nothing
    assert json.loads(result.read_text())["students"]["s"] == entry

    spread = bench_script("demo_spread")
    work, result = tmp_path / "spread", tmp_path / "demo_spread.json"
    (work / "t2_s0" / "disco" / "export").mkdir(parents=True)
    (work / "t2_s0" / "disco" / "export" / "manifest.json").write_text("{}")
    monkeypatch.setattr(spread, "WORK", work)
    monkeypatch.setattr(spread, "RESULT", result)

    def row(cpu_class, wall, **timed_on):
        int8 = {"cpu_class": cpu_class, "drop": 0.3, "drop_se": 0.5, "delivered_by": "ptq", "size_ratio": 3.2,
                "int8_layers": {"int8": 52, "weighted_layers": 54}}
        return {"threads": "2", "seed": 0, "disco_linear_top1": 90.0, "int8": int8, "gate_passed": True, "wall_s": wall,
                **timed_on}

    result.write_text(json.dumps({"rows": [row("x86-vnni", 136.0), row("x86-avx2", 999.0)]}))
    monkeypatch.setattr(spread, "_row", lambda folder: row("x86-avx2", 370.0))
    spread.table()
    rows = json.loads(result.read_text())["rows"]
    assert sorted((r["int8"]["cpu_class"], r["wall_s"]) for r in rows) == [("x86-avx2", 370.0), ("x86-vnni", 136.0)]
    monkeypatch.setattr(spread, "_row", lambda folder: row("x86-vnni", 120.0, timed_on="x86-vnni+amx"))
    spread.table()  # an AMX run is kept beside the VNNI-only row of the same class
    rows = json.loads(result.read_text())["rows"]
    assert sorted(r["wall_s"] for r in rows if r["int8"]["cpu_class"] == "x86-vnni") == [120.0, 136.0]


def test_ops_profile_names_each_layer_kind():
    """bench/int8_devices.py `ops`: convolutions are classified from their weights and groups (also
    behind a weight DequantizeLinear), and a fused node's profiler name ("<Conv>_token_N", "<activation
    output>_nchwc") finds its layer; a weight DequantizeLinear is told apart from an activation's."""
    import numpy as np
    from conftest import bench_script
    from onnx import TensorProto, helper, numpy_helper

    devices = bench_script("int8_devices")

    def weight(name, shape, dtype=np.float32):
        return numpy_helper.from_array(np.zeros(shape, dtype), name)

    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["stem"], name="/backbone/conv_stem/Conv"),
        helper.make_node("Relu", ["stem"], ["/backbone/act/Relu_output_0"], name="/backbone/act/Relu"),
        helper.make_node("Conv", ["/backbone/act/Relu_output_0", "w_dw"], ["dw"], name="/b/conv_dw/Conv", group=8),
        helper.make_node("DequantizeLinear", ["w_pw_q", "s"], ["w_pw"], name="w_pw_DequantizeLinear"),
        helper.make_node("Conv", ["dw", "w_pw"], ["pw"], name="/b/conv_pw/Conv"),
        helper.make_node("Conv", ["pw", "w_se"], ["se"], name="/b/se/conv_reduce/Conv"),
        helper.make_node("Gemm", ["se", "w_fc"], ["y"], name="/fc/Gemm"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [weight("w_stem", (8, 3, 3, 3)), weight("w_dw", (8, 1, 3, 3)),
                               weight("w_pw_q", (8, 8, 1, 1), np.int8), weight("s", ()), weight("w_se", (8, 8, 1, 1)),
                               weight("w_fc", (8, 10))])
    kinds = devices._layer_kinds(graph)
    category = lambda op, name: devices._node_category(op, name, kinds, {"w_pw_DequantizeLinear"})  # noqa: E731
    assert category("Conv", "/backbone/act/Relu_output_0_nchwc") == "dense convs (stem, ResNet)"
    assert category("QLinearConv", "/b/conv_dw/Conv_token_23") == "depthwise convs"
    assert category("QLinearConv", "/b/conv_pw/Conv_token_7") == "pointwise convs"
    assert category("Conv", "/b/se/conv_reduce/Conv") == "squeeze-excite convs"
    assert category("Gemm", "/fc/Gemm") == "fully connected"
    assert category("DequantizeLinear", "w_pw_DequantizeLinear") == "weight DequantizeLinear (runs every call)"
    assert category("DequantizeLinear", "pw_DequantizeLinear") == "activation Q/DQ"
    assert category("HardSigmoid", "HardSigmoid_431") == "float element-wise and pooling"


def test_qdq_parity_script(evaluated_run, export_dir, capsys):
    """bench/qdq_parity.py: the torch fake-quant graph computes the exported INT8 file as the exact
    QDQ reference does, and so does the file QAD's write-back makes from perturbed scales and
    weights (every learnt scale reaches it unchanged)."""
    import re

    from conftest import bench_script

    script = bench_script("qdq_parity")
    for extra in ([], ["--perturb"]):
        assert script.main([str(evaluated_run), str(export_dir), "--placement", "tuned", "--images", "64", *extra]) == 0
        out = capsys.readouterr().out
        agreement = float(re.search(r"torch fake-quant graph vs the exact reference: agreement ([\d.]+)%", out).group(1))
        assert agreement >= 95.0, out
    assert "0 not as learnt" in out
