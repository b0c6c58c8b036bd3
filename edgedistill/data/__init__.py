"""Data: image folders and the training loaders behind one interface.

A training loader has `name`, `steps_per_epoch` and `epoch(epoch, skip=0)`, which yields
`(views, labels)`: a list of `num_views` float tensors [B, 3, H, W], normalised, on the training
device, and int64 labels. Three implementations share the MoCo v2 augmentation recipe:
`dali-gpu` (decoding and augmentation on the GPU), `dali-cpu` (DALI's CPU-only pipeline, which
runs without a GPU) and `torchvision` (DataLoader workers). `data.loader: auto` picks the first
that can run here and the trainer logs the choice.
"""

from __future__ import annotations

import importlib.util
from typing import get_args
import logging

import torch

from edgedistill.config import DataConfig, Loader
from edgedistill.data.folder import ImageFolder, cache_dir, resolve, scan_folder
from edgedistill.errors import UserError

log = logging.getLogger(__name__)

LOADERS = tuple(name for name in get_args(Loader) if name != "auto")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def choose_loader(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if dali_available():
            return "dali-gpu" if device.type == "cuda" else "dali-cpu"
        return "torchvision"
    if requested.startswith("dali") and not dali_available():
        raise UserError(f"data.loader={requested} but NVIDIA DALI is not installed: pip install nvidia-dali-cuda130, or use data.loader=torchvision")
    if requested == "dali-gpu" and device.type != "cuda":
        raise UserError("data.loader=dali-gpu needs a CUDA device: use data.loader=dali-cpu or auto on this machine")
    return requested


def train_folder(cfg: DataConfig, seed: int) -> ImageFolder:
    folder = scan_folder(resolve(cfg.train, "train", cfg.img_size), cfg.strict, cfg.workers, "training")
    if cfg.max_images:
        folder = folder.subset(cfg.max_images, seed)
    return folder


def val_folder(cfg: DataConfig) -> ImageFolder:
    spec = cfg.val
    if spec is None:
        if not cfg.train.startswith("embedded:"):
            raise UserError("data.val is not set: point it at a labelled validation folder (<root>/<class>/<image>)")
        spec = cfg.train
    return scan_folder(resolve(spec, "val", cfg.img_size), cfg.strict, cfg.workers, "validation")


def build_train_loader(cfg: DataConfig, folder: ImageFolder, num_views: int, batch_size: int, seed: int,
                       device: torch.device, rank: int = 0, world: int = 1, augmentation: str = "mocov2"):
    if len(folder) < batch_size * world:
        raise UserError(
            f"{folder.root} has {len(folder)} usable images, fewer than one global batch of {batch_size * world}: "
            "lower train.batch_size or add images"
        )
    kind = choose_loader(cfg.loader, device)
    args = (folder, cfg, num_views, batch_size, seed, device, rank, world)
    if kind == "torchvision":
        return _torchvision_loader(*args, augmentation=augmentation)
    from edgedistill.data.dali_loader import DaliTrainLoader

    if cfg.loader != "auto":  # asked for by name: a pipeline that cannot be built is the user's error
        return DaliTrainLoader(*args, gpu=kind == "dali-gpu", augmentation=augmentation)
    # auto: DALI's GPU pipeline can fail to build where DALI imports (e.g. a driver older than the
    # CUDA of the nvidia-dali-cuda130 wheel); fall back to DALI's CPU pipeline, then torchvision.
    for gpu in ((True, False) if kind == "dali-gpu" else (False,)):
        try:
            return DaliTrainLoader(*args, gpu=gpu, augmentation=augmentation)
        except (UserError, RuntimeError, OSError, ImportError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("data.loader auto: the dali-%s pipeline cannot run here (%s): falling back to %s",
                        "gpu" if gpu else "cpu", first, "dali-cpu" if gpu else "torchvision")
    return _torchvision_loader(*args, augmentation=augmentation)


def _torchvision_loader(*args, augmentation: str):
    from edgedistill.data.torch_loader import TorchvisionTrainLoader

    return TorchvisionTrainLoader(*args, augmentation)


__all__ = [
    "LOADERS",
    "ImageFolder",
    "build_train_loader",
    "cache_dir",
    "choose_loader",
    "dali_available",
    "resolve",
    "scan_folder",
    "train_folder",
    "val_folder",
]
