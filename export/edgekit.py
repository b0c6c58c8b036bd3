#!/usr/bin/env python3
"""edgekit: time and check an edgedistill export on the device itself. Needs numpy + onnxruntime
(OpenVINO, TensorRT + cuda-python where installed).

Copied into every export as `kit/edgekit.py`; torch is never imported (edge devices rarely have
it). `edgedistill bench` imports this same file (`edgedistill.kit.load_kit_module("edgekit")`),
so the timing loop, the statistics and the results schema exist in one place.

    python kit/edgekit.py bench EXPORT_DIR [--batch 1,8,32] [--threads N] [--runs N | --time S]
                                           [--warmup N] [--providers cpu,cuda,trt] [--engine FILE]
                                           [--out results.json]
    python kit/edgekit.py check EXPORT_DIR [--providers ...] [--threads N]  # accuracy on this device
    python kit/edgekit.py env              # the environment stamp only

Method (as trtexec and timm's benchmark.py): build the session once, warm up, then time single
synchronous calls with `time.perf_counter` (CUDA events on the GPU) for a count of runs or a time
budget; report p50/p90/p99/mean/std/min in milliseconds and throughput = batch / mean latency.
This file is the one timing core of edgedistill: every runner (ONNX Runtime and TensorRT here,
torch in `edgedistill.bench.torch_runtime`) derives from `Runner`, every loop is `time_calls`,
every statistic is `latency_stats` (numpy.percentile). A measurement whose spread p90/p50 exceeds
`SPREAD_LIMIT` (a busy machine) is taken again once (`measure`); if it stays spread, its row says
`"unreliable": true`.
Inputs are the export's real validation images (`sample_inputs.npy`) tiled to the batch size,
never zeros (zeros take fast paths in some kernels and flatter INT8 artifacts).

On GPU (ONNX Runtime CUDA / TensorRT EPs through IOBinding, TensorRT engines through the TRT 10
Python runtime + cuda-python), `latency_ms` is the device-resident inference time and the
host-to-device / device-to-host copies are reported apart (`h2d_ms`, `d2h_ms`, medians), as
trtexec separates "GPU Compute Time" from "H2D/D2H Latency".

Results JSON (schema "edgedistill.bench/1"):
    {schema, created, environment, export: {dir, manifest, source_run}, settings: {...},
     results: [{artifact, file, format, runtime, provider, precision, batch, threads, warmup, runs,
                latency_ms: {p50, p90, p99, mean, std, min, max}, throughput_ips, h2d_ms?, d2h_ms?,
                spread_p90_p50, measurements, unreliable, top1?, top1_n?, host}],
     skipped: [{artifact?, runtime, reason}]}
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = "edgedistill.bench/1"
CHECK_SCHEMA = "edgedistill.check/1"
SAMPLE_REFERENCE = "sample_reference.npy"  # the torch fp32 outputs on SAMPLE_INPUTS
# `check`: how far an artifact run on the device may be from the fp32 reference on the samples.
# Float files by their largest relative difference; INT8 files by their output divergence and top-1
# agreement against what the exporting machine measured on the same samples (manifest
# `artifacts[].on_samples`, computed the way the target computes the file).
FLOAT_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
INT8_DIVERGENCE_FACTOR = 2.0
INT8_DIVERGENCE_FLOOR = 1e-3
MANIFEST_SCHEMA = "edgedistill.export/1"
MANIFEST = "manifest.json"
SAMPLE_INPUTS = "sample_inputs.npy"
SAMPLE_LABELS = "sample_labels.npy"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")

# Timing noise: a measurement whose p90 is more than SPREAD_LIMIT times its p50 was disturbed (other
# processes, thermal or frequency changes). It is taken again up to REMEASURE times; the steadiest
# one is kept and, still above the limit, marked "unreliable" in the results.
SPREAD_LIMIT = 1.5
REMEASURE = 1
# CPU threads when none are asked for (torch; ONNX Runtime sessions made by edgedistill's checks):
# the cores this process may use, at most 4 (more rarely helps batch-1 CNNs and oversubscribes).
MAX_DEFAULT_THREADS = 4

# ONNX Runtime execution providers by the short names used on the command line.
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
# Runtime names on the command line and in results: ONNX Runtime per provider, OpenVINO's CPU
# plugin (the same ONNX files), TensorRT engines.
RUNTIMES = tuple(f"ort-{short}" for short in ORT_PROVIDERS) + ("openvino-cpu", "tensorrt")
_VERSIONED = ("numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "openvino", "tensorrt", "tensorrt-lean", "tensorrt-cu12",
              "tensorrt-cu13", "cuda-python", "cuda-bindings", "torch", "edgedistill")


class KitError(Exception):
    """A problem with the inputs (missing file, bad manifest): one line, exit code 2."""


# ----------------------------------------------------------------------------- environment


def _read_cpuinfo() -> tuple[str | None, set[str], dict]:
    """(model name, ISA flags, x86 identity: vendor, family, model number) of the first CPU listed.
    The identity tells apart parts a virtual machine names alike ("AMD EPYC": family 25 is Zen 3/4,
    whose AVX-512 runs on 256-bit units, family 26 Zen 5)."""
    model, flags, ident = None, set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key in ("model name", "Model", "Hardware") and model is None:
                    model = value
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key == "vendor_id" and "vendor" not in ident:
                    ident["vendor"] = value
                elif key in ("cpu family", "model") and value.isdigit() and key not in ident:
                    ident[key] = int(value)
    except OSError:
        pass
    return model, flags, {"vendor": ident.get("vendor"), "family": ident.get("cpu family"), "model_number": ident.get("model")}


def cpu_stamp() -> dict:
    model, flags, ident = _read_cpuinfo()
    arch = platform.machine()
    if model is None and sys.platform == "darwin":
        try:
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    isa = {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "neon": arch in ("aarch64", "arm64") or "asimd" in flags,
        "arm_dotprod": "asimddp" in flags,
    }
    # INT8 speed-ups on x86 CPUs need VNNI (AVX-512 VNNI, AVX-VNNI) or AMX; without them the
    # u8s8 kernels emulate dot products and INT8 is often slower than FP32 (docs/int8.md).
    isa["int8_dot"] = bool(isa["avx512_vnni"] or isa["avx_vnni"] or isa["amx_int8"] or isa["arm_dotprod"])
    return {
        "model": model or platform.processor() or arch,
        **ident,
        "arch": arch,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": isa,
    }


def gpu_stamp() -> list[dict] | None:
    """GPUs as nvidia-smi lists them (no CUDA library needed); None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory_mib": parts[2],
                         "capability": parts[3] if len(parts) > 3 else None})
    return gpus or None


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def environment(threads: int | None = None) -> dict:
    """Who measured: host, OS, CPU (model, cores, ISA), GPUs, library versions, providers."""
    env = {
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_stamp(),
        "gpu": gpu_stamp(),
        "versions": library_versions(),
        "threads_requested": threads,
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    try:
        la = os.getloadavg()
        env["load_average"] = [round(x, 2) for x in la]  # a busy machine gives noisy latencies
    except (OSError, AttributeError):
        pass
    return env


# ----------------------------------------------------------------------------- timing core


def latency_stats(times_ms) -> dict:
    """The statistics of a list of timings in ms: p50/p90/p99 (numpy.percentile, linear), mean, std,
    min, max, rounded to 0.1 microsecond. The one statistics function of edgedistill."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timed runs")
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    values = {"p50": p50, "p90": p90, "p99": p99, "mean": t.mean(), "std": t.std(), "min": t.min(), "max": t.max()}
    return {k: round(float(v), 4) for k, v in values.items()}


def summarize(times_ms, batch: int) -> dict:
    """Latency statistics (ms) and throughput (images/s = batch / mean latency)."""
    lat = latency_stats(times_ms)
    mean = lat["mean"]
    return {"latency_ms": lat, "throughput_ips": round(batch * 1000.0 / mean, 2) if mean > 0 else None,
            "runs": len(times_ms)}


def default_threads() -> int:
    """CPU threads to use when none are given: the cores available to this process, at most 4."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n, MAX_DEFAULT_THREADS))


def time_calls(step, warmup: int = 10, runs: int | None = 50, time_s: float | None = None,
               min_runs: int = 5, max_runs: int = 100_000) -> list[float]:
    """Call `step()` `warmup` times, then time it `runs` times or until `time_s` seconds passed.

    `step` may return a duration in ms (device time measured with CUDA events); otherwise the host
    wall time of the (synchronous) call is used.
    """
    for _ in range(max(0, warmup)):
        step()
    times: list[float] = []
    deadline = time.perf_counter() + time_s if time_s else None
    if not runs and not time_s:
        runs = 50
    target = max_runs if time_s else runs
    while len(times) < target:
        t0 = time.perf_counter()
        dt = step()
        t1 = time.perf_counter()
        times.append(float(dt) if isinstance(dt, (int, float)) else (t1 - t0) * 1000.0)
        if deadline is not None and t1 >= deadline and len(times) >= min_runs:
            break
    return times


def spread(stats: dict) -> float:
    """p90 / p50 of a measurement (1.0 when p50 is 0): how far the slow runs are from the typical one."""
    lat = stats["latency_ms"]
    return round(lat["p90"] / lat["p50"], 3) if lat["p50"] > 0 else 1.0


class Runner:
    """What every timed runtime implements: ONNX Runtime sessions and TensorRT engines here, the torch
    student in `edgedistill.bench.torch_runtime`.

    `runtime` ("ort-cpu", "tensorrt", "torch-cpu", ...), `provider` (what ran it), `threads` (CPU
    threads, None on a GPU) and `fixed_batch` (None: any batch) describe it. A subclass implements
    `predict(x)` and `timing(x)`; `bench` (warm-up, timed calls, statistics, copies) is shared.
    """

    runtime = ""
    provider = ""
    threads: int | None = None
    fixed_batch: int | None = None

    def supports_batch(self, batch: int) -> bool:
        return self.fixed_batch is None or self.fixed_batch == batch

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def timing(self, x: np.ndarray):
        """A context manager that sets up the timing of batch `x` and yields `(step, copies)`.

        `step()` runs one synchronous call and returns its device time in ms, or None (the host wall
        time is then used); `copies(n_timed)` is called after the timed runs and returns
        {"h2d_ms", "d2h_ms"} (medians) on a GPU, {} on the CPU.
        """
        raise NotImplementedError

    def bench(self, x: np.ndarray, warmup: int, runs: int | None, time_s: float | None) -> dict:
        """Statistics of the timed calls, with `clock`: what each time is ("cuda-events": device
        time between CUDA events around the work; "host": host wall time of one synchronous call,
        which on a GPU includes launch and synchronisation, e.g. ONNX Runtime's CUDA / TensorRT
        providers through IOBinding)."""
        clocks: set[bool] = set()

        def timed():
            dt = step()
            clocks.add(isinstance(dt, (int, float)))
            return dt

        with self.timing(x) as (step, copies):
            out = summarize(time_calls(timed, warmup, runs, time_s), x.shape[0])
            out.update(copies(out["runs"]))
        out["clock"] = "cuda-events" if clocks == {True} else "host"
        return out


def no_copies(n_timed: int) -> dict:
    """`copies` of a runner whose inputs and outputs stay in host memory."""
    return {}


def median_ms(times_ms) -> float:
    return latency_stats(times_ms)["p50"]


def measure(runner, x: np.ndarray, warmup: int, runs: int | None, time_s: float | None,
            retries: int = REMEASURE) -> dict:
    """`runner.bench(x, ...)`, taken again (up to `retries` times) while its spread p90/p50 is above
    SPREAD_LIMIT. The steadiest measurement is returned with `spread_p90_p50`, `measurements` and
    `unreliable` (still above the limit: the machine was busy, do not quote the number)."""
    best = None
    for attempt in range(1, max(0, retries) + 2):
        stats = runner.bench(x, warmup, runs, time_s)
        stats["spread_p90_p50"] = spread(stats)
        if best is None or stats["spread_p90_p50"] < best["spread_p90_p50"]:
            best = stats
        if best["spread_p90_p50"] <= SPREAD_LIMIT:
            break
    best["measurements"] = attempt
    best["unreliable"] = best["spread_p90_p50"] > SPREAD_LIMIT
    return best


def tile_batch(samples: np.ndarray, batch: int) -> np.ndarray:
    """The first `batch` real samples, repeating them when there are fewer than `batch`."""
    reps = -(-batch // samples.shape[0])
    return np.ascontiguousarray(np.concatenate([samples] * reps, axis=0)[:batch])


# ----------------------------------------------------------------------------- export folder


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json_object(path, fix: str, missing: str | None = None) -> dict:
    """The JSON object in `path`, or a KitError naming the file and the fix: missing (`missing`, else
    `fix`), not valid JSON, or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise KitError(f"{path} is missing: {missing or fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KitError(f"{path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(data, dict):
        raise KitError(f"{path} is not a JSON object: {fix}")
    return data


def load_export(export_dir) -> dict:
    """manifest.json + sample inputs/labels of an export folder (tolerant of small differences)."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    manifest = read_json_object(path, "re-run `edgedistill export`",
                                missing="run `edgedistill export RUN` first (or pass the export folder)")
    if not isinstance(manifest.get("artifacts", []), list):
        raise KitError(f"{path} has no 'artifacts' list: re-run `edgedistill export`")
    schema = str(manifest.get("schema", MANIFEST_SCHEMA))
    if not schema.startswith("edgedistill.export/"):
        raise KitError(f"{path} has schema {schema!r}, expected {MANIFEST_SCHEMA!r}")
    inputs_path = export_dir / SAMPLE_INPUTS
    if not inputs_path.is_file():
        raise KitError(f"{inputs_path} is missing: the benchmark feeds real images; re-run `edgedistill export`")
    samples = np.load(inputs_path, allow_pickle=False)
    if samples.ndim != 4 or samples.shape[0] == 0:
        raise KitError(f"{inputs_path} has shape {samples.shape}, expected N x C x H x W with N > 0")
    labels_path = export_dir / SAMPLE_LABELS
    labels = np.load(labels_path, allow_pickle=False).astype(np.int64) if labels_path.is_file() else None
    if labels is not None and labels.shape[0] != samples.shape[0]:
        labels = None
    artifacts = []
    for art in manifest.get("artifacts", []):
        # Entries without a file (the torch student, recorded for its accuracy) are not timed here.
        if not isinstance(art, dict) or not art.get("file"):
            continue
        art = dict(art)
        art.setdefault("name", Path(art["file"]).stem)
        fmt = str(art.get("format") or "")
        if fmt != "tensorrt":  # "onnx", "onnx-qdq", ...: anything ONNX Runtime can load
            fmt = "tensorrt" if art["file"].endswith(ENGINE_SUFFIXES) else "onnx"
        art["format"] = fmt
        art.setdefault("precision", "fp32")
        artifacts.append(art)
    # TensorRT engines: those the export built (manifest "tensorrt.engines"), then any engine file
    # built on the device afterwards (kit/build_engine.py or trtexec) in engines/ or beside the manifest.
    known = {a["file"] for a in artifacts}
    trt = manifest.get("tensorrt") if isinstance(manifest.get("tensorrt"), dict) else {}
    for eng in trt.get("engines") or []:
        if isinstance(eng, dict) and eng.get("engine") and not eng.get("error") and eng["engine"] not in known:
            known.add(eng["engine"])
            artifacts.append({"name": eng.get("name") or f"tensorrt-{Path(eng['engine']).stem}", "file": eng["engine"],
                              "format": "tensorrt", "precision": eng.get("precision", "fp32"), "target": "tensorrt",
                              "source_onnx": eng.get("onnx")})
    for folder in (export_dir, export_dir / "engines"):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            rel = p.relative_to(export_dir).as_posix()
            if p.suffix in ENGINE_SUFFIXES and rel not in known:
                known.add(rel)
                precision = next((q for q in ("int8", "fp16", "fp32") if q in p.stem), "fp32")
                artifacts.append({"name": f"trt-{p.stem.replace('.', '-')}", "file": rel, "format": "tensorrt",
                                  "precision": precision, "target": "tensorrt"})
    return {"dir": export_dir, "manifest": manifest, "artifacts": artifacts, "samples": samples.astype(np.float32),
            "labels": labels}


def output_divergence(ref: np.ndarray, out: np.ndarray, kind: str) -> float:
    """How far an output is from fp32: mean KL(softmax(fp32) || softmax(out)) for class logits,
    mean 1 - cosine for embeddings."""
    ref, out = np.asarray(ref, np.float64).reshape(len(ref), -1), np.asarray(out, np.float64).reshape(len(out), -1)
    if kind == "classifier":
        def log_softmax(x):
            x = x - x.max(1, keepdims=True)
            return x - np.log(np.exp(x).sum(1, keepdims=True))

        lp, lq = log_softmax(ref), log_softmax(out)
        return float((np.exp(lp) * (lp - lq)).sum(1).mean())
    return float((1.0 - cosines(ref, out)).mean())


def cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    return (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)


def sample_agreement(ref: np.ndarray, out: np.ndarray, kind: str) -> dict:
    """One artifact's outputs on the samples against the fp32 reference: top-1 agreement
    (classifiers), output divergence, largest relative difference."""
    ref, out = np.asarray(ref, np.float32).reshape(len(ref), -1), np.asarray(out, np.float32).reshape(len(out), -1)
    scale = max(1.0, float(np.abs(ref).max()))
    res = {"samples": int(len(ref)), "divergence": round(output_divergence(ref, out, kind), 8),
           "max_rel_diff": float(np.abs(out - ref).max() / scale)}
    if kind == "classifier":
        res["agreement"] = round(100.0 * float((out.argmax(1) == ref.argmax(1)).mean()), 3)
    return res


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return round(100.0 * float((np.asarray(logits).reshape(len(labels), -1).argmax(1) == labels).mean()), 3)


# ----------------------------------------------------------------------------- ONNX Runtime

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OrtRunner(Runner):
    """One ONNX Runtime session on one execution provider ('cpu', 'cuda' or 'trt')."""

    runtime_prefix = "ort"

    def __init__(self, path, provider: str = "cpu", threads: int | None = None, device_id: int = 0,
                 precision: str | None = None):
        import onnxruntime as ort

        self.ort, self.provider_short = ort, provider
        self.provider = ORT_PROVIDERS[provider]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        providers: list = [self.provider]
        if provider == "cuda":
            providers = [(self.provider, {"device_id": device_id}), "CPUExecutionProvider"]
        elif provider == "trt":
            # The artifact's precision decides: fp32 stays fp32, fp16 may use fp16 kernels, and a QDQ
            # model carries its own INT8 scales (explicit quantization, no calibration table).
            providers = [(self.provider, {"device_id": device_id, "trt_fp16_enable": precision == "fp16",
                                          "trt_int8_enable": precision == "int8",
                                          "trt_engine_cache_enable": True,
                                          "trt_engine_cache_path": str(Path(path).parent / "trt_cache")}),
                         ("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        if self.provider not in self.session.get_providers():
            raise RuntimeError(f"{self.provider} did not load (session uses {self.session.get_providers()})")
        self.device_id = device_id
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.input_dtype = _ORT_DTYPES.get(inp.type, np.float32)
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.threads = int(threads) if threads else None
        self.on_gpu = provider in ("cuda", "trt")

    @property
    def runtime(self) -> str:
        return f"ort-{self.provider_short}"

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x.astype(self.input_dtype)})[0]

    @contextlib.contextmanager
    def timing(self, x: np.ndarray):
        x = np.ascontiguousarray(x.astype(self.input_dtype))
        if not self.on_gpu:
            feed = {self.input_name: x}
            yield (lambda: self.session.run([self.output_name], feed)), no_copies
            return
        # GPU: inputs and outputs resident on the device (IOBinding), copies timed apart.
        ort = self.ort
        x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.device_id)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, x_dev)
        binding.bind_output(self.output_name, "cuda", self.device_id)

        def step():
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        def copies(n_timed: int) -> dict:
            return {"h2d_ms": median_ms(time_calls(lambda: ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.device_id),
                                                   3, 20)),
                    "d2h_ms": median_ms(time_calls(lambda: binding.copy_outputs_to_cpu(), 3, 20))}

        yield step, copies


# ----------------------------------------------------------------------------- OpenVINO


@functools.lru_cache(maxsize=1)
def openvino_core():
    """The process's one OpenVINO Core, which every runner compiles through: a new Core per model
    load can crash the process after many loads (OpenVINO users report segfaults; this project's
    test suite, where every export timed OpenVINO with its own Core, died of one once)."""
    import openvino as ov

    return ov.Core()


class OpenVinoRunner(Runner):
    """OpenVINO's CPU plugin reading the exported ONNX file itself: its ONNX frontend turns a QDQ
    file's QuantizeLinear/DequantizeLinear pairs into FakeQuantize and runs its own INT8 kernels.
    One synchronous infer request, latency hint (one stream). Float layers run in fp32
    (`INFERENCE_PRECISION_HINT`): OpenVINO would otherwise run them in bf16 on CPUs with
    AVX512-BF16 or AMX, which is another model's accuracy; `inference_precision` "bf16" asks for
    exactly that where it is wanted, as the frozen teacher's `bf16-openvino` mode does."""

    runtime = "openvino-cpu"

    def __init__(self, path, threads: int | None = None, inference_precision: str = "f32"):
        import openvino as ov

        core = openvino_core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.ov = ov
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.provider = f"OpenVINO {ov.get_version().split('-')[0]} CPU"
        self.threads = int(threads) if threads else None
        shape = self.compiled.input(0).get_partial_shape()
        self.fixed_batch = shape[0].get_length() if shape[0].is_static else None

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})[self.compiled.output(0)])

    @contextlib.contextmanager
    def timing(self, x: np.ndarray):
        self.request.set_input_tensor(self.ov.Tensor(np.ascontiguousarray(x, dtype=np.float32)))
        yield (lambda: self.request.infer()), no_copies


# ----------------------------------------------------------------------------- TensorRT engines


def cuda_runtime():
    """cuda-python's runtime bindings (cuda.bindings.runtime, or cuda.cudart before 12.8)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # type: ignore[no-redef]
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTRunner(Runner):
    """A serialized TensorRT engine run through the TensorRT 10 Python runtime (name-based I/O,
    `execute_async_v3`) with buffers from cuda-python. Device time with CUDA events; H2D and
    D2H copies (pinned host memory) timed apart. Written against the documented TRT 10 API; not
    executed on this project's machines (no TensorRT there)."""

    runtime = "tensorrt"
    provider = "TensorRT"
    on_gpu = True
    threads = None

    def __init__(self, path):
        import tensorrt as trt

        self.trt, self.cudart = trt, cuda_runtime()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.trt_runtime = trt.Runtime(self.logger)
        self.engine = self.trt_runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: deserialization failed (engine built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(self.inputs) != 1:
            raise RuntimeError(f"{path}: expected one input tensor, found {self.inputs}")
        self.input_name, self.output_name = self.inputs[0], self.outputs[0]
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.output_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        if shape[0] == -1:
            lo, _opt, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.batch_range = (int(lo[0]), int(hi[0]))
        else:
            self.batch_range = (int(shape[0]), int(shape[0]))
        self.stream = _check(self.cudart.cudaStreamCreate())

    def supports_batch(self, batch: int) -> bool:
        return self.batch_range[0] <= batch <= self.batch_range[1]

    def _alloc(self, x: np.ndarray):
        cudart = self.cudart
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise RuntimeError(f"input shape {x.shape} outside the engine's optimization profile")
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        in_bytes, out_bytes = x.nbytes, int(np.prod(out_shape)) * self.output_dtype.itemsize
        bufs = {
            "h_in": _check(cudart.cudaMallocHost(in_bytes)), "h_out": _check(cudart.cudaMallocHost(out_bytes)),
            "d_in": _check(cudart.cudaMalloc(in_bytes)), "d_out": _check(cudart.cudaMalloc(out_bytes)),
            "in_bytes": in_bytes, "out_bytes": out_bytes, "out_shape": out_shape,
        }
        import ctypes

        ctypes.memmove(bufs["h_in"], x.ctypes.data, in_bytes)
        self.context.set_tensor_address(self.input_name, int(bufs["d_in"]))
        self.context.set_tensor_address(self.output_name, int(bufs["d_out"]))
        return bufs

    def _free(self, bufs) -> None:
        for key in ("h_in", "h_out"):
            self.cudart.cudaFreeHost(bufs[key])
        for key in ("d_in", "d_out"):
            self.cudart.cudaFree(bufs[key])

    def _run(self, bufs, events) -> tuple[float, float, float]:
        cudart, s = self.cudart, self.stream
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        e0, e1, e2, e3 = events
        _check(cudart.cudaEventRecord(e0, s))
        _check(cudart.cudaMemcpyAsync(bufs["d_in"], bufs["h_in"], bufs["in_bytes"], h2d, s))
        _check(cudart.cudaEventRecord(e1, s))
        if not self.context.execute_async_v3(int(s)):
            raise RuntimeError("execute_async_v3 failed")
        _check(cudart.cudaEventRecord(e2, s))
        _check(cudart.cudaMemcpyAsync(bufs["h_out"], bufs["d_out"], bufs["out_bytes"], d2h, s))
        _check(cudart.cudaEventRecord(e3, s))
        _check(cudart.cudaStreamSynchronize(s))
        ms = [_check(cudart.cudaEventElapsedTime(a, b)) for a, b in ((e0, e1), (e1, e2), (e2, e3))]
        return float(ms[0]), float(ms[1]), float(ms[2])

    def predict(self, x: np.ndarray) -> np.ndarray:
        import ctypes

        x = np.ascontiguousarray(x.astype(self.input_dtype))
        bufs, events = self._alloc(x), [_check(self.cudart.cudaEventCreate()) for _ in range(4)]
        try:
            self._run(bufs, events)
            out = np.empty(bufs["out_shape"], dtype=self.output_dtype)
            ctypes.memmove(out.ctypes.data, bufs["h_out"], bufs["out_bytes"])
            return out
        finally:
            self._free(bufs)
            for e in events:
                self.cudart.cudaEventDestroy(e)

    @contextlib.contextmanager
    def timing(self, x: np.ndarray):
        x = np.ascontiguousarray(x.astype(self.input_dtype))
        bufs, events = self._alloc(x), [_check(self.cudart.cudaEventCreate()) for _ in range(4)]
        transfers: list[tuple[float, float]] = []

        def step():
            h2d, compute, d2h = self._run(bufs, events)
            transfers.append((h2d, d2h))
            return compute

        def copies(n_timed: int) -> dict:  # the copies of the timed runs, measured in the same calls
            timed = transfers[-n_timed:]
            return {"h2d_ms": median_ms([t[0] for t in timed]), "d2h_ms": median_ms([t[1] for t in timed])}

        try:
            yield step, copies
        finally:
            self._free(bufs)
            for e in events:
                self.cudart.cudaEventDestroy(e)


# ----------------------------------------------------------------------------- benchmark driver


def available_runtimes() -> dict[str, str | None]:
    """Runtime name -> None when usable here, else a one-line reason why not."""
    out: dict[str, str | None] = {}
    try:
        import onnxruntime as ort

        have = ort.get_available_providers()
        for short, full in ORT_PROVIDERS.items():
            out[f"ort-{short}"] = None if full in have else f"{full} not in this onnxruntime build ({', '.join(have)})"
    except ImportError:
        for short in ORT_PROVIDERS:
            out[f"ort-{short}"] = "onnxruntime is not installed (pip install onnxruntime)"
    gpus = gpu_stamp()
    for key in ("ort-cuda", "ort-trt"):
        if out[key] is None and not gpus:
            out[key] = "no NVIDIA GPU visible (nvidia-smi absent or lists none)"
    try:
        import openvino  # noqa: F401

        out["openvino-cpu"] = None
    except ImportError:
        out["openvino-cpu"] = "OpenVINO is not installed (pip install openvino)"
    try:
        import tensorrt  # noqa: F401

        cuda_runtime()
        out["tensorrt"] = None if gpus else "no NVIDIA GPU visible"
    except ImportError as e:
        out["tensorrt"] = f"TensorRT runtime not importable ({e.name or e}); pip install tensorrt cuda-python on the device"
    return out


def make_runner(runtime: str, path: Path, threads: int | None, precision: str | None = None) -> Runner:
    """The runner of one artifact on one kit runtime (one of RUNTIMES)."""
    if runtime.startswith("ort-"):
        return OrtRunner(path, runtime[4:], threads, precision=precision)
    if runtime == "openvino-cpu":
        return OpenVinoRunner(path, threads)
    if runtime == "tensorrt":
        return TensorRTRunner(path)
    raise ValueError(f"unknown runtime {runtime!r}")


def _runtime_accepts(runtime: str, art: dict) -> bool:
    return (art["format"] == "tensorrt") == (runtime == "tensorrt")


def bench_export(export_dir, runtimes=("ort-cpu",), batches=(1, 8, 32), threads: int | None = None,
                 warmup: int = 10, runs: int | None = 50, time_s: float | None = None,
                 artifacts: list[str] | None = None, extra_engines=(), log=print, on_step=None) -> dict:
    """Time every artifact of an export on every requested runtime and batch size.

    Returns the results dict (schema "edgedistill.bench/1"); `on_step()` is called after each
    (artifact, runtime, batch) so callers can drive a progress bar.
    """
    exp = load_export(export_dir)
    arts = list(exp["artifacts"])
    for eng in extra_engines:
        eng = Path(eng)
        arts.append({"name": f"tensorrt-{eng.stem}", "file": str(eng.resolve()), "format": "tensorrt",
                     "precision": next((q for q in ("int8", "fp16") if q in eng.stem), "fp32")})
    if artifacts:
        unknown = sorted(set(artifacts) - {a["name"] for a in arts})
        if unknown:
            raise KitError(f"unknown artifact(s) {unknown}; {exp['dir'] / MANIFEST} lists {[a['name'] for a in arts]}")
        arts = [a for a in arts if a["name"] in artifacts]
    avail = available_runtimes()
    results, skipped = [], []
    host = platform.node()
    for runtime in runtimes:
        reason = avail.get(runtime, f"unknown runtime {runtime!r} (kit runtimes: {', '.join(avail)})")
        if reason:
            skipped.append({"runtime": runtime, "reason": reason})
            log(f"skip {runtime}: {reason}")
            continue
        for art in arts:
            if not _runtime_accepts(runtime, art):
                continue
            path = Path(art["file"]) if Path(art["file"]).is_absolute() else exp["dir"] / art["file"]
            if not path.is_file():
                skipped.append({"artifact": art["name"], "runtime": runtime, "reason": f"{path} is missing"})
                log(f"skip {art['name']} on {runtime}: {path} is missing")
                continue
            try:
                runner = make_runner(runtime, path, threads, art.get("precision"))
            except Exception as e:  # a provider that cannot load this graph: say so, go on
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                skipped.append({"artifact": art["name"], "runtime": runtime, "reason": reason})
                log(f"skip {art['name']} on {runtime}: {reason}")
                continue
            results += bench_runner(runner, art, exp, batches, threads, warmup, runs, time_s, skipped, log, on_step,
                                    host, runtime)
    return make_results(results, skipped, environment(threads), exp,
                        {"runtimes": list(runtimes), "batches": list(batches), "threads": threads, "warmup": warmup,
                         "runs": runs, "time_s": time_s})


def bench_runner(runner, art: dict, exp: dict, batches, threads: int | None, warmup: int, runs: int | None,
                 time_s: float | None, skipped: list, log=print, on_step=None, host: str | None = None,
                 runtime: str | None = None) -> list[dict]:
    """The result rows of one runner of one artifact (`art`: name, file, format, precision) at
    every batch size: top-1 on the export's samples, then `measure` per batch; a batch the runner
    does not accept or a measurement that fails is added to `skipped` with the reason. The one
    loop behind `bench_export` and `edgedistill bench`'s torch runners."""
    runtime, host = runtime or runner.runtime, host or platform.node()
    acc = None
    if exp["labels"] is not None:
        try:
            acc = _accuracy(runner, exp["samples"], exp["labels"])
        except Exception as e:
            log(f"{art['name']} on {runtime}: accuracy check failed ({type(e).__name__}: {e})")
    rows = []
    for batch in batches:
        if not runner.supports_batch(batch):
            skipped.append({"artifact": art["name"], "runtime": runtime, "batch": batch,
                            "reason": "batch size outside what the model/engine accepts"})
            if on_step:
                on_step()
            continue
        x = tile_batch(exp["samples"], batch)
        try:
            stats = measure(runner, x, warmup, runs, time_s)
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            skipped.append({"artifact": art["name"], "runtime": runtime, "batch": batch, "reason": reason})
            log(f"skip {art['name']} on {runtime} batch {batch}: {reason}")
            if on_step:
                on_step()
            continue
        row = {"artifact": art["name"], "file": art["file"], "format": art["format"], "runtime": runtime,
               "provider": runner.provider, "precision": art.get("precision"), "batch": batch,
               "threads": runner.threads or threads, "warmup": warmup, **stats, "host": host}
        if acc is not None:
            row["top1"], row["top1_n"] = acc, int(exp["labels"].shape[0])
        rows.append(row)
        if on_step:
            on_step()
    return rows


def _accuracy(runner, samples: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 (percent) on the export's sample images, in chunks the runner accepts."""
    n = samples.shape[0]
    chunk = runner.fixed_batch if getattr(runner, "fixed_batch", None) else min(n, 32)
    if hasattr(runner, "batch_range"):
        chunk = max(runner.batch_range[0], min(chunk, runner.batch_range[1]))
    logits = []
    for start in range(0, n, chunk):
        x = samples[start : start + chunk]
        if x.shape[0] < chunk and not runner.supports_batch(x.shape[0]):
            x = tile_batch(x, chunk)
            logits.append(runner.predict(x)[: n - start])
        else:
            logits.append(runner.predict(x))
    return top1(np.concatenate([np.asarray(l, dtype=np.float32).reshape(l.shape[0], -1) for l in logits]), labels)


def check_verdict(art: dict, measured: dict) -> tuple[bool, dict]:
    """(passed, tolerance) of one artifact's `sample_agreement` on the device."""
    precision = art.get("precision") or "fp32"
    if precision in FLOAT_TOLERANCE:
        tol = {"max_rel_diff": FLOAT_TOLERANCE[precision]}
        return measured["max_rel_diff"] <= tol["max_rel_diff"], tol
    expected = art.get("on_samples")
    if not expected:  # an export made before the samples' reference: nothing to hold it to
        return True, {"note": "the manifest has no on_samples record: re-export to check this artifact"}
    tol = {"divergence": round(max(INT8_DIVERGENCE_FACTOR * expected["divergence"], INT8_DIVERGENCE_FLOOR), 8),
           "expected": expected}
    ok = measured["divergence"] <= tol["divergence"]
    if "agreement" in measured and "agreement" in expected:
        tol["agreement"] = round(expected["agreement"] - 100.0 / max(measured["samples"], 1), 3)  # one sample
        ok = ok and measured["agreement"] >= tol["agreement"]
    return ok, tol


def check_export(export_dir, runtimes=("ort-cpu",), threads: int | None = None, log=print) -> dict:
    """Run every artifact of an export on every requested runtime on the sample inputs and hold
    its outputs against the fp32 reference outputs the export wrote (schema "edgedistill.check/1")."""
    exp = load_export(export_dir)
    ref_path = exp["dir"] / SAMPLE_REFERENCE
    if not ref_path.is_file():
        raise KitError(f"{ref_path} is missing: re-run `edgedistill export` (it writes the fp32 reference outputs)")
    reference = np.load(ref_path, allow_pickle=False)
    kind = exp["manifest"].get("kind", "classifier")
    avail = available_runtimes()
    rows, skipped = [], []
    for runtime in runtimes:
        if avail.get(runtime, f"unknown runtime {runtime!r}"):
            skipped.append({"runtime": runtime, "reason": avail.get(runtime, f"unknown runtime {runtime!r}")})
            continue
        for art in exp["artifacts"]:
            path = Path(art["file"]) if Path(art["file"]).is_absolute() else exp["dir"] / art["file"]
            if not _runtime_accepts(runtime, art) or not path.is_file():
                continue
            try:
                runner = make_runner(runtime, path, threads, art.get("precision"))
                chunk = runner.fixed_batch or len(exp["samples"])
                out = np.concatenate([runner.predict(tile_batch(exp["samples"][i : i + chunk], chunk))[: len(exp["samples"]) - i]
                                      for i in range(0, len(exp["samples"]), chunk)])
            except Exception as e:  # noqa: BLE001 - a runtime that cannot run this file: say so, go on
                skipped.append({"artifact": art["name"], "runtime": runtime, "reason": f"{type(e).__name__}: {e}"[:300]})
                continue
            measured = sample_agreement(reference, out, kind)
            passed, tol = check_verdict(art, measured)
            rows.append({"artifact": art["name"], "file": art["file"], "runtime": runtime, "provider": runner.provider,
                         "precision": art.get("precision"), **measured, "tolerance": tol, "passed": bool(passed)})
            log(f"{art['name']} on {runtime}: {'ok' if passed else 'BEYOND TOLERANCE'} ({measured})")
    return {"schema": CHECK_SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(threads), "kind": kind, "passed": all(r["passed"] for r in rows),
            "results": rows, "skipped": skipped,
            "export": {"dir": str(exp["dir"]), "manifest_sha256": file_sha256(exp["dir"] / MANIFEST)}}


def within_budget(art: dict, budget: float) -> tuple[bool, str]:
    """Whether the export found `art` accurate enough to ship, and what that rests on: fp32 always;
    fp16 when it passed its parity check; INT8 when its top-1 drop is within `budget` points."""
    precision = art.get("precision") or "fp32"
    if precision == "fp32":
        return True, "fp32"
    if precision == "int8":
        drop = (art.get("accuracy") or {}).get("drop_vs_fp32")
        if drop is None:
            return False, "no top-1 drop on record (an engine built on the device: score its ONNX file)"
        return drop <= budget, f"drop {drop:.2f} (budget {budget:g})"
    passed = (art.get("parity") or {}).get("passed")
    return bool(passed), "parity passed" if passed else "no passed parity check on record"


def device_pick(results: list[dict], exp: dict) -> dict | None:
    """What to ship on the device that ran `results`: the fastest artifact at batch 1 (p50, on any
    runtime timed) among those the export found within its accuracy budget (the manifest's
    recommendation.max_drop, 1 point without one), beside the fastest fp32 file. None without a
    batch-1 row."""
    manifest = exp["manifest"]
    budget = float((manifest.get("recommendation") or {}).get("max_drop", 1.0))
    arts = {a["name"]: a for a in exp["artifacts"]}
    rows = [r for r in results if r["batch"] == 1 and r["artifact"] in arts]
    if not rows:
        return None
    verdicts = {r["artifact"]: within_budget(arts[r["artifact"]], budget) for r in rows}
    eligible = [r for r in rows if verdicts[r["artifact"]][0]]
    if not eligible:
        return None
    fp32 = [r for r in rows if (arts[r["artifact"]].get("precision") or "fp32") == "fp32"]
    best = min(eligible, key=lambda r: r["latency_ms"]["p50"])
    pick = {"artifact": best["artifact"], "runtime": best["runtime"], "p50_ms": best["latency_ms"]["p50"],
            "max_drop": budget, "accuracy": verdicts[best["artifact"]][1],
            "excluded": {name: why for name, (ok, why) in verdicts.items() if not ok}}
    if fp32:
        fastest_fp32 = min(fp32, key=lambda r: r["latency_ms"]["p50"])
        pick["fastest_fp32"] = {"artifact": fastest_fp32["artifact"], "runtime": fastest_fp32["runtime"],
                                "p50_ms": fastest_fp32["latency_ms"]["p50"]}
        pick["speedup_vs_fp32"] = round(fastest_fp32["latency_ms"]["p50"] / best["latency_ms"]["p50"], 3)
    int8 = [r for r in eligible if arts[r["artifact"]].get("precision") == "int8"]
    if int8 and fp32 and best not in int8:
        fastest_int8 = min(int8, key=lambda r: r["latency_ms"]["p50"])
        pick["int8_note"] = (f"{fastest_int8['artifact']} on {fastest_int8['runtime']} runs at "
                             f"{pick['fastest_fp32']['p50_ms'] / fastest_int8['latency_ms']['p50']:.2f}x fp32's "
                             "speed here: it buys size, not speed, on this device")
    reason = f"{pick['artifact']} on {pick['runtime']} ({pick['p50_ms']:.3f} ms at batch 1, {pick['accuracy']})"
    if "speedup_vs_fp32" in pick:
        reason += (f", {pick['speedup_vs_fp32']:.2f}x the fastest fp32 ({pick['fastest_fp32']['artifact']} on "
                   f"{pick['fastest_fp32']['runtime']})")
    pick["reason"] = reason + (f"; {pick['int8_note']}" if pick.get("int8_note") else "")
    return pick


def format_pick(pick: dict | None) -> str:
    """One line for the end of `bench`."""
    if pick is None:
        return "ship here: nothing within the export's accuracy budget was timed at batch 1"
    return f"ship here: {pick['reason']}"


def make_results(results: list[dict], skipped: list[dict], env: dict, exp: dict | None = None,
                 settings: dict | None = None) -> dict:
    doc = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "settings": settings or {},
        "results": results,
        "skipped": skipped,
    }
    if exp is not None:
        doc["export"] = {"dir": str(exp["dir"]), "source_run": exp["manifest"].get("source_run"),
                         "manifest_sha256": file_sha256(exp["dir"] / MANIFEST)}
        doc["pick"] = device_pick(results, exp)
    return doc


def write_results(doc: dict, path) -> Path:
    """Write a results JSON (bench or check) atomically (temp file + rename)."""
    required = {SCHEMA: {"artifact", "runtime", "batch", "latency_ms", "throughput_ips"},
                CHECK_SCHEMA: {"artifact", "runtime", "samples", "divergence", "passed"}}.get(doc.get("schema"))
    if required is None:
        raise ValueError(f"not a {SCHEMA} or {CHECK_SCHEMA} document")
    for row in doc.get("results", []):
        missing = required - set(row)
        if missing:
            raise ValueError(f"result row lacks {sorted(missing)}")
    path = Path(path)
    write_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def write_atomic(path, data: bytes) -> None:
    """Write `data` through a uniquely named temporary file beside `path`, then rename: readers
    never see half a file, and two processes writing the same path do not share a temporary."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_results(path) -> dict:
    """Read a results JSON, checking its schema (KitError naming the file otherwise)."""
    doc = read_json_object(path, "pass a results JSON written by edgekit.py or `edgedistill bench`")
    if str(doc.get("schema", "")).split("/")[0] != SCHEMA.split("/")[0]:
        raise KitError(f"{path} has schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    if doc["schema"] != SCHEMA:
        raise KitError(f"{path} has schema {doc['schema']!r}; this edgedistill reads {SCHEMA!r}")
    return doc


def format_table(doc: dict) -> str:
    """Plain-text table of a results document (the kit has no rich)."""
    head = ("artifact", "runtime", "prec", "batch", "thr", "p50 ms", "p99 ms", "img/s", "top1")
    rows = [head]
    for r in doc["results"]:
        lat = r["latency_ms"]
        rows.append((r["artifact"], r["runtime"], str(r.get("precision") or ""), str(r["batch"]),
                     str(r.get("threads") or "-"), f"{lat['p50']:.3f}", f"{lat['p99']:.3f}",
                     f"{r['throughput_ips']:.1f}", "-" if r.get("top1") is None else f"{r['top1']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    noisy = unreliable_rows(doc)
    if noisy:
        lines.append(f"unreliable (p90/p50 > {SPREAD_LIMIT} after re-measuring; the machine was busy): {', '.join(noisy)}")
    return "\n".join(lines)


def format_check(doc: dict) -> str:
    """Plain-text table of a check document."""
    head = ("artifact", "runtime", "prec", "agree %", "divergence", "max rel diff", "verdict")
    rows = [head] + [(r["artifact"], r["runtime"], str(r.get("precision") or ""),
                      "-" if r.get("agreement") is None else f"{r['agreement']:.1f}", f"{r['divergence']:.2e}",
                      f"{r['max_rel_diff']:.2e}", "ok" if r["passed"] else "BEYOND TOLERANCE") for r in doc["results"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def unreliable_rows(doc: dict) -> list[str]:
    """'artifact/runtime/batch' of the rows marked unreliable."""
    return [f"{r['artifact']}/{r['runtime']}/b{r['batch']}" for r in doc["results"] if r.get("unreliable")]


# ----------------------------------------------------------------------------- CLI


def parse_batches(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; ValueError naming the problem otherwise (shared with `edgedistill bench`)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers such as 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        return parse_batches(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="edgekit.py", description="Time an edgedistill export on this device.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time the export's artifacts; write results JSON")
    b.add_argument("export_dir", type=Path, help="export folder (holds manifest.json)")
    b.add_argument("--batch", type=_ints, default=[1, 8, 32], help="batch sizes, e.g. 1,8,32")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (ORT intra-op); default: ORT's choice")
    b.add_argument("--runs", type=int, default=50, help="timed runs per measurement")
    b.add_argument("--time", type=float, default=None, dest="time_s", help="time budget (s) per measurement instead")
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--providers", default="auto",
                   help="runtimes: any of cpu,cuda,trt (ONNX Runtime EPs), openvino-cpu and tensorrt (engines); auto = all present")
    b.add_argument("--artifact", action="append", default=None, help="only this artifact (repeatable)")
    b.add_argument("--engine", action="append", type=Path, default=[], help="also time this TensorRT engine")
    b.add_argument("--out", type=Path, default=None, help="results JSON (default: EXPORT_DIR/bench-<host>.json)")
    c = sub.add_parser("check", help="run every artifact on the sample inputs here; compare with the fp32 "
                       "reference; exit 1 beyond tolerance")
    c.add_argument("export_dir", type=Path, help="export folder (holds manifest.json)")
    c.add_argument("--threads", type=int, default=None, help="CPU threads")
    c.add_argument("--providers", default="auto", help="runtimes, as for bench")
    c.add_argument("--out", type=Path, default=None, help="results JSON (default: EXPORT_DIR/check-<host>.json)")
    sub.add_parser("env", help="print the environment stamp as JSON")
    args = parser.parse_args(argv)
    if args.cmd == "env":
        print(json.dumps(environment(), indent=2))
        return 0
    if args.providers == "auto":
        avail = available_runtimes()
        runtimes = [r for r in RUNTIMES if avail.get(r) is None]
    else:
        runtimes = [p if p in RUNTIMES else f"ort-{p}" for p in args.providers.split(",")]
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        if args.cmd == "check":
            doc = check_export(args.export_dir, runtimes, args.threads, log=log)
        else:
            doc = bench_export(args.export_dir, runtimes, args.batch, args.threads, args.warmup,
                               None if args.time_s else args.runs, args.time_s, args.artifact, args.engine, log=log)
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path(args.export_dir) / f"{args.cmd}-{platform.node() or 'device'}.json"
    write_results(doc, out)
    print(format_check(doc) if args.cmd == "check" else format_table(doc) + "\n" + format_pick(doc.get("pick")))
    print(f"results: {out}", file=sys.stderr)
    return 0 if doc["results"] and doc.get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
