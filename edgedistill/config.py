"""Recipes: YAML files validated into typed dataclasses.

A recipe is strict: an unknown key or a value of the wrong type is an error that names the key
and the file (with a "did you mean" for typos). `--set a.b=value` overrides are parsed as YAML
scalars and validated the same way. Method hyper-parameters live in a per-method dataclass that
each method module registers (see `edgedistill.methods`), so `method:` is validated against the
chosen method's own fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from edgedistill.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """A backbone: any timm model name, or one of the CIFAR ResNets (`resnet20_cifar` ...)."""

    arch: str = "mobilenetv3_large_100"
    # Local checkpoint (teacher/peer only): MoCo v2, plain/timm/torchvision state dict, legacy
    # CIFAR .th, or an edgedistill run folder. Never downloaded.
    checkpoint: str | None = None
    # Allow missing/unexpected checkpoint keys (they are still listed in the log).
    allow_mismatch: bool = False
    # Stride of the first convolution; 1 keeps resolution for 32x32 inputs (parameter count is
    # unchanged). None keeps the architecture's default.
    stem_stride: int | None = None


# The frozen teacher's arithmetic (DisCo, SEED; see methods/components.FrozenTeacher): fp32 is the
# teacher as loaded, untouched; bf16/fp16 run it under autocast with BatchNorm folded into the
# convolutions and channels_last; fp32-ort runs it in fp32 with ONNX Runtime's CPU kernels;
# bf16-openvino in bf16 with OpenVINO's (CPUs with AVX512_BF16 or AMX, `openvino` installed);
# int8-openvino its convolutions in INT8 with OpenVINO, calibrated on augmented training views
# (auto measures it only on runs of at least 100,000 training images, which repay its calibration:
# methods/components.INT8_OV_MODE); auto measures the modes this device runs and takes the fastest
# that is faster than fp32 and whose fidelity passes (mean cosine to fp32 >= 0.999 on augmented
# training views), else fp32.
TeacherPrecision = Literal["auto", "fp32", "bf16", "fp16", "fp32-ort", "bf16-openvino", "int8-openvino"]
# The shortest run (training images through the teacher) on which auto measures int8-openvino.
INT8_AUTO_MIN_TRAIN_IMAGES = 100_000
# Asked for but not offered, with the measurement that decided it (docs/results.md, "The frozen teacher's precision").
TEACHER_PRECISION_NOT_OFFERED = {
    "int8": "teacher.precision: int8 is spelt int8-openvino (INT8 convolutions after the first stage, run by "
            "OpenVINO, calibrated on augmented training views; its target's fidelity is measured and logged, and auto "
            f"tries it on runs of at least {INT8_AUTO_MIN_TRAIN_IMAGES:,} training images: on an AVX2 CPU it made "
            "DisCo 1.75x faster than the fp32 teacher at mean cosine 0.99934 to fp32 on the CIFAR ResNet-56)",
}


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher (DisCo, SEED): a backbone from a local checkpoint, plus the arithmetic it runs in."""

    # auto | fp32 | bf16 | fp16 | fp32-ort | bf16-openvino | int8-openvino: see TeacherPrecision above. The student's arithmetic is train.precision.
    precision: TeacherPrecision = "auto"
    # torch.compile the bf16/fp16 teacher (its folded copy; fp32 stays as loaded). Compiles once at
    # the start (about a minute on one CPU thread, needs a C++ compiler on the CPU), for one batch shape.
    compile: bool = False


# auto: DALI on GPU when CUDA is present, DALI's CPU pipeline otherwise, torchvision without DALI.
Loader = Literal["auto", "dali-gpu", "dali-cpu", "torchvision"]


@dataclass
class DataConfig:
    # ImageFolder-style directory (<root>/<class>/<image>), or "embedded:digits".
    train: str = "embedded:digits"
    # Labelled validation folder for `eval`; with "embedded:digits" the embedded val split.
    val: str | None = None
    img_size: int = 32
    # Evaluation: resize the shorter side to img_size / crop_pct, then centre-crop img_size.
    crop_pct: float = 0.875
    # auto = DALI on GPU when CUDA is present, DALI CPU pipeline otherwise, torchvision when
    # DALI is not installed.
    loader: Loader = "auto"
    workers: int = 2
    # Unreadable or truncated images are skipped and counted; strict makes them an error.
    strict: bool = False
    # Use at most this many training images (a quick subset; chosen with the run's seed).
    max_images: int | None = None
    # Random-resized-crop lower scale bound (MoCo v2: 0.2).
    min_scale: float = 0.2
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


Schedule = Literal["cosine", "constant"]
Optimizer = Literal["sgd", "adam", "adamw"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
EvalProtocol = Literal["frozen", "paper"]
ProbeSolver = Literal["lbfgs", "sgd"]


@dataclass
class TrainConfig:
    epochs: int = 1
    # Stop after this many optimizer steps in total (None = epochs * steps per epoch).
    max_steps: int | None = None
    batch_size: int = 64
    optimizer: Optimizer = "sgd"
    # Learning rate for a batch of 256; scaled linearly with batch_size (MoCo v2: 0.03).
    lr: float = 0.03
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    warmup_steps: int = 0
    # cosine: linear warm-up then cosine decay to zero (MoCo v2, DisCo, SEED). constant: linear
    # warm-up then the base lr throughout (DoGo's reference: Adam 3e-4, no decay).
    schedule: Schedule = "cosine"
    # Also write TensorBoard event files into <run>/tensorboard (needs the `tensorboard` package).
    tensorboard: bool = False
    # auto = bf16 autocast on CUDA, fp32 on CPU.
    precision: Precision = "auto"
    # auto = channels_last on CUDA and on the CPU (oneDNN's NHWC kernels: 1.2-2.6x faster steps on
    # AVX2 and AVX-512 CPUs for these students, docs/scaling.md) | true | false (NCHW).
    channels_last: str = "auto"
    compile: bool = False
    # CPU: layers whose input is smaller than their kernel (the 1x1-4x4 maps of 32 px models) get
    # their weight gradient tap by tap (models/small_map_conv.py: oneDNN falls back to a slow GEMM
    # there; the same sums, 2-70x faster a layer). false = PyTorch's own kernel everywhere.
    cpu_small_map_grad: bool = True
    log_every: int = 10
    checkpoint_every: int = 200
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    # The frozen-feature probe's solver: lbfgs (logistic regression solved to convergence, at most
    # linear_max_iter iterations) or sgd (linear_epochs of SGD at linear_lr; see evaluate.linear_probe).
    linear_solver: ProbeSolver = "lbfgs"
    linear_max_iter: int = 1000
    linear_epochs: int = 100
    linear_lr: float = 0.1
    # None: chosen among 1e-4 / 1e-3 / 1e-2 by top-1 on held-out training features
    # (see evaluate.choose_probe); a number fixes it.
    linear_weight_decay: float | None = None
    batch_size: int = 256
    # frozen: features of the centre-cropped images extracted once, probe on standardised
    # features (fast; `linear_top1`). paper: also the papers' protocol (`paper_linear_top1`):
    # random-resized-crop + flip through the frozen backbone (BN frozen) every epoch, SGD momentum
    # 0.9, no weight decay, lr paper_lr divided by 10 at 60% and 80% of paper_epochs (MoCo's
    # schedule). eval.json then reports both.
    protocol: EvalProtocol = "frozen"
    # MoCo: 100 epochs; each epoch is a backbone forward over every training image (slow on a CPU).
    paper_epochs: int = 100
    # MoCo's linear-classification lr (30 for a batch of 256, scaled linearly with batch_size).
    paper_lr: float = 30.0


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # {"name": <method>, ...its hyper-parameters}; validated by the method's own dataclass.
    method: Any = None


CHOICES = {
    "data.loader": ("auto", "dali-gpu", "dali-cpu", "torchvision"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.channels_last": ("auto", "true", "false"),
}


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only the lossless cases."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, options))}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads exponents without a dot (`lr: 1e-4`) as strings; accept them as numbers.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, bool):
        # YAML reads `true` for a str field such as channels_last: keep its spelling.
        return "true" if value else "false"
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise UserError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if path == "teacher.precision" and value in TEACHER_PRECISION_NOT_OFFERED:
            raise UserError(TEACHER_PRECISION_NOT_OFFERED[value])
        if key not in fields:
            raise UserError(f"unknown key {path!r}{_did_you_mean(key, fields)}")
        kwargs[key] = _coerce(value, hints[key], path)
        if path in CHOICES and kwargs[key] not in CHOICES[path]:
            raise UserError(f"{path}: {kwargs[key]!r} is not one of {', '.join(CHOICES[path])}")
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=10")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
