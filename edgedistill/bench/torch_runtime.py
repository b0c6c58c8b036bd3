"""The run's student in torch (eager or torch.compile, CPU or CUDA) behind the kit's runner interface.

A runner has `runtime`, `provider`, `threads`, `supports_batch(b)`, `predict(x)` and
`bench(x, warmup, runs, time_s) -> stats`, like `edgekit.OrtRunner`, so `edgedistill bench` times
torch and the exported artifacts with the same loop (`edgekit.time_calls`) and statistics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgedistill.errors import UserError

TORCH_RUNTIMES = ("torch-cpu", "torch-compile", "torch-cuda", "torch-compile-cuda")
TORCH_ARTIFACT = "torch-fp32"


def load_run_classifier(run_dir: Path) -> nn.Module:
    """backbone (student.safetensors) + linear probe (classifier.safetensors) of an evaluated run."""
    from edgedistill.evaluate import load_run_config, load_student_backbone
    from edgedistill.models import CLASSIFIER_FILE, Classifier, read_classifier

    run_dir = Path(run_dir)
    path = run_dir / CLASSIFIER_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: run `edgedistill eval {run_dir}` first")
    cfg = load_run_config(run_dir)
    backbone = load_student_backbone(run_dir, cfg)
    fc, _ = read_classifier(path)
    return Classifier(backbone, fc).eval()


def find_source_run(export_dir: Path, manifest: dict) -> Path | None:
    """The run an export came from: manifest `source_run`, else the export folder's parent."""
    candidates = []
    if manifest.get("source_run"):
        src = Path(manifest["source_run"])
        candidates += [src, (export_dir / src)] if not src.is_absolute() else [src]
    candidates.append(Path(export_dir).resolve().parent)
    for c in candidates:
        if (c / "config.yaml").is_file() and (c / "student.safetensors").is_file():
            return c
    return None


def torch_unavailable(runtime: str) -> str | None:
    if runtime not in TORCH_RUNTIMES:
        return f"unknown runtime {runtime!r}"
    if runtime.endswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


class TorchRunner:
    def __init__(self, model: nn.Module, runtime: str, threads: int | None = None):
        self.runtime = runtime
        self.device = torch.device("cuda" if runtime.endswith("cuda") else "cpu")
        self.compiled = runtime.startswith("torch-compile")
        self.provider = f"torch {torch.__version__} {'inductor' if self.compiled else 'eager'} {self.device.type}"
        self.threads = threads if self.device.type == "cpu" else None
        self.fixed_batch = None
        model = model.to(self.device).eval()
        self.model = torch.compile(model, dynamic=False) if self.compiled else model

    def supports_batch(self, batch: int) -> bool:
        return True

    @torch.inference_mode()
    def predict(self, x: np.ndarray) -> np.ndarray:
        with _threads(self.threads):
            return self.model(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    @torch.inference_mode()
    def bench(self, x: np.ndarray, warmup: int, runs: int | None, time_s: float | None) -> dict:
        from edgedistill.kit import load_kit_module

        kit = load_kit_module("edgekit")
        host = torch.from_numpy(x)
        with _threads(self.threads):
            if self.device.type == "cpu":
                times = kit.time_calls(lambda: self.model(host), warmup, runs, time_s)
                return kit.summarize(times, x.shape[0])
            host = host.pin_memory()
            dev = host.to(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def step():  # device time of the forward only, with CUDA events
                start.record()
                self.model(dev)
                end.record()
                end.synchronize()
                return start.elapsed_time(end)

            out = kit.summarize(kit.time_calls(step, warmup, runs, time_s), x.shape[0])
            y = self.model(dev)
            out["h2d_ms"] = round(float(np.median(_cuda_times(lambda: host.to(self.device, non_blocking=True)))), 4)
            out["d2h_ms"] = round(float(np.median(_cuda_times(lambda: y.to("cpu", non_blocking=True)))), 4)
            return out


def _cuda_times(fn, n: int = 20) -> list[float]:
    times = []
    for i in range(n + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return times


class _threads:
    """Set torch's intra-op thread count for a block, then restore it."""

    def __init__(self, n: int | None):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


def torch_artifact(run_dir: Path, model: nn.Module) -> dict:
    """The manifest-like entry of the torch student (for result rows and the report)."""
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    meta = {}
    try:
        meta = json.loads((Path(run_dir) / "eval.json").read_text()).get("student", {})
    except (OSError, ValueError):
        pass
    return {"name": TORCH_ARTIFACT, "file": str(Path(run_dir) / "student.safetensors"), "format": "torch",
            "precision": "fp32", "params": params, "bytes": size, "top1_eval": meta.get("linear_top1")}
