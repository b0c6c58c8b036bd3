"""`edgedistill report RUN` and `edgedistill gate REPORT --baseline BASE`."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgedistill.cli_helpers import handle_errors


class GateFormat(str, Enum):
    """`gate --format`: a table, GitHub workflow annotations, or the result as JSON."""

    text = "text"
    github = "github"
    json = "json"


@handle_errors
def report(
    run: Annotated[Path, typer.Argument(help="Run folder (after `eval`, `export` and `bench`).")],
    device_results: Annotated[Optional[list[Path]], typer.Option(
        "--device-results", "-d",
        help="Results JSON from the device kit (`kit/edgekit.py bench`) or `edgedistill bench` on another "
             "machine (repeatable).")] = None,
    export_dir: Annotated[Optional[Path], typer.Option("--export", help="Export folder (default: RUN/export).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUN/report).")] = None,
):
    """Join every artifact's format, precision, size, parameters, MACs, top-1 (and drop vs fp32) and latency (p50/p99, throughput, per runtime and machine); student vs teacher; environment. Writes report.json (schema edgedistill.report/1), report.md and two PNG plots (accuracy vs size, accuracy vs latency).
    """
    from edgedistill.report.build import build_report
    from edgedistill.ui import console, setup_logging

    setup_logging()
    path = build_report(run, device_results or (), export_dir=export_dir, out_dir=out)
    console.print(f"report: [bold]{path}[/] and {path.with_name('report.md')}", highlight=False)


@handle_errors
def gate(
    report_file: Annotated[Path, typer.Argument(metavar="REPORT", help="report.json written by `edgedistill report`.")],
    baseline: Annotated[Path, typer.Option(help="Baseline JSON (edgedistill.baseline/1, or a report).")],
    max_drop: Annotated[Optional[float], typer.Option(help="Allowed top-1 drop vs the baseline, in points (default: the baseline's, else 1.0).")] = None,
    max_size_mb: Annotated[Optional[float], typer.Option(help="Size budget per gated artifact, MB.")] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option(help="p50 latency budget at --latency-batch, ms.")] = None,
    latency_tolerance: Annotated[Optional[float], typer.Option(help="Allowed p50 slow-down vs the baseline (same machine), percent (default: the baseline's, else 30).")] = None,
    accuracy_noise: Annotated[Optional[float], typer.Option(help="Top-1 differences up to this many points count as ties in the dominance check (default 0).")] = None,
    latency_batch: Annotated[Optional[int], typer.Option(help="Batch size whose latency is gated (default 1).")] = None,
    artifact: Annotated[Optional[list[str]], typer.Option(help="Gate only this artifact (repeatable; default: all in the baseline).")] = None,
    fmt: Annotated[GateFormat, typer.Option("--format", help="text, github (::error annotations) or json.")] = GateFormat.text,
    update_baseline: Annotated[bool, typer.Option("--update-baseline", help="Write REPORT's numbers (and these budgets) as the new baseline; exit 0.")] = False,
):
    """CI gate: exit 1 when accuracy fell more than allowed, size or latency broke a budget, latency regressed beyond the noise tolerance, or the model is dominated by the baseline on accuracy vs size; exit 0 when everything holds; exit 2 on a missing or invalid file.
    """
    import json

    from edgedistill.report import gate as g

    flags = {"max_drop": max_drop, "max_size_mb": max_size_mb, "max_latency_ms": max_latency_ms,
             "latency_tolerance": latency_tolerance, "accuracy_noise": accuracy_noise,
             "latency_batch": latency_batch, "artifacts": artifact or None}
    if update_baseline:
        result = None
        if baseline.is_file():
            result = g.run_gate(report_file, baseline, **flags)
            typer.echo(g.format_text(result))
            old = g.load_baseline(baseline)["budgets"]
            flags = {k: (v if v is not None else old.get(k)) for k, v in flags.items()}
        else:
            g.load_report(report_file)  # validate before writing
        path = g.write_baseline(report_file, baseline, flags)
        typer.echo(f"baseline written: {path}" + ("" if result is None or result.passed else
                                                   " (it replaces a baseline the report did not meet)"))
        return
    result = g.run_gate(report_file, baseline, **flags)
    if fmt is GateFormat.github:
        typer.echo(g.format_text(result))
        typer.echo(g.format_github(result))
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a") as f:
                f.write(g.markdown_summary(result) + "\n")
    elif fmt is GateFormat.json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(g.format_text(result))
    raise typer.Exit(0 if result.passed else 1)
