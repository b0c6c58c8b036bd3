"""`edgedistill bench EXPORT_DIR`: latency of an export's artifacts on this machine's runtimes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers such as 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"batch sizes must be >= 1, got {text!r}")
    return values


def register(app) -> None:
    """Add `bench` to the Typer app."""
    from edgedistill.cli import handle_errors

    @app.command()
    @handle_errors
    def bench(
        export_dir: Annotated[Path, typer.Argument(help="Export folder written by `edgedistill export` (holds manifest.json).")],
        runtime: Annotated[str, typer.Option(
            "--runtime", "-r",
            help="Comma list of ort-cpu, ort-cuda, ort-trt, tensorrt, torch-cpu, torch-compile, torch-cuda, "
                 "torch-compile-cuda; auto = every one present except torch.compile.")] = "auto",
        batch: Annotated[str, typer.Option(help="Batch sizes to sweep, e.g. 1,8,32.")] = "1,8,32",
        threads: Annotated[Optional[int], typer.Option(help="CPU threads (ORT intra-op, torch). Default: the runtime's choice.")] = None,
        runs: Annotated[int, typer.Option(help="Timed runs per measurement.")] = 50,
        time_s: Annotated[Optional[float], typer.Option("--time", help="Time budget in seconds per measurement (instead of --runs).")] = None,
        warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per measurement.")] = 10,
        artifact: Annotated[Optional[list[str]], typer.Option(help="Only this artifact (repeatable), e.g. onnx-int8-ort-cpu.")] = None,
        engine: Annotated[Optional[list[Path]], typer.Option(help="Also time this TensorRT engine file (repeatable).")] = None,
        out: Annotated[Optional[Path], typer.Option(help="Results JSON (default: EXPORT_DIR/bench.json).")] = None,
    ):
        """Time every artifact (ONNX fp32/fp16/INT8, TensorRT engines, the torch student) on every runtime
        present: warm-up, timed runs, p50/p90/p99, throughput, batch sweep; host-to-device and
        device-to-host apart on GPU. Writes JSON (schema edgedistill.bench/1) that `edgedistill report`
        reads, the same format the device kit (`EXPORT_DIR/kit/edgekit.py bench`) writes on a device.
        """
        from edgedistill.bench.runner import bench_export
        from edgedistill.ui import setup_logging

        setup_logging()
        bench_export(export_dir, runtime, _batches(batch), threads, None if time_s else runs, time_s, warmup, out,
                     artifact or None, engine or ())
