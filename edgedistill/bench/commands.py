"""`edgedistill bench EXPORT_DIR`: latency of an export's artifacts on this machine's runtimes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgedistill.bench.runner import Runtime
from edgedistill.cli_helpers import choices, handle_errors


def _batches(text: str) -> list[int]:
    from edgedistill.kit import load_kit_module

    try:
        return load_kit_module("edgekit").parse_batches(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@handle_errors
def bench(
    export_dir: Annotated[Path, typer.Argument(help="Export folder written by `edgedistill export` (holds manifest.json).")],
    runtime: Annotated[str, typer.Option(
        "--runtime", "-r",
        help=f"Comma list of {choices(Runtime)}; auto = every one present except torch.compile.")] = "auto",
    batch: Annotated[str, typer.Option(help="Batch sizes to sweep, e.g. 1,8,32.")] = "1,8,32",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (ORT intra-op, torch). Default: ONNX Runtime's choice; torch: the available cores, at most 4.")] = None,
    runs: Annotated[int, typer.Option(help="Timed runs per measurement.")] = 50,
    time_s: Annotated[Optional[float], typer.Option("--time", help="Time budget in seconds per measurement (instead of --runs).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per measurement.")] = 10,
    artifact: Annotated[Optional[list[str]], typer.Option(help="Only this artifact (repeatable): a name from the export's manifest.json, e.g. onnx-fp32, onnx-int8-u8s8, torch-fp32.")] = None,
    engine: Annotated[Optional[list[Path]], typer.Option(help="Also time this TensorRT engine file (repeatable).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Results JSON (default: EXPORT_DIR/bench.json).")] = None,
):
    """Time every artifact (ONNX fp32/fp16/INT8, TensorRT engines, the torch student) on every runtime present: warm-up, timed runs, p50/p90/p99, throughput, batch sweep; host-to-device and device-to-host apart on GPU. Writes JSON (schema edgedistill.bench/1) that `edgedistill report` reads, the same format the device kit (`EXPORT_DIR/kit/edgekit.py bench`) writes on a device.

    A measurement whose spread says the machine was busy (p90/p50 above the kit's limit) is taken again once; if it stays noisy, its row is marked "unreliable" in the JSON.
    """
    from edgedistill.bench.runner import bench_export
    from edgedistill.ui import setup_logging

    setup_logging()
    bench_export(export_dir, runtime, _batches(batch), threads, None if time_s else runs, time_s, warmup, out,
                 artifact or None, engine or ())
