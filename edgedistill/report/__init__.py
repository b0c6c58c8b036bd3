"""Reports (`edgedistill report`) and the CI gate (`edgedistill gate`). Import-light: the work is in
`edgedistill.report.build` and `edgedistill.report.gate`."""

from __future__ import annotations

from pathlib import Path


def build_report(run_dir, device_results=(), **kwargs) -> Path:
    """report.json + report.md + plots for a run; returns the report.json path (see `build.build_report`)."""
    from edgedistill.report.build import build_report as _build

    return _build(run_dir, device_results, **kwargs)


__all__ = ["build_report"]
