"""`manifest.json` of an export folder (schema "edgedistill.export/1").

Top-level keys:
  schema, created, edgedistill_version, source_run, arch, kind ("classifier" | "embedding"),
  params, input {name, shape ["batch", 3, H, W], dtype, layout, preprocess...}, output {name, shape},
  classes, validation {images, total, folder}, files [{path, sha256, bytes}],
  artifacts [{name, file, format, precision, target, bytes, accuracy{top1, agreement, kl_vs_fp32,
  drop_se, max_abs_diff, ...}, parity{passed, tolerance, ...}, quantization{...}}],
  int8 {target, format, format_choice, calibration {label, held_out_images, auto_scores...},
  placement, int8_layers {weighted_layers, int8, share}, size_ratio_vs_fp32, classifier_check,
  max_drop {initial, trials, kept_in_float...}, sensitivity_file}, tensorrt {built, reason, engines,
  commands}, status ("ok" | "parity_failed" | "max_drop_not_reached"), environment.
Paths are relative to the export folder.
"""

from __future__ import annotations

import os
from pathlib import Path

SCHEMA = "edgedistill.export/1"
MANIFEST_FILE = "manifest.json"
ACCURACY_FILE = "accuracy.json"


def sha256(path: Path) -> str:
    """The device kit's hash (one implementation, so manifests verify the same on the device)."""
    from edgedistill.kit import load_kit_module

    return load_kit_module("edgekit").file_sha256(path)


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
