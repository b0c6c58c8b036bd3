"""ONNX Runtime sessions for checking and scoring artifacts, and the short latency probe that picks
the INT8 format for the CPU at hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgedistill.kit import load_kit_module


def cpu_threads() -> int:
    """Threads of the sessions made here: the device kit's default (available cores, at most 4)."""
    return load_kit_module("edgekit").default_threads()


def session(path: Path, threads: int | None = None, exact: bool = False):
    """A CPU session; `exact`: graph optimisation off, so a QDQ file runs DequantizeLinear -> float
    op -> QuantizeLinear (the reference arithmetic of the format, free of this CPU's INT8 kernels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cpu_threads()
    opts.inter_op_num_threads = 1
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_DISABLE_ALL if exact else level.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(outs).astype(np.float32)


def compare(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None, kind: str) -> dict:
    """Numbers of one artifact against the fp32 reference on the same images."""
    diff = np.abs(out - ref)
    scale = max(1.0, float(np.abs(ref).max()))
    res = {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": float(diff.max() / scale),
    }
    if kind == "classifier":
        pred, ref_pred = out.argmax(1), ref.argmax(1)
        res["agreement"] = round(100.0 * float((pred == ref_pred).mean()), 3)
        res["kl_vs_fp32"] = round(output_divergence(ref, out, kind), 6)
        if labels is not None:
            res["top1"] = round(100.0 * float((pred == labels).mean()), 3)
            # Standard error of the top-1 difference against fp32 on these images (paired).
            delta = (pred == labels).astype(np.float64) - (ref_pred == labels).astype(np.float64)
            res["drop_se"] = round(100.0 * float(delta.std(ddof=1) / np.sqrt(len(delta))) if len(delta) > 1 else 0.0, 3)
    else:
        cosines = load_kit_module("edgekit").cosines(ref, out)
        res["min_cosine"] = float(cosines.min())
        res["mean_cosine"] = float(cosines.mean())
    return res


def output_divergence(ref: np.ndarray, out: np.ndarray, kind: str) -> float:
    """How far an INT8 output is from fp32: the device kit's measure (mean KL of the softmaxes for
    logits, mean 1 - cosine for embeddings)."""
    return load_kit_module("edgekit").output_divergence(ref, out, kind)


def latency_ms(path_or_session, sample: np.ndarray, threads: int | None = None, budget_s: float = 1.0,
               min_runs: int = 10, max_runs: int = 200, warmup: int = 5) -> dict:
    """Median / p90 batch-1 latency of an ONNX file (or an open session) on the CPU, within about
    `budget_s` seconds: the device kit's timing loop and statistics (`time_calls`, `latency_stats`)."""
    kit = load_kit_module("edgekit")
    sess = session(path_or_session, threads) if isinstance(path_or_session, (str, Path)) else path_or_session
    feed = {sess.get_inputs()[0].name: sample[:1]}
    times = kit.time_calls(lambda: sess.run(None, feed), warmup, runs=None, time_s=budget_s, min_runs=min_runs,
                           max_runs=max_runs)
    lat = kit.latency_stats(times)
    return {"median_ms": lat["p50"], "p90_ms": lat["p90"], "runs": len(times), "batch": 1,
            "threads": threads or cpu_threads()}
