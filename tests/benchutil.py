"""Test helper: an export folder for the bench/report/gate tests.

Uses `edgedistill.deploy.export_run` when it exists (the real `edgedistill export`); until then it
builds an equivalent folder by hand (legacy ONNX exporter + onnxruntime static QDQ quantization)
following the export contract ("edgedistill.export/1" manifest, sample_inputs.npy / labels).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_export(run_dir: Path) -> Path:
    """An export folder of `run_dir` (fp32 + INT8 ONNX) for these tests; built once, then reused.

    Written to its own folder (not RUN/export, which the export tests rewrite with other options).
    """
    export_dir = Path(run_dir) / "export-bench-tests"
    if (export_dir / "manifest.json").is_file():
        return export_dir
    try:
        from edgedistill.deploy import export_run  # the real exporter
    except ImportError:
        export_run = None
    if export_run is None:
        return _manual_export(Path(run_dir), export_dir)
    # Small and fast: a fixed INT8 format, placement and calibrator (nothing timed or tried), few images.
    return Path(export_run(run_dir, int8=True, int8_format="qdq-u8s8", placement="tuned", calibrator="percentile",
                           calib_count=64, val_count=200, out=export_dir))


def _load_classifier(run_dir: Path):
    import torch.nn as nn
    from safetensors.torch import load_file

    from edgedistill.runfolder.load import load_run_config, load_student_backbone
    from edgedistill.models import CLASSIFIER_FILE, Classifier

    cfg = load_run_config(run_dir)
    backbone = load_student_backbone(run_dir, cfg)
    state = load_file(str(run_dir / CLASSIFIER_FILE))
    fc = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    fc.load_state_dict(state)
    return Classifier(backbone, fc).eval(), cfg


def _val_samples(cfg, n: int = 32):
    from edgedistill.data import val_folder
    from edgedistill.data.torch_loader import eval_loader

    folder = val_folder(cfg.data)
    step = max(1, len(folder) // n)  # spread over the classes
    loader = eval_loader(folder, cfg.data, n, list(range(0, len(folder), step))[:n])
    images, labels = next(iter(loader))
    return images.numpy().astype(np.float32), labels.numpy().astype(np.int64), folder.classes


def export_model(model, samples: np.ndarray, labels: np.ndarray, export_dir: Path, classes, mean, std,
                 source_run: str | None = None, int8=("symmetric", "unsigned"), preprocess: bool = False) -> Path:
    """ONNX fp32 (dynamic batch) + INT8 QDQ variants of `model`, with a manifest."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    export_dir.mkdir(parents=True, exist_ok=True)
    fp32 = export_dir / "model-fp32.onnx"
    x = torch.from_numpy(samples[:1])
    torch.onnx.export(model, (x,), str(fp32), input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    source = fp32
    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source = export_dir / "model-fp32-pre.onnx"
        quant_pre_process(str(fp32), str(source))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": samples[i : i + 1]} for i in range(samples.shape[0])])

        def get_next(self):
            return next(self.it, None)

    artifacts = [("onnx-fp32", fp32, "fp32", "any")]
    if "symmetric" in int8:
        path = export_dir / "model-int8-tensorrt.onnx"
        quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        artifacts.append(("onnx-int8-tensorrt", path, "int8", "tensorrt"))
    if "unsigned" in int8:
        path = export_dir / "model-int8-ort-cpu.onnx"
        quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        artifacts.append(("onnx-int8-ort-cpu", path, "int8", "ort-cpu"))
    if preprocess:
        source.unlink()

    params = sum(p.numel() for p in model.parameters())
    ref = None
    entries = []
    for name, path, precision, target in artifacts:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"input": samples})[0]
        pred = logits.argmax(1)
        ref = pred if ref is None else ref
        entries.append({
            "name": name, "file": path.name, "format": "onnx", "precision": precision, "target": target,
            "sha256": _sha256(path), "bytes": path.stat().st_size, "params": params,
            "accuracy": {"top1": round(100.0 * float((pred == labels).mean()), 3),
                         "agreement_fp32": round(100.0 * float((pred == ref).mean()), 3), "n": int(len(labels))},
        })
    np.save(export_dir / "sample_inputs.npy", samples)
    np.save(export_dir / "sample_labels.npy", labels)
    kit = export_dir / "kit"
    kit.mkdir(exist_ok=True)
    shutil.copy2(REPO / "export" / "edgekit.py", kit / "edgekit.py")
    manifest = {
        "schema": "edgedistill.export/1",
        "source_run": source_run,
        "input": {"name": "input", "shape": [-1, *samples.shape[1:]], "mean": list(mean), "std": list(std)},
        "classes": list(classes),
        "artifacts": entries,
        "environment": {"note": "built by tests/benchutil.py"},
    }
    (export_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return export_dir


def _manual_export(run_dir: Path, export_dir: Path) -> Path:
    model, cfg = _load_classifier(run_dir)
    samples, labels, classes = _val_samples(cfg)
    return export_model(model, samples, labels, export_dir, classes, cfg.data.mean, cfg.data.std,
                        source_run=str(run_dir.resolve()))
