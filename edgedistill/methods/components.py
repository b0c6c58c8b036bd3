"""Building blocks shared by methods: the frozen teacher and the embedding queue."""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgedistill.runfolder import TEACHER_CENTER_FILE, TEACHER_FIDELITY_FILE
from edgedistill.config import INT8_AUTO_MIN_TRAIN_IMAGES, ModelConfig
from edgedistill.distributed import all_gather_cat
from edgedistill.errors import UserError
from edgedistill.models import load_encoder


# Images of the training set (a seeded subset) whose mean teacher feature is the centre.
CENTER_IMAGES = 10_000
# Images whose pairwise cosines are summarised in the log (before / after centring).
COSINE_IMAGES = 2_000

# Teacher precision (teacher.precision): the fidelity a fast mode must reach, mean cosine between
# its target and fp32's on augmented training views, for `auto` to take it.
FIDELITY_MIN_COSINE = 0.999
# Training images whose two augmented views measure that cosine (seeded subset).
FIDELITY_IMAGES = 512
# Rounds of the modes' interleaved timing (`FrozenTeacher._time_modes`), after one warm-up round.
TIMING_ROUNDS = 5
# kNN top-1 of the teacher's targets, fp32 and fast: a labelled bank and held-out queries, both
# seeded subsets of the training set (centre crops); k and temperature are eval's defaults.
FIDELITY_KNN_BANK, FIDELITY_KNN_QUERIES, FIDELITY_KNN_K, FIDELITY_KNN_T = 2_000, 1_000, 20, 0.07
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fp32 arithmetic run by ONNX Runtime's CPU kernels (the teacher exported to ONNX; BatchNorm folded
# by its graph optimiser). Measured on one AVX2 core, CIFAR ResNet-56 at 32 px, batch 256: 966 ms
# against torch's 1,490 ms in channels_last (docs/results.md); torch wins on other teachers, so
# `auto` times it.
ORT_MODE = "fp32-ort"
# bf16 run by OpenVINO's CPU plugin (the same ONNX file; `INFERENCE_PRECISION_HINT` bf16, its fused
# kernels), on CPUs with AVX512_BF16 or AMX where the `openvino` package is installed. Measured on one
# core of an AMD EPYC (Zen 4, AVX512_BF16), CIFAR ResNet-56 at 32 px, batch 128: 1.22 ms an image
# against 1.51 for torch's bf16 autocast of the folded copy and 2.83 for fp32 (docs/results.md).
OV_MODE = "bf16-openvino"
# INT8 convolutions run by OpenVINO: the teacher's ONNX file quantized by the export's own path
# (`deploy.quantize`: QDQ in this CPU class's format, per-channel weights, Percentile 99.999
# activation ranges calibrated on augmented training views), every convolution after the first
# stage in INT8; the stem, the first stage (`quantize.first_stage_nodes`) and everything else in
# bf16 where the CPU has it (fp32 otherwise). The first stage is where INT8 costs the target most:
# with only the stem float the CIFAR ResNet-56's centred target had a mean cosine to fp32's of
# 0.9987 on an AMD EPYC Zen 4 (8-bit weights) and 0.9985 on an AVX2 one (7-bit), below
# FIDELITY_MIN_COSINE; with the first stage float too, 0.9993 on the AVX2 one (docs/results.md).
# Calibrating costs the run's start (30 s of one AVX2 thread for the CIFAR ResNet-56, beside other
# jobs), so `auto` tries it only on a run long enough to repay that many times over: at least
# INT8_AUTO_MIN_TRAIN_IMAGES training images (DisCo's step there went from 1.47 s to 1.10 s a
# batch of 128 against fp32-ort, 2.9 ms an image: 30 s back after ~10,000 images). Shorter runs
# (the demo's 12,800, the tests') keep the modes that cost no calibration.
INT8_OV_MODE = "int8-openvino"
INT8_CALIBRATOR = {"calibrator": "percentile", "percentile": 99.999}
# Training images (a seeded subset, apart from the fidelity images) whose two views calibrate it.
INT8_CALIBRATION_IMAGES = 256
# The modes that run the teacher exported to ONNX, and the runtime of each.
EXPORTED_MODES = {ORT_MODE: "onnxruntime", OV_MODE: "openvino", INT8_OV_MODE: "openvino"}
TEACHER_MODES = ("fp32", *AMP_DTYPES, *EXPORTED_MODES)
# `auto` takes a fast mode only when it ran at least this many times fp32's speed on the fidelity
# views (1: any gain; a mode that passes fidelity but is slower, e.g. ONNX Runtime where torch's
# kernels win, is left).
AUTO_MIN_SPEEDUP = 1.0


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512_BF16 or AMX-BF16), per the environment stamp."""
    from edgedistill.envinfo import cpu_info

    isa = cpu_info()["isa"]
    return bool(isa.get("avx512_bf16") or isa.get("amx_bf16"))


def fast_teacher_modes(device: torch.device, on_request: bool = False) -> list[str]:
    """The fast teacher modes `device` runs natively ([] = fp32 only): `auto` measures each against
    fp32 and takes the fastest whose fidelity passes. `on_request`: also int8-openvino, which `auto`
    offers only to long runs (`auto_teacher_modes`)."""
    if device.type == "cuda":
        return ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    if device.type != "cpu":
        return []
    bf16, openvino = cpu_has_bf16(), openvino_installed()
    return (["bf16"] if bf16 else []) + [ORT_MODE] + ([OV_MODE] if bf16 and openvino else []) + (
        [INT8_OV_MODE] if on_request and openvino else [])


def auto_teacher_modes(device: torch.device, train_images: int | None) -> list[str]:
    """What `auto` measures for a run that will put `train_images` images through the teacher
    (None: not known, a bare prepare): int8-openvino too when the run repays its calibration."""
    return fast_teacher_modes(device, on_request=(train_images or 0) >= INT8_AUTO_MIN_TRAIN_IMAGES)


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def choose_teacher_mode(requested: str, fp32_ms: float | None, modes: dict[str, dict]) -> str:
    """The mode a teacher runs in, from its measurements (`modes`: mode -> {"passed", "ms_per_image"}):
    an explicit request is kept; `auto` takes the fastest mode that passed the fidelity check and
    ran faster than fp32, else fp32."""
    if requested != "auto":
        return requested
    faster = {mode: m["ms_per_image"] for mode, m in modes.items()
              if m["passed"] and (fp32_ms is None or m["ms_per_image"] * AUTO_MIN_SPEEDUP < fp32_ms)}
    return min(faster, key=faster.get) if faster else "fp32"


def check_teacher_precision(mode: str, device: torch.device) -> None:
    """A one-line error for an explicit teacher.precision this device cannot run fast."""
    from edgedistill.config import TEACHER_PRECISION_NOT_OFFERED

    if mode not in ("auto", *TEACHER_MODES):
        raise UserError(TEACHER_PRECISION_NOT_OFFERED.get(mode)
                        or f"teacher precision {mode!r} is not one of auto, {', '.join(TEACHER_MODES)}")
    if mode in ("fp32", "auto") or mode in fast_teacher_modes(device, on_request=True):
        return
    if mode == ORT_MODE:
        raise UserError(f"teacher.precision: {ORT_MODE} runs the teacher with ONNX Runtime on the CPU (this run is on "
                        f"{device.type}): use teacher.precision=auto or fp32")
    if mode == INT8_OV_MODE:
        why = f"this run is on {device.type}" if device.type != "cpu" else "the openvino package is not installed: pip install openvino"
        raise UserError(f"teacher.precision: {INT8_OV_MODE} runs the teacher's convolutions in INT8 with OpenVINO on "
                        f"the CPU ({why}): use teacher.precision=auto or fp32")
    if mode == OV_MODE:
        why = (f"this run is on {device.type}" if device.type != "cpu" else "this CPU has neither AVX512_BF16 nor AMX"
               if not cpu_has_bf16() else "the openvino package is not installed: pip install openvino")
        raise UserError(f"teacher.precision: {OV_MODE} runs the teacher in bf16 with OpenVINO on a CPU with AVX512_BF16 "
                        f"or AMX ({why}): use teacher.precision=auto or fp32")
    if mode == "fp16":
        raise UserError(f"teacher.precision: fp16 needs a CUDA device (this run is on {device.type}): "
                        "use teacher.precision=auto (or bf16 / fp32)")
    raise UserError(f"teacher.precision: {mode} on {device.type} needs AVX512_BF16 or AMX (this CPU has neither, bf16 "
                    "would be emulated and slower than fp32): use teacher.precision=auto or fp32")


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of `module` (in eval mode) with every Conv-BN pair folded into one convolution
    (torch.fx); an untraceable model is copied unfolded."""
    from torch.fx.experimental.optimization import fuse

    module = copy.deepcopy(module).eval()
    try:
        return fuse(module)
    except Exception as e:  # noqa: BLE001 - fx tracing fails in many ways on dynamic models
        logging.getLogger(__name__).info("teacher BatchNorm not folded (%s: %s)", type(e).__name__,
                                         str(e).splitlines()[0] if str(e) else "")
        return module


class ExportedTeacher:
    """The teacher's encoder exported to ONNX (fp32) and run by a CPU runtime, as a callable on torch
    tensors (NCHW or channels_last in, fp32 embeddings out): ONNX Runtime in fp32 (fp32-ort),
    OpenVINO with bf16 inference (bf16-openvino), or the file quantized to INT8 and run by OpenVINO
    (int8-openvino, calibrated on `calibration`: augmented training views, or, when none are given,
    the first batch it runs, which is for speed measurements only). OpenVINO through the device
    kit's one Core per process. One compiled model per (square) input size, with torch's intra-op
    thread count."""

    def __init__(self, encoder: nn.Module, mode: str, calibration=None):
        self.encoder, self.mode, self.runtime = encoder, mode, EXPORTED_MODES[mode]
        self.calibration = calibration  # a tensor of views, or a callable that makes them
        self.runners: dict[int, object] = {}
        self.int8: dict | None = None  # int8-openvino: what was quantized, on what

    def _compile(self, path) -> object:
        """A callable from a float32 NCHW array to the embeddings, for the ONNX file at `path`."""
        threads = torch.get_num_threads()
        if self.runtime == "onnxruntime":
            from edgedistill.deploy.runtime import session

            sess = session(path, threads=threads)
            name = sess.get_inputs()[0].name
            return lambda batch: sess.run(None, {name: batch})[0]
        from edgedistill.kit import load_kit_module

        precision = "bf16" if self.mode == OV_MODE or cpu_has_bf16() else "f32"
        return load_kit_module("edgekit").OpenVinoRunner(path, threads, inference_precision=precision).predict

    def _quantized(self, path, views: torch.Tensor):
        """`path` quantized to INT8 by the export's quantization path (its calibration and QDQ
        format for this CPU class): every convolution after the first stage."""
        import hashlib

        from edgedistill.deploy import quantize as q
        from edgedistill.deploy.onnx_module import INPUT_NAME

        pre, out = path.with_suffix(".pre.onnx"), path.with_suffix(".int8.onnx")
        q.prepare(path, pre)
        settings = q.QuantSettings(**INT8_CALIBRATOR)
        array = views.detach().float().contiguous().numpy()
        array = array[:len(array) - len(array) % settings.calib_batch] if len(array) > settings.calib_batch else array
        batch = min(settings.calib_batch, len(array))

        def reader():
            from onnxruntime.quantization import CalibrationDataReader

            class Views(CalibrationDataReader):
                def __init__(self):
                    self.batches = iter(array[i:i + batch] for i in range(0, len(array), batch))

                def get_next(self):
                    chunk = next(self.batches, None)
                    return None if chunk is None else {INPUT_NAME: chunk}

            return Views()

        calib = q.Calibration(pre, [], [hashlib.sha256(array.tobytes()).hexdigest()], settings,
                              {"teacher_views": len(array)}, path.parent, reader)
        cpu_class = q.resolve_cpu_class("auto")
        plan = q.QuantPlan("ort-cpu", cpu_class, op_types=("Conv",), float_nodes=tuple(q.first_stage_nodes(pre)))
        q.quantize(pre, out, q.CLASS_FORMAT[cpu_class], calib, plan)
        self.int8 = {**q.int8_share(pre, out), "format": q.CLASS_FORMAT[cpu_class], "cpu_class": cpu_class,
                     "calibrator": settings.label, "calibration_views": len(array), "float": "the stem and the first stage"}
        logging.getLogger(__name__).info("teacher %s: %d of %d convolutions in INT8 (%s, %s ranges of %d views)",
                                         self.mode, self.int8["int8"], self.int8["weighted_layers"],
                                         self.int8["format"], settings.label, len(array))
        return out

    def _runner(self, x: torch.Tensor):
        import tempfile
        from pathlib import Path

        from edgedistill.deploy.onnx_module import export_module

        height, width = x.shape[-2:]
        if height != width:
            raise UserError(f"teacher.precision {self.mode}: square inputs only (got {height}x{width}); use fp32")
        if height not in self.runners:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "teacher.onnx"
                # A copy: the export puts the model in eval mode, the encoder keeps its own.
                export_module(copy.deepcopy(self.encoder), path, height, "embedding")
                if self.mode == INT8_OV_MODE:
                    views = self.calibration() if callable(self.calibration) else self.calibration
                    if views is None:
                        logging.getLogger(__name__).warning("teacher %s calibrated on the first batch it ran (no "
                                                            "training views given): for speed only", self.mode)
                        views = x
                    path = self._quantized(path, views)
                self.runners[height] = self._compile(path)
        return self.runners[height]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        run = self._runner(x)
        return torch.from_numpy(run(x.detach().float().contiguous().numpy()))


def cosine_summary(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Per-row cosine between two sets of embeddings: mean, 0.1% quantile and minimum."""
    cos = F.cosine_similarity(reference.float(), other.float(), dim=1).double()
    return {"mean_cosine": round(float(cos.mean()), 6), "q001_cosine": round(float(torch.quantile(cos, 0.001)), 6),
            "min_cosine": round(float(cos.min()), 6), "rows": int(cos.numel())}


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows (1 = every row points the same way)."""
    z = F.normalize(features.float(), dim=1)
    n = z.shape[0]
    if n < 2:
        return float("nan")
    total = z.sum(dim=0).pow(2).sum() - z.pow(2).sum()  # sum over i != j of z_i . z_j
    return float(total / (n * (n - 1)))


class FrozenTeacher(nn.Module):
    """A teacher loaded from a local checkpoint, never trained; `forward` returns its final
    embedding, L2-normalised, without gradient.

    bn_mode "eval" (default) keeps its BN statistics frozen; "train" uses batch statistics under
    no_grad, as the DisCo reference code does. Methods list "teacher." in `frozen_prefixes` so
    checkpoints do not carry it (it is rebuilt from its source).

    center: for a teacher without a projection head (a supervised checkpoint), subtract the
    per-channel mean of its pooled features over the training set before normalising. Pooled
    post-ReLU features are non-negative, so without it every target sits in one orthant (mean
    pairwise cosine 0.57 for the CIFAR ResNet-56) and a distance loss pulls the student's
    embedding there too. The mean is computed once by `prepare` and kept in the run folder
    (teacher_center.json), which a resumed run reuses. Teachers with a projection head (MoCo
    checkpoints) already give centred, spread embeddings and are left as they are.

    precision (`teacher.precision`): "fp32" runs `encoder` exactly as before (under whatever
    autocast the trainer's train.precision sets). "bf16" / "fp16" run `fast`, a copy of the encoder
    with BatchNorm folded into the convolutions (bn_mode eval; with bn_mode "train" the encoder
    itself, BN unfolded), in channels_last under autocast of that dtype. "fp32-ort" runs the encoder
    exported to ONNX in an ONNX Runtime CPU session (fp32; bn_mode eval only), "bf16-openvino" the
    same ONNX file in OpenVINO with bf16 inference (AVX512_BF16 / AMX CPUs). The target is still
    centred and normalised in fp32. "auto" measures, at `prepare`, every mode of
    `fast_teacher_modes(device)` against fp32 on augmented training views and takes the fastest
    whose target has mean cosine >= FIDELITY_MIN_COSINE to fp32's and that ran faster than fp32
    (`choose_teacher_mode`), else fp32, and says which it refused and why. The measurement (cosine
    mean / 0.1% quantile, kNN top-1 with fp32 and with the fast targets, ms an image) is logged and
    written to <run>/teacher_fidelity.json, which a resumed run reuses.
    """

    def __init__(self, cfg: ModelConfig, bn_mode: str = "eval", center: bool = False):
        super().__init__()
        if bn_mode not in ("eval", "train"):
            raise UserError(f"method.teacher_bn must be 'eval' or 'train', got {bn_mode!r}")
        self.encoder = load_encoder(cfg)
        self.encoder.requires_grad_(False)
        self.bn_mode = bn_mode
        self.out_dim = self.encoder.out_dim
        self.has_head = isinstance(self.encoder.head, nn.Sequential)
        self.center_wanted = center and not self.has_head
        self.register_buffer("center", torch.zeros(self.out_dim))
        self.centered = False
        self._warned = False
        self.precision = getattr(cfg, "precision", "fp32")
        self.mode: str | None = "fp32" if self.precision == "fp32" else None  # resolved by prepare / set_mode
        self.fast: nn.Module | None = None
        self.compile = bool(getattr(cfg, "compile", False))
        # What runs instead of `fast` (not a submodule): torch.compile(self.fast), or the
        # ExportedTeacher of fp32-ort / bf16-openvino (then `fast` is None).
        self._runner = None
        self.batch_size = 256  # the forward's batch: fidelity chunks are padded to it (one compiled shape)
        # int8-openvino's calibration views (a callable, set by prepare from the training images)
        self.calibration_views = None
        # What `auto` measures at prepare (None: fast_teacher_modes; a benchmark sets every mode it times)
        self.candidates: list[str] | None = None
        self.fidelity: dict | None = None
        self.train(True)

    def set_mode(self, mode: str) -> None:
        """Run the teacher in `mode` (TEACHER_MODES) from now on; builds the folded copy on the
        encoder's device (or the exported teacher's runtime) once (no fidelity check: `prepare`
        does that)."""
        if mode not in TEACHER_MODES:
            raise UserError(f"teacher precision {mode!r} is not one of {', '.join(TEACHER_MODES)}")
        if mode in EXPORTED_MODES and self.bn_mode == "train":
            raise UserError(f"teacher.precision {mode} needs method.teacher_bn=eval (batch statistics do not "
                            "export): use fp32")
        param = next(self.encoder.parameters())
        cache = self.__dict__.setdefault("_built", {})  # (mode, compile) -> (fast, runner): switching back is free
        key = (mode, self.compile)
        fast, runner = cache.get(key, (None, None))
        if (fast, runner) == (None, None) or (fast is not None and next(fast.parameters()).device != param.device):
            fast, runner = None, None
            if mode in EXPORTED_MODES:
                runner = ExportedTeacher(self.encoder, mode, self.calibration_views if mode == INT8_OV_MODE else None)
            elif mode != "fp32" and self.bn_mode == "eval":
                fast = fold_batchnorm(self.encoder).to(param.device).to(memory_format=torch.channels_last)
                fast.requires_grad_(False)
                if self.compile:
                    runner = torch.compile(fast, dynamic=False)
            elif self.compile and mode != "fp32":
                logging.getLogger(__name__).info("teacher.compile: not with method.teacher_bn=train (BN unfolded)")
            if (fast, runner) != (None, None):
                cache[key] = (fast, runner)
        self.fast = fast
        object.__setattr__(self, "_runner", runner)
        self.mode = mode

    def _features(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "fp32":
            return self.encoder(x).float()
        if mode in EXPORTED_MODES:
            return self._runner(x)
        module = self.fast if self.fast is not None else self.encoder
        if self._runner is not None:
            module = self._runner
        with torch.autocast(x.device.type, dtype=AMP_DTYPES[mode]):
            return module(x.contiguous(memory_format=torch.channels_last)).float()

    def _target(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        features = self._features(x, mode)
        if self.centered:
            features = features - self.center
        return F.normalize(features, dim=1)

    @torch.no_grad()
    def prepare(self, run_dir, folder, data_cfg, seed: int, device: torch.device,
                augmentation: str = "mocov2", batch_size: int | None = None, channels_last: bool = False,
                train_images: int | None = None) -> dict | None:
        """Load or compute the centre, then settle the precision (see the class doc); returns the
        centre's statistics, or None when centring is off. `batch_size`: the training step's
        per-process batch (the teacher's forward batch); `channels_last`: the step's memory format,
        in which the modes are timed (fp32 in NCHW is up to 2x slower on a CPU than in the step);
        `train_images`: how many images the run will put through the teacher (what `auto` measures
        depends on it: `auto_teacher_modes`)."""
        if batch_size:
            self.batch_size = batch_size
        stats = self._prepare_center(run_dir, folder, data_cfg, seed, device)
        self._prepare_precision(run_dir, folder, data_cfg, seed, device, augmentation, channels_last, train_images)
        return stats

    def _prepare_center(self, run_dir, folder, data_cfg, seed: int, device: torch.device) -> dict | None:
        import json
        from pathlib import Path

        from edgedistill.data.torch_loader import eval_loader
        from edgedistill.fileio import write_json

        if not self.center_wanted:
            return None
        log = logging.getLogger(__name__)
        path = Path(run_dir) / TEACHER_CENTER_FILE
        if path.is_file():
            stats = json.loads(path.read_text())
            if len(stats["mean"]) != self.out_dim:
                raise UserError(f"{path} holds a {len(stats['mean'])}-d centre but the teacher embedding is "
                                f"{self.out_dim}-d: delete the file (or the run folder) and start again")
            log.info("teacher centre reused from %s", path)
        else:
            count = min(len(folder), CENTER_IMAGES)
            # A seeded random subset, in random order (so the first COSINE_IMAGES mix every class).
            indices = np.random.default_rng([seed, 0xCE]).permutation(len(folder))[:count].tolist()
            was_training = self.encoder.training
            self.encoder.eval()
            feats = torch.cat([self.encoder(images.to(device)).float().cpu()
                               for images, _ in eval_loader(folder, data_cfg, 256, indices)])
            self.encoder.train(was_training)
            mean = feats.mean(dim=0)
            sample = feats[:COSINE_IMAGES]
            stats = {"mean": [round(float(v), 7) for v in mean], "images": count,
                     "mean_pairwise_cosine_before": round(mean_pairwise_cosine(sample), 4),
                     "mean_pairwise_cosine_after": round(mean_pairwise_cosine(sample - mean), 4)}
            write_json(path, stats)
        self.center.copy_(torch.tensor(stats["mean"], dtype=torch.float32))
        self.centered = True
        log.info("teacher target centred with the per-channel mean of %d training images: mean pairwise cosine "
                 "%.3f before, %.3f after", stats["images"], stats["mean_pairwise_cosine_before"],
                 stats["mean_pairwise_cosine_after"])
        return stats

    def _prepare_precision(self, run_dir, folder, data_cfg, seed: int, device: torch.device, augmentation: str,
                           channels_last: bool, train_images: int | None = None) -> None:
        import json
        from pathlib import Path

        from edgedistill.fileio import write_json

        log = logging.getLogger(__name__)
        check_teacher_precision(self.precision, device)
        memory_format = "channels_last" if channels_last else "contiguous"
        if folder is not None:
            self.calibration_views = lambda: self._calibration_data(folder, data_cfg, seed, augmentation)
        path = Path(run_dir) / TEACHER_FIDELITY_FILE
        if path.is_file():
            saved = json.loads(path.read_text())
            if (saved.get("requested"), saved.get("compile", False), saved.get("device_type"),
                    saved.get("memory_format", "contiguous")) == (self.precision, self.compile, device.type, memory_format):
                self.fidelity = saved
                self.set_mode(saved["chosen"])
                log.info("teacher precision %s -> %s, reused from %s", self.precision, self.mode, path)
                return
        candidates = (self.candidates or auto_teacher_modes(device, train_images)) if self.precision == "auto" else (
            [] if self.precision == "fp32" else [self.precision])
        record = {"requested": self.precision, "compile": self.compile, "device_type": device.type, "device": str(device),
                  "memory_format": memory_format, "threshold_mean_cosine": FIDELITY_MIN_COSINE,
                  "candidates": candidates, "train_images": train_images, "modes": {}}
        if self.precision == "auto" and self.candidates is None and INT8_OV_MODE not in candidates \
                and INT8_OV_MODE in fast_teacher_modes(device, on_request=True):
            record["note"] = (f"{INT8_OV_MODE} not tried: the run's {train_images or 'unknown number of'} training images "
                              f"are fewer than the {INT8_AUTO_MIN_TRAIN_IMAGES:,} that repay its calibration")
        if candidates and folder is None:
            # Nothing to measure on: auto stays exact; an explicit mode is taken unmeasured.
            chosen = "fp32" if self.precision == "auto" else self.precision
            record["note"] = "no training images to measure fidelity on"
        else:
            chosen = "fp32"
            if candidates:
                layout = torch.channels_last if channels_last else torch.contiguous_format
                self.encoder.to(memory_format=layout)  # as the trainer will put it (the method, teacher included)
                views, bank, queries = self._fidelity_data(folder, data_cfg, seed, device, augmentation, layout)
                reference = self._fidelity(views, bank, queries, "fp32")
                for mode in candidates:
                    self.set_mode(mode)
                    record["modes"][mode] = self._fidelity(views, bank, queries, mode, reference)
                    if mode == INT8_OV_MODE:
                        record["modes"][mode]["int8"] = self._runner.int8
                speed = self._time_modes(views, ["fp32", *candidates])
                record["fp32"] = {"knn_top1": reference["knn_top1"], "ms_per_image": speed["fp32"]}
                record["timing"] = (f"median of {TIMING_ROUNDS} interleaved rounds (after a warm-up round), one forward "
                                    f"of {self.batch_size} views per mode and round")
                for mode in candidates:
                    measured = record["modes"][mode]
                    passed = measured["mean_cosine"] >= FIDELITY_MIN_COSINE
                    measured.update(ms_per_image=speed[mode], passed=passed)
                    log.info("teacher %s vs fp32 on %d augmented training views: mean cosine %.6f, 0.1%% quantile "
                             "%.6f; teacher kNN top-1 fp32 %.2f, %s %.2f (%s queries on the fp32 bank %.2f); "
                             "%.3f ms an image (fp32 %.3f)", mode, measured["rows"], measured["mean_cosine"],
                             measured["q001_cosine"], reference["knn_top1"], mode, measured["knn_top1"], mode,
                             measured["knn_top1_on_fp32_bank"], measured["ms_per_image"], speed["fp32"])
                    if not passed and self.precision == "auto":
                        log.warning("teacher.precision auto: %s refused (mean cosine %.6f to fp32 < %.4f)", mode,
                                    measured["mean_cosine"], FIDELITY_MIN_COSINE)
                    elif not passed:
                        log.warning("teacher.precision %s: mean cosine %.6f to fp32 is below %.4f (auto would "
                                    "refuse it); kept because the recipe asks for it", mode,
                                    measured["mean_cosine"], FIDELITY_MIN_COSINE)
                chosen = choose_teacher_mode(self.precision, speed["fp32"], record["modes"])
            elif self.precision == "auto":
                record["note"] = f"no fast teacher mode on this {device.type} (bf16 needs AVX512_BF16/AMX or CUDA)"
        self.set_mode(chosen)
        record["chosen"] = chosen
        self.fidelity = record
        write_json(path, record)
        log.info("teacher precision %s -> %s (%s)", self.precision, chosen, path)

    def _fidelity_data(self, folder, data_cfg, seed: int, device: torch.device, augmentation: str,
                       layout: torch.memory_format):
        """Augmented views of a seeded subset of the training images (the training recipe's
        augmentation, two views each), and a kNN bank / query split of centre crops with labels,
        the images in `layout` (the training step's memory format)."""
        from edgedistill.data.torch_loader import ForkSafeDataLoader, ViewsDataset, eval_loader, view_transform

        order = self._subset_order(folder, seed)
        count = min(len(folder), FIDELITY_IMAGES)
        dataset = ViewsDataset(folder, view_transform(data_cfg, augmentation), 2, seed, 0xF1)
        views = torch.cat([v.flatten(0, 1) for v, _ in ForkSafeDataLoader(dataset, batch_size=128, sampler=order[:count],
                                                                           num_workers=data_cfg.workers)])
        n_bank = min(FIDELITY_KNN_BANK, len(folder) * 2 // 3)
        n_query = min(FIDELITY_KNN_QUERIES, len(folder) - n_bank)

        def crops(indices):
            images, labels = zip(*eval_loader(folder, data_cfg, 256, indices))
            return torch.cat(images).contiguous(memory_format=layout), torch.cat(labels)

        views = views.to(device).contiguous(memory_format=layout)
        return views, crops(order[:n_bank]), crops(order[n_bank:n_bank + n_query])

    @staticmethod
    def _subset_order(folder, seed: int) -> list[int]:
        """The seeded order of the training images the fidelity check (from the front) and the INT8
        teacher's calibration (from the back) take their subsets from."""
        return np.random.default_rng([seed, 0xF1]).permutation(len(folder)).tolist()

    def _calibration_data(self, folder, data_cfg, seed: int, augmentation: str) -> torch.Tensor:
        """int8-openvino's calibration: two augmented views each of the last INT8_CALIBRATION_IMAGES
        images of `_subset_order` (apart from the fidelity check's images where the set is large enough)."""
        from edgedistill.data.torch_loader import ForkSafeDataLoader, ViewsDataset, view_transform

        indices = self._subset_order(folder, seed)[-INT8_CALIBRATION_IMAGES:]
        dataset = ViewsDataset(folder, view_transform(data_cfg, augmentation), 2, seed, 0xCA)
        return torch.cat([v.flatten(0, 1) for v, _ in ForkSafeDataLoader(dataset, batch_size=128, sampler=indices,
                                                                         num_workers=data_cfg.workers)])

    def _fidelity(self, views, bank, queries, mode: str, reference: dict | None = None) -> dict:
        from edgedistill.knn import knn_top1

        device = views.device
        was_training = self.encoder.training
        self.encoder.eval()  # the kNN and the cosine use the frozen statistics

        def embed(images):
            return torch.cat([self._target(self._padded(chunk).to(device), mode)[:chunk.shape[0]].cpu()
                              for chunk in images.split(self.batch_size)])

        try:
            out = {"views": embed(views), "bank": embed(bank[0]), "queries": embed(queries[0])}
        finally:
            self.encoder.train(was_training)
        classes = int(max(bank[1].max(), queries[1].max())) + 1
        knn = round(knn_top1(out["bank"], bank[1], out["queries"], queries[1], FIDELITY_KNN_K, FIDELITY_KNN_T, classes), 2)
        if reference is None:
            return {**out, "knn_top1": knn}
        return {**cosine_summary(reference["views"], out["views"]), "knn_top1": knn,
                "knn_top1_on_fp32_bank": round(knn_top1(reference["bank"], bank[1], out["queries"], queries[1],
                                                        FIDELITY_KNN_K, FIDELITY_KNN_T, classes), 2),
                "knn_bank": int(bank[1].numel()), "knn_queries": int(queries[1].numel())}

    def _padded(self, chunk: torch.Tensor) -> torch.Tensor:
        """`chunk` padded with zero images to the training batch, in its layout: a compiled teacher
        sees one shape (BN is frozen here, so padding rows change nothing in the others)."""
        rows = chunk.shape[0]
        if rows == self.batch_size:
            return chunk
        layout = torch.channels_last if chunk.stride(1) == 1 else torch.contiguous_format
        return torch.cat([chunk, chunk.new_zeros((self.batch_size - rows, *chunk.shape[1:]))]).contiguous(
            memory_format=layout)

    def _time_modes(self, views: torch.Tensor, modes: list[str]) -> dict[str, float]:
        """ms an image of each mode's target on one training batch of the fidelity views (in the
        step's layout), the modes in interleaved rounds so that a busy neighbour (the training
        loader prefetching, another job) slows them alike; the first round warms up (and compiles).
        Leaves the teacher in the last mode timed."""
        batch = self._padded(views[:self.batch_size])
        was_training = self.encoder.training
        self.encoder.eval()
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        try:
            for round_ in range(TIMING_ROUNDS + 1):
                for mode in modes:
                    self.set_mode(mode)
                    start = time.perf_counter()
                    self._target(batch, mode)
                    if round_:
                        seconds[mode].append(time.perf_counter() - start)
        finally:
            self.encoder.train(was_training)
        return {mode: round(1000 * float(np.median(t)) / batch.shape[0], 4) for mode, t in seconds.items()}

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.train(mode and self.bn_mode == "train")
        if self.fast is not None:
            self.fast.eval()  # folded: no BatchNorm left to put in train mode
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center_wanted and not self.centered and not self._warned:
            # The trainer always prepares; a bare forward (e.g. a speed benchmark) gets the raw target.
            logging.getLogger(__name__).warning("teacher centring is on but prepare() has not run: uncentred target")
            self._warned = True
        if self.mode is None:
            # Not prepared (a bare forward): the requested mode unmeasured, or auto's first candidate.
            check_teacher_precision(self.precision, x.device)
            fast = fast_teacher_modes(x.device)
            self.set_mode(self.precision if self.precision != "auto" else (fast[0] if fast else "fp32"))
            logging.getLogger(__name__).warning("teacher precision %s -> %s without a fidelity check (prepare() has "
                                                "not run)", self.precision, self.mode)
        return self._target(x, self.mode)


class EmbeddingQueue(nn.Module):
    """A FIFO of L2-normalised embeddings (MoCo's negatives, SEED's teacher bank).

    Under DDP every rank enqueues the embeddings gathered from all ranks, so the queues stay
    identical without broadcasting.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise UserError(f"method.queue_size must be positive, got {size}")
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def snapshot(self) -> torch.Tensor:
        """The current contents, detached from later in-place updates (safe inside a loss)."""
        return self.embeddings.clone().detach()

    @torch.no_grad()
    def push(self, batch: torch.Tensor) -> None:
        batch = all_gather_cat(batch.float())
        n, size = batch.shape[0], self.embeddings.shape[0]
        if size % n:
            raise UserError(f"method.queue_size {size} must be a multiple of the global batch {n}")
        ptr = int(self.ptr)
        # Out of place: under torch.compile the loss's backward may read the queue tensor itself
        # (the snapshot's clone is recomputed, not saved), which an in-place write would corrupt.
        self.embeddings = torch.cat([self.embeddings[:ptr], batch.to(self.embeddings.dtype),
                                     self.embeddings[ptr + n :]])
        self.ptr.fill_((ptr + n) % size)


# Shuffle-BN: a split smaller than this gives noisy BN statistics; the automatic choice keeps
# every split at least this large (MoCo's CIFAR notebook: batch 512 in 8 groups of 64). Measured:
# groups of 32 at the demo's batch of 64 cost its DisCo student 3 points (78.9 vs 82.0 linear).
MIN_SPLIT_SIZE = 64
MAX_AUTO_SPLITS = 8


def auto_shuffle_bn_splits(local_batch: int) -> int:
    """The default number of key-encoder BN groups: the largest count up to 8 that divides the
    per-process batch and keeps every group at >= 64 samples (1 = plain BN, below 128)."""
    for splits in range(MAX_AUTO_SPLITS, 1, -1):
        if local_batch % splits == 0 and local_batch // splits >= MIN_SPLIT_SIZE:
            return splits
    return 1


def resolve_shuffle_bn_splits(requested: int | None, local_batch: int) -> int:
    """`method.shuffle_bn_splits` checked against the per-process batch; None = automatic."""
    if requested is None:
        return auto_shuffle_bn_splits(local_batch)
    if requested < 1 or local_batch % requested:
        raise UserError(
            f"method.shuffle_bn_splits={requested} must be a positive divisor of the per-process batch "
            f"{local_batch}: use 1 (off), a divisor such as {auto_shuffle_bn_splits(local_batch)}, or leave it unset"
        )
    return requested


class ShuffleBN:
    """MoCo's shuffle-BN for a key encoder, so BN statistics cannot tell which key matches which query.

    `forward(encoder, x)` permutes the batch, runs `encoder` on `splits` equal groups (each with
    its own BN batch statistics), and returns the outputs in the input order. Under DDP the batch
    is first gathered from every rank, permuted with a permutation every rank draws from the same
    seed, and each rank encodes its slice of the shuffled global batch; the outputs are gathered
    and unshuffled (facebookresearch/moco `_batch_shuffle_ddp`, with a shared seed in place of a
    broadcast). The permutation depends only on (run seed, call count), and the call count is a
    buffer of the owning method, so a resumed run draws the same permutations.
    """

    def __init__(self, splits: int, seed: int):
        self.splits = splits
        self.seed = seed

    def permutation(self, n: int, call: int) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed, call, 0x5B]).generate_state(1, np.uint64)[0] >> 1)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def __call__(self, encoder: nn.Module, x: torch.Tensor, call: int) -> torch.Tensor:
        from edgedistill import distributed as dist_utils

        world = dist_utils.world_size()
        if self.splits == 1 and world == 1:
            return encoder(x)
        local = x.shape[0]
        x_all = all_gather_cat(x)
        order = self.permutation(x_all.shape[0], call).to(x.device)
        rank = dist_utils.rank()
        mine = x_all[order[rank * local : (rank + 1) * local]]
        out = torch.cat([encoder(group) for group in mine.chunk(self.splits)], dim=0)
        out_all = all_gather_cat(out)
        restored = torch.empty_like(out_all)
        restored[order] = out_all
        return restored[rank * local : (rank + 1) * local]
