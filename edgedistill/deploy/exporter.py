"""`export_run`: one run folder -> one export folder of checked artifacts.

    <export>/model.onnx              fp32, dynamic batch (always)
    <export>/model.fp16.onnx         fp16 weights/activations, fp32 I/O (fp16=True)
    <export>/model.int8.<fmt>.onnx   INT8 QDQ (int8=True): s8s8 (TensorRT) or the CPU's fastest
    <export>/manifest.json           schema edgedistill.export/1 (see manifest.py)
    <export>/accuracy.json           every artifact's numbers on the same validation images
    <export>/sensitivity.json        per-layer INT8 sensitivity (when computed)
    <export>/sample_inputs.npy       32 real preprocessed validation images, float32 NCHW
    <export>/sample_labels.npy       their labels (int64)
    <export>/sample_reference.npy    the torch fp32 outputs on them (`kit/edgekit.py check` compares)
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
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgedistill.runfolder import CLASSIFIER_FILE, STUDENT_FILE
from edgedistill.deploy.manifest import MANIFEST_FILE, TORCH_ARTIFACT, recommendation_text
from edgedistill.deploy.quantize import DEFAULT_OPSET
from edgedistill.errors import UserError
from edgedistill.ui import progress_bar

log = logging.getLogger(__name__)

DEFAULT_CALIB_COUNT = 512
DEFAULT_VAL_COUNT = 1000
DEFAULT_QAD_STEPS = 300
# --placement auto keeps the fastest placement whose held-out output divergence is at most this
# many times the best one's (measured noise between calibrations is about 10-20%).
PLACEMENT_SLACK = 1.25
# --latency-fallback: a block counts as faster in float beyond this ratio (the timing's noise)
LATENCY_GAIN = 1.03
# The accuracy budget (top-1 points) of the recommendation when --max-drop is not given.
RECOMMEND_MAX_DROP = 1.0
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
    cpu: str = "auto"  # the CPU class the INT8 file is built for: auto (this machine) | quantize.CPU_CLASSES
    int8_format: str = "auto"  # auto | qdq-s8s8-sym | qdq-u8s8
    calib_data: Path | None = None
    calib_count: int | None = None  # None = DEFAULT_CALIB_COUNT, capped by what exists
    calibrator: str = "auto"  # auto | minmax | entropy | percentile
    percentile: float = 99.99
    placement: str = "auto"  # auto | tuned | split-hardswish | ort-default (see deploy/quantize.py)
    # Quantize the classifier's head too (quantize.classifier_nodes, with what the pooling reads on
    # ort-cpu). Off by default: the features have a few large channels, so one per-tensor 8-bit
    # scale over them is coarse for all the others (docs/int8.md: the demo's classifier lost 3-6
    # points from the pooled features' scale alone, 2.8 from the pooling input's); their
    # activations stay float.
    int8_classifier: bool = False
    # Quantize the stem too (the layer that reads the image). Off by default: its weights are a
    # negligible share of the file (432 of MobileNetV3-Small's 1.5M), its 3-channel INT8 kernel is
    # slower than fp32 on CPUs (docs/int8.md, the per-node profile), and it is among the layers
    # whose quantization costs the network most (the demo's sensitivity ranking).
    int8_stem: bool = False
    entropy_bins: int = 512
    max_drop: float | None = None
    # --max-drop keeps at most this share of the weighted layers in float: beyond it the file is no
    # longer an INT8 model (and the search would be chasing the drop's measurement noise).
    max_float_share: float = 0.1
    sensitivity: bool = False
    # Time the INT8 file with each block's layers in float beside the all-INT8 one on this CPU and
    # keep in float the blocks whose INT8 kernels are slower, when that costs no accuracy
    # (`_latency_fallback`; ort-cpu, on a machine of the --cpu class).
    latency_fallback: bool = False
    # Quantization-aware distillation (deploy/qad.py): None = only when --max-drop is missed by PTQ
    # and by the float fallback (then DEFAULT_QAD_STEPS), 0 = never, N = always N steps, right
    # after PTQ.
    qad_steps: int | None = None
    qad_lr: float = 1e-3
    qad_batch: int = 64
    qad_learn_scales: bool = True
    qad_images: str = "clean"  # deploy/qad.py ImageSource
    embedding: bool = False
    out: Path | None = None
    opset: int = DEFAULT_OPSET
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
    recommendation: dict | None = None
    status: str = "ok"
    problems: list[str] = field(default_factory=list)


def _validate(opts: ExportOptions) -> None:
    from edgedistill.deploy.quantize import CALIBRATORS, EXPORTERS, FORMATS, PLACEMENTS, TARGETS

    if opts.target not in TARGETS:
        raise UserError(f"--target {opts.target!r}: use one of {', '.join(TARGETS)}")
    from edgedistill.deploy.quantize import resolve_cpu_class

    resolve_cpu_class(opts.cpu)
    if opts.placement not in PLACEMENTS:
        raise UserError(f"--placement {opts.placement!r}: use one of {', '.join(PLACEMENTS)}")
    if opts.target == "tensorrt" and opts.placement == "split-hardswish":
        raise UserError("--placement split-hardswish is for ONNX Runtime's CPU kernels: use auto or tuned with --target tensorrt")
    if opts.calibrator not in CALIBRATORS:
        raise UserError(f"--calibrator {opts.calibrator!r}: use one of {', '.join(CALIBRATORS)}")
    if opts.int8_format not in ("auto", *FORMATS):
        raise UserError(f"--int8-format {opts.int8_format!r}: use auto or one of {', '.join(FORMATS)}")
    if opts.target == "tensorrt" and opts.int8_format == "qdq-u8s8":
        raise UserError("--target tensorrt needs symmetric signed INT8 (qdq-s8s8-sym): drop --int8-format qdq-u8s8")
    if not 0.0 < opts.max_float_share <= 1.0:
        raise UserError(f"--max-float-share must be in (0, 1], got {opts.max_float_share}")
    if opts.qad_steps is not None and opts.qad_steps < 0:
        raise UserError(f"--qad-steps must be >= 0, got {opts.qad_steps}")
    from edgedistill.deploy.qad import IMAGE_SOURCES

    if opts.qad_images not in IMAGE_SOURCES:
        raise UserError(f"qad_images {opts.qad_images!r}: use one of {', '.join(IMAGE_SOURCES)}")
    if not 0 < opts.qad_lr < 1 or opts.qad_batch < 1:
        raise UserError(f"--qad-lr must be in (0, 1) and --qad-batch >= 1, got {opts.qad_lr} and {opts.qad_batch}")
    if opts.max_drop is not None and opts.max_drop < 0:
        raise UserError(f"--max-drop must be >= 0 (top-1 points), got {opts.max_drop}")
    if not 90.0 < opts.percentile <= 100.0:
        raise UserError(f"--percentile must be in (90, 100], got {opts.percentile}")
    if not 128 < opts.entropy_bins <= 8192:
        raise UserError(f"--entropy-bins must be in (128, 8192], got {opts.entropy_bins}")
    if opts.exporter not in EXPORTERS:
        raise UserError(f"--exporter {opts.exporter!r}: use one of {', '.join(EXPORTERS)}")
    if (opts.calib_data is not None or opts.calib_count is not None or opts.max_drop is not None) and not opts.int8:
        log.warning("calibration / --max-drop options only apply with --int8: ignored")
    b = opts.batches
    if len(b) != 3 or not 1 <= b[0] <= b[1] <= b[2]:
        raise UserError(f"TensorRT batches must satisfy 1 <= min <= opt <= max, got {tuple(b)}")
    if opts.tolerance <= 0 or opts.tolerance_fp16 <= 0:
        raise UserError("tolerances must be positive")
    if opts.val_count is not None and opts.val_count < 1:
        raise UserError(f"--val-count must be at least 1, got {opts.val_count}: every artifact is scored on one "
                        f"in-memory array of that many validation images (default {DEFAULT_VAL_COUNT})")


def _clean(out: Path) -> None:
    """Remove what an earlier export wrote here (files named in its manifest, kit/, engines/ kept).

    A manifest is input like any other: a path in it that leaves `out` (absolute, `..`, or a
    symlink out of the folder) is refused, and a manifest that cannot be read is an error, so a
    tampered or foreign manifest never deletes files elsewhere."""
    manifest = out / MANIFEST_FILE
    if not manifest.is_file():
        shutil.rmtree(out / "kit", ignore_errors=True)
        return
    fix = f"delete {manifest} (or pass another --out) and export again"
    try:
        old = json.loads(manifest.read_text())
        entries = [e["path"] for e in old.get("files", [])]
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise UserError(f"cannot read the earlier export's manifest {manifest} ({type(e).__name__}: {e}): {fix}") from None
    root = out.resolve()
    doomed = []
    for rel in entries:
        if not isinstance(rel, str) or not rel:
            raise UserError(f"{manifest} lists a file path {rel!r} that is not a relative path: {fix}")
        p = out / rel
        if Path(rel).is_absolute() or not p.resolve().is_relative_to(root):
            raise UserError(f"{manifest} lists {rel!r}, which is outside {out}: refusing to delete it; {fix}")
        if p.is_file() and not rel.startswith("engines/"):
            doomed.append(p)
    for p in doomed:
        p.unlink()
    shutil.rmtree(out / "kit", ignore_errors=True)


def _artifact(name, file, fmt, precision, target, out: Path, **extra) -> dict:
    entry = {"name": name, "file": file, "format": fmt, "precision": precision, "target": target}
    if file and (out / file).is_file():
        entry["bytes"] = (out / file).stat().st_size
    entry.update(extra)
    return entry


def _check(metrics: dict, kind: str, tol: float, min_agree: float, ref=None, out=None) -> tuple[bool, dict]:
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

    Raises UserError for bad input and ExportCheckFailed (ParityError) when a check fails. The
    defaults (512 calibration images, `calibrator="auto"`: Percentile / Entropy / MinMax tried and
    the one closest to fp32 on held-out calibration images kept) take seconds to a minute on the
    demo's tiny model.
    """
    opts = ExportOptions(int8=int8, fp16=fp16, **kwargs)
    return _export(Path(run_dir), opts)


@dataclass
class _Export:
    """What every artifact function reads (the run, the options, the validation images and the
    torch reference) and writes (its artifact record, the state)."""

    dep: object
    opts: ExportOptions
    out: Path
    images: np.ndarray
    labels: np.ndarray | None  # validation labels when the model is a classifier
    ref: np.ndarray  # torch fp32 outputs on `images`
    torch_metrics: dict
    calib_files: tuple[list[str], str] | None
    st: _State = field(default_factory=_State)
    failures: list[str] = field(default_factory=list)  # parity failures: later artifacts are skipped

    @property
    def kind(self) -> str:
        return self.dep.kind

    def stamp(self, path: Path, artifact: dict) -> None:
        from edgedistill.deploy.onnx_export import metadata_for, stamp_metadata

        stamp_metadata(path, metadata_for(self.dep, artifact))

    def check_float(self, name: str, file: str, precision: str, tol: float, min_agree: float, **extra) -> dict:
        """Score one float ONNX file against torch, stamp it, and note a parity failure."""
        from edgedistill.deploy import runtime

        got = runtime.run(runtime.session(self.out / file), self.images)
        m = runtime.compare(self.ref, got, self.labels, self.kind)
        ok, parity = _check(m, self.kind, tol, min_agree, self.ref, got)
        art = _artifact(name, file, "onnx", precision, "any", self.out, accuracy=m, parity=parity, **extra)
        self.stamp(self.out / file, {k: art[k] for k in ("name", "precision", "target", "format")})
        log.info("%s: %s", file, _summary(m))
        if not ok:
            self.failures.append(_fmt_parity(file, m, parity))
        return art


@dataclass(frozen=True)
class ArtifactFormat:
    """One row of the export table: an artifact, when it is made, and the function that makes it
    (writes its file into the export folder and returns its record for the manifest, or None)."""

    name: str
    file: str
    wanted: Callable[[ExportOptions], bool]
    build: Callable[[_Export], dict | None]


def export_formats() -> list[ArtifactFormat]:
    """Every artifact `edgedistill export` can write, in the order they are made (each later one
    is made only when the float ones passed their parity checks)."""
    return [
        ArtifactFormat("onnx-fp32", "model.onnx", lambda o: True, export_fp32),
        ArtifactFormat("onnx-fp16", "model.fp16.onnx", lambda o: o.fp16, export_fp16),
        ArtifactFormat("onnx-int8", "model.int8.<format>.onnx", lambda o: o.int8, export_int8),
    ]


def export_fp32(ctx: _Export) -> dict:
    from edgedistill.deploy.onnx_export import export_onnx

    t0 = time.perf_counter()
    info = export_onnx(ctx.dep, ctx.out / "model.onnx", ctx.opts.opset, ctx.opts.exporter)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return ctx.check_float("onnx-fp32", "model.onnx", "fp32", ctx.opts.tolerance, ctx.opts.min_agreement, export=info)


def export_fp16(ctx: _Export) -> dict:
    from edgedistill.deploy.onnx_export import convert_fp16

    info = convert_fp16(ctx.out / "model.onnx", ctx.out / "model.fp16.onnx")
    return ctx.check_float("onnx-fp16", "model.fp16.onnx", "fp16", ctx.opts.tolerance_fp16, ctx.opts.min_agreement_fp16,
                           conversion=info, io_dtype="float32")


def _make(fmt: ArtifactFormat, ctx: _Export) -> None:
    """The common wrapper: make one artifact, time and log it, record it in the state."""
    t0 = time.perf_counter()
    art = fmt.build(ctx)
    if art is None:
        return
    art["seconds"] = round(time.perf_counter() - t0, 2)
    ctx.st.artifacts.append(art)
    ctx.st.paths[art["name"]] = art["file"]
    log.debug("%s made in %.1f s", art["file"], art["seconds"])


def _export(run_dir: Path, opts: ExportOptions) -> Path:
    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import runtime
    from edgedistill.deploy.onnx_export import load_deployable

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

    # Validation images: the same array for every artifact.
    images, labels, val_classes, val_total = ddata.validation_set(dep.cfg, opts.val_count)
    if dep.classes is not None and list(dep.classes) != list(val_classes):
        raise UserError(f"the classifier's classes {dep.classes[:5]}... differ from the validation folder's "
                        f"{val_classes[:5]}...: re-run `edgedistill eval {run_dir}`")
    use_labels = labels if dep.kind == "classifier" else None
    ref = ddata.torch_outputs(dep.model, images)
    ctx = _Export(dep, opts, out, images, use_labels, ref, runtime.compare(ref, ref, use_labels, dep.kind), calib_files)
    ctx.st.artifacts.append(_artifact(TORCH_ARTIFACT, None, "pytorch", "fp32", "any", out,
                                      source=[str(run_dir / STUDENT_FILE)] +
                                      ([str(run_dir / CLASSIFIER_FILE)] if dep.kind == "classifier" else []),
                                      accuracy=ctx.torch_metrics))
    for fmt in export_formats():
        if fmt.wanted(opts) and not ctx.failures:
            _make(fmt, ctx)

    # Real sample inputs for torch-free benchmarks on the device.
    pick = np.sort(np.random.default_rng(0).permutation(len(images))[: min(SAMPLE_COUNT, len(images))])
    from edgedistill.deploy.manifest import write_samples

    samples = write_samples(out, np.ascontiguousarray(images[pick]), labels[pick], np.ascontiguousarray(ref[pick]))
    _on_samples(ctx, pick)
    trt = _kit_and_engines(ctx)
    if ctx.failures:
        ctx.st.status = "parity_failed"
    ctx.st.problems.extend(ctx.failures)
    _write_manifest(ctx, run_dir, val_total, samples, trt, time.perf_counter() - t_start)
    if ctx.failures:
        raise ParityError("; ".join(ctx.failures) + f" (see {out / MANIFEST_FILE})", out)
    if ctx.st.status != "ok":
        raise ExportCheckFailed("; ".join(ctx.st.problems) + f" (see {out / MANIFEST_FILE})", out)
    return out


def _on_samples(ctx: _Export, pick: np.ndarray) -> None:
    """Each artifact's own numbers on the sample inputs against their fp32 reference outputs,
    computed as its target computes it: what `kit/edgekit.py check` holds the device to."""
    from edgedistill.deploy import runtime
    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")
    exact = bool((ctx.st.int8.get("scored_with") or {}).get("exact"))
    for art in ctx.st.artifacts:
        if art.get("file"):
            sess = runtime.session(ctx.out / art["file"], exact=exact and art["precision"] == "int8")
            art["on_samples"] = kit.sample_agreement(ctx.ref[pick], runtime.run(sess, ctx.images[pick]), ctx.kind)


def _kit_and_engines(ctx: _Export) -> dict:
    """The device kit travels with the export; TensorRT engines where possible, otherwise the
    reason and the commands for the device."""
    from edgedistill.deploy.onnx_export import INPUT_NAME
    from edgedistill.deploy.tensorrt import build_engines, kit_source, plan

    shutil.copytree(kit_source(), ctx.out / "kit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True)
    chw = (3, ctx.dep.img_size, ctx.dep.img_size)
    jobs = plan(ctx.st.paths, INPUT_NAME, chw, ctx.opts.batches)
    if ctx.opts.target == "tensorrt" and not ctx.failures:
        return build_engines(ctx.out, jobs, ctx.opts.batches)
    return {"built": False, "reason": "not requested (--target tensorrt builds engines where TensorRT and a GPU exist)",
            "commands": jobs}


def _write_manifest(ctx: _Export, run_dir: Path, val_total: int, samples: dict, trt: dict, seconds: float) -> None:
    """accuracy.json and manifest.json (schema edgedistill.export/1), built in one place."""
    from edgedistill.deploy.manifest import ACCURACY_FILE, SCHEMA, file_entries
    from edgedistill.deploy.onnx_export import INPUT_NAME, preprocess_spec
    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json
    from edgedistill.models import count_params

    dep, out, st = ctx.dep, ctx.out, ctx.st
    accuracy = {
        "validation": {"folder": str(_val_root(dep)), "images": len(ctx.images), "total": int(val_total),
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
        "kind": dep.kind,
        "target": ctx.opts.target,
        "params": count_params(dep.model),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, dep.img_size, dep.img_size], **preprocess_spec(dep)},
        "output": {"name": dep.output_name, "shape": ["batch", int(ctx.ref.shape[1])],
                   "meaning": "class logits (argmax = prediction)" if dep.kind == "classifier" else "pooled student features"},
        "classes": dep.classes,
        "validation": accuracy["validation"],
        "artifacts": st.artifacts,
        "int8": st.int8 or None,
        "recommendation": st.recommendation,
        "tensorrt": trt,
        "samples": samples,
        "status": st.status,
        "problems": st.problems,
        "seconds": round(seconds, 2),
        "environment": environment(),
    }
    manifest["files"] = file_entries(out)
    write_json(out / MANIFEST_FILE, manifest)
    log.info("export folder %s written in %.1f s (status %s)", out, manifest["seconds"], st.status)


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


@dataclass
class _Int8Setup:
    """The INT8 model's ingredients: prepared graph, placement, format, calibration, scorer."""

    placement: str
    pre: Path
    prepared: dict
    plan: object  # quantize.QuantPlan
    fmt: str
    format_choice: dict
    calib: object  # quantize.Calibration
    calib_info: dict
    scorer: object | None  # quantize.Scorer on the held-out calibration images
    arithmetic: dict  # quantize.scoring_arithmetic: how this machine computes the file as the target will


def _holdout_scorer(ctx: _Export, exact: bool):
    """The held-out calibration images (never the validation set) and a scorer of INT8 files on
    them against fp32, computed the target's way (`exact`); None below 4 calibration images."""
    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import quantize as q

    _, holdout = q.split_holdout(ctx.calib_files[0])
    if not holdout:
        return None
    held = ddata.load_images(holdout, ctx.dep.cfg)
    return q.Scorer(held, ddata.torch_outputs(ctx.dep.model, held), ctx.kind, exact)


def _int8_setup(ctx: _Export, work: Path, placement: str, scorer, arithmetic: dict,
                format_choice: tuple[str, dict] | None = None, chosen: _Int8Setup | None = None) -> _Int8Setup:
    """Prepare the graph for `placement`, choose the format (timed on this CPU for ort-cpu + auto,
    unless `format_choice` is given) and the calibrator (scored by `scorer`, unless `chosen`, the
    setup of another placement of the same model, already chose one: its ranges are recomputed
    for this graph, the choice is not)."""
    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import quantize as q
    from edgedistill.deploy.onnx_export import INPUT_NAME, preprocess_spec

    dep, opts = ctx.dep, ctx.opts
    files, source = ctx.calib_files
    calib_files_used, holdout = q.split_holdout(files)
    pre = work / f"model.pre.{placement}.onnx"
    prepared = q.prepare(ctx.out / "model.onnx", pre, placement)
    plan = q.make_plan(opts.target, pre, placement, opts.cpu,
                       float_classifier=ctx.kind == "classifier" and not opts.int8_classifier,
                       float_stem=not opts.int8_stem)
    cache_dir = opts.cache_dir or q.default_cache_dir()
    fingerprint = ddata.file_list_fingerprint(calib_files_used)

    def make_calibration(settings: q.QuantSettings) -> q.Calibration:
        return q.Calibration(pre, calib_files_used, fingerprint, settings, preprocess_spec(dep), cache_dir,
                             lambda: ddata.make_reader(calib_files_used, dep.cfg, INPUT_NAME, settings.calib_batch))

    symmetric = opts.target == "tensorrt" or opts.int8_format == "qdq-s8s8-sym"
    if chosen is not None:
        candidates = [chosen.calib.settings]
    elif opts.calibrator == "auto":
        if scorer is None:
            raise UserError(f"--calibrator auto needs at least 4 calibration images (got {len(files)}): "
                            "raise --calib-count or pick a calibrator")
        candidates = q.auto_candidates(symmetric)
    else:
        candidates = [q.QuantSettings(opts.calibrator, percentile=opts.percentile, entropy_bins=opts.entropy_bins,
                                      symmetric=symmetric)]

    if format_choice is not None:
        fmt, choice = format_choice
    elif opts.target == "tensorrt":
        fmt = "qdq-s8s8-sym"
        choice = {"chosen": fmt, "measured": False,
                  "reason": "TensorRT explicit quantization needs symmetric signed int8 Q/DQ (zero point 0)"}
    elif opts.int8_format != "auto":
        fmt = opts.int8_format
        choice = {"chosen": fmt, "measured": False, "reason": "chosen by the user (--int8-format)"}
    elif plan.cpu_class != arithmetic["this_machine"]:  # another class's kernels cannot be timed here
        fmt = q.CLASS_FORMAT[plan.cpu_class]
        choice = {"chosen": fmt, "measured": False,
                  "reason": f"the format for {plan.cpu_class} (not timed: {arithmetic['why']})"}
        log.info("INT8 format for %s: %s", plan.cpu_class, choice["reason"])
    else:  # the ranges do not change the speed: time the formats with the cheapest candidate's
        fmt, choice = q.choose_cpu_format(pre, ctx.out / "model.onnx", make_calibration(candidates[-1]), plan,
                                          ctx.images[:1], work, budget_s=opts.timing_budget_s)
        log.info("INT8 format for ort-cpu: %s", choice["reason"])

    scores = None
    if len(candidates) > 1:
        calib, scores = q.choose_calibrator(pre, fmt, plan, make_calibration, candidates, scorer, work)
        log.info("--calibrator auto chose %s (lowest output divergence on %d held-out calibration images)",
                 calib.settings.label, len(holdout))
    else:
        calib = make_calibration(candidates[0])
        calib.ensure(pre)
    calib_info = {**calib.describe(), "source": source, "held_out_images": len(holdout),
                  "seconds": round(calib.seconds, 2), "auto_scores": scores}
    if chosen is not None and opts.calibrator == "auto":  # the scores of the placement the choice was made on
        calib_info.update(auto_scores=chosen.calib_info["auto_scores"], chosen_on=chosen.placement)
    return _Int8Setup(placement, pre, prepared, plan, fmt, choice, calib, calib_info, scorer, arithmetic)


def export_int8(ctx: _Export) -> dict:
    """PTQ, repaired by `_deliver_int8` when it misses --max-drop; the manifest says what
    delivered the file."""
    from edgedistill.deploy import quantize as q

    opts, out = ctx.opts, ctx.out
    cpu_class = q.resolve_cpu_class(opts.cpu)
    arithmetic = q.scoring_arithmetic(opts.target, cpu_class)
    log.info("INT8 for %s on %s: scored with %s (%s)", opts.target, cpu_class, arithmetic["name"], arithmetic["why"])
    work = Path(tempfile.mkdtemp(prefix="edgedistill-int8-"))
    try:
        scorer = _holdout_scorer(ctx, arithmetic["exact"])
        if opts.placement == "auto":
            setup, placement_choice = _choose_placement(ctx, work, scorer, arithmetic)
        else:
            setup = _int8_setup(ctx, work, opts.placement, scorer, arithmetic)
            placement_choice = {"chosen": opts.placement, "measured": False, "reason": "chosen by the user (--placement)"}
        # Keep a copy of the ranges with the export (what the INT8 file was calibrated with).
        shutil.copyfile(setup.calib.path, out / "calibration.json")
        name, file = f"onnx-int8-{q.short_name(setup.fmt)}", f"model.int8.{q.short_name(setup.fmt)}.onnx"
        made = _deliver_int8(ctx, setup, work, out / file)
        share = q.int8_share(setup.pre, out / file)
        size_ratio = round((out / "model.onnx").stat().st_size / (out / file).stat().st_size, 3)
        log.info("%s: %d of %d weighted layers in INT8, file %.2fx smaller than fp32 (delivered by %s)", file,
                 share["int8"], share["weighted_layers"], size_ratio, made["delivered_by"])
        record = {"placement": {"name": setup.placement, **setup.plan.describe()}, "placement_choice": placement_choice,
                  "int8_layers": share, "size_ratio_vs_fp32": size_ratio,
                  "delivered_by": made["delivered_by"], "ptq": made["ptq"], "qad": made["qad"],
                  "latency_fallback": made.get("latency_fallback")}
        quant = {**q.describe_format(setup.fmt, setup.plan.cpu_class, opts.target), "calibration": setup.calib_info, "prepare": setup.prepared,
                 "nodes_kept_in_float": made["excluded"], **record,
                 "ort_version": __import__("onnxruntime").__version__}
        ctx.stamp(out / file, {"name": name, "precision": "int8", "target": opts.target, "format": setup.fmt,
                               "calibrator": setup.calib.settings.label, "kept_in_float": made["excluded"]})
        check = (q.classifier_check(setup.scorer, out / file, None if setup.plan.float_nodes else ctx.dep.model)
                 if ctx.kind == "classifier" and setup.scorer else None)
        ctx.st.int8 = {"target": opts.target, "cpu_class": {"declared": opts.cpu, "built_for": setup.plan.cpu_class},
                       "scored_with": setup.arithmetic, "format": setup.fmt, "format_choice": setup.format_choice,
                       "calibration": setup.calib_info, **record, "classifier_check": check,
                       "max_drop": made["fallback"],
                       "sensitivity_file": "sensitivity.json" if made["sensitivity"] else None}
        ctx.st.recommendation = _recommend(ctx, setup, out / file, made["drop"], size_ratio)
        if check and check["fragile"]:
            log.warning("the INT8 classifier is fragile: %s", check["advice"])
        return _artifact(name, file, "onnx-qdq", "int8", opts.target, out,
                         accuracy={**made["metrics"], "drop_vs_fp32": made["drop"], "computed_with": setup.arithmetic["name"]},
                         quantization=quant)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _choose_placement(ctx: _Export, work: Path, scorer, arithmetic: dict) -> tuple[_Int8Setup, dict]:
    """`--placement auto`: for ort-cpu, the tuned placement and, where the model has HardSwish,
    the split-HardSwish one, each calibrated and scored on the held-out calibration images and
    timed side by side with fp32 on this CPU when it is of the declared class; the fastest whose
    output divergence is within PLACEMENT_SLACK of the best is kept (speed that costs no accuracy).
    Not timed (another class): split-HardSwish, whose int8 HardSigmoid/Mul kernels avoid the
    float round trip of a whole HardSwish on every x86 class measured (docs/int8.md)."""
    import onnx

    from edgedistill.deploy import quantize as q

    tuned = _int8_setup(ctx, work, "tuned", scorer, arithmetic)
    has_hardswish = any(n.op_type == "HardSwish" for n in onnx.load(str(tuned.pre)).graph.node)
    if ctx.opts.target != "ort-cpu" or scorer is None or not has_hardswish:
        why = ("TensorRT: Q/DQ on the weighted layers' inputs, as its explicit-quantization guide places them"
               if ctx.opts.target != "ort-cpu" else "no HardSwish to split" if not has_hardswish
               else "no held-out calibration images to score another placement")
        return tuned, {"chosen": "tuned", "measured": False, "reason": why}
    setups = {"tuned": tuned,
              "split-hardswish": _int8_setup(ctx, work, "split-hardswish", scorer, arithmetic,
                                             (tuned.fmt, tuned.format_choice), chosen=tuned)}
    files = {name: q.quantize(s.pre, work / f"placement.{name}.onnx", s.fmt, s.calib, s.plan) for name, s in setups.items()}
    divergence = {name: round(scorer(path), 6) for name, path in files.items()}
    timed = arithmetic["this_machine"] == tuned.plan.cpu_class
    latency = (q.time_side_by_side({"fp32": ctx.out / "model.onnx", **files}, ctx.images[:1], ctx.opts.timing_budget_s)
               if timed else None)
    best = min(divergence.values())
    eligible = [name for name in files if divergence[name] <= PLACEMENT_SLACK * best + 1e-6]
    chosen = min(eligible, key=latency.get) if latency else ("split-hardswish" if "split-hardswish" in eligible else "tuned")
    reason = (f"{chosen}: the fastest of the placements within {PLACEMENT_SLACK:g}x of the best held-out output "
              f"divergence ({', '.join(eligible)}); divergence {', '.join(f'{k} {v:.4g}' for k, v in divergence.items())}; "
              + (f"batch 1 on this CPU {', '.join(f'{k} {v:.3f} ms' for k, v in latency.items())}" if latency
                 else f"not timed ({arithmetic['why']})"))
    log.info("INT8 placement: %s", reason)
    return setups[chosen], {"chosen": chosen, "measured": timed, "latency_ms_batch1": latency,
                            "held_out_divergence": divergence, "reason": reason}


def _recommend(ctx: _Export, setup: _Int8Setup, int8_path: Path, drop: float, size_ratio: float) -> dict:
    """The artifact to ship for the declared device, and the runtime to run it on: where this CPU is
    of the declared class, fp32 and INT8 are timed side by side at batch 1 on every CPU runtime
    installed here (ONNX Runtime; OpenVINO, which runs the same QDQ file); `recommend_artifact` picks."""
    from edgedistill.deploy import quantize as q

    budget = ctx.opts.max_drop if ctx.opts.max_drop is not None else RECOMMEND_MAX_DROP
    timed = ctx.opts.target == "ort-cpu" and setup.arithmetic["this_machine"] == setup.plan.cpu_class
    latency = (q.time_on_runtimes({"fp32": ctx.out / "model.onnx", "int8": int8_path}, ctx.images[:1],
                                  q.cpu_runtimes(), ctx.opts.timing_budget_s) if timed else None)
    device = f"{setup.plan.cpu_class} ({ctx.opts.target})"
    pick, runtime, why = recommend_artifact(f"onnx-int8-{q.short_name(setup.fmt)}", latency, drop, budget, size_ratio)
    rec = {"artifact": pick, "runtime": runtime, "device": device, "reason": why, "latency_ms_batch1": latency,
           "max_drop": budget, "int8_drop": drop, "int8_size_ratio": size_ratio}
    log.info("%s", recommendation_text(rec))
    return rec


def recommend_artifact(int8_name: str, latency: dict[str, dict[str, float]] | None, drop: float, budget: float,
                       size_ratio: float) -> tuple[str, str | None, str]:
    """(artifact, runtime, why): the INT8 file, on the runtime where it runs fastest, when it meets
    the accuracy budget and is faster than the fastest fp32 (any runtime) in `latency`
    ({runtime: {"fp32": ms, "int8": ms}}, batch 1); fp32 on its fastest runtime otherwise, saying
    plainly what INT8 buys. `latency` None: not timed here (another device class)."""
    fastest = {name: min(latency, key=lambda rt: latency[rt][name]) for name in ("fp32", "int8")} if latency else {}
    if drop > budget:
        return "onnx-fp32", fastest.get("fp32"), f"the INT8 file loses {drop:.2f} points, beyond the {budget:g}-point budget"
    if not latency:
        return int8_name, None, (f"INT8 meets the {budget:g}-point budget (drop {drop:.2f}) and is {size_ratio:.1f}x smaller; "
                                 "its speed was not measured here (another device class): `python kit/edgekit.py bench .` "
                                 "there times every file and says which to ship on it")
    fp32_ms, int8_ms = latency[fastest["fp32"]]["fp32"], latency[fastest["int8"]]["int8"]
    speedup = fp32_ms / int8_ms
    per_runtime = "" if len(latency) == 1 else "; per runtime: " + ", ".join(
        f"{rt} INT8 {v['int8']:.3f} / fp32 {v['fp32']:.3f} ms ({v['fp32'] / v['int8']:.2f}x)" for rt, v in latency.items())
    if speedup > 1.0:
        return int8_name, fastest["int8"], (f"INT8 is {speedup:.2f}x faster than the fastest fp32 ({int8_ms:.3f} ms on "
                                            f"{fastest['int8']} vs {fp32_ms:.3f} ms on {fastest['fp32']}, batch 1), "
                                            f"{size_ratio:.1f}x smaller, drop {drop:.2f} (budget {budget:g}){per_runtime}")
    return "onnx-fp32", fastest["fp32"], (f"INT8 buys size ({size_ratio:.1f}x smaller) but not speed on this CPU: "
                                          f"{int8_ms:.3f} ms at best ({fastest['int8']}) against fp32's {fp32_ms:.3f} ms "
                                          f"({fastest['fp32']}) at batch 1 ({speedup:.2f}x); ship model.onnx for speed, the "
                                          f"INT8 file where size matters{per_runtime}")


class _Delivery:
    """The INT8 file being made by `_deliver_int8`: the float model it quantizes (the prepared
    export, or its QAD-trained weights), the activation scales QAD learnt, its current numbers and
    the manifest's record of how it got there."""

    def __init__(self, ctx: _Export, setup: _Int8Setup, work: Path, dst: Path):
        self.ctx, self.setup, self.work, self.dst = ctx, setup, work, dst
        self.source = setup.pre
        self.learnt: dict[str, dict] = {}
        self.metrics, self.drop = self.evaluate([])
        self.made = {"ptq": {"accuracy": self.metrics, "drop": self.drop, "bytes": dst.stat().st_size},
                     "delivered_by": "ptq", "qad": None, "excluded": [], "fallback": None, "sensitivity": None}

    def build(self, excluded: list[str], path: Path) -> Path:
        from edgedistill.deploy import quantize as q

        setup = self.setup
        return q.quantize(self.source, path, setup.fmt, setup.calib, setup.plan, excluded, self.learnt)

    def evaluate(self, excluded: list[str]) -> tuple[dict, float]:
        """Write `dst` with `excluded` in float and score it on the validation images."""
        from edgedistill.deploy import runtime

        self.build(excluded, self.dst)
        session = runtime.session(self.dst, exact=self.setup.arithmetic["exact"])
        metrics = runtime.compare(self.ctx.ref, runtime.run(session, self.ctx.images), self.ctx.labels, self.ctx.kind)
        return metrics, _drop(self.ctx.torch_metrics, metrics, self.ctx.kind)

    def held_out(self):
        """The scorer the fallback judges on (`quantize.FALLBACK_MIN_HELD_OUT`), None: the validation images."""
        from edgedistill.deploy import quantize as q

        scorer = self.setup.scorer
        return scorer if scorer is not None and len(scorer.images) >= q.FALLBACK_MIN_HELD_OUT else None

    def judge(self, excluded: list[str]) -> float:
        """Write `dst` with `excluded` in float; the drop it is expected to cost on the held-out
        calibration images (label-free, `Scorer.drop`), or its validation drop (`held_out`)."""
        scorer = self.held_out()
        if scorer is None:
            return self.evaluate(excluded)[1]
        self.build(excluded, self.dst)
        return scorer.drop(self.dst)

    def misses(self) -> bool:
        max_drop = self.ctx.opts.max_drop
        return max_drop is not None and self.drop > max_drop

    def qad(self) -> None:
        """Quantization-aware distillation of the all-INT8 model; kept only if it lowers the
        output divergence on the held-out calibration images (judged like the calibrators)."""
        from edgedistill.deploy import runtime

        ctx, scorer, dst = self.ctx, self.setup.scorer, self.dst
        if self.made["excluded"]:  # QAD starts from the all-INT8 PTQ file, not a fallback's
            self.metrics, self.drop = self.evaluate([])
        ptq_divergence = scorer(dst) if scorer is not None else None
        self.source, self.learnt, record = _qad(ctx, self.setup.pre, dst, self.work)
        self.metrics, self.drop = self.evaluate([])
        # The torch graph reproduces the QDQ arithmetic itself: held against the exact reference (how
        # this CPU's kernels differ from it is what the scoring above measures).
        record["parity"] = _qad_parity(record.pop("torch_outputs"), runtime.run(runtime.session(dst, exact=True), ctx.images),
                                       ctx.ref, ctx.kind)
        record["held_out_divergence"] = {"ptq": ptq_divergence, "qad": scorer(dst) if scorer is not None else None}
        log.info("%s after %d QAD steps: %s, drop %.2f points (PTQ %.2f)", dst.name, record["steps"],
                 _summary(self.metrics), self.drop, self.made["ptq"]["drop"])
        record["kept"] = ptq_divergence is None or record["held_out_divergence"]["qad"] < ptq_divergence
        # All INT8 again, whatever a fallback before it had kept in float.
        self.made.update(qad=record, excluded=[], delivered_by="qad" if record["kept"] else "ptq")
        if not record["kept"]:  # QAD made the model worse on images it did not train on: ship the PTQ model
            log.warning("QAD raised the output divergence on the held-out calibration images (%.4g -> %.4g): "
                        "keeping the PTQ model", ptq_divergence, record["held_out_divergence"]["qad"])
            self.source, self.learnt = self.setup.pre, {}
            self.metrics, self.drop = self.evaluate([])
        record["parity"]["checked"] = "the QAD file (before the choice)"
        if record["kept"] and not record["parity"]["passed"]:
            ctx.st.status = "qad_parity_failed"
            parity = record["parity"]
            ctx.st.problems.append(f"{dst.name}: ONNX Runtime's output differs from the torch fake-quant model "
                                   f"(divergence {parity['ratio']:.1%} of the INT8 model's own from fp32, allowed "
                                   f"{parity['max_ratio']:.0%}; top-1 agreement {parity.get('agreement', '-')}%)")

    def rank_layers(self) -> None:
        """The end-to-end INT8 sensitivity of every weighted layer (`sensitivity.json`)."""
        from edgedistill.deploy import quantize as q
        from edgedistill.fileio import write_json

        setup = self.setup
        layers = [n for n in q.weighted_nodes(self.source) if n not in setup.plan.float_nodes]
        with progress_bar(len(layers), "INT8 sensitivity", show_loss=False) as bar:
            self.made["sensitivity"] = q.layer_sensitivity(self.source, setup.fmt, setup.calib, setup.plan,
                                                           setup.scorer, self.work, lambda: bar.advance(1))
        write_json(self.ctx.out / "sensitivity.json", self.made["sensitivity"])

    def fall_back(self) -> bool:
        """--max-drop: the fewest of the most sensitive layers back in float that bring the drop
        within the budget (at most --max-float-share of them). True when the budget is met."""
        from edgedistill.deploy import quantize as q

        opts = self.ctx.opts
        # The all-INT8 model before any layer goes back to float, for the record.
        record = {"max_drop": opts.max_drop, "initial_drop": self.drop, "reached": not self.misses(),
                  "kept_in_float": [], "trials": [],
                  "initial": {"accuracy": self.metrics, "bytes": self.dst.stat().st_size,
                              "int8_layers": q.int8_share(self.source, self.dst)}}
        if self.made["fallback"] is not None:  # the fallback that did not reach it before QAD
            record["before_qad"] = self.made["fallback"]
        self.made["fallback"] = record
        if not self.misses():
            return True
        ranked = [r["node"] for r in (self.made["sensitivity"] or {}).get("layers", [])]
        cap = max(1, math.floor(opts.max_float_share * len(ranked)))
        excluded, _, drop, trials, reached = q.fallback(ranked, self.judge, self.evaluate, opts.max_drop, cap)
        if not reached and drop >= record["initial_drop"]:  # nothing beat the all-INT8 model: keep it
            excluded = []
        # The last trial written may not be the one kept: write the kept one again.
        self.metrics, self.drop = self.evaluate(excluded)
        scorer = self.held_out()
        record.update({"reached": reached, "kept_in_float": excluded, "trials": trials, "final_drop": self.drop,
                       "max_float_layers": cap,
                       "validation_looks": sum("drop" in t for t in trials) if scorer is not None else len(trials),
                       "judged_on": (f"{len(scorer.images)} held-out calibration images (expected drop, no labels)"
                                     if scorer is not None else f"the validation images (fewer than "
                                     f"{q.FALLBACK_MIN_HELD_OUT} held-out calibration images)")})
        if reached:
            log.info("--max-drop %.2f: kept %d weighted layer(s) in float (%s%s): drop %.2f points", opts.max_drop,
                     len(excluded), ", ".join(excluded[:3]), ", ..." if len(excluded) > 3 else "", self.drop)
        self.made["excluded"] = excluded
        if excluded:
            self.made["delivered_by"] = "fallback"
        elif self.made["qad"] is None or not self.made["qad"]["kept"]:
            self.made["delivered_by"] = "ptq"
        return reached

    def give_up(self) -> None:
        """The budget stays out of reach: the export fails its check (exit 1), the file is kept."""
        ctx, record = self.ctx, self.made["fallback"]
        qad = self.made["qad"]
        msg = (f"INT8 top-1 drop {record['initial_drop']:.2f} points{' after QAD' if qad else ''} cannot be brought "
               f"within --max-drop {ctx.opts.max_drop:.2f} with at most {record['max_float_layers']} layers in float "
               f"(--max-float-share {ctx.opts.max_float_share:g}): best {self.drop:.2f} with "
               f"{len(record['kept_in_float'])}; "
               + ("a larger budget, a larger --max-float-share or more --qad-steps are the remedies" if qad else
                  "quantization-aware distillation (--qad-steps), a larger budget or a larger --max-float-share "
                  "are the remedies"))
        log.warning(msg)
        ctx.st.status = "max_drop_not_reached"
        ctx.st.problems.append(msg)


def _deliver_int8(ctx: _Export, setup: _Int8Setup, work: Path, dst: Path) -> dict:
    """Write `dst`. PTQ; if it misses --max-drop, the float fallback (no training, the accuracy-
    aware tuning of Intel Neural Compressor); if that cannot reach it within --max-float-share,
    QAD (deploy/qad.py) and the fallback again on the QAD model. `--qad-steps N` runs QAD right
    after PTQ, `--qad-steps 0` never."""
    opts = ctx.opts
    delivery = _Delivery(ctx, setup, work, dst)
    log.info("%s (%s, %s): %s, drop %.2f points", dst.name, setup.fmt, setup.calib.settings.label,
             _summary(delivery.metrics), delivery.drop)
    if opts.qad_steps:
        delivery.qad()
    if setup.scorer is not None and (opts.sensitivity or delivery.misses()):
        delivery.rank_layers()
    if opts.max_drop is not None and not delivery.fall_back():
        if opts.qad_steps is None:
            log.info("--max-drop %.2f: not reached with %d layer(s) in float (best drop %.2f): quantization-aware "
                     "distillation of the all-INT8 model", opts.max_drop, delivery.made["fallback"]["max_float_layers"],
                     delivery.drop)
            delivery.qad()
            if setup.scorer is not None and delivery.misses():
                delivery.rank_layers()
            reached = delivery.fall_back()
        else:
            reached = False
        if not reached:
            delivery.give_up()
    made = delivery.made
    made.update(metrics=delivery.metrics, drop=delivery.drop)
    if opts.latency_fallback:
        made["latency_fallback"] = _latency_fallback(delivery)
    return made


def _latency_fallback(delivery: _Delivery) -> dict:
    """`--latency-fallback`: the delivered INT8 file against itself with one block's weighted layers
    in float (`quantize.layer_groups`), every variant timed at batch 1 in the same interleaved rounds
    on this CPU; the blocks faster in float by more than LATENCY_GAIN are kept in float together
    when the result is itself faster than the all-INT8 file and loses no more accuracy than it
    (or stays within --max-drop). Updates `made` when kept; returns the record for the manifest."""
    from edgedistill.deploy import quantize as q

    ctx, setup, work, dst, made = delivery.ctx, delivery.setup, delivery.work, delivery.dst, delivery.made
    build, evaluate, opts = delivery.build, delivery.evaluate, ctx.opts
    if opts.target != "ort-cpu" or setup.arithmetic["this_machine"] != setup.plan.cpu_class:
        why = "TensorRT builds its own kernels" if opts.target != "ort-cpu" else setup.arithmetic["why"]
        return {"measured": False, "reason": f"not timed: {why}"}
    base = list(made["excluded"])
    groups = q.layer_groups(setup.pre, skip={*setup.plan.float_nodes, *base})
    all_int8 = work / "latency.all_int8.onnx"
    shutil.copyfile(dst, all_int8)
    variants = {g: build(base + layers, work / f"latency.block{k}.onnx") for k, (g, layers) in enumerate(groups.items())}
    sample = ctx.images[:1]
    table = q.time_side_by_side({"fp32": ctx.out / "model.onnx", "int8": all_int8, **variants}, sample, opts.timing_budget_s)
    blocks = [{"block": g, "layers": len(groups[g]), "ms_with_block_float": table[g],
               "gain_vs_all_int8": round(table["int8"] / table[g], 3)} for g in groups]
    faster = [b["block"] for b in blocks if b["gain_vs_all_int8"] > LATENCY_GAIN]
    record = {"measured": True, "blocks": blocks, "latency_ms_batch1": {"fp32": table["fp32"], "int8": table["int8"]},
              "faster_in_float": faster, "kept": False}
    if not faster:
        record["reason"] = "no block is faster in float on this CPU"
        return record
    excluded = base + [n for g in faster for n in groups[g]]
    metrics, drop = evaluate(excluded)  # writes dst
    again = q.time_side_by_side({"fp32": ctx.out / "model.onnx", "int8": all_int8, "hybrid": dst}, sample, opts.timing_budget_s)
    budget = max(made["drop"], opts.max_drop if opts.max_drop is not None else made["drop"])
    record.update({"hybrid": {"latency_ms_batch1": again, "drop": drop, "bytes": dst.stat().st_size,
                              "layers_in_float": len(excluded)},
                   "kept": again["hybrid"] * LATENCY_GAIN < again["int8"] and drop <= budget + 1e-9})
    if record["kept"]:
        record["reason"] = (f"{len(faster)} of {len(groups)} blocks in float: {again['hybrid']:.3f} ms against the all-INT8 "
                            f"file's {again['int8']:.3f} (fp32 {again['fp32']:.3f}), drop {drop:.2f} (was {made['drop']:.2f})")
        made.update(excluded=excluded, metrics=metrics, drop=drop, delivered_by=made["delivered_by"] + "+latency")
    else:
        record["reason"] = (f"not kept: the blocks faster in float together give {again['hybrid']:.3f} ms against "
                            f"{again['int8']:.3f} and a drop of {drop:.2f} (budget {budget:.2f})")
        shutil.copyfile(all_int8, dst)
    log.info("--latency-fallback: %s", record["reason"])
    return record


def _qad(ctx: _Export, pre: Path, ptq_path: Path, work: Path) -> tuple[Path, dict, dict]:
    """Quantization-aware distillation of the PTQ model `ptq_path` (deploy/qad.py); returns the
    prepared float model with the trained weights, the learnt activation scales (ONNX Runtime
    TensorQuantOverrides) and the record for the manifest."""
    import onnx
    import torch

    from edgedistill.deploy import qad

    dep, opts = ctx.dep, ctx.opts
    settings = qad.QADSettings(steps=opts.qad_steps or DEFAULT_QAD_STEPS, lr=opts.qad_lr,
                               batch_size=opts.qad_batch, seed=dep.cfg.seed, learn_scales=opts.qad_learn_scales,
                               images=opts.qad_images)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graph = qad.FakeQuantGraph(onnx.load(str(ptq_path)), qad.float_initializers(pre), settings.learn_scales).to(device)
    folder, loader = qad.training_images(dep.cfg, settings, device)
    log.info("QAD: %d steps of batch %d on %s (%s loader), teacher: the fp32 model", settings.steps,
             loader.batch_size, folder.root, loader.name)
    record = qad.train(graph, dep.model.to(device), loader, dep.kind, settings, ctx.out,
                       qad.checkpoint_key(ptq_path, settings))
    graph = graph.cpu()
    dep.model.cpu()
    record.update(steps=settings.steps, images=folder.root.as_posix(), loader=loader.name,
                  torch_outputs=qad.outputs(graph, ctx.images))
    return (qad.write_trained_float(pre, graph.trained_weights(), work / "model.qad.onnx"),
            graph.activation_overrides(), record)


def _qad_parity(torch_out: np.ndarray, ort_out: np.ndarray, ref: np.ndarray, kind: str, max_ratio: float = 0.1,
                min_agreement: float = 98.0) -> dict:
    """ONNX Runtime's INT8 output against the torch fake-quant model on the validation images.

    The two run the same integer grid but sum their float convolutions in different orders, so a
    value that lands next to a rounding boundary of a QuantizeLinear can come out one int8 step
    apart, and that step travels to the output. The check therefore compares the divergence
    between them (KL of the logits, 1 - cosine for embeddings) with the INT8 model's own
    divergence from fp32, which is what QAD reduces: it passes when the first is at most
    `max_ratio` of the second (and top-1 agreement is at least `min_agreement`)."""
    from edgedistill.deploy.runtime import output_divergence

    scale = max(1.0, float(np.abs(torch_out).max()))
    per_image = np.abs(torch_out - ort_out).max(1) / scale
    res = {"divergence": output_divergence(torch_out, ort_out, kind),
           "int8_divergence_vs_fp32": output_divergence(ref, ort_out, kind), "max_ratio": max_ratio,
           "match_share": round(float((per_image <= 1e-3).mean()), 4), "max_rel_diff": float(per_image.max())}
    res["ratio"] = res["divergence"] / max(res["int8_divergence_vs_fp32"], 1e-9)
    ok = res["ratio"] <= max_ratio
    if kind == "classifier":
        res["agreement"] = round(100.0 * float((torch_out.argmax(1) == ort_out.argmax(1)).mean()), 3)
        res["min_agreement"] = min_agreement
        ok = ok and res["agreement"] >= min_agreement
    res["passed"] = bool(ok)
    return res
