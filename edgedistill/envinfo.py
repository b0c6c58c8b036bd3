"""Environment stamp recorded in every run, evaluation, export, benchmark and report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import sys

import numpy as np
import torch

import edgedistill

_PACKAGES = ("torch", "torchvision", "timm", "nvidia-dali-cuda130", "onnx", "onnxruntime", "tensorrt", "numpy")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"edgedistill": edgedistill.__version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_info() -> dict:
    """CPU model, ISA flags and core counts (the device kit's stamp) plus torch's thread count."""
    from edgedistill.kit import load_kit_module

    return {**load_kit_module("edgekit").cpu_stamp(), "torch_threads": torch.get_num_threads()}


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "driver": _nvidia_driver(),
    }


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().split("Kernel Module")[-1].split()[0]
    except (OSError, IndexError):
        return None


def environment() -> dict:
    return {"host": platform.node(), "os": platform.platform(), "versions": package_versions(), "cpu": cpu_info(), "gpu": gpu_info()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(spec: str) -> torch.device:
    from edgedistill.errors import UserError

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={spec} but no CUDA device is visible: use train.device=cpu or auto")
    return device


def python_command() -> str:
    return " ".join([os.path.basename(sys.executable), *sys.argv])
