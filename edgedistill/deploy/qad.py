"""Quantization-aware distillation (QAD): fine-tune the INT8 model against its own fp32 self.

Post-training quantization only chooses ranges. QAD goes one step further, as NVIDIA ModelOpt's
QAT/QAD and NNCF's QAT do: the student is fine-tuned with fake quantization in the forward pass
and the fp32 student as the teacher, so its weights move to where the INT8 rounding costs least.
See docs/int8.md.

How it is done here, so that what is trained is exactly what ONNX Runtime will run:
- `FakeQuantGraph` executes the post-training QDQ ONNX graph itself in torch: the same nodes,
  the same Q/DQ placement, BatchNorm already folded into the convolutions (as the export has it).
  QuantizeLinear is `clamp(round(x / scale) + zero_point, qmin, qmax)` (round half to even,
  saturating, as the ONNX operator) with a straight-through gradient inside the range;
  DequantizeLinear is `(q - zero_point) * scale`.
- The float weights and biases of the quantized layers are the trained parameters. Weight scales
  are re-estimated from the weights at every step, per output channel, with the formula ONNX
  Runtime applies at export (`max |w| / qmax`, zero point 0); bias scales are
  `input scale x weight scale` as ONNX Runtime's int32 biases; TensorRT's format keeps biases in
  float, and they are trained as float. Nothing about the weights' ranges
  has to be learnt: they follow the weights, and the export reproduces them exactly.
- Activation scales are learnt (LSQ: log-scales, their own learning rate, zero points fixed),
  starting from the calibrated ones: most of the INT8 error of a MobileNetV3 is the clipping of
  the calibrated ranges, which no weight update can undo (docs/int8.md has the measurement).
  `QADSettings.learn_scales=False` keeps them fixed.
- The weights' learning rate is relative (per tensor, times its RMS): Adam moves every element by
  about the learning rate, which would tear apart a layer whose folded weights are tiny.
- The teacher is the fp32 student: KL divergence of the logits at a temperature for classifier
  exports, mean squared error of L2-normalised outputs for embedding exports. The images are the
  run's training images, unlabelled, through the eval transform with random flips (`clean`, the
  default: measured better than the run's self-supervised augmentation, `augmented`).
- The export writes the trained float weights into the prepared float graph and quantizes it again
  with the same calibration ranges and placement: the QDQ file is what ONNX Runtime's quantizer
  makes of the trained weights, checked against the torch fake-quant model (`parity`).
- Checkpoints every `checkpoint_every` steps (atomic); an interrupted QAD resumes where it stopped
  when the same export is run again with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "qad.checkpoint.pt"
ImageSource = Literal["clean", "augmented"]
IMAGE_SOURCES: tuple[str, ...] = get_args(ImageSource)
SCHEMA = "edgedistill.qad/1"


@dataclass(frozen=True)
class QADSettings:
    """What a QAD run is made of (the checkpoint key hashes it)."""

    steps: int = 300
    lr: float = 1e-3  # relative: per tensor, times its RMS (see `train`)
    batch_size: int = 64
    temperature: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    # Learn the activation scales too (LSQ, on log-scales, zero points fixed): the calibrated
    # ranges clip, and the weights alone cannot undo a clip.
    learn_scales: bool = True
    scale_lr: float = 1e-3
    # clean: training images through the eval transform + flips (what the deployed model sees);
    # augmented: the run's training loader with its self-supervised augmentation.
    images: ImageSource = "clean"


# --------------------------------------------------------------------------- ONNX Q/DQ in torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as ONNX QuantizeLinear and numpy) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def _per_axis(t: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    if t.ndim == 0:
        return t
    shape = [1] * like.ndim
    shape[axis % like.ndim] = -1
    return t.reshape(shape)


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                    axis: int = 1) -> torch.Tensor:
    """ONNX QuantizeLinear as float values: saturating, round half to even; gradient passes inside
    [qmin, qmax] and is zero outside (the clamp's own gradient)."""
    scale, zero_point = _per_axis(scale, x, axis), _per_axis(zero_point, x, axis)
    return torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)


def dequantize_linear(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int = 1) -> torch.Tensor:
    return (q - _per_axis(zero_point, q, axis)) * _per_axis(scale, q, axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int = 1) -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x)): what one Q/DQ pair does to a tensor."""
    return dequantize_linear(quantize_linear(x, scale, zero_point, qmin, qmax, axis), scale, zero_point, axis)


def weight_scale(weight: torch.Tensor, qmax: int, axis: int | None = 0) -> torch.Tensor:
    """Symmetric scale per channel along `axis` (None: one for the tensor), ONNX Runtime's formula:
    max |w| / qmax (1 for an all-zero channel); not differentiated (it follows the weights)."""
    w = weight.detach().abs()
    peak = w.amax() if axis is None else w.movedim(axis, 0).reshape(w.shape[axis], -1).amax(1)
    return torch.where(peak > 0, peak / qmax, torch.ones_like(peak))


_INT_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127), np.dtype(np.int32): (-(2**31), 2**31 - 1)}


# --------------------------------------------------------------------------- the graph


class FakeQuantGraph(nn.Module):
    """A QDQ ONNX graph executed in torch with fake quantization, its float weights trainable.

    `qdq` is the post-training INT8 model; `float_weights` the prepared float model's initializers
    (the quantized weights' float originals, looked up by name). Only the operators the exported
    students use are implemented; another one is a clear error naming it.
    """

    def __init__(self, qdq, float_weights: dict[str, np.ndarray], learn_scales: bool = False):
        super().__init__()
        from onnx import numpy_helper

        graph = qdq.graph
        self.input_name = graph.input[0].name
        self.output_name = graph.output[0].name
        consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self._consts = consts
        self.params = nn.ParameterList()
        self._param_index: dict[str, int] = {}
        self._buffers_by_name: dict[str, str] = {}
        producers = {o: n for n in graph.node for o in n.output}
        self.steps: list[tuple] = []
        for node in graph.node:
            if node.op_type == "Constant":
                continue
            if node.op_type == "DequantizeLinear" and node.input[0] in consts and node.input[0].endswith("_quantized"):
                self.steps.append(("weight", node, self._weight_entry(node, consts, float_weights, producers, graph)))
                continue
            if node.op_type not in _OPS and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                raise UserError(f"QAD: operator {node.op_type} (node {node.name}) is not implemented in the torch "
                                "fake-quant graph: export without --qad-steps, or report the model")
            if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in float_weights \
                    and node.input[2] in consts:  # a float bias (TensorRT's format): trained as it is
                self._param(node.input[2], float_weights[node.input[2]])
            self.steps.append(("op", node, {a.name: _attr(a) for a in node.attribute}))
        # Activation scales (one per scale initializer, shared by the Q and DQ nodes that use it),
        # learnt as log-scales when asked (LSQ: the straight-through round gives its gradient).
        self.act_scales = nn.ParameterList()
        self._act_scale_index: dict[str, int] = {}
        self.act_tensors: dict[str, list[str]] = {}  # scale initializer -> tensors quantized with it
        for node in graph.node:
            if node.op_type == "QuantizeLinear" and node.input[0] not in consts:
                self.act_tensors.setdefault(node.input[1], []).append(node.input[0])
                if learn_scales and node.input[1] not in self._act_scale_index and consts[node.input[1]].ndim == 0:
                    self._act_scale_index[node.input[1]] = len(self.act_scales)
                    self.act_scales.append(nn.Parameter(torch.tensor(float(np.log(consts[node.input[1]])))))
        # Every constant an op, Q or DQ reads, as a buffer (so that `.to(device)` moves it).
        # Zero points are kept as float: that is how the Q/DQ arithmetic below uses them.
        zero_points = {n.input[2] for _, n, _ in self.steps if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
        for kind, node, _ in self.steps:
            for name in node.input[1:] if kind == "weight" else node.input:
                if (name in consts and name not in self._act_scale_index and name not in self._buffers_by_name
                        and name not in self._param_index):
                    value = torch.from_numpy(np.array(consts[name]))
                    key = f"const_{len(self._buffers_by_name)}"
                    self.register_buffer(key, value.float() if name in zero_points else value, persistent=False)
                    self._buffers_by_name[name] = key
        # Weights first, then biases (their scales need the weights'), then the graph in its order.
        rank = {"weight": 0, "bias": 1}
        self.steps.sort(key=lambda step: rank.get(step[2].get("kind"), 2) if step[0] == "weight" else 2)

    def _tensor(self, name: str) -> torch.Tensor:
        if name in self._param_index:
            return self.params[self._param_index[name]]
        if name in self._act_scale_index:
            return self.act_scales[self._act_scale_index[name]].exp()
        return getattr(self, self._buffers_by_name[name])

    def _param(self, name: str, value: np.ndarray) -> int:
        if name not in self._param_index:
            self._param_index[name] = len(self.params)
            self.params.append(nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32))))
        return self._param_index[name]

    def _weight_entry(self, node, consts, float_weights, producers, graph) -> dict:
        qname = node.input[0]
        fname = qname[: -len("_quantized")]
        if fname not in float_weights:
            raise UserError(f"QAD: the float original of {qname} is not in the prepared model")
        q = consts[qname]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        entry = {"float": fname, "index": self._param(fname, float_weights[fname]), "axis": axis,
                 "dtype": q.dtype}
        scale = consts[node.input[1]]
        if q.dtype == np.int32:  # a bias: scale = input scale x weight scale of the layer that adds it
            consumer = next(n for n in graph.node if node.output[0] in n.input)
            act_dq, weight_dq = producers.get(consumer.input[0]), producers.get(consumer.input[1])
            if act_dq is None or act_dq.op_type != "DequantizeLinear" or weight_dq is None:
                raise UserError(f"QAD: the int32 bias {qname} of {consumer.name} has no quantized input and weight")
            entry.update(kind="bias", act_scale=act_dq.input[1], weight_dq=weight_dq.output[0])
        else:  # qmax as ONNX Runtime chose it (127, or 63/64 with reduce_range), read off its scales
            per_channel = scale.ndim > 0 and scale.size > 1
            entry["axis"] = axis if per_channel else None
            w = np.abs(float_weights[fname])
            peak = w.max() if entry["axis"] is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).max(1)
            ratio = np.atleast_1d(peak / scale)[np.atleast_1d(peak) > 0]
            qmax = round(float(np.median(ratio))) if ratio.size else 127
            entry.update(kind="weight", qmax=qmax)
        return entry

    def activation_overrides(self) -> dict[str, dict]:
        """The learnt activation quantization parameters per tensor, in the form of ONNX Runtime's
        TensorQuantOverrides (scale + zero point)."""
        out = {}
        for scale_name, index in self._act_scale_index.items():
            zero_name = scale_name[: -len("_scale")] + "_zero_point" if scale_name.endswith("_scale") else None
            zero = self._consts.get(zero_name)
            if zero is None:
                continue
            for tensor in self.act_tensors.get(scale_name, []):
                # A graph output keeps its name on the final DQ; the quantizer renamed the float tensor.
                tensor = tensor.removesuffix("_QuantizeLinear_Input")
                out[tensor] = {"scale": np.array(float(self.act_scales[index].detach().exp()), dtype=np.float32),
                               "zero_point": np.array(zero)}
        return out

    def trained_weights(self) -> dict[str, np.ndarray]:
        return {name: self.params[i].detach().cpu().numpy().copy() for name, i in self._param_index.items()}

    def forward(self, x: torch.Tensor, tensors: dict | None = None) -> torch.Tensor:
        """The graph's output; `tensors`, when given, receives every tensor by its ONNX name."""
        env: dict[str, torch.Tensor] = {self.input_name: x} if tensors is None else tensors
        env[self.input_name] = x
        scales: dict[str, torch.Tensor] = {}

        def get(name: str) -> torch.Tensor:
            return env[name] if name in env else self._tensor(name)

        for kind, node, info in self.steps:
            if kind == "weight":
                w = self.params[info["index"]]
                if info["kind"] == "weight":
                    axis = info["axis"]
                    s = weight_scale(w, info["qmax"], axis)
                    scales[node.output[0]] = s
                    s_w = s if axis is None else _per_axis(s, w, axis)
                    env[node.output[0]] = torch.clamp(round_ste(w / s_w), -info["qmax"], info["qmax"]) * s_w
                else:
                    # int32 bias: ONNX Runtime divides in float64 before rounding; a float32 quotient
                    # can land exactly on .5 where float64 does not, so round the float64 one.
                    s = self._tensor(info["act_scale"]) * scales[info["weight_dq"]]
                    ratio = w / s
                    exact = torch.round(w.detach().double() / s.detach().double()).float()
                    env[node.output[0]] = (ratio + (exact - ratio).detach()) * s
                continue
            op = node.op_type
            if op == "QuantizeLinear":
                zp = self._consts[node.input[2]]
                qmin, qmax = _INT_RANGES[zp.dtype]
                axis = info.get("axis", 1)
                env[node.output[0]] = quantize_linear(get(node.input[0]), get(node.input[1]), get(node.input[2]),
                                                      qmin, qmax, axis)
            elif op == "DequantizeLinear":
                env[node.output[0]] = dequantize_linear(get(node.input[0]), get(node.input[1]), get(node.input[2]),
                                                        info.get("axis", 1))
            else:
                inputs = [get(n) if n else None for n in node.input]
                env[node.output[0]] = _OPS[op](inputs, info)
        return env[self.output_name]


def _attr(a):
    from onnx import helper

    return helper.get_attribute_value(a)


def _conv(inputs, at):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    pads = list(at.get("pads", [0] * (2 * (w.ndim - 2))))
    half = len(pads) // 2
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UserError("QAD: Conv with auto_pad is not implemented")
    if pads[:half] != pads[half:]:
        x = F.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])])
        pads = [0] * len(pads)
    return F.conv2d(x, w, bias, stride=tuple(at.get("strides", [1, 1])), padding=tuple(pads[:half]),
                    dilation=tuple(at.get("dilations", [1, 1])), groups=at.get("group", 1))


def _gemm(inputs, at):
    a, b = inputs[0], inputs[1]
    if at.get("transA", 0):
        a = a.t()
    if at.get("transB", 0):
        b = b.t()
    y = at.get("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + at.get("beta", 1.0) * inputs[2]
    return y


def _pool(kind):
    def run(inputs, at):
        k = tuple(at["kernel_shape"])
        pads = list(at.get("pads", [0] * 2 * len(k)))
        half = len(pads) // 2
        if pads[:half] != pads[half:]:
            raise UserError("QAD: asymmetric pooling pads are not implemented")
        fn = F.max_pool2d if kind == "max" else F.avg_pool2d
        extra = {} if kind == "max" else {"count_include_pad": bool(at.get("count_include_pad", 0))}
        return fn(inputs[0], k, tuple(at.get("strides", [1] * len(k))), tuple(pads[:half]),
                  ceil_mode=bool(at.get("ceil_mode", 0)), **extra)
    return run


def _reshape(inputs, at):
    shape = [int(s) for s in inputs[1].tolist()]
    shape = [inputs[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return inputs[0].reshape(shape)


def _reduce_mean(inputs, at):
    axes = at.get("axes") or (inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else None)
    keep = bool(at.get("keepdims", 1))
    return inputs[0].mean(dim=tuple(axes), keepdim=keep) if axes else inputs[0].mean()


_OPS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda i, at: i[0] @ i[1],
    "Add": lambda i, at: i[0] + i[1],
    "Sub": lambda i, at: i[0] - i[1],
    "Mul": lambda i, at: i[0] * i[1],
    "Div": lambda i, at: i[0] / i[1],
    "Relu": lambda i, at: F.relu(i[0]),
    "Sigmoid": lambda i, at: torch.sigmoid(i[0]),
    "HardSigmoid": lambda i, at: torch.clamp(at.get("alpha", 0.2) * i[0] + at.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda i, at: F.hardswish(i[0]),
    "Clip": lambda i, at: torch.clamp(i[0], *(None if v is None else float(v) for v in (i + [None, None])[1:3])),
    "GlobalAveragePool": lambda i, at: i[0].mean(dim=tuple(range(2, i[0].ndim)), keepdim=True),
    "ReduceMean": _reduce_mean,
    "Flatten": lambda i, at: torch.flatten(i[0], at.get("axis", 1)),
    "Reshape": _reshape,
    "Identity": lambda i, at: i[0],
    "Concat": lambda i, at: torch.cat(i, dim=at["axis"]),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
}


# --------------------------------------------------------------------------- training


class CleanImages:
    """Training images prepared as the deployed model sees them (the eval transform) plus a
    seeded horizontal flip, in a seeded order per epoch; the training loaders' interface."""

    name = "eval-transform"

    def __init__(self, files: list[str], cfg, batch_size: int, seed: int):
        self.files, self.cfg, self.batch_size, self.seed = files, cfg, batch_size, seed
        self.steps_per_epoch = len(files) // batch_size

    def epoch(self, epoch: int, skip: int = 0):
        from edgedistill.deploy.data import load_images

        rng = np.random.default_rng([self.seed, epoch])
        order, flips = rng.permutation(len(self.files)), rng.random(len(self.files)) < 0.5
        for step in range(skip, self.steps_per_epoch):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            images = load_images([self.files[i] for i in idx], self.cfg)
            images[flips[idx]] = images[flips[idx]][..., ::-1]
            yield [torch.from_numpy(np.ascontiguousarray(images))], None


def training_images(cfg, settings: QADSettings, device: torch.device):
    """QAD's data: the run's training folder and a loader of it (`settings.images`: "clean", the
    eval transform plus flips, or the run's own training augmentation); returns (folder, loader)."""
    from edgedistill.data import build_train_loader, train_folder

    folder = train_folder(cfg.data, cfg.seed)
    batch = min(settings.batch_size, len(folder))
    if settings.images == "clean":
        return folder, CleanImages([path for path, _ in folder.samples], cfg, batch, settings.seed)
    return folder, build_train_loader(cfg.data, folder, 1, batch, settings.seed, device)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of softmax(logits / T), times T^2, for classifiers; MSE of the
    L2-normalised outputs for embeddings."""
    if kind == "classifier":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                        reduction="batchmean") * t * t
    return F.mse_loss(F.normalize(student, dim=1), F.normalize(teacher, dim=1), reduction="sum") / student.shape[0]


def checkpoint_key(qdq_path: Path, settings: QADSettings) -> str:
    digest = hashlib.sha256(Path(qdq_path).read_bytes())
    digest.update(json.dumps({k: v for k, v in asdict(settings).items() if k not in ("log_every",)},
                             sort_keys=True).encode())
    return digest.hexdigest()[:20]


def _save(path: Path, graph: FakeQuantGraph, optimizer, scheduler, step: int, key: str, curve: list,
          seconds: float) -> None:
    from edgedistill.models.checkpoint import save_torch

    save_torch({"key": key, "step": step, "params": [p.detach().clone() for p in graph.parameters()],
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "curve": curve, "seconds": seconds}, path)


def train(graph: FakeQuantGraph, teacher: nn.Module, loader, kind: str, settings: QADSettings, work_dir: Path,
          key: str, progress: bool = True) -> dict:
    """Fine-tune `graph` against `teacher` on unlabelled images of `loader` (a training loader of the
    run: `epoch(e, skip)` yields ([view], labels)); resumes from `work_dir/qad.checkpoint.pt` when its
    key matches. Returns the record the manifest keeps."""
    from edgedistill.models.checkpoint import load_torch_file
    from edgedistill.ui import progress_bar

    torch.manual_seed(settings.seed)
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # Adam moves every element by about the learning rate, whatever its size: a layer whose weights
    # are a thousand times smaller (a BatchNorm that shrank a channel, folded in) would be torn
    # apart. So the rate is relative: per tensor, `lr` times the tensor's RMS.
    groups = [{"params": [p], "lr": settings.lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-12),
               "weight_decay": settings.weight_decay} for p in graph.params]
    if len(graph.act_scales):
        groups.append({"params": list(graph.act_scales), "lr": settings.scale_lr, "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(settings.steps, 1))
    ckpt_path = work_dir / CHECKPOINT_FILE
    step, curve, seconds_before, resumed = 0, [], 0.0, None
    if ckpt_path.is_file():
        state = load_torch_file(ckpt_path)
        if state.get("key") == key:
            with torch.no_grad():
                for p, saved in zip(graph.parameters(), state["params"]):
                    p.copy_(saved)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            step, curve, seconds_before, resumed = state["step"], state["curve"], state["seconds"], state["step"]
            log.info("QAD: resuming from step %d of %d (%s)", step, settings.steps, ckpt_path)
        else:
            log.info("QAD: %s belongs to other settings or another model: starting afresh", ckpt_path)
    steps_per_epoch = max(loader.steps_per_epoch, 1)
    t0 = time.perf_counter()
    images = 0
    graph.train()
    with progress_bar(settings.steps, "QAD", enabled=progress) as bar:
        bar.advance(step)
        while step < settings.steps:
            epoch, skip = divmod(step, steps_per_epoch)
            for views, _labels in loader.epoch(epoch, skip):
                x = views[0].float().to(next(graph.parameters()).device)
                with torch.no_grad():
                    target = teacher(x)
                loss = distill_loss(graph(x), target, kind, settings.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                images += x.shape[0]
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise UserError(f"QAD loss is {value} at step {step}: lower --qad-lr")
                if step % settings.log_every == 0 or step == settings.steps:
                    curve.append([step, round(value, 6)])
                bar.advance(1)
                bar.update_fields(loss=value, ips=images / max(time.perf_counter() - t0, 1e-9))
                if step % settings.checkpoint_every == 0 and step < settings.steps:
                    _save(ckpt_path, graph, optimizer, scheduler, step, key,
                          curve, seconds_before + time.perf_counter() - t0)
                if step >= settings.steps:
                    break
    graph.eval()
    seconds = seconds_before + time.perf_counter() - t0
    ckpt_path.unlink(missing_ok=True)
    learnt = len(graph.act_scales) > 0
    return {"schema": SCHEMA, "settings": asdict(settings), "loss_curve": curve, "seconds": round(seconds, 2),
            "images_per_s": round(images / max(time.perf_counter() - t0, 1e-9), 1), "resumed_from_step": resumed,
            "teacher": "the fp32 student", "loss": "KL(logits/T) x T^2" if kind == "classifier" else "MSE of L2-normalised outputs",
            "weight_scales": "re-estimated every step (max |w| / qmax per channel)",
            "activation_ranges": ("learnt log-scales from the calibrated ones (LSQ), zero points fixed" if learnt
                                  else "calibrated, fixed")}


def write_trained_float(pre_path: Path, weights: dict[str, np.ndarray], dst: Path) -> Path:
    """The prepared float model with the QAD-trained weights (what gets quantized again)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(pre_path))
    for init in model.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(numpy_helper.to_array(init).dtype), init.name))
    onnx.save(model, str(dst))
    return dst


def float_initializers(pre_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(pre_path)).graph.initializer}


@torch.no_grad()
def outputs(graph: FakeQuantGraph, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    graph.eval()
    return np.concatenate([graph(torch.from_numpy(images[i : i + batch_size])).numpy()
                           for i in range(0, len(images), batch_size)]).astype(np.float32)
