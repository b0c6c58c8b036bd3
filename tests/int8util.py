"""Test helpers for INT8: a timm MobileNetV3-Small exported as the exporter does, and a calibration
over in-memory images (no files)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from edgedistill.deploy import quantize as q


def export_mnv3(path: Path, seed: int = 0) -> torch.nn.Module:
    """A MobileNetV3-Small classifier (seeded random weights, eval mode) written to `path` as ONNX."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("mobilenetv3_small_100", num_classes=10).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice (the exporter's choice too)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), opset_version=17, dynamo=False,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return model


def calibration(pre: Path, tmp: Path, images: np.ndarray, settings=None) -> q.Calibration:
    """A Calibration of `pre` over `images` (one batch), cached under `tmp`."""
    class Reader:
        def __init__(self):
            self.done = False

        def get_next(self):
            if self.done:
                return None
            self.done = True
            return {"input": images}

        def rewind(self):
            self.done = False

    return q.Calibration(pre, ["synthetic"], [["synthetic", 0, 0]], settings or q.QuantSettings("minmax"), {},
                         tmp / "cache", Reader)
