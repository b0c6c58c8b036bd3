"""The export folder: its file names, `manifest.json` (schema "edgedistill.export/1"), the
sample arrays and the bench results, written and read here only (torch-free; the names are the
device kit's, so the kit and the package agree on them).

Files: manifest.json, accuracy.json, sample_inputs.npy / sample_labels.npy / sample_reference.npy
(real preprocessed validation images, their labels and their torch fp32 outputs, for benchmarks and
device checks), bench*.json (results of `edgedistill bench`, schema "edgedistill.bench/1"),
check*.json (`kit/edgekit.py check`, schema "edgedistill.check/1"), the artifacts, kit/, engines/.

Manifest, top-level keys:
  schema, created, edgedistill_version, source_run, arch, kind ("classifier" | "embedding"),
  params, input {name, shape ["batch", 3, H, W], dtype, layout, preprocess...}, output {name, shape},
  classes, validation {images, total, folder}, files [{path, sha256, bytes}],
  artifacts [{name, file, format, precision, target, bytes, accuracy{top1, agreement, kl_vs_fp32,
  drop_se, max_abs_diff, ...}, parity{passed, tolerance, ...}, quantization{...},
  on_samples{samples, agreement, divergence, max_rel_diff}}],
  int8 {target, cpu_class {declared, built_for}, scored_with {exact, name, why, this_machine}, format,
  format_choice, calibration {label, held_out_images, auto_scores, chosen_on (the placement whose
  --calibrator auto choice was reused)...}, placement {name, float_nodes,
  ...}, placement_choice, int8_layers {weighted_layers, int8, share}, size_ratio_vs_fp32,
  classifier_check {images, agreement, expected_drop, fragile, advice}, max_drop {initial, trials,
  kept_in_float, before_qad (the fallback that QAD followed)...}, latency_fallback {measured, blocks, kept, hybrid...} | null, sensitivity_file},
  recommendation {artifact, runtime, device, reason, latency_ms_batch1 {runtime: {fp32, int8}} | null, max_drop}, tensorrt {built, reason,
  engines, commands}, samples {inputs, labels, reference, count}, status ("ok" | "parity_failed" |
  "max_drop_not_reached"), environment.
Paths are relative to the export folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgedistill.errors import UserError
from edgedistill.kit import load_kit_module

log = logging.getLogger(__name__)

_kit = load_kit_module("edgekit")
SCHEMA = _kit.MANIFEST_SCHEMA
MANIFEST_FILE = _kit.MANIFEST
SAMPLE_INPUTS_FILE = _kit.SAMPLE_INPUTS
SAMPLE_LABELS_FILE = _kit.SAMPLE_LABELS
SAMPLE_REFERENCE_FILE = _kit.SAMPLE_REFERENCE
CHECK_SCHEMA = _kit.CHECK_SCHEMA
CHECK_GLOB = "check*.json"
ACCURACY_FILE = "accuracy.json"
BENCH_FILE = "bench.json"
BENCH_GLOB = "bench*.json"
# The torch student, as the manifest and the bench results name it.
TORCH_ARTIFACT = "torch-fp32"


def sha256(path: Path) -> str:
    """The device kit's hash (one implementation, so manifests verify the same on the device)."""
    return _kit.file_sha256(path)


def file_entries(root: Path) -> list[dict]:
    """Every file under `root` except the manifest itself, with sha256 and size."""
    entries = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(names):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel == MANIFEST_FILE:
                continue
            entries.append({"path": rel, "sha256": sha256(path), "bytes": path.stat().st_size})
    return entries


def write_samples(out: Path, images, labels, reference) -> dict:
    """sample_inputs.npy / sample_labels.npy / sample_reference.npy (the torch fp32 outputs on the
    inputs, what `kit/edgekit.py check` holds the artifacts to), written atomically; returns the
    manifest's record."""
    from edgedistill.fileio import save_npy

    save_npy(Path(out) / SAMPLE_INPUTS_FILE, images)
    save_npy(Path(out) / SAMPLE_LABELS_FILE, labels)
    save_npy(Path(out) / SAMPLE_REFERENCE_FILE, reference)
    return {"inputs": SAMPLE_INPUTS_FILE, "labels": SAMPLE_LABELS_FILE, "reference": SAMPLE_REFERENCE_FILE,
            "count": int(len(images))}


def recommendation_text(rec: dict) -> str:
    """The manifest's `recommendation` as one line, as `export` and the demo print it."""
    on = f" on {rec['runtime']}" if rec.get("runtime") else ""
    return f"recommended for {rec['device']}: {rec['artifact']}{on} ({rec['reason']})"


def read_manifest(export_dir: Path, fix: str) -> dict:
    """The export's manifest.json (UserError with `fix` when missing, damaged or of another schema)."""
    path = Path(export_dir) / MANIFEST_FILE
    try:
        manifest = _kit.read_json_object(path, fix)
    except _kit.KitError as e:
        raise UserError(str(e)) from None
    if not str(manifest.get("schema", SCHEMA)).startswith(SCHEMA.split("/")[0] + "/"):
        raise UserError(f"{path} has schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    return manifest


def bench_results(export_dir: Path | None, device_results=(), stale: list[str] | None = None,
                  schema: str = _kit.SCHEMA) -> list[tuple[str, dict]]:
    """Every results file of `schema` (bench results, or the kit's device checks with
    `CHECK_SCHEMA`) in the export folder plus those among `device_results`, minus the stale ones:
    a results file records the sha256 of the manifest of the export it timed, and one whose hash
    is not the current manifest's timed an earlier export (skipped with a warning, listed in
    `stale`)."""
    globs = {_kit.SCHEMA: BENCH_GLOB, CHECK_SCHEMA: CHECK_GLOB}
    paths: list[Path] = []
    current = None
    if export_dir is not None and Path(export_dir).is_dir():
        export_dir = Path(export_dir)
        paths += sorted(export_dir.glob(globs[schema]))
        if (export_dir / MANIFEST_FILE).is_file():
            current = sha256(export_dir / MANIFEST_FILE)
    paths += [Path(p) for p in device_results]
    docs, seen = [], set()
    for p in paths:
        key = p.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            doc = _kit.read_json_object(p, "pass a JSON written by `edgedistill bench` or the device kit")
        except _kit.KitError as e:
            raise UserError(str(e)) from None
        if doc.get("schema") not in globs:
            raise UserError(f"{p} has schema {doc.get('schema')!r}, expected one of {', '.join(globs)}")
        if doc["schema"] != schema:  # the other kind of device result: read by the other call
            continue
        timed = (doc.get("export") or {}).get("manifest_sha256")
        if current is not None and timed is not None and timed != current:
            log.warning("%s is stale: it timed an earlier export (manifest sha256 %s..., now %s...); skipped: "
                        "re-run `edgedistill bench %s`", p, timed[:12], current[:12], export_dir)
            if stale is not None:
                stale.append(str(p))
            continue
        docs.append((str(p), doc))
    return docs
