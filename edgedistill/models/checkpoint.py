"""Loading weights from local files, safely, and writing them atomically.

Accepted teacher/peer checkpoints (all loaded with `weights_only=True`, never executed):
- a MoCo v1/v2 checkpoint: {"state_dict": {"module.encoder_q.<backbone>", "...fc.0/fc.2" (MLP)}};
  the MLP becomes the projection head, so the teacher embedding is the MoCo output;
- a plain, timm or torchvision state dict (optionally under "state_dict"/"model", optionally
  with a "module." prefix), or a .safetensors file: the classifier is dropped and the teacher
  embedding is the pooled backbone feature;
- the legacy (pre-1.6, non-zip) CIFAR ResNet checkpoints in ../shared/teachers/;
- an edgedistill run folder: its student.safetensors (+ head.safetensors when present).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from edgedistill.runfolder import CLASSIFIER_FILE, CONFIG_FILE, HEAD_FILE, STUDENT_FILE  # noqa: F401 (re-exported by models)
from edgedistill.config import ModelConfig
from edgedistill.errors import UserError
from edgedistill.fileio import atomic_write
from edgedistill.models.backbones import Encoder, create_backbone, feature_dim, head_from_state

log = logging.getLogger(__name__)



def save_torch(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_classifier(path: Path) -> tuple[nn.Linear, dict[str, str]]:
    """classifier.safetensors (a linear probe from `eval`, or a jointly trained fc) as an
    nn.Linear, with the file's metadata (classes, source, ...)."""
    from safetensors import safe_open

    path = Path(path)
    state = load_file(str(path))
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        raise UserError(f"{path} is not a linear classifier (expected weight [classes, features] and bias): "
                        "re-run `edgedistill eval`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    fc = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    fc.load_state_dict(state)
    return fc, meta


def load_torch_file(path: Path):
    """torch.load with weights_only=True and a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass a local file path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise UserError(
            f"{path}: cannot be loaded with weights_only=True ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "only tensor checkpoints are accepted, re-save it as a plain state_dict or safetensors"
        ) from None


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: no state_dict found (expected a mapping of parameter names to tensors)")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_into(module: nn.Module, state: dict, source: str, allow_mismatch: bool, ignore_prefixes=()) -> None:
    """Load `state` into `module`, listing missing/unexpected/mis-shaped keys.

    A mismatch is an error unless `allow_mismatch`; keys under `ignore_prefixes` (a classifier
    the backbone does not have) are dropped with a log line.
    """
    ignored = [k for k in state if any(k.startswith(p) for p in ignore_prefixes)]
    state = {k: v for k, v in state.items() if k not in ignored}
    if ignored:
        log.info("%s: dropped classifier weights %s", source, ", ".join(sorted(ignored)))
    own = module.state_dict()
    shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    # BN's num_batches_tracked postdates old checkpoints (like the legacy CIFAR ones) and does
    # not affect inference: its absence is not a mismatch.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if shape:
        problems.append(f"shape mismatches: {'; '.join(shape[:5])}")
    if problems:
        msg = f"{source} does not fit {type(module).__name__}: " + "; ".join(problems)
        if not allow_mismatch:
            raise UserError(msg + " (check the architecture name, or set allow_mismatch: true to load what fits)")
        log.warning(msg)
    module.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    name = backbone.pretrained_cfg.get("classifier", "fc")
    names = name if isinstance(name, (tuple, list)) else (name,)
    return tuple(f"{n}." for n in names)


def load_encoder(cfg: ModelConfig) -> Encoder:
    """Build the architecture in `cfg` and load `cfg.checkpoint` (a file or a run folder).

    Returns an Encoder whose output is the model's final embedding: the MoCo projection head's
    output when the checkpoint has one, else the pooled backbone features (logged).
    """
    if not cfg.checkpoint:
        raise UserError(f"teacher {cfg.arch!r} needs a checkpoint: set teacher.checkpoint to a local file")
    path = Path(cfg.checkpoint)
    backbone = create_backbone(cfg)
    if path.is_dir():
        return _load_run_encoder(path, backbone, cfg)
    if path.suffix == ".safetensors" and path.is_file():
        state = load_file(str(path))
    else:
        state = _unwrap_state_dict(load_torch_file(path), path)

    moco = _strip(state, "module.encoder_q.") or _strip(state, "encoder_q.")
    if moco:
        head_state = _strip(moco, "fc.")
        body = {k: v for k, v in moco.items() if not k.startswith("fc.")}
        load_into(backbone, body, str(path), cfg.allow_mismatch)
        if head_state:
            head = head_from_state(head_state, f"{path} (projection head)")
            log.info("teacher %s: MoCo checkpoint, embedding = projection head output (%d-d)", cfg.arch, head[-1].out_features)
            return Encoder(backbone, head)
        log.info("teacher %s: MoCo checkpoint without MLP head, embedding = pooled features", cfg.arch)
        return Encoder(backbone)

    if all(k.startswith("module.") for k in state):
        state = _strip(state, "module.")
    load_into(backbone, state, str(path), cfg.allow_mismatch, ignore_prefixes=_classifier_prefixes(backbone))
    log.info(
        "teacher %s: plain state dict (no projection head), embedding = pooled features (%d-d)",
        cfg.arch,
        feature_dim(backbone),
    )
    return Encoder(backbone)


def _load_run_encoder(run: Path, backbone: nn.Module, cfg: ModelConfig) -> Encoder:
    student = run / STUDENT_FILE
    if not student.is_file():
        raise UserError(f"{run} is not a finished edgedistill run: {STUDENT_FILE} is missing")
    run_arch = read_run_config(run)["student"]["arch"]
    if run_arch != cfg.arch:
        raise UserError(f"{run} holds a {run_arch!r} model but the recipe says {cfg.arch!r}: fix the arch")
    load_into(backbone, load_file(str(student)), str(student), cfg.allow_mismatch)
    head_path = run / HEAD_FILE
    if head_path.is_file():
        head = head_from_state(load_file(str(head_path)), str(head_path))
        log.info("teacher %s from run %s: embedding = projection head output (%d-d)", cfg.arch, run, head[-1].out_features)
        return Encoder(backbone, head)
    log.info("teacher %s from run %s: embedding = pooled features", cfg.arch, run)
    return Encoder(backbone)


def read_run_config(run: Path) -> dict:
    """The run's config.yaml as a dict (the run folder's reader: `runfolder.read_config`)."""
    from edgedistill.runfolder import read_config

    return read_config(run)
