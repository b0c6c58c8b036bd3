"""The device kit (export/edgekit.py): torch-free timing on the CPU, its statistics and JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from benchutil import REPO, make_export

# Runs a script with `import torch` made impossible (a meta-path finder that refuses it), the way
# the kit runs on an edge device without torch.
NO_TORCH = textwrap.dedent("""
    import importlib.abc, runpy, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name == "edgedistill" or name.startswith("edgedistill."):
                raise ImportError(f"{name} is blocked: the device kit must not import it")
            return None

    sys.meta_path.insert(0, NoTorch())
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        assert "torch" not in sys.modules
""")


@pytest.fixture(scope="module")
def export_dir(evaluated_run) -> Path:
    return make_export(evaluated_run)


@pytest.fixture(scope="module")
def kit():
    from edgedistill.kit import load_kit_module

    return load_kit_module("edgekit")


def _run_kit(script: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, str(script), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_kit_bench_without_torch(export_dir, tmp_path):
    shipped = export_dir / "kit" / "edgekit.py"
    assert shipped.read_text() == (REPO / "export" / "edgekit.py").read_text(), "the export ships the kit as is"
    out = tmp_path / "device.json"
    proc = _run_kit(shipped, "bench", export_dir, "--batch", "1,4", "--threads", "1", "--runs", "5", "--warmup", "2",
                    "--providers", "cpu", "--out", out)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == "edgedistill.bench/1"
    manifest = json.loads((export_dir / "manifest.json").read_text())
    onnx_names = {a["name"] for a in manifest["artifacts"] if a.get("file", "") and a["file"].endswith(".onnx")}
    assert onnx_names and {r["artifact"] for r in doc["results"]} == onnx_names
    assert len(doc["results"]) == 2 * len(onnx_names)
    labels = np.load(export_dir / "sample_labels.npy")
    for r in doc["results"]:
        lat = r["latency_ms"]
        assert r["runtime"] == "ort-cpu" and r["provider"] == "CPUExecutionProvider"
        assert r["batch"] in (1, 4) and r["threads"] == 1 and r["runs"] == 5 and r["warmup"] == 2
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["std"] >= 0 and r["throughput_ips"] > 0
        assert r["throughput_ips"] == pytest.approx(r["batch"] * 1000 / lat["mean"], rel=1e-3)
        assert r["top1_n"] == len(labels) and 0 <= r["top1"] <= 100
    fp32 = next(r for r in doc["results"] if r["artifact"] == "onnx-fp32")
    assert fp32["top1"] > 100 / len(manifest["classes"])  # real images, a trained classifier: above chance
    env = doc["environment"]
    assert env["cpu"]["logical_cores"] >= 1 and set(env["cpu"]["isa"]) >= {"avx2", "avx512_vnni", "amx_int8"}
    assert env["versions"]["onnxruntime"] and "CPUExecutionProvider" in env["onnxruntime_providers"]
    assert doc["export"]["source_run"] == manifest["source_run"]
    assert "onnx-fp32" in proc.stdout  # the plain-text table
    # What to ship here: the fastest batch-1 row among the artifacts within the export's budget.
    pick = doc["pick"]
    assert pick["artifact"] in onnx_names and f"ship here: {pick['reason']}" in proc.stdout
    batch1 = {r["artifact"]: r["latency_ms"]["p50"] for r in doc["results"] if r["batch"] == 1}
    assert pick["p50_ms"] == min(v for k, v in batch1.items() if k not in pick["excluded"])


def test_kit_env_and_bad_input(export_dir, tmp_path):
    script = REPO / "export" / "edgekit.py"
    proc = _run_kit(script, "env")
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    assert env["cpu"]["model"] and "python" in env["versions"]

    proc = _run_kit(script, "bench", tmp_path / "nowhere", "--providers", "cpu")
    assert proc.returncode == 2 and "manifest.json is missing" in proc.stderr

    proc = _run_kit(script, "bench", export_dir, "--providers", "tensorrt", "--out", tmp_path / "trt.json")
    assert proc.returncode == 1  # nothing timed: TensorRT is not here, said in one line
    doc = json.loads((tmp_path / "trt.json").read_text())
    assert doc["results"] == [] and doc["skipped"][0]["runtime"] == "tensorrt" and doc["skipped"][0]["reason"]


def test_kit_check_on_the_device_without_torch(evaluated_run, export_dir, tmp_path):
    """`edgekit.py check`: every artifact on every runtime here (ONNX Runtime, OpenVINO) against the
    fp32 reference outputs the export wrote; a reference that no longer matches is exit 1.

    The INT8 file is held to what the export measured with ONNX Runtime, so ONNX Runtime must pass;
    OpenVINO computes the same QDQ file with its own kernels, and on an AVX2-only CPU (7-bit
    weights) it diverged from fp32 6x more than ONNX Runtime on this fragile 4-step student
    (docs/int8.md): there the check's verdict is the finding, and the exit code must follow it."""
    shipped = export_dir / "kit" / "edgekit.py"
    out = tmp_path / "check.json"
    proc = _run_kit(shipped, "check", export_dir, "--providers", "cpu,openvino-cpu", "--threads", "1", "--out", out)
    doc = json.loads(out.read_text())
    assert doc["schema"] == "edgedistill.check/1"
    assert proc.returncode == (0 if doc["passed"] else 1), proc.stderr + proc.stdout
    runs = {(r["runtime"], r["precision"]) for r in doc["results"]}
    runtimes = ("ort-cpu", "openvino-cpu") if importlib.util.find_spec("openvino") else ("ort-cpu",)  # the test extra has it
    assert runs == {(rt, p) for rt in runtimes for p in ("fp32", "int8")}, runs
    for row in doc["results"]:
        assert row["samples"] == 32
        if row["precision"] == "fp32":
            assert row["passed"] and row["max_rel_diff"] <= row["tolerance"]["max_rel_diff"] and row["agreement"] == 100.0
        else:  # held to what the export measured on the same samples
            assert row["passed"] == (row["divergence"] <= row["tolerance"]["divergence"]
                                     and row["agreement"] >= row["tolerance"]["agreement"])
            assert row["tolerance"]["expected"]["samples"] == 32
            if row["runtime"] == "ort-cpu":
                assert row["passed"], row
    # `report` folds the device's checks in beside its latencies.
    from edgedistill.report import build_report

    report = json.loads(build_report(evaluated_run, [out], export_dir=export_dir, out_dir=tmp_path / "r").read_text())
    assert len(report["device_checks"]) == len(doc["results"])
    assert [r["passed"] for r in report["device_checks"]] == [r["passed"] for r in doc["results"]]
    assert "Accuracy checks on the devices" in (tmp_path / "r" / "report.md").read_text()
    # A device that computes something else: here, the reference of other images.
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(export_dir, broken)
    reference = np.load(broken / "sample_reference.npy")
    np.save(broken / "sample_reference.npy", np.roll(reference, 1, axis=0))
    proc = _run_kit(shipped, "check", broken, "--providers", "cpu", "--out", tmp_path / "bad.json")
    assert proc.returncode == 1 and "BEYOND TOLERANCE" in proc.stdout
    assert not json.loads((tmp_path / "bad.json").read_text())["passed"]


def test_statistics_and_time_budget(kit):
    stats = kit.summarize([1.0, 2.0, 3.0, 4.0, 100.0], batch=8)
    lat = stats["latency_ms"]
    assert lat["p50"] == 3.0 and lat["min"] == 1.0 and lat["max"] == 100.0 and lat["mean"] == 22.0
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= 100.0
    assert stats["throughput_ips"] == pytest.approx(8 * 1000 / 22.0, rel=1e-3) and stats["runs"] == 5
    calls = []
    times = kit.time_calls(lambda: calls.append(1), warmup=3, runs=7)
    assert len(times) == 7 and len(calls) == 10
    times = kit.time_calls(lambda: 0.25, warmup=0, runs=None, time_s=0.05, min_runs=4)
    assert len(times) >= 4 and all(t == 0.25 for t in times)  # a returned duration (device time) wins
    with pytest.raises(ValueError):
        kit.summarize([], 1)


def test_statistics_are_numpy_percentiles(kit):
    rng = np.random.default_rng(0)
    times = rng.gamma(2.0, 1.5, size=37)
    lat = kit.latency_stats(times)
    for q in (50, 90, 99):
        assert lat[f"p{q}"] == round(float(np.percentile(times, q)), 4)
    assert lat["std"] == round(float(times.std()), 4) and kit.median_ms(times) == lat["p50"]


class _Scripted:
    """A runner of the kit's interface whose `timing` step returns scripted device times (ms)."""

    def __init__(self, kit, rounds):
        class Scripted(kit.Runner):
            runtime, provider = "scripted", "test"

            def __init__(self):
                self.rounds, self.calls = list(rounds), 0

            def predict(self, x):
                return np.zeros((x.shape[0], 2), np.float32)

            def timing(self, x):
                import contextlib

                times = iter(self.rounds.pop(0))
                self.calls += 1

                @contextlib.contextmanager
                def cm():
                    yield (lambda: next(times)), (lambda n: {"h2d_ms": 0.5, "d2h_ms": 0.25})

                return cm()

        self.runner = Scripted()


def test_runner_interface_and_remeasuring(kit):
    assert issubclass(kit.OrtRunner, kit.Runner) and issubclass(kit.TensorRTRunner, kit.Runner)
    x = np.zeros((4, 3, 8, 8), np.float32)
    steady, noisy = [0.0] + [1.0] * 10, [0.0] + [1.0] * 7 + [3.0] * 3  # first value: the warm-up call
    runner = _Scripted(kit, [steady]).runner
    stats = kit.measure(runner, x, warmup=1, runs=10, time_s=None)
    assert stats["latency_ms"]["p50"] == 1.0 and stats["runs"] == 10 and stats["throughput_ips"] == 4000.0
    assert stats["h2d_ms"] == 0.5 and stats["d2h_ms"] == 0.25  # copies() of the runner, after the timed runs
    assert stats["measurements"] == 1 and not stats["unreliable"] and stats["spread_p90_p50"] == 1.0
    # Disturbed once: measured again, the steady measurement is kept.
    runner = _Scripted(kit, [noisy, steady]).runner
    stats = kit.measure(runner, x, warmup=1, runs=10, time_s=None)
    assert runner.calls == 2 and stats["measurements"] == 2 and not stats["unreliable"]
    # Disturbed every time: kept, but marked unreliable (the JSON says so).
    runner = _Scripted(kit, [noisy] * (kit.REMEASURE + 1)).runner
    stats = kit.measure(runner, x, warmup=1, runs=10, time_s=None)
    assert stats["unreliable"] and stats["spread_p90_p50"] > kit.SPREAD_LIMIT
    assert stats["measurements"] == kit.REMEASURE + 1


def test_inputs_are_real_samples_tiled(kit, export_dir, monkeypatch):
    samples = np.load(export_dir / "sample_inputs.npy")
    tiled = kit.tile_batch(samples[:3], 7)
    assert tiled.shape[0] == 7 and np.array_equal(tiled[3:6], samples[:3]) and tiled.flags["C_CONTIGUOUS"]

    seen = []

    class Recorder:
        provider, threads, fixed_batch = "recorder", None, None

        def supports_batch(self, b):
            return True

        def predict(self, x):
            return np.zeros((x.shape[0], 10), np.float32)

        def bench(self, x, warmup, runs, time_s):
            seen.append(x.copy())
            return kit.summarize([1.0, 2.0], x.shape[0])

    monkeypatch.setattr(kit, "make_runner", lambda runtime, path, threads, precision=None: Recorder())
    doc = kit.bench_export(export_dir, ["ort-cpu"], [1, 40], warmup=0, runs=2, log=lambda m: None)
    assert doc["results"] and seen
    for x in seen:
        assert np.abs(x).sum() > 0, "benchmark inputs must be real images, not zeros"
        assert np.array_equal(x, kit.tile_batch(samples, x.shape[0]))


def test_results_schema_checked(kit, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something/1", "results": []}))
    with pytest.raises(kit.KitError, match="bad.json"):
        kit.read_results(bad)
    with pytest.raises(ValueError):
        kit.write_results({"schema": kit.SCHEMA, "results": [{"artifact": "x"}]}, tmp_path / "x.json")
    assert kit.available_runtimes()["ort-cpu"] is None


def test_write_results_uses_a_unique_temporary(kit, tmp_path):
    """Two processes writing one results file must not share a temporary: a fixed `<name>.tmp`
    that another writer is filling is left alone, and no temporary is left behind."""
    other = tmp_path / "bench.json.tmp"
    other.write_text("another process is writing this")
    doc = kit.make_results([], [], {"host": "h"})
    kit.write_results(doc, tmp_path / "bench.json")
    assert other.read_text() == "another process is writing this"
    assert kit.read_results(tmp_path / "bench.json")["schema"] == kit.SCHEMA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.json.tmp"]


# ----------------------------------------------------------------------------- TensorRT path, faked
# TensorRT cannot be installed here. These fakes follow the TensorRT 10 Python API and cuda-python's
# runtime bindings closely enough to execute the kit's engine runner end to end (buffers, shapes,
# events, copies); they check the kit's own logic, not TensorRT.


class _FakeCudart:
    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        import ctypes

        self.ctypes, self.buffers, self.copies = ctypes, {}, []

    def _alloc(self, n):
        buf = self.ctypes.create_string_buffer(int(n))
        addr = self.ctypes.addressof(buf)
        self.buffers[addr] = buf
        return 0, addr

    cudaMallocHost = cudaMalloc = _alloc

    def cudaFreeHost(self, p):
        self.buffers.pop(p, None)
        return (0,)

    cudaFree = cudaFreeHost

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamSynchronize(self, s):
        return (0,)

    def cudaEventCreate(self):
        return 0, [0.0]

    def cudaEventRecord(self, e, s):
        import time

        e[0] = time.perf_counter()
        return (0,)

    def cudaEventDestroy(self, e):
        return (0,)

    def cudaEventElapsedTime(self, a, b):
        return 0, (b[0] - a[0]) * 1000.0

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert dst in self.buffers and src in self.buffers and stream == 7
        self.copies.append(kind)
        self.ctypes.memmove(dst, src, n)
        return (0,)


def _fake_tensorrt(classes: int = 10):
    import types

    trt = types.ModuleType("tensorrt")

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Context:
        def __init__(self):
            self.shapes, self.addr = {}, {}

        def set_input_shape(self, name, shape):
            assert name == "input"
            if not 1 <= shape[0] <= 32:
                return False
            self.shapes["input"], self.shapes["logits"] = tuple(shape), (shape[0], classes)
            return True

        def get_tensor_shape(self, name):
            return self.shapes[name]

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            import ctypes

            shape = self.shapes["input"]
            n = int(np.prod(shape))
            x = np.frombuffer((ctypes.c_float * n).from_address(self.addr["input"]), np.float32).reshape(shape)
            y = np.repeat(x.reshape(shape[0], -1).mean(1, keepdims=True), classes, 1).astype(np.float32)
            y[:, 3] += 1.0  # predicts class 3
            ctypes.memmove(self.addr["logits"], y.ctypes.data, y.nbytes)
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["input", "logits"][i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "input" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return "float32"

        def get_tensor_shape(self, name):
            return (-1, 3, 32, 32) if name == "input" else (-1, classes)

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32)]

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data == b"fake engine"
            return Engine()

    trt.TensorIOMode, trt.Logger, trt.Runtime = TensorIOMode, Logger, Runtime
    trt.nptype = lambda dtype: np.float32
    return trt


def test_tensorrt_runner_with_fakes(kit, export_dir, tmp_path, monkeypatch):
    import shutil

    exp = tmp_path / "export"
    shutil.copytree(export_dir, exp, ignore=shutil.ignore_patterns("bench*.json"))
    (exp / "engines").mkdir(exist_ok=True)
    (exp / "engines" / "model.int8.engine").write_bytes(b"fake engine")
    cudart = _FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.setattr(kit, "cuda_runtime", lambda: cudart)
    monkeypatch.setattr(kit, "gpu_stamp", lambda: [{"name": "Fake GPU", "driver": "0", "memory_mib": "1",
                                                    "capability": "9.0"}])
    assert kit.available_runtimes()["tensorrt"] is None
    doc = kit.bench_export(exp, ["tensorrt"], [1, 8, 64], warmup=2, runs=4, log=lambda m: None)
    rows = {r["batch"]: r for r in doc["results"]}
    assert set(rows) == {1, 8} and rows[1]["artifact"] == "trt-model-int8" and rows[1]["precision"] == "int8"
    for r in rows.values():
        assert r["runtime"] == "tensorrt" and r["h2d_ms"] >= 0 and r["d2h_ms"] >= 0 and r["runs"] == 4
        assert r["clock"] == "cuda-events"  # the engine is timed between CUDA events, not by the host
        assert 0 <= r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] and r["throughput_ips"] > 0
    labels = np.load(exp / "sample_labels.npy")
    assert rows[1]["top1"] == pytest.approx(100.0 * float((labels == 3).mean()), abs=1e-3)
    assert [s for s in doc["skipped"] if s.get("batch") == 64]  # outside the engine's profile: skipped
    assert cudart.copies.count(1) == cudart.copies.count(2) > 0  # every run: one H2D, one D2H
    assert not cudart.buffers  # every buffer freed


def _positional_count(fn) -> int:
    import inspect

    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(params)


def test_fakes_match_the_installed_libraries():
    """The fakes above stand in for cuda-python and TensorRT: every call the kit makes must exist
    in the real library (where it imports) with the same number of positional arguments, and the
    fake enums must carry the real values. Also the DALI calls of the GPU loader, which cannot run
    here: feed_ndarray's `cuda_stream` and Pipeline.run's positional stream."""
    import inspect
    import re

    kit_source = (Path(__file__).resolve().parents[1] / "export" / "edgekit.py").read_text()
    called = set(re.findall(r"cudart\.(cuda\w+)\(", kit_source))
    assert called >= {"cudaMemcpyAsync", "cudaEventElapsedTime", "cudaStreamCreate"}
    checked = []
    try:
        from cuda.bindings import runtime as real
    except ImportError:
        real = None
    if real is not None:
        fake = _FakeCudart()
        for name in sorted(called):
            assert hasattr(real, name), f"the kit calls cudart.{name}, which cuda-python does not have"
            assert hasattr(fake, name), f"the fake lacks cudart.{name}"
            assert _positional_count(getattr(fake, name)) == _positional_count(getattr(real, name)), name
        for kind in ("cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"):
            assert int(getattr(real.cudaMemcpyKind, kind)) == getattr(_FakeCudart.cudaMemcpyKind, kind)
        checked.append("cuda-python")
    try:
        import tensorrt as real_trt
    except Exception:  # noqa: BLE001 - absent, or a placeholder wheel that raises on import
        real_trt = None
    if real_trt is not None:
        fake_trt = _fake_tensorrt()
        for cls in ("Logger", "Runtime", "TensorIOMode"):
            assert hasattr(real_trt, cls)
        engine_calls = set(re.findall(r"self\.engine\.(\w+)", kit_source))
        context_calls = set(re.findall(r"self\.context\.(\w+)", kit_source))
        assert all(hasattr(real_trt.ICudaEngine, n) for n in engine_calls), engine_calls
        assert all(hasattr(real_trt.IExecutionContext, n) for n in context_calls), context_calls
        assert fake_trt.Logger.WARNING is not None
        checked.append("tensorrt")
    try:
        from nvidia.dali import Pipeline
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError:
        Pipeline = None
    if Pipeline is not None:
        assert "cuda_stream" in inspect.signature(feed_ndarray).parameters
        first = list(inspect.signature(Pipeline.run).parameters.values())[1]
        assert first.name == "cuda_stream" and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD)
        checked.append("dali")
    if not checked:
        pytest.skip("neither cuda-python, TensorRT nor DALI is importable here")


def test_device_pick_is_the_fastest_file_within_the_budget(kit):
    """The kit's `bench` says what to ship on the device: INT8 only within the export's budget and
    when faster; otherwise fp32, saying that INT8 buys size, not speed, there."""
    def row(name, ms, runtime="ort-cpu", batch=1):
        return {"artifact": name, "runtime": runtime, "batch": batch, "latency_ms": {"p50": ms}}

    arts = [{"name": "onnx-fp32", "precision": "fp32"},
            {"name": "onnx-fp16", "precision": "fp16", "parity": {"passed": False}},
            {"name": "onnx-int8-u8s8", "precision": "int8", "accuracy": {"drop_vs_fp32": 0.4}}]
    exp = {"manifest": {"recommendation": {"max_drop": 1.0}}, "artifacts": arts}
    faster = kit.device_pick([row("onnx-fp32", 2.0), row("onnx-int8-u8s8", 1.0), row("onnx-int8-u8s8", 0.5, batch=8),
                              row("onnx-fp16", 0.1)], exp)
    assert faster["artifact"] == "onnx-int8-u8s8" and faster["speedup_vs_fp32"] == 2.0
    assert set(faster["excluded"]) == {"onnx-fp16"} and "int8_note" not in faster  # fp16 failed its parity
    slower = kit.device_pick([row("onnx-fp32", 1.0), row("onnx-int8-u8s8", 1.6), row("onnx-fp32", 0.8, "openvino-cpu")], exp)
    assert (slower["artifact"], slower["runtime"]) == ("onnx-fp32", "openvino-cpu")
    assert "buys size, not speed" in slower["int8_note"] and "0.50x" in slower["int8_note"]
    arts[2]["accuracy"]["drop_vs_fp32"] = 1.5  # beyond the budget: never picked, however fast
    beyond = kit.device_pick([row("onnx-fp32", 2.0), row("onnx-int8-u8s8", 1.0)], exp)
    assert beyond["artifact"] == "onnx-fp32" and "drop 1.50" in beyond["excluded"]["onnx-int8-u8s8"]
    assert kit.device_pick([row("onnx-fp32", 2.0, batch=8)], exp) is None
