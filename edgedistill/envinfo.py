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
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if flags and model:
                    break
    except OSError:
        pass
    isa = {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "amx_int8": "amx_int8" in flags,
        "neon": platform.machine() in ("aarch64", "arm64"),
    }
    return {
        "model": model,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": isa,
    }


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
