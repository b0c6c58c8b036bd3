"""INT8 post-training quantization with ONNX Runtime: graph preparation, calibration (cached, or
chosen automatically), the format and QDQ placement per target, an end-to-end sensitivity
analysis, and the "keep the most harmful layers in float" fallback. See docs/int8.md.

Pipeline:
1. `prepare`: ONNX Runtime's `quant_pre_process` for shape inference only when BatchNorm is
   already folded (the exporter folds it): its graph optimiser would split every HardSwish into an
   unnamed HardSigmoid + Mul pair, which are then quantized too. Identity nodes are removed (the
   exporter routes shared biases through them, which hides the biases from the quantizer) and
   every node gets a name, so sensitivity reports and `nodes_to_exclude` can point at any node.
2. Calibration over real images (MinMax, Entropy, Percentile at a level, or `auto`, which
   scores each candidate on held-out calibration images by the KL divergence of the network's
   output against fp32); the tensor ranges are cached.
3. `quantize_static` in QDQ format, per-channel symmetric int8 weights, with a placement per
   target (`QuantPlan`).

Formats:
- `qdq-s8s8-sym`: signed int8 activations and weights, symmetric (zero point 0): what TensorRT's
  explicit quantization wants; the only format for `--target tensorrt`.
- `qdq-u8s8`: unsigned int8 activations (asymmetric), signed symmetric weights: what ONNX Runtime's
  x86 kernels prefer. On x86 without VNNI the weights use 7 bits (`reduce_range`) in both
  formats because the AVX2 u8*s8 dot product saturates 16-bit sums (ONNX Runtime's own guidance),
  and ONNX Runtime computes s8s8 there with the same instruction.
For `--target ort-cpu` with `--int8-format auto` both are built and timed on this CPU at export
time and the faster one is kept; the numbers and the reason go into the manifest.

Placement per target:
- ort-cpu: every op type ONNX Runtime can quantize, as its default does: its CPU kernels fuse
  whole int8 chains (Conv with its Relu, Sigmoid/Mul of SiLU, pooling); restricting INT8 to the
  weighted layers put a float op between DQ and Q after each of them and measured up to 1.8x
  slower (EfficientNet-B0, 224 px). HardSwish (kept whole, see `prepare`) has no int8 kernel and
  runs in float between DQ and Q; the range of a tensor that only feeds HardSwish / HardSigmoid
  is clipped to where the activation is not flat (HardSwish: >= -3; HardSigmoid: [-3, 3]) through
  `TensorQuantOverrides`: lossless, and it gives the quantization steps to the values that matter.
- tensorrt: only the weighted layers and residual adds (`QUANTIZED_OPS`), and no QuantizeLinear on
  their outputs (`OpTypesToExcludeOutputQuantization`): Q/DQ on the inputs of weighted layers, as
  TensorRT's explicit-quantization guide places them; the engine builder fuses the activations.

Calibration cache: the ranges are stored as JSON under a key that hashes the prepared model's
bytes, the calibration files (path, size, mtime), the calibrator and its settings, the
preprocessing and the ONNX Runtime version; any change is a new key, so a stale cache is never
used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from edgedistill.deploy.runtime import output_divergence, run, session
from edgedistill.errors import UserError
from edgedistill.fileio import write_json

log = logging.getLogger(__name__)

Calibrator = Literal["auto", "minmax", "entropy", "percentile"]
Format = Literal["qdq-s8s8-sym", "qdq-u8s8"]
Target = Literal["ort-cpu", "tensorrt"]
# tuned: the preparation and placement described above, HardSwish whole (in float between DQ and
# Q); split-hardswish: the same, but ONNX Runtime's graph optimiser first splits every HardSwish
# into HardSigmoid + Mul, which its CPU kernels run in int8; auto: for ort-cpu both are built,
# scored and timed on this CPU, and the fastest that costs no accuracy is kept (`export`);
# ort-default: ONNX Runtime's stock quant_pre_process + quantize_static (every supported op
# quantized, its graph optimiser on), kept to measure what the tuning buys.
Placement = Literal["auto", "tuned", "split-hardswish", "ort-default"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)
# The CPU class an INT8 file is built for (`export --cpu`): it decides the format's details
# (7-bit weights without VNNI) and how the file is scored here (`scoring_arithmetic`).
CpuClass = Literal["x86-avx2", "x86-vnni", "arm64"]
CPU_CLASSES: tuple[str, ...] = get_args(CpuClass)
CPU_CLASS_ENV = "EDGEDISTILL_CPU_CLASS"
# The format a class gets when it cannot be timed here (`--int8-format auto` for another class):
# x86's INT8 kernels multiply u8 activations by s8 weights (VPMADDUBSW / VPDPBUSD); ARM's
# dot-product instructions are signed (SDOT), and the signed symmetric format is ONNX Runtime's
# first recommendation there.
CLASS_FORMAT = {"x86-avx2": "qdq-u8s8", "x86-vnni": "qdq-u8s8", "arm64": "qdq-s8s8-sym"}
CALIBRATORS: tuple[str, ...] = get_args(Calibrator)
FORMATS: tuple[str, ...] = get_args(Format)
TARGETS: tuple[str, ...] = get_args(Target)
Exporter = Literal["legacy", "dynamo"]  # torch's TorchScript ONNX exporter or torch.export (deploy/onnx_export.py)
EXPORTERS: tuple[str, ...] = get_args(Exporter)
DEFAULT_OPSET = 17  # parses in ONNX Runtime and TensorRT 8.6+

# The ops quantized for TensorRT: the weighted layers (what "INT8" means for speed and size) and
# the residual adds between them; the builder fuses everything else.
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# What the head of a classifier is made of besides weighted layers: pooling, activations and
# shape-only ops (`classifier_nodes`); the global poolings that begin it.
ACTIVATION_OPS = ("Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Mul")
CLASSIFIER_TAIL_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "GlobalAveragePool", "AveragePool", "ReduceMean",
                       *ACTIVATION_OPS)
GLOBAL_POOLS = ("GlobalAveragePool", "ReduceMean")
# Share of the calibration images held out to score calibrators and layer sensitivity.
HOLDOUT_FRACTION = 0.25


@dataclass(frozen=True)
class QuantSettings:
    """One calibrator with its settings (what the calibration cache key is made of)."""

    calibrator: str = "minmax"
    percentile: float = 99.99
    # Entropy (KL) calibration histogram: ONNX Runtime's default of 128 bins for 128 quantized
    # bins leaves no threshold to search (it then equals MinMax). TensorRT's entropy calibrator
    # uses 2048 bins, but ONNX Runtime's Python threshold search is then slow (about 70 s of CPU
    # for mobilenetv3_small); 512 bins keeps it to seconds.
    entropy_bins: int = 512
    # Histogram calibrators: symmetric ranges around 0. ONNX Runtime's Percentile default is
    # symmetric, which wastes half the codes of an unsigned (asymmetric) activation.
    symmetric: bool = False
    calib_batch: int = 32

    @property
    def label(self) -> str:
        if self.calibrator == "percentile":
            return f"percentile-{self.percentile:g}"
        if self.calibrator == "entropy":
            return f"entropy-{self.entropy_bins}"
        return self.calibrator

    def calibration_key_parts(self) -> dict:
        parts = {"calibrator": self.calibrator}
        if self.calibrator == "percentile":
            parts["percentile"] = self.percentile
        if self.calibrator == "entropy":
            parts["entropy_bins"] = self.entropy_bins
        if self.calibrator in ("percentile", "entropy"):
            parts["symmetric"] = self.symmetric
        return parts

    def calibrator_options(self) -> dict:
        """extra_options of onnxruntime.quantization.create_calibrator."""
        if self.calibrator == "percentile":
            return {"percentile": self.percentile, "symmetric": self.symmetric}
        if self.calibrator == "entropy":
            return {"num_bins": self.entropy_bins, "num_quantized_bins": 128, "symmetric": self.symmetric}
        return {}


def auto_candidates(symmetric: bool) -> list[QuantSettings]:
    """What `--calibrator auto` tries: Percentile at three levels, Entropy, MinMax."""
    return [QuantSettings("percentile", percentile=p, symmetric=symmetric) for p in (99.9, 99.99, 99.999)] + [
        QuantSettings("entropy", symmetric=symmetric), QuantSettings("minmax", symmetric=symmetric)]


@dataclass
class QuantPlan:
    """Where the Q/DQ pairs go for one target: op types, outputs left in float, range overrides."""

    target: str
    cpu_class: str  # one of CPU_CLASSES (resolved, never "auto")
    op_types: tuple[str, ...] = QUANTIZED_OPS
    exclude_output_ops: tuple[str, ...] = ()
    # tensor -> (rmin, rmax) clip applied on top of the calibrated range
    clips: dict[str, tuple[float, float]] = field(default_factory=dict)
    # nodes whose activations are never quantized (the classifier's head, see `classifier_nodes`),
    # and those of them that get int8 weights all the same (`weight_only_int8`)
    float_nodes: tuple[str, ...] = ()
    weight_only_nodes: tuple[str, ...] = ()

    def describe(self) -> dict:
        return {"cpu_class": self.cpu_class,
                "quantized_op_types": list(self.op_types) or "all (ONNX Runtime default)",
                "outputs_not_quantized": list(self.exclude_output_ops),
                "activation_range_clips": len(self.clips), "float_nodes": list(self.float_nodes),
                "int8_weights_float_activations": list(self.weight_only_nodes)}


def _ort_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _class_of(cpu: dict) -> str:
    """The INT8 class of the CPU an environment stamp's `cpu` entry describes."""
    isa = cpu.get("isa") or {}
    if str(cpu.get("arch", "")).lower() in ("aarch64", "arm64"):
        return "arm64"
    return "x86-vnni" if isa.get("avx512_vnni") or isa.get("avx_vnni") or isa.get("amx_int8") else "x86-avx2"


def this_cpu_class() -> str:
    """The INT8 class of this machine's CPU, or the one `EDGEDISTILL_CPU_CLASS` names (to run the
    code paths of another class here, e.g. the test suite with AVX2's 7-bit weights on a VNNI CPU;
    the kernels themselves stay this CPU's)."""
    forced = os.environ.get(CPU_CLASS_ENV)
    if forced:
        if forced not in CPU_CLASSES:
            raise UserError(f"{CPU_CLASS_ENV}={forced!r}: use one of {', '.join(CPU_CLASSES)} (or unset it)")
        return forced
    from edgedistill.envinfo import cpu_info

    return _class_of(cpu_info())


def timing_class(cpu: dict | None = None) -> str:
    """What INT8 *speed* is keyed by: the CPU class, with `+amx` where the CPU also has AMX INT8
    tiles (ONNX Runtime's and OpenVINO's INT8 GEMMs use them, so the same file times differently
    from a VNNI-only CPU of the same arithmetic), and `+zen4` on an AMD Zen 4, whose AVX-512 runs on
    256-bit units (`envinfo.avx512_on_256bit_units`: 1.3-1.5x slower per core than the Zen 5 the
    plain `x86-vnni` rows were measured on). `cpu`: an environment stamp's `cpu` entry (default: this
    machine, in the class `this_cpu_class` gives). Accuracy is keyed by the class alone: AMX, like
    VNNI, accumulates u8 x s8 products exactly in int32."""
    from edgedistill.envinfo import avx512_on_256bit_units, cpu_info

    if cpu is None:
        cpu_class, cpu = this_cpu_class(), cpu_info()
    else:
        cpu_class = _class_of(cpu)
    if cpu_class != "x86-vnni":
        return cpu_class
    if (cpu.get("isa") or {}).get("amx_int8"):
        return f"{cpu_class}+amx"
    return f"{cpu_class}+zen4" if avx512_on_256bit_units(cpu) else cpu_class


def resolve_cpu_class(declared: str) -> str:
    """`--cpu`: `auto` is this machine's class (said in the log and the manifest)."""
    if declared == "auto":
        return this_cpu_class()
    if declared not in CPU_CLASSES:
        raise UserError(f"--cpu {declared!r}: use auto or one of {', '.join(CPU_CLASSES)}")
    return declared


def format_options(fmt: str, cpu_class: str, target: str = "ort-cpu") -> dict:
    """quantize_static arguments of a format for a CPU class (activation/weight types, symmetry,
    7-bit weights on x86 without VNNI) and a target (TensorRT keeps float biases).

    7-bit weights on x86-avx2 in *both* formats: without VNNI ONNX Runtime computes int8 x int8
    through the same u8 x s8 pair instruction (VPMADDUBSW, signed activations shifted to unsigned),
    whose int16 pair sums saturate with 8-bit weights (255 x 127 x 2 > 32767; 255 x 64 x 2 is not).
    TensorRT computes 8-bit weights exactly, on any host."""
    from onnxruntime.quantization import QuantType

    extra = {} if target != "tensorrt" else {"QuantizeBias": False}
    reduce_range = cpu_class == "x86-avx2" and target != "tensorrt"
    if fmt == "qdq-s8s8-sym":
        return {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8, "reduce_range": reduce_range,
                "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, **extra}}
    if fmt == "qdq-u8s8":
        return {"activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "reduce_range": reduce_range,
                "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True, **extra}}
    raise UserError(f"unknown INT8 format {fmt!r}: use one of {', '.join(FORMATS)}")


def short_name(fmt: str) -> str:
    return "s8s8" if fmt == "qdq-s8s8-sym" else "u8s8"


def describe_format(fmt: str, cpu_class: str, target: str = "ort-cpu") -> dict:
    opts = format_options(fmt, cpu_class, target)
    return {
        "format": "QDQ",
        "name": fmt,
        "cpu_class": cpu_class,
        "activations": "int8 symmetric (zero point 0)" if fmt == "qdq-s8s8-sym" else "uint8 asymmetric",
        "weights": "int8 symmetric, per-channel" + (", 7-bit (reduce_range)" if opts["reduce_range"] else ""),
        "reduce_range": opts["reduce_range"],
        "bias": "float (TensorRT)" if target == "tensorrt" else "int32 (input scale x weight scale)",
    }


def scoring_arithmetic(target: str, cpu_class: str) -> dict:
    """How this machine computes an INT8 file the way the target will: with ONNX Runtime's own
    kernels when this CPU is of the target's class, otherwise with the exact QDQ arithmetic
    (ONNX Runtime with graph optimisation off: DequantizeLinear -> float op -> QuantizeLinear),
    which every correct INT8 kernel reproduces up to float summation order. TensorRT is always
    scored the exact way: its kernels are not here, and x86 CPUs without VNNI saturate the s8s8
    dot products TensorRT's format would use on them."""
    here = this_cpu_class()
    exact = target == "tensorrt" or cpu_class != here
    why = ("TensorRT's kernels are not on this machine" if target == "tensorrt" else
           f"this machine is {here}, the file is built for {cpu_class}" if exact else
           f"this machine is of the declared class ({here})")
    return {"exact": exact, "this_machine": here,
            "name": "exact QDQ reference (ONNX Runtime, graph optimisation off)" if exact
            else "ONNX Runtime's INT8 kernels on this CPU", "why": why}


# --------------------------------------------------------------------------- graph preparation


def prepare(src: Path, dst: Path, placement: str = "tuned") -> dict:
    """Shape inference (+ ONNX Runtime's optimiser where BatchNorm is still in the graph, and for
    `split-hardswish` and `ort-default`: it splits every HardSwish into HardSigmoid + Mul), Identity
    nodes removed, every node named. Writes `dst`; returns what was done."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    has_bn = any(n.op_type == "BatchNormalization" for n in onnx.load(str(src)).graph.node)
    optimise = has_bn or placement in ("split-hardswish", "ort-default")
    try:
        quant_pre_process(str(src), str(dst), skip_optimization=not optimise, skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001 - the optimiser can fail on unusual graphs
        log.warning("quant_pre_process failed (%s: %s); retrying without graph optimisation", type(e).__name__, e)
        quant_pre_process(str(src), str(dst), skip_optimization=True, skip_symbolic_shape=True)
    model = onnx.load(str(dst))
    removed = remove_identities(model)
    unshared = unshare_parameters(model)
    named = name_nodes(model)
    onnx.save(model, str(dst))
    return {"graph_optimisation": optimise, "identity_nodes_removed": removed, "parameters_unshared": unshared,
            "nodes_named": named}


def remove_identities(model) -> int:
    """Bypass Identity nodes (consumers read the Identity's input directly); returns how many."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    drop = [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in outputs]
    alias = {n.output[0]: n.input[0] for n in drop}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = resolve(name)
    for node in drop:
        graph.node.remove(node)
    return len(drop)


def unshare_parameters(model) -> int:
    """Give every weighted layer its own weight and bias initializers; returns how many copies.

    The exporter stores equal constants once (e.g. the zero biases of freshly folded BatchNorms);
    ONNX Runtime's quantizer then makes one int32 copy per layer anyway (each with its own scale),
    and quantization-aware distillation trains each layer's copy on its own, so the float graph
    has to hold them apart to receive the trained values."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    seen: set[str] = set()
    copies = 0
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        for slot, name in enumerate(node.input):
            if slot == 0 or name not in inits:
                continue
            if name in seen:
                copy = graph.initializer.add()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}.{node.name or node.output[0]}"
                node.input[slot] = copy.name
                copies += 1
            seen.add(name)
    return copies


def name_nodes(model) -> int:
    """Give every unnamed node a unique name `<op>_<first output>`; returns how many were named."""
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for node in model.graph.node:
        if node.name:
            continue
        base = f"{node.op_type}_{node.output[0] if node.output else count}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        count += 1
    return count


def weighted_nodes(model_path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type in WEIGHTED_OPS]


def activation_clips(model_path: Path) -> dict[str, tuple[float, float]]:
    """For each tensor read only by HardSwish / HardSigmoid (whole, or split into x * HardSigmoid(x)),
    the interval outside which those activations are flat: quantizing beyond it spends codes on
    values that all map to the same output."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(model_path)).graph
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    clips = {}
    for tensor, nodes in consumers.items():
        sigmoids = {n.output[0] for n in nodes if n.op_type == "HardSigmoid"}
        bounds = []
        for n in nodes:
            if n.op_type == "HardSwish":
                bounds.append((-3.0, math.inf))
            elif n.op_type == "HardSigmoid":
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
                low = -beta / alpha
                # x * HardSigmoid(x) (a split HardSwish) is flat (0) below the sigmoid's low knee only.
                split = any(m.op_type == "Mul" and set(m.input) == {tensor, n.output[0]} for m in nodes)
                bounds.append((low, math.inf) if split else (low, (1.0 - beta) / alpha))
            elif n.op_type == "Mul" and sigmoids & set(n.input):
                continue  # the Mul of a split HardSwish: its bounds come from the HardSigmoid
            else:
                bounds = []
                break
        if bounds:
            clips[tensor] = (min(b[0] for b in bounds), max(b[1] for b in bounds))
    return clips


def classifier_nodes(model_path: Path, pool_input: bool = False) -> list[str]:
    """The head of a classifier graph: every node after the last global pooling (a MobileNetV3's
    `conv_head` and its HardSwish, the flatten, the linear classifier) and the pooling itself,
    found walking back from the graph output through weighted layers and the pooling, activation
    and shape-only ops of CLASSIFIER_TAIL_OPS; without a global pooling on the way (or at a residual
    Add), the walk keeps the classifier and what stands between it and the last weighted layer.
    Their activations stay in float (`float_nodes`), so the pooled features, whose few large
    channels would set a coarse 8-bit scale for all the others, are never quantized. The classifier
    comes first. [] when the graph does not end in a weighted layer (an embedding export).

    `pool_input`: also the nodes that produce the tensor the pooling reads, back through
    activations to the first weighted layer or residual Add. Quantizing that tensor is quantizing
    the features before they are averaged, one 8-bit scale over all their channels (576 for a
    MobileNetV3-Small) on a 2x2 to 7x7 map: on the demo's 1-thread student this alone cost 2.8 of
    3.4 points by PTQ. Kept in float, the weighted producer reads int8 inputs with int8 weights and
    writes float (ONNX Runtime's CPU runs that one layer as a float convolution of dequantized values)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(graph.output[0].name)
    found = []
    if node is not None and node.op_type == "Add":  # MatMul + bias
        found.append(node)
        node = next((producer[i] for i in node.input if i in producer and producer[i].op_type == "MatMul"), None)
    if node is None or node.op_type not in WEIGHTED_OPS:
        return []
    found.append(node)
    tail, queue = [], [node.input[0]]
    while queue:
        source = producer.get(queue.pop())
        if source is None or source in tail or source.op_type not in (*CLASSIFIER_TAIL_OPS, *WEIGHTED_OPS):
            continue
        tail.append(source)
        if source.op_type in GLOBAL_POOLS:
            return [n.name for n in found + tail + (_pool_producers(source, producer) if pool_input else [])]
        queue.append(source.input[0]) if source.op_type in WEIGHTED_OPS else queue.extend(source.input)
    # No global pooling: the classifier and the non-weighted ops before it.
    stop = next((k for k, n in enumerate(tail) if n.op_type in WEIGHTED_OPS), len(tail))
    return [n.name for n in found + tail[:stop]]


def _pool_producers(pool, producer: dict) -> list:
    """Back from a global pooling's input through activations to the first weighted layer or Add."""
    found, queue = [], [pool.input[0]]
    while queue:
        source = producer.get(queue.pop())
        if source is None or source in found or source.op_type not in (*WEIGHTED_OPS, "Add", *ACTIVATION_OPS):
            continue
        found.append(source)
        if source.op_type in ACTIVATION_OPS:
            queue.extend(source.input)
    return found


def weight_only_int8(path: Path, nodes: list[str]) -> list[str]:
    """Give the weighted layers among `nodes` (kept with float activations) int8 weights all the
    same: symmetric per output channel with ONNX Runtime's formula (max |w| / 127, zero point 0),
    stored as `<weight>_quantized` behind a DequantizeLinear, so the file stays small; their inputs
    and outputs stay float. Rewrites `path`; returns the layers changed."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    changed = []
    for index, node in reversed(list(enumerate(graph.node))):
        if node.name not in nodes or node.op_type not in WEIGHTED_OPS or node.input[1] not in inits:
            continue
        name = node.input[1]
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = 1 if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0)) else 0
        peak = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(1)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        quantized = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        graph.initializer.remove(inits[name])
        graph.initializer.extend([numpy_helper.from_array(quantized, f"{name}_quantized"),
                                  numpy_helper.from_array(scale, f"{name}_scale"),
                                  numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_zero_point")])
        dq = helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                              [f"{name}_DequantizeLinear_Output"], name=f"{name}_DequantizeLinear", axis=axis)
        graph.node.insert(index, dq)
        node.input[1] = dq.output[0]
        changed.append(node.name)
    onnx.save(model, str(path))
    return changed


def stem_nodes(model_path: Path) -> list[str]:
    """The weighted layers that read the graph's input (a network's stem convolution)."""
    import onnx

    return _stem_names(onnx.load(str(model_path)).graph)


def _stem_names(graph) -> list[str]:
    inputs = {i.name for i in graph.input}
    return [n.name for n in graph.node if n.op_type in WEIGHTED_OPS and n.input and n.input[0] in inputs]


def first_stage_nodes(model_path: Path) -> list[str]:
    """The stem and the first stage's convolutions: every Conv in graph order from the input up to
    the first strided one after the stem (a ResNet's first downsampling)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    stem = set(_stem_names(graph))
    names = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [1])
        if node.name not in stem and max(strides) > 1:
            break
        names.append(node.name)
    return names


def make_plan(target: str, prepared: Path, placement: str = "tuned", cpu_class: str = "auto",
              float_classifier: bool = False, float_stem: bool = False) -> QuantPlan:
    """() as op types = every op type ONNX Runtime can quantize. `float_classifier`: the final
    linear classifier and its input stay in float (`classifier_nodes`). `float_stem`: so does the
    layer that reads the image (`stem_nodes`; its output is quantized for the next layer)."""
    cpu_class = resolve_cpu_class(cpu_class)
    # TensorRT's placement never quantizes a layer's output: there the pooling's input is float anyway.
    keep = tuple(classifier_nodes(prepared, pool_input=target != "tensorrt")) if float_classifier else ()
    # The head's weighted layers but the classifier itself get int8 weights (per-channel 8-bit
    # weights cost a MobileNetV3's conv_head nothing measurable); the classifier keeps float
    # weights: a probe folded with 1/std has rows whose largest weight sets a coarse 8-bit step for
    # all the others (on the demo's student, int8 weights there alone moved the output KL from
    # 0.011 to 0.086). TensorRT takes no weight-only int8 convolutions: there the head is float.
    all_weighted = set(weighted_nodes(prepared)) if keep else set()
    weighted = [name for name in keep if name in all_weighted]
    weight_only = tuple(weighted[1:]) if target != "tensorrt" else ()
    keep += tuple(stem_nodes(prepared)) if float_stem else ()
    if placement == "ort-default":
        return QuantPlan(target, cpu_class, op_types=(), float_nodes=keep, weight_only_nodes=weight_only)
    if target == "tensorrt":
        return QuantPlan(target, cpu_class, exclude_output_ops=("Conv", "Gemm", "MatMul"), float_nodes=keep)
    return QuantPlan(target, cpu_class, op_types=(), clips=activation_clips(prepared), float_nodes=keep,  # tuned, split
                     weight_only_nodes=weight_only)


# --------------------------------------------------------------------------- calibration


def calibration_key(model_path: Path, files_fingerprint: list, settings: QuantSettings, preprocess_spec: dict) -> tuple[str, dict]:
    import onnxruntime

    h = hashlib.sha256()
    h.update(Path(model_path).read_bytes())
    parts = {
        "files": files_fingerprint,
        "settings": settings.calibration_key_parts(),
        "preprocess": preprocess_spec,
        "onnxruntime": onnxruntime.__version__,
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest()[:32], parts


def default_cache_dir() -> Path:
    from edgedistill.data import cache_dir

    return cache_dir() / "calibration"


def entropy_threshold(histogram: tuple, num_quantized_bins: int) -> tuple:
    """ONNX Runtime's KL-divergence threshold search (`HistogramCollector.get_entropy_threshold`,
    TensorRT's entropy calibration) with its two Python loops over the quantized bins done in
    numpy: the same integer distributions, smoothed and compared by ONNX Runtime's own
    `smooth_distribution` and `entropy`, so the same threshold (tests/test_int8.py compares them).
    On the demo's export on a 2-core AVX2 machine: about 2 s where ONNX Runtime's loops took 24-27 s."""
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, edges, min_value, max_value = histogram[:4]
    num_bins, dtype = hist.size, edges.dtype
    zero_bin, half = num_bins // 2, num_quantized_bins // 2
    below = np.concatenate([[0], np.cumsum(hist)])  # below[k] = sum(hist[:k])
    divergences, thresholds = [], []
    for i in range(half, zero_bin + 1):
        start, end = zero_bin - i, min(zero_bin + i + 1, num_bins)
        thresholds.append((edges[start], edges[end]))
        sliced = hist[start:end]
        p = sliced.copy()  # the reference: outliers folded into the end bins
        p[0] += below[start]
        p[-1] += below[-1] - below[end]
        merged = sliced.size // num_quantized_bins
        whole = num_quantized_bins * merged
        quantized = sliced[:whole].reshape(num_quantized_bins, merged).sum(axis=1)
        quantized[-1] += sliced[whole:].sum()
        norm = (p[:whole] != 0).reshape(num_quantized_bins, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)  # expanded back over the nonzero bins; int64, truncated, as there
        q[:whole] = np.repeat(np.where(norm != 0, quantized / np.maximum(norm, 1), 0), merged)
        p, q = smooth_distribution(p), smooth_distribution(q)
        divergences.append(np.inf if p is None or q is None else np.array(entropy(p, q), dtype=dtype))
    low, high = thresholds[int(np.argmin(np.array(divergences, dtype=np.float64)))]
    return (min_value if low < min_value else low), (max_value if high > max_value else high)


class Calibration:
    """Where the ranges for one (model, files, settings) live, and whether they were there already."""

    def __init__(self, model_path: Path, files: list[str], fingerprint: list, settings: QuantSettings,
                 preprocess_spec: dict, cache_dir: Path, reader_factory):
        self.key, parts = calibration_key(model_path, fingerprint, settings, preprocess_spec)
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / f"calib-{self.key}.json"
        self.hit = self.path.is_file()
        self.files = files
        self.settings = settings
        self.reader_factory = reader_factory
        self._parts = parts
        self._ranges: dict[str, tuple[float, float]] | None = None
        self.seconds = 0.0

    def ensure(self, model_path: Path, also: list[Calibration] = ()) -> None:
        """Compute and store the ranges when not cached (runs the calibrator once). `also`: other
        Percentile levels over the same images, computed from the same histograms."""
        if self.path.is_file():
            return
        from onnxruntime.quantization import create_calibrator
        from onnxruntime.quantization.calibrate import save_tensors_data

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tmp_dir = Path(tempfile.mkdtemp(prefix="edgedistill-calib-"))
        try:
            # ONNX Runtime's own calibrator; the ranges are stored in its cache format
            # (save_tensors_data writes atomically).
            from onnxruntime.quantization.registry import (
                QDQRegistry,
                QLinearOpsRegistry,
            )

            # Every op type ONNX Runtime can quantize, so any placement finds its ranges here.
            calibrator = create_calibrator(
                Path(model_path), sorted(set(QLinearOpsRegistry) | set(QDQRegistry)), augmented_model_path=str(tmp_dir / "augmented.onnx"),
                calibrate_method=_ort_method(self.settings.calibrator),
                extra_options=self.settings.calibrator_options(),
            )
            with contextlib.redirect_stdout(io.StringIO()):  # ONNX Runtime prints its progress
                calibrator.collect_data(self.reader_factory())
                if self.settings.calibrator == "entropy":  # the same search, vectorised (entropy_threshold)
                    calibrator.collector.get_entropy_threshold = entropy_threshold
                for calib in (self, *also):
                    if calib.settings.calibrator == "percentile":
                        calibrator.collector.percentile = calib.settings.percentile
                    save_tensors_data(calibrator.compute_data(), calib.path)
                    write_json(calib.cache_dir / f"calib-{calib.key}.key.json",
                               {**calib._parts, "files": f"{len(calib.files)} files",
                                "first_files": [f[0] for f in calib._parts["files"][:5]]})
            del calibrator
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        self.seconds = time.perf_counter() - t0
        log.info("calibration (%s, %d images): %.1f s, ranges cached in %s", self.settings.label,
                 len(self.files), self.seconds, self.path)

    def ranges(self) -> dict[str, tuple[float, float]]:
        """(min, max) per tensor, read from the cache file once."""
        if self._ranges is None:
            from onnxruntime.quantization.calibrate import load_tensors_data

            data = load_tensors_data(self.path)
            self._ranges = {name: (float(np.min(td.range_value[0])), float(np.max(td.range_value[1])))
                            for name, td in data.items()}
        return self._ranges

    def describe(self) -> dict:
        return {
            "calibrator": self.settings.calibrator,
            "label": self.settings.label,
            **self.settings.calibration_key_parts(),
            "images": len(self.files),
            "cache_key": self.key,
            "cache_file": str(self.path),
            "cache_hit": self.hit,
        }


def quantize(pre_path: Path, out_path: Path, fmt: str, calib: Calibration, plan: QuantPlan,
             nodes_to_exclude: list[str] | None = None, overrides: dict[str, dict] | None = None) -> Path:
    """quantize_static with the cached ranges (no calibration pass) and the target's placement;
    `overrides`: a scale and zero point per activation tensor (learnt by QAD), which win over the
    calibrated ranges and clips."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    calib.ensure(pre_path)
    opts = format_options(fmt, plan.cpu_class, plan.target)
    extra = dict(opts["extra_options"])
    if plan.exclude_output_ops:
        extra["OpTypesToExcludeOutputQuantization"] = list(plan.exclude_output_ops)
    if plan.clips:
        ranges = calib.ranges()
        clipped = {}
        for tensor, (lo, hi) in plan.clips.items():
            if tensor in ranges:
                rmin, rmax = ranges[tensor]
                new = (max(rmin, lo), min(rmax, hi))
                if new != (rmin, rmax) and new[0] < new[1]:
                    clipped[tensor] = [{"rmin": np.float32(new[0]), "rmax": np.float32(new[1])}]
        extra["TensorQuantOverrides"] = clipped
    if overrides:
        extra["TensorQuantOverrides"] = {**extra.get("TensorQuantOverrides", {}),
                                         **{tensor: [dict(qparams)] for tensor, qparams in overrides.items()}}
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # ONNX Runtime warns per bias it cannot fold; nothing to act on
    try:
        quantize_static(str(pre_path), str(out_path), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=opts["reduce_range"], activation_type=opts["activation_type"],
                        weight_type=opts["weight_type"], op_types_to_quantize=list(plan.op_types) or None,
                        nodes_to_exclude=[*plan.float_nodes, *(nodes_to_exclude or [])],
                        calibrate_method=_ort_method(calib.settings.calibrator), extra_options=extra,
                        calibration_cache_path=str(calib.path))
    finally:
        quiet.setLevel(level)
    if plan.weight_only_nodes:
        weight_only_int8(out_path, list(plan.weight_only_nodes))
    return out_path


def int8_share(pre_path: Path, qdq_path: Path) -> dict:
    """How many weighted layers (Conv/Gemm/MatMul) of the float model run in INT8 (int8 weights and
    inputs), and how many have int8 weights with float activations (the classifier's head)."""
    import onnx

    total = weighted_nodes(pre_path)
    graph = onnx.load(str(qdq_path)).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    weighted = [n for n in graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in dq_outputs]
    quantized = [n.name for n in weighted if n.input[0] in dq_outputs]
    return {"weighted_layers": len(total), "int8": len(quantized),
            "int8_weights_float_activations": len(weighted) - len(quantized),
            "share": round(len(quantized) / max(len(total), 1), 4)}


# --------------------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """Runs a candidate INT8 file on the held-out calibration images and scores it against fp32."""

    images: np.ndarray
    ref: np.ndarray
    kind: str
    exact: bool = False  # score with the exact QDQ arithmetic (see `scoring_arithmetic`)

    def __call__(self, path: Path) -> float:
        return output_divergence(self.ref, run(session(path, exact=self.exact), self.images), self.kind)

    def drop(self, path: Path) -> float:
        """The drop `path` is expected to cost, from these images alone (no labels): top-1 points for
        a classifier (`expected_drop`), 100 (1 - mean cosine) for an embedding (the validation
        drop's own measure)."""
        from edgedistill.kit import load_kit_module

        out = run(session(path, exact=self.exact), self.images)
        if self.kind == "classifier":
            return expected_drop(self.ref, out)
        return 100.0 * (1.0 - float(load_kit_module("edgekit").cosines(self.ref, out).mean()))


def choose_calibrator(pre_path: Path, fmt: str, plan: QuantPlan, make_calibration: Callable[[QuantSettings], Calibration],
                      candidates: list[QuantSettings], scorer: Scorer, work_dir: Path) -> tuple[Calibration, list[dict]]:
    """Quantize with every candidate calibrator and keep the one whose output diverges least from
    fp32 on the held-out calibration images. Returns the winner and every score."""
    scores, best = [], None
    calibs = [make_calibration(settings) for settings in candidates]
    # The Percentile levels share one histogram pass over the calibration images.
    levels = [c for c in calibs if c.settings.calibrator == "percentile" and not c.path.is_file()]
    if levels:
        levels[0].ensure(pre_path, also=levels[1:])
    for settings, calib in zip(candidates, calibs):
        t0 = time.perf_counter()
        calib.ensure(pre_path)
        path = quantize(pre_path, work_dir / f"calib-candidate.{settings.label}.onnx", fmt, calib, plan)
        divergence = scorer(path)
        path.unlink(missing_ok=True)
        scores.append({"calibrator": settings.label, "output_divergence": round(divergence, 6),
                       "seconds": round(time.perf_counter() - t0, 2)})
        log.info("calibrator %s: output divergence %.5f on %d held-out calibration images",
                 settings.label, divergence, len(scorer.images))
        if best is None or divergence < best[0]:
            best = (divergence, calib)
    return best[1], scores


# --------------------------------------------------------------------------- format choice


def cpu_runtimes() -> tuple[str, ...]:
    """The CPU runtimes installed here that run the exported ONNX files as they are: ONNX Runtime,
    and OpenVINO where the `openvino` package is present (its ONNX frontend reads the QDQ file)."""
    from edgedistill.kit import load_kit_module

    usable = load_kit_module("edgekit").available_runtimes()
    return tuple(rt for rt in ("ort-cpu", "openvino-cpu") if usable.get(rt) is None)


def time_on_runtimes(paths: dict[str, Path], sample: np.ndarray, runtimes: tuple[str, ...] = ("ort-cpu",),
                     budget_s: float = 0.6, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Batch-1 median latency (ms) of each ONNX file on each CPU runtime, {runtime: {name: ms}}:
    the device kit's runners, every file and runtime once per round, interleaved (a busy neighbour
    hurts all alike); the median of the rounds' medians."""
    from edgedistill.deploy.runtime import cpu_threads
    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")
    runners = {(rt, name): kit.make_runner(rt, path, cpu_threads()) for rt in runtimes for name, path in paths.items()}
    medians: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    per_call = budget_s / rounds
    for _ in range(rounds):
        for key, runner in runners.items():
            medians[key].append(runner.bench(sample[:1], 3, None, per_call)["latency_ms"]["p50"])
    return {rt: {name: round(float(np.median(medians[(rt, name)])), 4) for name in paths} for rt in runtimes}


def time_side_by_side(paths: dict[str, Path], sample: np.ndarray, budget_s: float = 0.6, rounds: int = 3) -> dict:
    """`time_on_runtimes` on ONNX Runtime alone: {name: ms}."""
    return time_on_runtimes(paths, sample, ("ort-cpu",), budget_s, rounds)["ort-cpu"]


def layer_groups(pre_path: Path, skip=()) -> dict[str, list[str]]:
    """The weighted layers by block, in graph order, but those in `skip` (blocks left empty are
    dropped): a layer's block is its name's path up to the
    end of the first run of components that end in an index (`/backbone/blocks/blocks.2/blocks.2.1/
    se/conv_reduce/Conv` -> `/backbone/blocks/blocks.2/blocks.2.1`; ResNet's
    `/backbone/layer2/layer2.0/downsample/downsample.0/Conv` -> `/backbone/layer2/layer2.0`), else
    its module (`/backbone/conv_stem`)."""
    import re

    groups: dict[str, list[str]] = {}
    for name in weighted_nodes(pre_path):
        parts = name.strip("/").split("/")
        indexed = [bool(re.search(r"\.\d+$", part)) for part in parts[:-1]]
        first = indexed.index(True) if True in indexed else None
        cut = max(1, len(parts) - 1)
        if first is not None:
            cut = next((k for k in range(first, len(indexed)) if not indexed[k]), len(indexed))
        group = groups.setdefault("/" + "/".join(parts[:cut]), [])
        if name not in skip:
            group.append(name)
    return {g: layers for g, layers in groups.items() if layers}


def choose_cpu_format(pre_path: Path, fp32_path: Path, calib: Calibration, plan: QuantPlan, sample: np.ndarray,
                      work_dir: Path, budget_s: float = 0.6, rounds: int = 3) -> tuple[str, dict]:
    """Build every candidate format, time each at batch 1 on this CPU (interleaved rounds, so a
    busy neighbour hurts all alike) and return the fastest with the measured table."""
    from edgedistill.deploy.runtime import cpu_threads
    from edgedistill.envinfo import cpu_info

    paths = {"fp32": fp32_path}
    for fmt in FORMATS:
        paths[fmt] = quantize(pre_path, work_dir / f"candidate.{fmt}.onnx", fmt, calib, plan)
    table = time_side_by_side(paths, sample, budget_s, rounds)
    chosen = min(FORMATS, key=lambda f: table[f])
    other = next(f for f in FORMATS if f != chosen)
    cpu = cpu_info()
    isa = ", ".join(k for k, v in cpu["isa"].items() if v) or "no listed SIMD extensions"
    reason = (f"{chosen} measured fastest on this CPU ({table[chosen]:.2f} ms vs {other} {table[other]:.2f} ms, "
              f"fp32 {table['fp32']:.2f} ms; batch 1, {cpu_threads()} threads; {cpu['model']}; {isa})")
    if table[chosen] >= table["fp32"]:
        reason += ": INT8 is NOT faster than fp32 here; it only makes the file smaller. Prefer fp32 on this CPU"
    return chosen, {"latency_ms_batch1": table, "reason": reason, "chosen": chosen, "measured": True,
                    "rounds": rounds, "threads": cpu_threads(), "cpu": cpu["model"], "isa": cpu["isa"]}


# --------------------------------------------------------------------------- sensitivity


def layer_sensitivity(pre_path: Path, fmt: str, calib: Calibration, plan: QuantPlan, scorer: Scorer,
                      work_dir: Path, progress: Callable[[], None] | None = None) -> dict:
    """End-to-end sensitivity: for each weighted layer, the network output's divergence from fp32
    when every layer is INT8 except that one. `gain` = all-INT8 divergence minus that; the layers
    sorted by gain (largest first) are the ones worth keeping in float."""
    import onnx

    ops = {n.name: n.op_type for n in onnx.load(str(pre_path)).graph.node}
    path = work_dir / "sens.onnx"
    base = scorer(quantize(pre_path, path, fmt, calib, plan))
    layers = []
    for name in (n for n in weighted_nodes(pre_path) if n not in plan.float_nodes):
        divergence = scorer(quantize(pre_path, path, fmt, calib, plan, [name]))
        layers.append({"node": name, "op": ops[name], "divergence_with_layer_in_float": round(divergence, 6),
                       "gain": round(base - divergence, 6)})
        if progress:
            progress()
    path.unlink(missing_ok=True)
    layers.sort(key=lambda r: r["gain"], reverse=True)
    return {"metric": "KL(softmax fp32 || softmax int8)" if scorer.kind == "classifier" else "1 - cosine",
            "measured_on": f"{len(scorer.images)} held-out calibration images (never the validation set)",
            "all_int8_divergence": round(base, 6), "layers": layers}


# The fallback judges its trials on the held-out calibration images when there are at least this
# many (512 calibration images by default hold out 128); fewer judge too noisily (a trial's expected
# drop on 8 images swung between 0 and 43 points on the suite's tiny model), and the validation
# images judge instead, as the record says.
FALLBACK_MIN_HELD_OUT = 100


def fallback(ranked: list[str], judge: Callable[[list[str]], float],
             confirm: Callable[[list[str]], tuple[dict, float]], max_drop: float, max_layers: int):
    """Greedy on the sensitivity ranking: the first k layers of `ranked` in float for k = 1, 2, ...
    up to `max_layers`. Each trial is judged by `judge(excluded)`, the drop expected on images the
    report does not use (the held-out calibration images, `Scorer.drop`); the first that fits is
    confirmed by `confirm(excluded)` -> (metrics, drop) on the validation images, and the walk
    stops when that fits too. So the drop reported is a measurement of a choice made on other
    images, not the luckiest of several noisy trials on the reported images (each trial that
    needed confirming says so: `drop` is set on it). When none fits, the trial judged best,
    confirmed. Returns (excluded, metrics, drop, trials, reached).

    A linear walk, not a bisection: measured drops are not monotone in k (their standard error on
    a few hundred images is a few tenths of a point), and the cap keeps it short."""
    trials: list[dict] = []
    best: tuple[list[str], float] | None = None
    for k in range(1, min(max_layers, len(ranked)) + 1):
        excluded = ranked[:k]
        judged = judge(excluded)
        trial = {"kept_in_float": k, "judged_drop": round(judged, 3)}
        trials.append(trial)
        if best is None or judged < best[1]:
            best = (excluded, judged)
        if judged <= max_drop:
            metrics, trial["drop"] = confirm(excluded)
            if trial["drop"] <= max_drop:
                return excluded, metrics, trial["drop"], trials, True
    excluded = best[0] if best else []
    metrics, drop = confirm(excluded)
    return excluded, metrics, drop, trials, False


def split_holdout(files: list[str], fraction: float = HOLDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(calibration files, held-out files): every 1/fraction-th file is held out (at least 1 when
    there are 4 or more files, none otherwise)."""
    if len(files) < 4:
        return files, []
    step = max(2, round(1 / fraction))
    held = files[step - 1 :: step]
    held_set = set(held)
    return [f for f in files if f not in held_set], held


# --------------------------------------------------------------------------- the INT8 classifier

# `classifier_check`: an INT8 classifier is fragile when its expected drop on the held-out
# calibration images exceeds FRAGILE_DROP points: the fp32 model's own probability of its decision
# minus that of the INT8 file's decision, averaged (the accuracy fp32 itself expects to lose, with
# no labels: flips between near-tied classes cost little, flips of confident decisions the most). With
# `--int8-classifier` the check also reports the classifier alone with its input, the pooled
# features, quantized to NOISE_BITS bits over their range (what that file's input QuantizeLinear
# does): whether the loss is the classifier's or the backbone's.
NOISE_BITS = 8
FRAGILE_DROP = 1.0
FRAGILE_AGREEMENT = 98.0  # input_noise_agreement below this: the classifier's input quantization is the loss


def expected_drop(ref: np.ndarray, out: np.ndarray) -> float:
    """Top-1 points a classifier whose logits are `out` is expected to lose against fp32's `ref` on
    the same images, with no labels: fp32's own probability of its decision minus its probability
    of `out`'s decision, averaged (flips between near-tied classes cost little, flips of confident
    decisions the most)."""
    ref = ref - ref.max(1, keepdims=True)
    prob = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    rows = np.arange(len(prob))
    return 100.0 * float((prob[rows, ref.argmax(1)] - prob[rows, out.argmax(1)]).mean())


def quantize_features(feats, lo: float, hi: float, bits: int = NOISE_BITS):
    """Per-tensor asymmetric fake quantization of a torch tensor over [lo, hi]."""
    import torch

    step = max(hi - lo, 1e-12) / (2**bits - 1)
    return torch.round((feats.clamp(lo, hi) - lo) / step) * step + lo


def classifier_check(scorer: Scorer, int8_path: Path, model=None) -> dict:
    """Top-1 agreement and expected drop (see FRAGILE_DROP) of the INT8 file against fp32 on the
    scorer's held-out calibration images (no labels needed), computed the target's way; with `model` (a
    `Classifier`, when the classifier itself is INT8) also `input_noise_agreement`, the fp32
    classifier's agreement with itself when only its input features are quantized."""
    out = run(session(int8_path, exact=scorer.exact), scorer.images)
    drop = round(expected_drop(scorer.ref, out), 3)
    agreement = round(100.0 * float((out.argmax(1) == scorer.ref.argmax(1)).mean()), 2)
    fragile = drop > FRAGILE_DROP
    check = {"images": int(len(scorer.images)), "agreement": agreement, "expected_drop": drop, "fragile": fragile}
    advice = (f"the INT8 file changes {100 - agreement:.1f}% of fp32's decisions on {len(scorer.images)} held-out "
              f"calibration images, an expected drop of {drop:.2f} points")
    if model is not None:
        check["input_noise_agreement"] = input_noise_agreement(model, scorer.images)
        if check["input_noise_agreement"] < FRAGILE_AGREEMENT:
            advice += (f"; quantizing only the classifier's input to {NOISE_BITS} bits changes "
                       f"{100 - check['input_noise_agreement']:.1f}% of them: export without --int8-classifier "
                       "(the head stays in float)")
    check["advice"] = advice + "; --max-drop N tries QAD and then float layers until the drop is within N" if fragile else ""
    return check


def input_noise_agreement(model, images) -> float:
    """Top-1 agreement of a `Classifier` (backbone + fc) with itself when only its input features
    are quantized to NOISE_BITS bits over their range on `images`, as an INT8 classifier's input
    QuantizeLinear does."""
    import torch

    with torch.no_grad():
        feats = model.backbone.eval()(torch.as_tensor(images))
        lo, hi = float(feats.min()), float(feats.max())
        clean, noisy = model.fc(feats).argmax(1), model.fc(quantize_features(feats, lo, hi)).argmax(1)
        return round(100.0 * float((clean == noisy).float().mean()), 2)
