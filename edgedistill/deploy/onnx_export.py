"""The deployable model of a run, its ONNX export (fp32 and fp16) and the metadata it carries.

A run with `classifier.safetensors` (written by `edgedistill eval`) exports as
`Classifier(backbone, fc)` with output `logits`; a run without one (or `--embedding`) exports the
bare backbone with output `embedding` (the pooled features). Input `input`: float32 NCHW,
normalised as the run's eval transform does, with a dynamic batch dimension.

Exporter: torch's legacy TorchScript exporter (`dynamo=False`) at opset 17 by default: measured
here at well under a second for the timm students, and opset 17 parses in ONNX Runtime and
TensorRT 8.6-11. The dynamo exporter is available (`exporter="dynamo"`); it writes opset 18 at the
least and is asked for a single self-contained file (`external_data=False`).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

import edgedistill
from edgedistill.config import RunConfig
from edgedistill.deploy.onnx_module import INPUT_NAME, export_module
from edgedistill.deploy.quantize import DEFAULT_OPSET
from edgedistill.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Deployable:
    """What gets exported: the model, what it outputs, and how its input must be prepared."""

    model: nn.Module
    kind: str  # "classifier" | "embedding"
    output_name: str  # "logits" | "embedding"
    classes: list[str] | None
    cfg: RunConfig
    run_dir: Path

    @property
    def img_size(self) -> int:
        return self.cfg.data.img_size


def load_deployable(run_dir: Path, embedding: bool = False) -> Deployable:
    """Student backbone (+ linear classifier when the run has one and `embedding` is False)."""
    from edgedistill.models import Classifier
    from edgedistill.runfolder import CLASSIFIER_FILE
    from edgedistill.runfolder.load import load_classifier, load_run_config, load_student_backbone

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist: pass a folder written by `edgedistill train`")
    cfg = load_run_config(run_dir)
    backbone = load_student_backbone(run_dir, cfg)
    found = None if embedding else load_classifier(run_dir)
    if found is None:
        if not embedding:
            log.warning(
                "%s has no %s (run `edgedistill eval %s` for a classifier): exporting the embedding model "
                "(pooled features), without top-1 accuracy", run_dir, CLASSIFIER_FILE, run_dir)
        else:
            log.info("exporting the bare embedding model (--embedding)")
        return Deployable(backbone.eval(), "embedding", "embedding", None, cfg, run_dir)
    fc, meta = found
    classes = json.loads(meta["classes"]) if "classes" in meta else [str(i) for i in range(fc.out_features)]
    return Deployable(Classifier(backbone, fc).eval(), "classifier", "logits", classes, cfg, run_dir)


def export_onnx(dep: Deployable, path: Path, opset: int = DEFAULT_OPSET, exporter: str = "legacy") -> dict:
    """Write `dep.model` as ONNX with a dynamic batch; returns what was done (for the manifest)."""
    return export_module(dep.model, path, dep.img_size, dep.output_name, opset, exporter)


def convert_fp16(src: Path, dst: Path) -> dict:
    """fp16 weights and activations, fp32 input/output (keep_io_types) so callers feed the same arrays."""
    import onnx

    try:
        from onnxconverter_common import float16  # type: ignore[import-not-found]

        tool = "onnxconverter-common"
    except ImportError:  # ONNX Runtime ships the same converter
        from onnxruntime.transformers import float16  # type: ignore[no-redef]

        tool = "onnxruntime.transformers.float16"
    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(dst))
    return {"converter": tool, "keep_io_types": True}


def preprocess_spec(dep: Deployable) -> dict:
    d = dep.cfg.data
    return {
        "input_name": INPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "color": "RGB",
        "input_size": [3, d.img_size, d.img_size],
        "resize_shorter_side": int(round(d.img_size / d.crop_pct)),
        "center_crop": d.img_size,
        "crop_pct": d.crop_pct,
        "interpolation": "bilinear",
        "scale": "1/255",
        "mean": list(d.mean),
        "std": list(d.std),
    }


def metadata_for(dep: Deployable, artifact: dict) -> dict[str, str]:
    """The metadata_props every exported ONNX file carries (strings only, JSON where structured)."""
    return {
        "edgedistill.version": edgedistill.__version__,
        "edgedistill.source_run": str(dep.run_dir.resolve()),
        "edgedistill.arch": dep.cfg.student.arch,
        "edgedistill.kind": dep.kind,
        "edgedistill.output": dep.output_name,
        "edgedistill.preprocess": json.dumps(preprocess_spec(dep)),
        "edgedistill.classes": json.dumps(dep.classes),
        "edgedistill.artifact": json.dumps(artifact),
    }


def stamp_metadata(path: Path, meta: dict[str, str]) -> None:
    """Replace the edgedistill.* metadata_props of an ONNX file (quantization tools drop them)."""
    import onnx

    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if not p.key.startswith("edgedistill.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"edgedistill {edgedistill.__version__} export of {dep_desc(meta)}"
    from edgedistill.fileio import atomic_write

    # Not in place: a kill mid-write would leave a truncated model under the artifact's name.
    atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))


def dep_desc(meta: dict[str, str]) -> str:
    return f"{meta.get('edgedistill.arch')} ({meta.get('edgedistill.kind')}) from {meta.get('edgedistill.source_run')}"


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
