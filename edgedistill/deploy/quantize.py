"""INT8 post-training quantization with ONNX Runtime: calibration (cached), the format per target,
a per-layer sensitivity analysis, and the "keep the worst layers in float" fallback.

Pipeline: `quant_pre_process` (shape inference + graph optimisation, e.g. BatchNorm folding) ->
calibration over real images (MinMax, Entropy or Percentile; the tensor ranges are cached) ->
`quantize_static` in QDQ format with per-channel weights.

Formats (DESIGN §6):
- `qdq-s8s8-sym`: signed int8 activations and weights, symmetric (zero point 0): what TensorRT's
  explicit quantization wants; the only format for `--target tensorrt`.
- `qdq-u8s8`: unsigned int8 activations (asymmetric), signed symmetric weights: what ONNX Runtime's
  x86 kernels prefer. On x86 without VNNI the weights use 7 bits (`reduce_range`) because the
  AVX2 u8*s8 dot product saturates 16-bit sums (ONNX Runtime's own guidance).
For `--target ort-cpu` with `--int8-format auto` both are built and timed on this CPU at export
time and the faster one is kept; the numbers and the reason go into the manifest.

Calibration cache: the tensor ranges ONNX Runtime computes are stored as JSON under a key that
hashes the pre-processed model's bytes, the calibration files (path, size, mtime), the calibrator
and its settings, the preprocessing and the ONNX Runtime version; any change is a new key, so a
stale cache is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgedistill.errors import UserError

log = logging.getLogger(__name__)

CALIBRATORS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq-s8s8-sym", "qdq-u8s8")
TARGETS = ("ort-cpu", "tensorrt")


@dataclass
class QuantSettings:
    calibrator: str = "minmax"
    percentile: float = 99.999
    # Entropy (KL) calibration histogram: ONNX Runtime's default of 128 bins for 128 quantized
    # bins leaves no threshold to search (it then equals MinMax). TensorRT's entropy calibrator
    # uses 2048 bins, but ONNX Runtime's Python threshold search is then slow (measured here:
    # about 70 s of CPU for mobilenetv3_small); 512 bins keeps it to seconds.
    entropy_bins: int = 512
    per_channel: bool = True
    calib_batch: int = 32

    def calibration_key_parts(self) -> dict:
        parts = {"calibrator": self.calibrator}
        if self.calibrator == "percentile":
            parts["percentile"] = self.percentile
        if self.calibrator == "entropy":
            parts["entropy_bins"] = self.entropy_bins
        return parts

    def calibrator_options(self) -> dict:
        """extra_options of onnxruntime.quantization.create_calibrator."""
        if self.calibrator == "percentile":
            return {"percentile": self.percentile}
        if self.calibrator == "entropy":
            return {"num_bins": self.entropy_bins, "num_quantized_bins": 128}
        return {}


@dataclass
class QuantResult:
    path: Path
    fmt: str
    settings: dict
    nodes_excluded: list[str] = field(default_factory=list)


def _ort_types():
    from onnxruntime.quantization import CalibrationMethod, QuantType

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    return methods, QuantType


def cpu_has_vnni() -> bool:
    from edgedistill.envinfo import cpu_info

    isa = cpu_info()["isa"]
    return bool(isa.get("avx512_vnni") or isa.get("avx_vnni") or isa.get("amx_int8"))


def format_options(fmt: str) -> dict:
    """quantize_static arguments of a format (activation/weight types, symmetry, reduce_range)."""
    _, QuantType = _ort_types()
    if fmt == "qdq-s8s8-sym":
        return {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8, "reduce_range": False,
                "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}}
    if fmt == "qdq-u8s8":
        x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
        return {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8,
                "reduce_range": bool(x86 and not cpu_has_vnni()),
                "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True}}
    raise UserError(f"unknown INT8 format {fmt!r}: use one of {', '.join(FORMATS)}")


def describe_format(fmt: str) -> dict:
    opts = format_options(fmt)
    return {
        "format": "QDQ",
        "name": fmt,
        "activations": "int8 symmetric (zero point 0)" if fmt == "qdq-s8s8-sym" else "uint8 asymmetric",
        "weights": "int8 symmetric, per-channel" + (", 7-bit (reduce_range)" if opts["reduce_range"] else ""),
        "reduce_range": opts["reduce_range"],
    }


def preprocess(src: Path, dst: Path) -> Path:
    """ONNX Runtime's quant_pre_process (shape inference + optimisation); falls back to the
    unoptimised model when the optimiser cannot handle it."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001 - the optimiser can fail on unusual graphs
        log.warning("quant_pre_process failed (%s: %s); retrying without graph optimisation", type(e).__name__, e)
        quant_pre_process(str(src), str(dst), skip_optimization=True, skip_symbolic_shape=True)
    return dst


def calibration_key(model_path: Path, files_fingerprint: list, settings: QuantSettings, preprocess_spec: dict) -> tuple[str, dict]:
    import onnxruntime

    h = hashlib.sha256()
    h.update(Path(model_path).read_bytes())
    parts = {
        "files": files_fingerprint,
        "settings": settings.calibration_key_parts(),
        "preprocess": preprocess_spec,
        "onnxruntime": onnxruntime.__version__,
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()[:32], parts


def default_cache_dir() -> Path:
    from edgedistill.data import cache_dir

    return cache_dir() / "calibration"


class Calibration:
    """Where the ranges for one (model, files, settings) live, and whether they were there already."""

    def __init__(self, model_path: Path, files: list[str], fingerprint: list, settings: QuantSettings,
                 preprocess_spec: dict, cache_dir: Path, reader_factory):
        self.key, parts = calibration_key(model_path, fingerprint, settings, preprocess_spec)
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / f"calib-{self.key}.json"
        self.hit = self.path.is_file()
        self.files = files
        self.settings = settings
        self.reader_factory = reader_factory
        self._parts = parts
        self.seconds = 0.0

    def ensure(self, model_path: Path) -> None:
        """Compute and store the ranges when not cached (runs the calibrator once)."""
        if self.path.is_file():
            return
        methods, _ = _ort_types()
        from onnxruntime.quantization import create_calibrator
        from onnxruntime.quantization.calibrate import save_tensors_data
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tmp_dir = Path(tempfile.mkdtemp(prefix="edgedistill-calib-"))
        try:
            # The same calibrator and operator set quantize_static would use; the ranges are then
            # stored in ONNX Runtime's own cache format (save_tensors_data writes atomically).
            calibrator = create_calibrator(
                Path(model_path), sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                augmented_model_path=str(tmp_dir / "augmented.onnx"),
                calibrate_method=methods[self.settings.calibrator],
                extra_options=self.settings.calibrator_options(),
            )
            calibrator.collect_data(self.reader_factory())
            save_tensors_data(calibrator.compute_data(), self.path)
            del calibrator
            (self.cache_dir / f"calib-{self.key}.key.json").write_text(json.dumps(
                {**self._parts, "files": f"{len(self.files)} files", "first_files": [f[0] for f in self._parts["files"][:5]]},
                indent=2))
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        self.seconds = time.perf_counter() - t0
        log.info("calibration (%s, %d images): %.1f s, ranges cached in %s", self.settings.calibrator,
                 len(self.files), self.seconds, self.path)

    def _calib_extra(self) -> dict:
        if self.settings.calibrator == "percentile":
            return {"CalibPercentile": self.settings.percentile}
        return {}

    def describe(self) -> dict:
        return {
            "calibrator": self.settings.calibrator,
            **({"percentile": self.settings.percentile} if self.settings.calibrator == "percentile" else {}),
            **({"entropy_bins": self.settings.entropy_bins} if self.settings.calibrator == "entropy" else {}),
            "images": len(self.files),
            "cache_key": self.key,
            "cache_file": str(self.path),
            "cache_hit": self.hit,
        }


def quantize(pre_path: Path, out_path: Path, fmt: str, calib: Calibration, nodes_to_exclude: list[str] | None = None,
             per_channel: bool = True) -> QuantResult:
    """quantize_static with the cached ranges (no calibration pass)."""
    methods, _ = _ort_types()
    from onnxruntime.quantization import QuantFormat, quantize_static

    calib.ensure(pre_path)
    opts = format_options(fmt)
    extra = dict(opts["extra_options"])
    extra.update(calib._calib_extra())
    quantize_static(str(pre_path), str(out_path), None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    reduce_range=opts["reduce_range"], activation_type=opts["activation_type"],
                    weight_type=opts["weight_type"], nodes_to_exclude=list(nodes_to_exclude or []),
                    calibrate_method=methods[calib.settings.calibrator], extra_options=extra,
                    calibration_cache_path=str(calib.path))
    return QuantResult(out_path, fmt, {**describe_format(fmt), "per_channel": per_channel},
                       list(nodes_to_exclude or []))


# --------------------------------------------------------------------------- format choice


def choose_cpu_format(pre_path: Path, fp32_path: Path, calib: Calibration, sample: np.ndarray, work_dir: Path,
                      budget_s: float = 0.6, rounds: int = 3) -> tuple[str, dict, dict[str, Path]]:
    """Build every candidate format, time each at batch 1 on this CPU (interleaved rounds, so a
    busy neighbour hurts all alike) and return the fastest, the measured table and the candidate
    files (work_dir/candidate.<fmt>.onnx)."""
    from edgedistill.deploy.runtime import cpu_threads, latency_ms, session
    from edgedistill.envinfo import cpu_info

    paths = {"fp32": fp32_path}
    for fmt in FORMATS:
        paths[fmt] = quantize(pre_path, work_dir / f"candidate.{fmt}.onnx", fmt, calib).path
    sessions = {name: session(path) for name, path in paths.items()}
    runs: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for name, sess in sessions.items():
            runs[name].append(latency_ms(sess, sample, budget_s=budget_s / rounds, min_runs=5,
                                         warmup=3)["median_ms"])
    del sessions
    table = {name: round(float(np.median(v)), 4) for name, v in runs.items()}
    chosen = min(FORMATS, key=lambda f: table[f])
    other = [f for f in FORMATS if f != chosen][0]
    cpu = cpu_info()
    isa = ", ".join(k for k, v in cpu["isa"].items() if v) or "no listed SIMD extensions"
    reason = (f"{chosen} measured fastest on this CPU ({table[chosen]:.2f} ms vs {other} {table[other]:.2f} ms, "
              f"fp32 {table['fp32']:.2f} ms; batch 1, {cpu_threads()} threads; {cpu['model']}; {isa})")
    if table[chosen] >= table["fp32"]:
        reason += ": INT8 is NOT faster than fp32 here; it only makes the file smaller. Prefer fp32 on this CPU"
    return chosen, {"latency_ms_batch1": table, "reason": reason, "chosen": chosen, "measured": True,
                    "rounds": rounds, "threads": cpu_threads(), "cpu": cpu["model"], "isa": cpu["isa"]}, \
        {f: paths[f] for f in FORMATS}


# --------------------------------------------------------------------------- sensitivity


def quantized_nodes(qdq_path: Path) -> list[str]:
    """Names of the compute nodes that the QDQ model feeds through DequantizeLinear."""
    import onnx

    model = onnx.load(str(qdq_path))
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_out for i in n.input)]


def _with_outputs(src: Path, dst: Path, tensors: list[str]) -> None:
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    existing = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in existing:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    onnx.save(model, str(dst))


def layer_sensitivity(pre_path: Path, qdq_path: Path, images: np.ndarray, work_dir: Path) -> list[dict]:
    """Per quantized node: relative error of its output in the INT8 model against the float model,
    and the part of it that the node adds (its output error minus the worst error of its inputs).
    Sorted by added error, worst first. One pass over `images` per model."""
    import onnx

    from edgedistill.deploy.runtime import session

    float_model = onnx.load(str(pre_path))
    by_name = {n.name: n for n in float_model.graph.node}
    nodes = [by_name[n] for n in quantized_nodes(qdq_path) if n in by_name]
    if not nodes:
        return []
    # The tensor that shows each node's result in both models. With asymmetric activations the
    # quantizer folds a following Relu/Clip into the node, so its output is then the Relu's.
    qdq_tensors = {o for n in onnx.load(str(qdq_path)).graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in float_model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    probe: dict[str, str] = {}
    for n in nodes:
        t = n.output[0]
        if t not in qdq_tensors:
            nxt = consumers.get(t, [])
            if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip") and nxt[0].output[0] in qdq_tensors:
                t = nxt[0].output[0]
            else:
                continue
        probe[n.name] = t
    nodes = [n for n in nodes if n.name in probe]
    outputs = sorted(set(probe.values()))
    # In the INT8 model read each tensor as its consumers see it: after its Q/DQ pair.
    qdq_graph = onnx.load(str(qdq_path)).graph
    q_of = {n.input[0]: n.output[0] for n in qdq_graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in qdq_graph.node if n.op_type == "DequantizeLinear"}
    seen_as = {t: dq_of.get(q_of.get(t, ""), t) for t in outputs}
    fa, qa = work_dir / "sens.float.onnx", work_dir / "sens.int8.onnx"
    _with_outputs(pre_path, fa, outputs)
    _with_outputs(qdq_path, qa, sorted(set(seen_as.values())))
    results = {}
    for path in (fa, qa):
        sess = session(path)
        names = {o.name for o in sess.get_outputs()}
        wanted = sorted({(t if path == fa else seen_as[t]) for t in outputs} & names)
        inp = sess.get_inputs()[0].name
        acc = {n: [] for n in wanted}
        for i in range(0, len(images), 32):
            vals = sess.run(wanted, {inp: images[i : i + 32]})
            for n, v in zip(wanted, vals):
                acc[n].append(np.asarray(v, dtype=np.float32))
        results[path] = {n: np.concatenate(v) for n, v in acc.items()}
        del sess
    fa.unlink(missing_ok=True)
    qa.unlink(missing_ok=True)
    err = {}
    for t in outputs:
        f, q = results[fa].get(t), results[qa].get(seen_as[t])
        if f is None or q is None or f.shape != q.shape:
            continue
        err[t] = float(np.linalg.norm(q - f) / (np.linalg.norm(f) + 1e-12))
    # Error of each tensor a node reads: its producer's probe (through a folded Relu/Clip too).
    probe_of_tensor = {n.output[0]: probe[n.name] for n in nodes}
    for n in float_model.graph.node:
        if n.op_type in ("Relu", "Clip") and n.input and n.input[0] in probe_of_tensor:
            probe_of_tensor.setdefault(n.output[0], probe_of_tensor[n.input[0]])
    producer_node = {o: n for n in float_model.graph.node for o in n.output}

    def upstream_errors(tensor: str, depth: int = 0) -> list[float]:
        """Errors of the nearest probed tensors feeding `tensor` (through unprobed ops such as
        HardSwish, Flatten or a folded activation)."""
        probed = probe_of_tensor.get(tensor)
        if probed is not None and probed in err:
            return [err[probed]]
        node = producer_node.get(tensor)
        if node is None or depth > 6:
            return []
        return [e for i in node.input for e in upstream_errors(i, depth + 1)]

    report = []
    for n in nodes:
        out = probe[n.name]
        if out not in err:
            continue
        upstream = [e for i in n.input if probe_of_tensor.get(i) != out for e in upstream_errors(i)]
        added = err[out] - (max(upstream) if upstream else 0.0)
        report.append({"node": n.name, "op": n.op_type, "output_rel_error": round(err[out], 6),
                       "added_rel_error": round(added, 6)})
    report.sort(key=lambda r: r["added_rel_error"], reverse=True)
    return report
