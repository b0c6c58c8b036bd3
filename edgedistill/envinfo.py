"""The environment stamp recorded in every run, evaluation, export, benchmark and report, and the
seed / device helpers.

One stamp: the device kit's (`edgekit.environment`: host, OS, CPU with ISA flags, GPUs as
nvidia-smi lists them, library versions, threads, load average), which a device without torch
writes too, plus a `torch` section (version, threads, CUDA and cuDNN versions, the devices torch
sees). `gpu` is therefore always the kit's list of {name, driver, memory_mib, capability} (or None).
"""

from __future__ import annotations

import importlib.metadata
import random

import numpy as np
import torch

from edgedistill.kit import load_kit_module

# Versions the kit does not look up (it knows the runtime side; these are the training side).
_TRAINING_PACKAGES = ("torchvision", "timm", "nvidia-dali-cuda130")


def cpu_info() -> dict:
    """CPU model, architecture, core counts and ISA flags (the device kit's `cpu_stamp`)."""
    return load_kit_module("edgekit").cpu_stamp()


def avx512_on_256bit_units(cpu: dict) -> bool:
    """Whether the CPU an environment stamp's `cpu` entry describes runs AVX-512 in two 256-bit
    halves: AMD family 25 with AVX-512 (Zen 4; Zen 3, the same family, has none). Its vector peak
    is half an AVX-512 core's, and its INT8 and float kernels time differently from Zen 5's."""
    return cpu.get("vendor") == "AuthenticAMD" and cpu.get("family") == 25 and bool((cpu.get("isa") or {}).get("avx512f"))


def torch_stamp() -> dict:
    """What torch sees: version, intra-op threads, CUDA / cuDNN versions and the CUDA devices."""
    devices = []
    if torch.cuda.is_available():
        for idx in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(idx)
            devices.append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2**30, 1)})
    return {"version": torch.__version__, "num_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_devices": devices}


def environment(threads: int | None = None) -> dict:
    """The environment stamp (see the module docstring); `threads` is what the caller asked for."""
    env = load_kit_module("edgekit").environment(threads)
    for name in _TRAINING_PACKAGES:
        try:
            env["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    env["torch"] = torch_stamp()
    return env


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
