"""The run's student in torch (eager or torch.compile, CPU or CUDA) as a runner of the device kit.

`TorchRunner` derives from the kit's `Runner` (`export/edgekit.py`), like its ONNX Runtime and
TensorRT runners, so `edgedistill bench` times torch and the exported artifacts with the same
loop (`time_calls`), statistics (`latency_stats`) and spread check (`measure`). On the CPU it sets
torch's intra-op thread count explicitly (`--threads`, else the kit's `default_threads()`): left to
itself, torch may start more threads than there are free cores and a batch-1 forward then waits
on the slowest of them (oversubscription: on a loaded machine a batch of 1 once took 30 times as
long as a batch of 32 of the same model).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgedistill.deploy.manifest import TORCH_ARTIFACT
from edgedistill.errors import UserError
from edgedistill.runfolder import CONFIG_FILE, STUDENT_FILE, read_eval
from edgedistill.kit import load_kit_module

kit = load_kit_module("edgekit")



def find_source_run(export_dir: Path, manifest: dict) -> Path | None:
    """The run an export came from: manifest `source_run`, else the export folder's parent."""
    candidates = []
    if manifest.get("source_run"):
        src = Path(manifest["source_run"])
        candidates += [src, (export_dir / src)] if not src.is_absolute() else [src]
    candidates.append(Path(export_dir).resolve().parent)
    for c in candidates:
        if (c / CONFIG_FILE).is_file() and (c / STUDENT_FILE).is_file():
            return c
    return None


def torch_unavailable(runtime: str) -> str | None:
    if not runtime.startswith("torch-"):
        return f"unknown runtime {runtime!r}"
    if runtime.endswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


class TorchRunner(kit.Runner):
    """The torch student on "torch-cpu", "torch-compile", "torch-cuda" or "torch-compile-cuda"."""

    def __init__(self, model: nn.Module, runtime: str, threads: int | None = None):
        self.runtime = runtime
        self.device = torch.device("cuda" if runtime.endswith("cuda") else "cpu")
        self.compiled = runtime.startswith("torch-compile")
        self.provider = f"torch {torch.__version__} {'inductor' if self.compiled else 'eager'} {self.device.type}"
        self.threads = (threads or kit.default_threads()) if self.device.type == "cpu" else None
        model = model.to(self.device).eval()
        self.model = torch.compile(model, dynamic=False) if self.compiled else model

    def predict(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch_threads(self.threads):
            return self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    @contextlib.contextmanager
    def timing(self, x: np.ndarray):
        host = torch.from_numpy(x)
        with torch.inference_mode(), torch_threads(self.threads):
            if self.device.type == "cpu":
                yield (lambda: self.model(host)), kit.no_copies
                return
            host = host.pin_memory()
            dev = host.to(self.device)

            def copies(n_timed: int) -> dict:
                y = self.model(dev)
                h2d = kit.time_calls(lambda: cuda_time_ms(lambda: host.to(self.device, non_blocking=True)), 3, 20)
                d2h = kit.time_calls(lambda: cuda_time_ms(lambda: y.to("cpu", non_blocking=True)), 3, 20)
                return {"h2d_ms": kit.median_ms(h2d), "d2h_ms": kit.median_ms(d2h)}

            yield (lambda: cuda_time_ms(lambda: self.model(dev))), copies  # device time of the forward only


def cuda_time_ms(fn) -> float:
    """Device time (ms) of `fn()`'s CUDA work, with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to `n` for a block (unchanged when None), then restored."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)


def torch_artifact(run_dir: Path, model: nn.Module) -> dict:
    """The manifest-like entry of the torch student (for result rows and the report)."""
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    meta = {}
    try:
        meta = (read_eval(run_dir, required=False) or {}).get("student", {})
    except UserError:  # a damaged eval.json only costs the eval top-1 of this row
        pass
    return {"name": TORCH_ARTIFACT, "file": str(Path(run_dir) / STUDENT_FILE), "format": "torch",
            "precision": "fp32", "params": params, "bytes": size, "top1_eval": meta.get("linear_top1")}
