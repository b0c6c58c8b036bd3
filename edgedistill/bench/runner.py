"""`edgedistill bench`: latency of every artifact of an export on every runtime present here.

ONNX Runtime (CPU, CUDA and TensorRT execution providers) and TensorRT engines are timed by the
device kit (`export/edgekit.py`, loaded with `load_kit_module`): the same code a user runs on the
edge device, so a laptop number and a Jetson number come from one loop and one schema
("edgedistill.bench/1"). The run's torch student (eager, torch.compile; CPU or CUDA) is one more
runner of the kit's interface (`torch_runtime.TorchRunner`), measured by the same `edgekit.measure`
(timing loop, statistics, re-measuring when the spread says the machine was busy). Absent
runtimes are skipped with a reason.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path

from edgedistill.errors import UserError

log = logging.getLogger(__name__)


class Runtime(str, Enum):
    """The runtimes `edgedistill bench --runtime` knows (those without "torch" are the device kit's)."""

    ort_cpu = "ort-cpu"
    ort_cuda = "ort-cuda"
    ort_trt = "ort-trt"
    openvino_cpu = "openvino-cpu"
    tensorrt = "tensorrt"
    torch_cpu = "torch-cpu"
    torch_compile = "torch-compile"
    torch_cuda = "torch-cuda"
    torch_compile_cuda = "torch-compile-cuda"


ALL_RUNTIMES = tuple(r.value for r in Runtime)
KIT_RUNTIMES = tuple(r for r in ALL_RUNTIMES if not r.startswith("torch-"))
# `auto`: every runtime that is present, except torch.compile (compiling takes minutes on a CPU).
AUTO_RUNTIMES = tuple(r for r in ALL_RUNTIMES if not r.startswith("torch-compile"))
ALIASES = {"ort": "ort-cpu", "onnxruntime": "ort-cpu", "torch": "torch-cpu", "trt": "tensorrt",
           "ort-tensorrt": "ort-trt", "compile": "torch-compile", "openvino": "openvino-cpu"}


def parse_runtimes(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """'auto' or a comma list (aliases allowed) -> runtimes. Unknown names are a UserError."""
    from edgedistill.cli_helpers import comma_list

    if spec is None or spec == "auto" or spec == ["auto"]:
        return list(AUTO_RUNTIMES)
    items = [ALIASES.get(s, s) for s in comma_list(spec)]
    unknown = [s for s in items if s not in ALL_RUNTIMES]
    if unknown:
        raise UserError(f"unknown runtime(s) {', '.join(unknown)}: choose from {', '.join(ALL_RUNTIMES)} or auto")
    return list(dict.fromkeys(items))


def bench_export(export_dir, runtimes="ort-cpu,torch-cpu", batches=(1,), threads: int | None = None,
                 runs: int | None = 20, time_s: float | None = None, warmup: int = 3, out=None,
                 artifacts: list[str] | None = None, engines=(), show: bool = True) -> Path:
    """Time the export in `export_dir`; write and return the results JSON (default EXPORT_DIR/bench.json).

    Defaults are small (batch 1, 20 runs) so that `demo` finishes in seconds; the CLI's are larger.
    """
    from edgedistill.kit import load_kit_module
    from edgedistill.ui import console, progress_bar

    kit = load_kit_module("edgekit")
    export_dir = Path(export_dir)
    try:
        exp = kit.load_export(export_dir)
    except kit.KitError as e:
        raise UserError(str(e)) from None
    batches = [int(size) for size in batches]
    if not batches or min(batches) < 1:
        raise UserError(f"batch sizes must be >= 1, got {batches}")
    from edgedistill.bench.torch_runtime import torch_unavailable
    from edgedistill.deploy.manifest import BENCH_FILE, MANIFEST_FILE, TORCH_ARTIFACT

    if artifacts:
        names = [a["name"] for a in exp["artifacts"]] + [TORCH_ARTIFACT]
        unknown = sorted(set(artifacts) - set(names))
        if unknown:
            raise UserError(f"unknown artifact(s) {', '.join(unknown)}: {export_dir / MANIFEST_FILE} has "
                            f"{', '.join(names)}")
    wanted = parse_runtimes(runtimes)
    avail = kit.available_runtimes()
    reasons = {r: (avail.get(r) if r in KIT_RUNTIMES else torch_unavailable(r)) for r in wanted}
    kit_rts = [r for r in wanted if r in KIT_RUNTIMES and reasons[r] is None]
    torch_rts = [r for r in wanted if r not in KIT_RUNTIMES and reasons[r] is None]
    skipped = [{"runtime": r, "reason": why} for r, why in reasons.items() if why]
    for s in skipped:
        console.print(f"[dim]skip {s['runtime']}: {s['reason']}[/]", highlight=False)

    if artifacts and TORCH_ARTIFACT not in artifacts:
        torch_rts = []
    model = run_dir = None
    if torch_rts:
        from edgedistill.bench.torch_runtime import find_source_run
        from edgedistill.runfolder.load import load_run_classifier

        run_dir = find_source_run(export_dir, exp["manifest"])
        if run_dir is None:
            why = f"source run of {export_dir} not found (manifest source_run={exp['manifest'].get('source_run')!r})"
            skipped += [{"runtime": r, "reason": why} for r in torch_rts]
            console.print(f"[dim]skip {', '.join(torch_rts)}: {why}[/]", highlight=False)
            torch_rts = []
        else:
            model = load_run_classifier(run_dir)

    onnx_arts = [a for a in exp["artifacts"] if a["format"] != "tensorrt" and (not artifacts or a["name"] in artifacts)]
    trt_arts = [a for a in exp["artifacts"] if a["format"] == "tensorrt" and (not artifacts or a["name"] in artifacts)]
    steps = sum(len(trt_arts if r == "tensorrt" else onnx_arts) for r in kit_rts) * len(batches)
    steps += len(torch_rts) * len(batches)
    results = []
    with progress_bar(max(steps, 1), "bench", show_loss=False) as bar:
        if kit_rts and (onnx_arts or trt_arts):
            try:
                doc = kit.bench_export(export_dir, kit_rts, batches, threads, warmup, runs, time_s,
                                       [a["name"] for a in onnx_arts + trt_arts] if artifacts else None, engines,
                                       log=lambda m: console.print(f"[dim]{m}[/]", highlight=False),
                                       on_step=lambda: bar.advance(1))
            except kit.KitError as e:
                raise UserError(str(e)) from None
            results += doc["results"]
            skipped += doc["skipped"]
        if torch_rts:
            results += _bench_torch(kit, model, run_dir, exp, torch_rts, batches, threads, warmup, runs, time_s,
                                    skipped, bar)
    from edgedistill.envinfo import environment

    doc = kit.make_results(results, skipped, environment(threads), exp,
                           {"runtimes": wanted, "batches": batches, "threads": threads, "warmup": warmup,
                            "runs": runs, "time_s": time_s})
    out = Path(out) if out else export_dir / BENCH_FILE
    kit.write_results(doc, out)
    if show:
        print_results(doc)
        console.print(f"results: [bold]{out}[/]", highlight=False)
    if not results:
        raise UserError(f"nothing could be timed in {export_dir} (see the skip reasons above; results in {out})")
    return out


def _bench_torch(kit, model, run_dir, exp, runtimes, batches, threads, warmup, runs, time_s, skipped, bar):
    """The torch student on each torch runtime, through the kit's own loop (`bench_runner`)."""
    from edgedistill.bench.torch_runtime import TorchRunner, torch_artifact

    art = torch_artifact(run_dir, model)
    rows = []
    for runtime in runtimes:
        try:
            runner = TorchRunner(model, runtime, threads)
            runner.predict(exp["samples"][:1])  # torch.compile compiles here: a failure skips the runtime
        except Exception as e:  # e.g. torch.compile without a working C compiler
            skipped.append({"artifact": art["name"], "runtime": runtime, "reason": f"{type(e).__name__}: {e}"[:300]})
            log.warning("skip %s: %s", runtime, e)
            bar.advance(len(batches))
            continue
        rows += kit.bench_runner(runner, art, exp, batches, threads, warmup, runs, time_s, skipped,
                                 log=log.warning, on_step=lambda: bar.advance(1))
    return rows


def print_results(doc: dict) -> None:
    """The results as one rich table (artifact x runtime x batch)."""
    from rich.table import Table

    from edgedistill.ui import console

    env = doc.get("environment", {})
    cpu = env.get("cpu", {})
    gpus = env.get("gpu") or []
    where = f"{cpu.get('model')} ({cpu.get('affinity_cores')} cores)" + (f", {gpus[0]['name']}" if gpus else "")
    table = Table(title=f"latency on {env.get('host')}: {where}")
    copies = any(r.get("h2d_ms") is not None for r in doc["results"])
    cols = ["artifact", "runtime", "prec", "batch", "thr", "p50 ms", "p99 ms", "img/s"]
    cols += ["H2D/D2H ms"] if copies else []
    cols += ["top-1*"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("artifact", "runtime", "prec") else "right",
                         no_wrap=col in ("artifact", "runtime"))
    for r in doc["results"]:
        lat = r["latency_ms"]
        row = [r["artifact"], r["runtime"], str(r.get("precision") or "-"), str(r["batch"]),
               str(r.get("threads") or "-"), f"{lat['p50']:.2f}", f"{lat['p99']:.2f}", f"{r['throughput_ips']:.0f}"]
        if copies:
            row.append(f"{r['h2d_ms']:.3f}/{r['d2h_ms']:.3f}" if r.get("h2d_ms") is not None else "-")
        row.append("-" if r.get("top1") is None else f"{r['top1']:.1f}")
        table.add_row(*row)
    table.caption = "* top-1 on the export's sample images (a sanity check; the report has full-val accuracy)"
    if console.is_terminal:
        console.print(table)
    else:  # logs (CI): a fixed, wide enough width rather than 80 columns of truncated numbers
        from rich.console import Console

        Console(file=console.file, width=max(console.width, 120), color_system=None).print(table)
    if "pick" in doc:
        from edgedistill.kit import load_kit_module

        console.print(load_kit_module("edgekit").format_pick(doc["pick"]), highlight=False)
    noisy = [f"{r['artifact']} on {r['runtime']} at batch {r['batch']}" for r in doc["results"] if r.get("unreliable")]
    if noisy:
        console.print(f"[yellow]note:[/] unreliable (p90/p50 still above the limit after re-measuring): "
                      f"{'; '.join(noisy)}", highlight=False)
    load = env.get("load_average")
    if load and cpu.get("affinity_cores") and load[0] > 0.5 * cpu["affinity_cores"]:
        console.print(f"[yellow]note:[/] load average {load[0]} on {cpu['affinity_cores']} cores while timing: "
                      "latencies are noisy; re-run on an idle machine for numbers to quote", highlight=False)
