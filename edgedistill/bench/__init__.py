"""Latency benchmarking of exports (`edgedistill bench`) and training speed (`train_speed`).

Kept import-light (the CLI imports this package at start-up): the real work is in
`edgedistill.bench.runner`, which relies on the device kit `export/edgekit.py` for the timing core
and the results schema, so numbers taken here and on a device are comparable.
"""

from __future__ import annotations

from pathlib import Path


def bench_export(export_dir, *args, **kwargs) -> Path:
    """Time an export's artifacts; returns the results JSON path. See `runner.bench_export`."""
    from edgedistill.bench.runner import bench_export as _bench_export

    return _bench_export(export_dir, *args, **kwargs)


__all__ = ["bench_export"]
