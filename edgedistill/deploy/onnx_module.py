"""Write a torch image model as checked ONNX (no run folders: the frozen teacher's ONNX Runtime
mode uses it as well as `export`)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from edgedistill.deploy.quantize import DEFAULT_OPSET
from edgedistill.errors import UserError

log = logging.getLogger(__name__)

INPUT_NAME = "input"


def export_module(model: nn.Module, path: Path, img_size: int, output_name: str, opset: int = DEFAULT_OPSET,
                  exporter: str = "legacy") -> dict:
    """Write `model` (an image model, NCHW input `INPUT_NAME`) as checked ONNX with a dynamic batch."""
    model = model.eval()
    dummy = torch.zeros(2, 3, img_size, img_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": [INPUT_NAME], "output_names": [output_name]}
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation on every call; the choice is documented in onnx_export.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        with torch.no_grad():
            if exporter == "legacy":
                torch.onnx.export(model, (dummy,), str(path), opset_version=opset, dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
                                  do_constant_folding=True, **names)
            elif exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(model, (dummy,), str(path), opset_version=opset, dynamo=True, external_data=False,
                                  dynamic_shapes=({0: batch},), **names)
            else:
                raise UserError(f"unknown exporter {exporter!r}: use legacy or dynamo")
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto)
    actual = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    if actual != opset:
        log.info("ONNX exporter %s wrote opset %d (asked for %d)", exporter, actual, opset)
    return {"exporter": exporter, "opset": actual, "torch": torch.__version__}
