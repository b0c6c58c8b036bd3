"""TensorRT engines for an export, through the device kit's `export/build_engine.py`.

The engine-building code exists once, in the kit (torch-free, runs on the device); this module
only decides whether it can run here (TensorRT builder importable + a CUDA GPU), builds the fp16
and INT8 engines into `<export>/engines/` when it can, and otherwise records a one-line reason and
the `trtexec` / `python kit/build_engine.py` commands to run on the target.

Not executed on this project's machines: the TensorRT builder cannot be installed there
(no TensorRT wheel with the builder for them), so the build path is written against the documented TensorRT 10/11 API only.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

from edgedistill.errors import UserError

log = logging.getLogger(__name__)


def kit_source() -> Path:
    """The device kit folder (`export/` of the checkout, or the installed copy)."""
    from edgedistill.kit import kit_dir

    try:
        return kit_dir()
    except UserError:
        # kit_dir() recognises the kit by export/edgekit.py; build_engine.py is enough for this module.
        here = Path(__file__).resolve().parents[2] / "export"
        if (here / "build_engine.py").is_file():
            return here
        raise


def build_engine_module() -> ModuleType:
    """export/build_engine.py, imported once (the same file the kit carries to the device)."""
    from edgedistill.kit import load_kit_module

    try:
        return load_kit_module("build_engine")
    except UserError:
        name = "edgedistill_kit_build_engine"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, kit_source() / "build_engine.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module


def status() -> tuple[bool, str, dict]:
    """(can build here, one-line reason, versions)."""
    kit = build_engine_module()
    ok, detail = kit.tensorrt_available()
    if not ok:
        return False, detail, {"tensorrt": None}
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = kit.gpu_name() is not None
    if not has_gpu:
        return False, f"TensorRT {detail} is installed but no CUDA GPU is visible", {"tensorrt": detail}
    return True, f"TensorRT {detail}", {"tensorrt": detail, "gpu": kit.gpu_name()}


def plan(artifacts: dict[str, str], input_name: str, chw: tuple[int, int, int],
         batches: tuple[int, int, int]) -> list[dict]:
    """What to build: fp16 from the fp32 ONNX (TRT 10; fp16 ONNX on TRT 11), INT8 from the QDQ ONNX."""
    kit = build_engine_module()
    jobs = []
    if "onnx-fp32" in artifacts:
        jobs.append({"name": "trt-fp16", "onnx": artifacts["onnx-fp32"], "precision": "fp16"})
    if "onnx-int8-s8s8" in artifacts:
        jobs.append({"name": "trt-int8", "onnx": artifacts["onnx-int8-s8s8"], "precision": "int8"})
    for job in jobs:
        engine = f"engines/{Path(job['onnx']).stem}.{job['precision']}.engine"
        job["engine"] = engine
        job["trtexec"] = kit.trtexec_command(job["onnx"], engine, job["precision"], input_name, chw, batches,
                                             "engines/timing.cache")
        job["kit_command"] = (f"python kit/build_engine.py {job['onnx']} --{job['precision']} --engine {engine} "
                              f"--min-batch {batches[0]} --opt-batch {batches[1]} --max-batch {batches[2]} "
                              "--timing-cache engines/timing.cache")
    return jobs


def build_engines(export_dir: Path, jobs: list[dict], batches: tuple[int, int, int]) -> dict:
    """Build every planned engine where possible; returns the manifest's `tensorrt` section."""
    ok, reason, versions = status()
    section = {"built": False, "reason": reason, **versions, "engines": [], "commands": jobs}
    if not jobs:
        section["reason"] = "nothing to build (no fp32 or s8s8 QDQ ONNX in this export)"
        return section
    if not ok:
        log.info("TensorRT engines skipped: %s (the QDQ/fp32 ONNX files are the portable artifacts; "
                 "build on the target with kit/build_engine.py or trtexec)", reason)
        return section
    kit = build_engine_module()
    (export_dir / "engines").mkdir(exist_ok=True)
    for job in jobs:
        onnx_path = export_dir / job["onnx"]
        if job["precision"] == "fp16" and "FP16" not in set(dir(__import__("tensorrt").BuilderFlag)):
            fp16 = export_dir / "model.fp16.onnx"
            if not fp16.is_file():
                section["engines"].append({**job, "error": "TensorRT 11 needs an fp16 ONNX: export with --fp16"})
                continue
            onnx_path = fp16
        try:
            record = kit.build(onnx_path, export_dir / job["engine"], job["precision"], batches,
                               export_dir / "engines" / "timing.cache")
        except Exception as e:  # noqa: BLE001 - BuildError or a TensorRT exception: recorded, not fatal
            log.warning("TensorRT %s engine failed: %s", job["precision"], e)
            section["engines"].append({**job, "error": f"{type(e).__name__}: {e}"})
            continue
        section["engines"].append({**job, **record, "engine": job["engine"]})
        log.info("TensorRT %s engine: %s (%.1f s)", job["precision"], job["engine"], record["build_seconds"])
    section["built"] = any("error" not in e for e in section["engines"])
    return section
