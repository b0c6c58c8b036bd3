"""Export and quantization: ONNX fp32/fp16, INT8 QDQ (ONNX Runtime PTQ), TensorRT engines.

`export_run(run_dir, int8=True)` is the Python API behind `edgedistill export`; heavy modules
(torch, onnx, onnxruntime) are imported only when it is called.
"""

from __future__ import annotations


def export_run(run_dir, int8: bool = False, fp16: bool = False, **kwargs):
    """Export a run folder; returns the export folder (see edgedistill.deploy.exporter)."""
    from edgedistill.deploy.exporter import export_run as _export_run

    return _export_run(run_dir, int8=int8, fp16=fp16, **kwargs)


__all__ = ["export_run"]
