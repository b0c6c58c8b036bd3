"""Multiply-accumulate counts (MACs) of one image through a classifier.

Counted the usual way (fvcore, ptflops, timm's profiler): convolutions and fully connected layers
only; activations, normalisation, pooling and element-wise ops are ignored (they are a few
percent of the MACs of a CNN). A convolution costs out_elements * (in_channels / groups) * kh * kw
MACs, a linear layer in_features * out_features per row.

Two counters that agree on the fp32 graph (a test checks it):
- `torch_macs`: torch's own counter (`torch.utils.flop_counter.FlopCounterMode`) on one forward;
  it counts the convolutions and matrix products (2 FLOPs per multiply-accumulate) and nothing
  else, so its FLOPs / 2 are the MACs above;
- `onnx_macs`: from the ONNX graph (Conv, Gemm, MatMul with a constant weight) after shape
  inference; weights behind a DequantizeLinear (QDQ INT8 graphs) are followed to their
  initializer, so INT8 artifacts are counted too (quantization changes precision, not the count).
"""

from __future__ import annotations

import math
from pathlib import Path


def torch_macs(model, input_shape) -> int:
    """MACs of `model` on one input of shape (C, H, W) or (1, C, H, W)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    shape = (1, *(int(s) for s in list(input_shape)[-3:]))  # the batch entry may be -1 or "batch"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def onnx_macs(path: str | Path) -> int:
    """MACs of one image through the ONNX graph at `path` (batch dimension taken as 1)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    # Pin a symbolic batch to 1 so that shape inference yields concrete output shapes.
    for vi in list(graph.input) + list(graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        dims = [d.dim_value if d.dim_value else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    inits = {t.name: list(t.dims) for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:  # Constant nodes carry weights in some exporters
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    inits[node.output[0]] = list(attr.t.dims)

    def weight_shape(name: str) -> list[int] | None:
        seen = 0
        while name not in inits and seen < 4:  # DequantizeLinear / Cast / Identity in front of a weight
            node = producers.get(name)
            if node is None or node.op_type not in ("DequantizeLinear", "Cast", "Identity", "QuantizeLinear"):
                return None
            name, seen = node.input[0], seen + 1
        return inits.get(name)

    total = 0
    for node in graph.node:
        if node.op_type == "Conv":
            w = weight_shape(node.input[1])
            out = shapes.get(node.output[0])
            if w is None or out is None:
                continue
            total += math.prod(out) * math.prod(w[1:])
        elif node.op_type == "Gemm":
            w = weight_shape(node.input[1])
            a = shapes.get(node.input[0])
            if w is None:
                continue
            rows = a[0] if a else 1
            total += rows * w[0] * w[1]
        elif node.op_type == "MatMul":
            w = weight_shape(node.input[1])
            a = shapes.get(node.input[0])
            if w is None or a is None or len(w) != 2:
                continue
            total += math.prod(a[:-1]) * w[0] * w[1]
    return int(total)
