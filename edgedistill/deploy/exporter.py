"""`export_run`: one run folder -> one export folder of checked artifacts.

    <export>/model.onnx              fp32, dynamic batch (always)
    <export>/model.fp16.onnx         fp16 weights/activations, fp32 I/O (fp16=True)
    <export>/model.int8.<fmt>.onnx   INT8 QDQ (int8=True): s8s8 (TensorRT) or the CPU's fastest
    <export>/manifest.json           schema edgedistill.export/1 (see manifest.py)
    <export>/accuracy.json           every artifact's numbers on the same validation images
    <export>/sensitivity.json        per-layer INT8 sensitivity (when computed)
    <export>/sample_inputs.npy       32 real preprocessed validation images, float32 NCHW
    <export>/sample_labels.npy       their labels (int64)
    <export>/kit/                    the device kit (copy of the top-level export/ folder)
    <export>/engines/                TensorRT engines (only where TensorRT + a GPU exist)

Every ONNX artifact is run with ONNX Runtime on real validation images and compared with torch:
fp32 and fp16 must match within a tolerance (else `ParityError`, exit code 1); INT8 is scored
(top-1, agreement with fp32) and, with `max_drop`, repaired by keeping the most sensitive layers
in float until the top-1 drop is within the budget.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgedistill.errors import UserError
from edgedistill.ui import progress_bar

log = logging.getLogger(__name__)

DEFAULT_CALIB_COUNT = 512
DEFAULT_VAL_COUNT = 1000
SAMPLE_COUNT = 32


class ExportCheckFailed(Exception):
    """An artifact failed its check (parity beyond tolerance, INT8 drop budget not reachable).

    Not a UserError: the CLI exits with code 1 ("a check failed"). The export folder and its
    manifest are still written, with `status` saying what failed.
    """

    def __init__(self, message: str, export_dir: Path | None = None):
        super().__init__(message)
        self.export_dir = export_dir


class ParityError(ExportCheckFailed):
    """An fp32/fp16 ONNX file disagrees with torch beyond the tolerance."""


@dataclass
class ExportOptions:
    int8: bool = False
    fp16: bool = False
    target: str = "ort-cpu"  # ort-cpu | tensorrt
    int8_format: str = "auto"  # auto | qdq-s8s8-sym | qdq-u8s8
    calib_data: Path | None = None
    calib_count: int | None = None  # None = DEFAULT_CALIB_COUNT, capped by what exists
    calibrator: str = "auto"  # auto | minmax | entropy | percentile
    percentile: float = 99.99
    placement: str = "tuned"  # tuned | ort-default (see deploy/quantize.py)
    entropy_bins: int = 512
    max_drop: float | None = None
    # --max-drop keeps at most this share of the weighted layers in float: beyond it the file is no
    # longer an INT8 model (and the search would be chasing the drop's measurement noise).
    max_float_share: float = 0.1
    sensitivity: bool = False
    embedding: bool = False
    out: Path | None = None
    opset: int = 17
    exporter: str = "legacy"
    val_count: int | None = DEFAULT_VAL_COUNT
    tolerance: float = 1e-4  # fp32 ONNX vs torch: max |diff| / max(1, max |logit|)
    tolerance_fp16: float = 2e-2
    min_agreement: float = 99.0  # fp32 top-1 agreement with torch, percent
    min_agreement_fp16: float = 97.0
    batches: tuple[int, int, int] = (1, 8, 32)
    cache_dir: Path | None = None
    timing_budget_s: float = 0.6


@dataclass
class _State:
    artifacts: list[dict] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    int8: dict = field(default_factory=dict)
    status: str = "ok"
    problems: list[str] = field(default_factory=list)


def _validate(opts: ExportOptions) -> None:
    from edgedistill.deploy.quantize import CALIBRATORS, FORMATS, PLACEMENTS, TARGETS

    if opts.target not in TARGETS:
        raise UserError(f"--target {opts.target!r}: use one of {', '.join(TARGETS)}")
    if opts.placement not in PLACEMENTS:
        raise UserError(f"--placement {opts.placement!r}: use one of {', '.join(PLACEMENTS)}")
    if opts.calibrator not in CALIBRATORS:
        raise UserError(f"--calibrator {opts.calibrator!r}: use one of {', '.join(CALIBRATORS)}")
    if opts.int8_format not in ("auto", *FORMATS):
        raise UserError(f"--int8-format {opts.int8_format!r}: use auto or one of {', '.join(FORMATS)}")
    if opts.target == "tensorrt" and opts.int8_format == "qdq-u8s8":
        raise UserError("--target tensorrt needs symmetric signed INT8 (qdq-s8s8-sym): drop --int8-format qdq-u8s8")
    if not 0.0 < opts.max_float_share <= 1.0:
        raise UserError(f"--max-float-share must be in (0, 1], got {opts.max_float_share}")
    if opts.max_drop is not None and opts.max_drop < 0:
        raise UserError(f"--max-drop must be >= 0 (top-1 points), got {opts.max_drop}")
    if not 90.0 < opts.percentile <= 100.0:
        raise UserError(f"--percentile must be in (90, 100], got {opts.percentile}")
    if not 128 < opts.entropy_bins <= 8192:
        raise UserError(f"--entropy-bins must be in (128, 8192], got {opts.entropy_bins}")
    if opts.exporter not in ("legacy", "dynamo"):
        raise UserError(f"--exporter {opts.exporter!r}: use legacy or dynamo")
    if (opts.calib_data is not None or opts.calib_count is not None or opts.max_drop is not None) and not opts.int8:
        log.warning("calibration / --max-drop options only apply with --int8: ignored")
    b = opts.batches
    if len(b) != 3 or not 1 <= b[0] <= b[1] <= b[2]:
        raise UserError(f"TensorRT batches must satisfy 1 <= min <= opt <= max, got {tuple(b)}")
    if opts.tolerance <= 0 or opts.tolerance_fp16 <= 0:
        raise UserError("tolerances must be positive")


def _clean(out: Path) -> None:
    """Remove what an earlier export wrote here (files named in its manifest, kit/, engines/ kept)."""
    from edgedistill.deploy.manifest import MANIFEST_FILE

    manifest = out / MANIFEST_FILE
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
            for entry in old.get("files", []):
                p = out / entry["path"]
                if p.is_file() and not entry["path"].startswith("engines/"):
                    p.unlink()
        except (ValueError, KeyError, OSError):
            pass
    shutil.rmtree(out / "kit", ignore_errors=True)


def _artifact(name, file, fmt, precision, target, out: Path, **extra) -> dict:
    entry = {"name": name, "file": file, "format": fmt, "precision": precision, "target": target}
    if file and (out / file).is_file():
        entry["bytes"] = (out / file).stat().st_size
    entry.update(extra)
    return entry


def _check(name: str, metrics: dict, kind: str, tol: float, min_agree: float, ref=None, out=None) -> tuple[bool, dict]:
    """Parity of an fp32/fp16 ONNX file with torch: max relative difference within `tol`, and
    top-1 agreement >= `min_agree` among the images whose fp32 decision is not a near-tie
    (top-1 minus top-2 logit larger than twice the measured difference, itself capped by the
    tolerance: a flip there is within tolerance by definition, and barely trained models have
    many such ties)."""
    parity = {"tolerance_max_rel_diff": tol, "max_rel_diff": metrics["max_rel_diff"]}
    ok = metrics["max_rel_diff"] <= tol
    if kind == "classifier":
        parity["min_agreement"] = min_agree
        agreement = metrics["agreement"]
        if ref is not None and out is not None and ref.shape[1] > 1:
            scale = max(1.0, float(np.abs(ref).max()))
            top2 = np.sort(ref, axis=1)[:, -2:]
            margin = 2 * min(metrics["max_abs_diff"], tol * scale)
            decided = (top2[:, 1] - top2[:, 0]) > margin
            parity["near_ties_excluded"] = int((~decided).sum())
            if decided.any():
                agreement = 100.0 * float((out[decided].argmax(1) == ref[decided].argmax(1)).mean())
            parity["agreement_outside_ties"] = round(agreement, 3)
        ok = ok and agreement >= min_agree
    parity["passed"] = bool(ok)
    return ok, parity


def _fmt_parity(name: str, metrics: dict, parity: dict) -> str:
    s = (f"{name} disagrees with torch: max |diff| {metrics['max_abs_diff']:.3g} "
         f"(relative {metrics['max_rel_diff']:.3g} > tolerance {parity['tolerance_max_rel_diff']:.3g})")
    if "agreement" in metrics:
        s += (f", top-1 agreement {parity.get('agreement_outside_ties', metrics['agreement']):.2f}% outside near-ties "
              f"(needs >= {parity['min_agreement']}%)")
    return s


def export_run(run_dir: str | Path, int8: bool = False, fp16: bool = False, **kwargs) -> Path:
    """Export a run; returns the export folder. Keyword arguments: the fields of ExportOptions.

    Raises UserError for bad input and ExportCheckFailed (ParityError) when a check fails; the
    defaults finish in seconds on the demo's tiny model (512 calibration images, MinMax).
    """
    opts = ExportOptions(int8=int8, fp16=fp16, **kwargs)
    return _export(Path(run_dir), opts)


def _export(run_dir: Path, opts: ExportOptions) -> Path:
    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import runtime
    from edgedistill.deploy.manifest import ACCURACY_FILE, MANIFEST_FILE, SCHEMA, file_entries
    from edgedistill.fileio import write_json
    from edgedistill.deploy.onnx_export import (
        INPUT_NAME,
        convert_fp16,
        export_onnx,
        load_deployable,
        metadata_for,
        preprocess_spec,
        stamp_metadata,
    )
    from edgedistill.envinfo import environment
    from edgedistill.models import count_params

    _validate(opts)
    t_start = time.perf_counter()
    dep = load_deployable(run_dir, opts.embedding)
    calib_files = None
    if opts.int8:  # bad calibration input fails before any slow work
        count = opts.calib_count or DEFAULT_CALIB_COUNT
        calib_files = ddata.calibration_files(dep.cfg, opts.calib_data, count, opts.calib_count is not None)
    out = Path(opts.out) if opts.out else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    st = _State()
    kind = dep.kind

    # Validation images: the same array for every artifact.
    images, labels, val_classes, val_total = ddata.validation_set(dep.cfg, opts.val_count)
    if dep.classes is not None and list(dep.classes) != list(val_classes):
        raise UserError(f"the classifier's classes {dep.classes[:5]}... differ from the validation folder's "
                        f"{val_classes[:5]}...: re-run `edgedistill eval {run_dir}`")
    use_labels = labels if kind == "classifier" else None
    ref = ddata.torch_outputs(dep.model, images)
    torch_metrics = runtime.compare(ref, ref, use_labels, kind)
    st.artifacts.append(_artifact("torch-fp32", None, "pytorch", "fp32", "any", out,
                                  source=[str(run_dir / "student.safetensors")] +
                                  ([str(run_dir / "classifier.safetensors")] if kind == "classifier" else []),
                                  accuracy=torch_metrics))
    classes = dep.classes
    base_meta = lambda art: metadata_for(dep, art)  # noqa: E731
    failures: list[str] = []

    # fp32 ONNX
    fp32_path = out / "model.onnx"
    t0 = time.perf_counter()
    export_info = export_onnx(dep, fp32_path, opts.opset, opts.exporter)
    export_info["seconds"] = round(time.perf_counter() - t0, 2)

    def check_float(name: str, file: str, precision: str, tol: float, min_agree: float, **extra) -> None:
        """Score one float ONNX file against torch, record it, and note a parity failure."""
        path = out / file
        got = runtime.run(runtime.session(path), images)
        m = runtime.compare(ref, got, use_labels, kind)
        ok, parity = _check(file, m, kind, tol, min_agree, ref, got)
        art = _artifact(name, file, "onnx", precision, "any", out, accuracy=m, parity=parity, **extra)
        st.artifacts.append(art)
        st.paths[name] = file
        stamp_metadata(path, base_meta({k: art[k] for k in ("name", "precision", "target", "format")}))
        log.info("%s: %s", file, _summary(m))
        if not ok:
            failures.append(_fmt_parity(file, m, parity))

    check_float("onnx-fp32", "model.onnx", "fp32", opts.tolerance, opts.min_agreement, export=export_info)

    # fp16 ONNX
    if opts.fp16 and not failures:
        info = convert_fp16(fp32_path, out / "model.fp16.onnx")
        check_float("onnx-fp16", "model.fp16.onnx", "fp16", opts.tolerance_fp16, opts.min_agreement_fp16,
                    conversion=info, io_dtype="float32")

    # INT8
    if opts.int8 and not failures:
        _int8(dep, opts, out, fp32_path, images, use_labels, ref, torch_metrics, st, base_meta, calib_files)

    # Real sample inputs for torch-free benchmarks on the device.
    pick = np.sort(np.random.default_rng(0).permutation(len(images))[: min(SAMPLE_COUNT, len(images))])
    np.save(out / "sample_inputs.npy", np.ascontiguousarray(images[pick]))
    np.save(out / "sample_labels.npy", labels[pick])

    # The device kit travels with the export.
    from edgedistill.deploy.tensorrt import build_engines, kit_source, plan

    shutil.copytree(kit_source(), out / "kit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)

    # TensorRT: engines where possible; otherwise the reason and the commands for the device.
    chw = (3, dep.img_size, dep.img_size)
    if opts.target == "tensorrt" and not failures:
        trt = build_engines(out, plan(out, st.paths, INPUT_NAME, chw, opts.batches), opts.batches)
    else:
        trt = {"built": False, "reason": "not requested (--target tensorrt builds engines where TensorRT and a GPU exist)",
               "commands": plan(out, st.paths, INPUT_NAME, chw, opts.batches)}

    if failures:
        st.status = "parity_failed"
    st.problems.extend(failures)
    accuracy = {
        "validation": {"folder": str(_val_root(dep)), "images": int(len(images)), "total": int(val_total),
                       "seed": 0, "note": "every artifact scored on the same images"},
        "artifacts": {a["name"]: a.get("accuracy") for a in st.artifacts},
    }
    write_json(out / ACCURACY_FILE, accuracy)
    manifest = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edgedistill_version": __import__("edgedistill").__version__,
        "source_run": str(run_dir.resolve()),
        "arch": dep.cfg.student.arch,
        "kind": kind,
        "target": opts.target,
        "params": count_params(dep.model),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, dep.img_size, dep.img_size], **preprocess_spec(dep)},
        "output": {"name": dep.output_name, "shape": ["batch", int(ref.shape[1])],
                   "meaning": "class logits (argmax = prediction)" if kind == "classifier" else "pooled student features"},
        "classes": classes,
        "validation": accuracy["validation"],
        "artifacts": st.artifacts,
        "int8": st.int8 or None,
        "tensorrt": trt,
        "samples": {"inputs": "sample_inputs.npy", "labels": "sample_labels.npy", "count": int(len(pick))},
        "status": st.status,
        "problems": st.problems,
        "seconds": round(time.perf_counter() - t_start, 2),
        "environment": environment(),
    }
    manifest["files"] = file_entries(out)
    write_json(out / MANIFEST_FILE, manifest)
    log.info("export folder %s written in %.1f s (status %s)", out, manifest["seconds"], st.status)
    if failures:
        raise ParityError("; ".join(failures) + f" (see {out / MANIFEST_FILE})", out)
    if st.status != "ok":
        raise ExportCheckFailed("; ".join(st.problems) + f" (see {out / MANIFEST_FILE})", out)
    return out


def _val_root(dep) -> Path | str:
    from edgedistill.data import resolve

    spec = dep.cfg.data.val or dep.cfg.data.train
    return resolve(spec, "val", dep.cfg.data.img_size) if spec.startswith("embedded:") else Path(spec)


def _summary(m: dict) -> str:
    parts = []
    if "top1" in m:
        parts.append(f"top-1 {m['top1']:.2f}%")
    if "agreement" in m:
        parts.append(f"agreement {m['agreement']:.2f}%")
    if "mean_cosine" in m:
        parts.append(f"cosine {m['mean_cosine']:.4f}")
    parts.append(f"max |diff| {m['max_abs_diff']:.3g}")
    return ", ".join(parts)


def _drop(torch_metrics: dict, m: dict, kind: str) -> float:
    """Top-1 points lost against torch fp32 (classifier); 100 * (1 - mean cosine) for embeddings."""
    if kind == "classifier":
        return round(torch_metrics["top1"] - m["top1"], 3)
    return round(100.0 * (1.0 - m["mean_cosine"]), 3)


def _int8(dep, opts: ExportOptions, out: Path, fp32_path: Path, images, labels, ref, torch_metrics, st: _State, base_meta,
          calib_files: tuple[list[str], str]) -> None:
    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import quantize as q
    from edgedistill.deploy import runtime
    from edgedistill.deploy.onnx_export import INPUT_NAME, preprocess_spec, stamp_metadata
    from edgedistill.evaluate import classifier_noise_check
    from edgedistill.fileio import write_json

    kind = dep.kind
    files, source = calib_files
    calib_files_used, holdout = q.split_holdout(files)
    work = Path(tempfile.mkdtemp(prefix="edgedistill-int8-"))
    try:
        pre = work / "model.pre.onnx"
        prepared = q.prepare(fp32_path, pre, opts.placement)
        plan = q.make_plan(opts.target, pre, opts.placement)
        cache_dir = opts.cache_dir or q.default_cache_dir()
        fingerprint = ddata.file_list_fingerprint(calib_files_used)

        def make_calibration(settings: q.QuantSettings) -> q.Calibration:
            return q.Calibration(pre, calib_files_used, fingerprint, settings, preprocess_spec(dep), cache_dir,
                                 lambda: ddata.make_reader(calib_files_used, dep.cfg, INPUT_NAME, settings.calib_batch))

        # Held-out calibration images: what calibrators and layers are scored on (never the
        # validation images the report uses).
        scorer = None
        if holdout:
            held = ddata.load_images(holdout, dep.cfg)
            scorer = q.Scorer(held, ddata.torch_outputs(dep.model, held), kind)
        symmetric = opts.target == "tensorrt" or opts.int8_format == "qdq-s8s8-sym"
        if opts.calibrator == "auto":
            if scorer is None:
                raise UserError(f"--calibrator auto needs at least 4 calibration images (got {len(files)}): "
                                "raise --calib-count or pick a calibrator")
            candidates = q.auto_candidates(symmetric)
        else:
            candidates = [q.QuantSettings(opts.calibrator, percentile=opts.percentile, entropy_bins=opts.entropy_bins,
                                          symmetric=symmetric)]

        if opts.target == "tensorrt":
            fmt = "qdq-s8s8-sym"
            choice = {"chosen": fmt, "measured": False,
                      "reason": "TensorRT explicit quantization needs symmetric signed int8 Q/DQ (zero point 0)"}
        elif opts.int8_format != "auto":
            fmt = opts.int8_format
            choice = {"chosen": fmt, "measured": False, "reason": "chosen by the user (--int8-format)"}
        else:  # the ranges do not change the speed: time the formats with the cheapest candidate's
            fmt, choice = q.choose_cpu_format(pre, fp32_path, make_calibration(candidates[-1]), plan, images[:1], work,
                                              budget_s=opts.timing_budget_s)
            log.info("INT8 format for ort-cpu: %s", choice["reason"])

        calibrator_scores = None
        if len(candidates) > 1:
            calib, calibrator_scores = q.choose_calibrator(pre, fmt, plan, make_calibration, candidates, scorer, work)
            log.info("--calibrator auto chose %s (lowest output divergence on %d held-out calibration images)",
                     calib.settings.label, len(holdout))
        else:
            calib = make_calibration(candidates[0])
            calib.ensure(pre)
        calib_info = {**calib.describe(), "source": source, "held_out_images": len(holdout),
                      "seconds": round(calib.seconds, 2), "auto_scores": calibrator_scores}
        # Keep a copy of the ranges with the export (what the INT8 file was calibrated with).
        shutil.copyfile(calib.path, out / "calibration.json")

        name, file = f"onnx-int8-{q.short_name(fmt)}", f"model.int8.{q.short_name(fmt)}.onnx"
        dst = out / file

        def evaluate(excluded: list[str]) -> tuple[dict, float]:
            q.quantize(pre, dst, fmt, calib, plan, excluded)
            m = runtime.compare(ref, runtime.run(runtime.session(dst), images), labels, kind)
            return m, _drop(torch_metrics, m, kind)

        metrics, drop = evaluate([])
        log.info("%s (%s, %s): %s, drop %.2f points", file, fmt, calib.settings.label, _summary(metrics), drop)
        excluded: list[str] = []
        fallback = None
        sensitivity = None
        if scorer is not None and (opts.sensitivity or (opts.max_drop is not None and drop > opts.max_drop)):
            layers = q.weighted_nodes(pre)
            with progress_bar(len(layers), "INT8 sensitivity", show_loss=False) as bar:
                sensitivity = q.layer_sensitivity(pre, fmt, calib, plan, scorer, work, lambda: bar.advance(1))
            write_json(out / "sensitivity.json", sensitivity)
        if opts.max_drop is not None:
            # The all-INT8 model before any layer goes back to float, for the record.
            fallback = {"max_drop": opts.max_drop, "initial_drop": drop, "reached": drop <= opts.max_drop,
                        "kept_in_float": [], "trials": [],
                        "initial": {"accuracy": metrics, "bytes": dst.stat().st_size,
                                    "int8_layers": q.int8_share(pre, dst)}}
            if drop > opts.max_drop:
                ranked = [r["node"] for r in (sensitivity or {}).get("layers", [])]
                cap = max(1, math.floor(opts.max_float_share * len(ranked)))
                excluded, metrics, drop, trials, reached = q.fallback(ranked, evaluate, opts.max_drop, cap)
                if not reached and drop >= fallback["initial_drop"]:  # nothing beat the all-INT8 model: keep it
                    excluded, drop = [], fallback["initial_drop"]
                fallback.update({"reached": reached, "kept_in_float": excluded, "trials": trials, "final_drop": drop,
                                 "max_float_layers": cap})
                if reached:
                    log.info("--max-drop %.2f: kept %d weighted layer(s) in float (%s%s): drop %.2f points",
                             opts.max_drop, len(excluded), ", ".join(excluded[:3]), ", ..." if len(excluded) > 3 else "",
                             drop)
                else:
                    msg = (f"INT8 top-1 drop {fallback['initial_drop']:.2f} points cannot be brought within --max-drop "
                           f"{opts.max_drop:.2f} with at most {cap} layers in float (--max-float-share "
                           f"{opts.max_float_share:g}): best {drop:.2f} with {len(excluded)}; quantization-aware "
                           "fine-tuning, a larger budget or a larger --max-float-share are the remedies")
                    log.warning(msg)
                    st.status = "max_drop_not_reached"
                    st.problems.append(msg)
                # The last trial written may not be the one kept: write the kept one again.
                metrics, drop = evaluate(excluded)

        share = q.int8_share(pre, dst)
        size_ratio = round((out / "model.onnx").stat().st_size / dst.stat().st_size, 3)
        log.info("%s: %d of %d weighted layers in INT8, file %.2fx smaller than fp32", file, share["int8"],
                 share["weighted_layers"], size_ratio)
        quant = {**q.describe_format(fmt), "calibration": calib_info, "placement": plan.describe(),
                 "prepare": prepared, "nodes_kept_in_float": excluded, "int8_layers": share,
                 "size_ratio_vs_fp32": size_ratio, "ort_version": __import__("onnxruntime").__version__}
        art = _artifact(name, file, "onnx-qdq", "int8", opts.target, out, accuracy={**metrics, "drop_vs_fp32": drop},
                        quantization=quant)
        st.artifacts.append(art)
        st.paths[name] = file
        stamp_metadata(dst, base_meta({"name": name, "precision": "int8", "target": opts.target, "format": fmt,
                                       "calibrator": calib.settings.label, "kept_in_float": excluded}))
        st.int8 = {"target": opts.target, "format": fmt, "format_choice": choice, "calibration": calib_info,
                   "placement": plan.describe(), "int8_layers": share, "size_ratio_vs_fp32": size_ratio,
                   "classifier_check": classifier_noise_check(dep.model, scorer.images) if kind == "classifier" and scorer else None,
                   "max_drop": fallback, "sensitivity_file": "sensitivity.json" if sensitivity is not None else None}
        check = st.int8["classifier_check"]
        if check and check["fragile"]:
            log.warning("the classifier is fragile under INT8 noise: %s", check["advice"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
