"""`edgedistill demo`: the whole path on the embedded digits dataset, CPU-friendly.

1. teacher: a supervised ResNet-18 fit on the digits (stands in for a pretrained teacher), with an
   embedding head whose output is the teacher embedding (see methods/supervised.py);
2. DisCo: MobileNetV3-Small student distilled from that teacher;
3. MoCo v2: the same student, same budget and seed, without the teacher;
4. evaluation of all three (kNN + linear probe), and a comparison table;
5. export (ONNX fp32 + INT8), benchmark, report and gate of the DisCo student.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from edgedistill.recipe import build_config
from edgedistill.errors import UserError
from edgedistill.fileio import write_json
from edgedistill.ui import console

log = logging.getLogger(__name__)

# INT8 may lose at most this many top-1 points; the layers whose float precision helps the
# network's output most stay in float otherwise.
INT8_MAX_DROP = 1.0
BASELINE = Path(__file__).resolve().parents[1] / "baselines" / "demo.json"

TEACHER_ARCH = "resnet18"  # 11.2M parameters; at 32x32 with its stride-4 stem it is cheap on a CPU
STUDENT = {"arch": "mobilenetv3_small_100", "stem_stride": 1}
DATA = {"train": "embedded:digits", "img_size": 32, "crop_pct": 1.0, "min_scale": 0.5}


def demo_recipes(steps: int, teacher_run: Path, seed: int = 0) -> dict[str, dict]:
    """The demo's three recipes (plain dicts, as a YAML recipe would load)."""
    train = {"max_steps": steps, "epochs": 1000, "batch_size": 64, "lr": 0.12, "warmup_steps": 10,
             "log_every": 10, "checkpoint_every": 1000}
    ssl = {"temperature": 0.2, "momentum": 0.99, "queue_size": 1024}
    return {
        "teacher": {"name": "teacher_resnet18", "seed": seed, "method": {"name": "supervised"},
                    "student": {"arch": TEACHER_ARCH}, "data": DATA,
                    "train": {**train, "max_steps": max(steps // 2, 20), "lr": 0.4, "weight_decay": 5e-4}},
        "disco": {"name": "disco_mnv3s", "seed": seed, "method": {"name": "disco", **ssl},
                  "student": STUDENT, "teacher": {"arch": TEACHER_ARCH, "checkpoint": str(teacher_run)},
                  "data": DATA, "train": train},
        "mocov2": {"name": "mocov2_mnv3s", "seed": seed, "method": {"name": "mocov2", **ssl},
                   "student": STUDENT, "data": DATA, "train": train},
    }


def run_demo(out: Path, steps: int = 200, gate_baseline: Path | None = BASELINE, seed: int = 0) -> dict:
    from edgedistill.bench import bench_export
    from edgedistill.deploy import export_run
    from edgedistill.deploy.exporter import ExportCheckFailed, ParityError
    from edgedistill.evaluate import evaluate_run
    from edgedistill.report import build_report
    from edgedistill.report.gate import format_text, run_gate
    from edgedistill.train import train

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: remove it or pass --out to a new folder")
    start = time.perf_counter()
    runs = {role: out / role for role in ("teacher", "disco", "mocov2")}
    recipes = demo_recipes(steps, runs["teacher"], seed)
    for role in ("teacher", "disco", "mocov2"):
        console.rule(f"[bold]{role}")
        train(build_config(recipes[role], f"demo:{role}"), runs[role])
    # The teacher is scored by the DisCo run's `eval --teacher`, so the report shows both.
    disco = evaluate_run(runs["disco"], with_teacher=True)
    scores = {"teacher": disco.teacher, "disco": disco.student, "mocov2": evaluate_run(runs["mocov2"]).student}

    console.rule("[bold]export, benchmark, report (DisCo student)")
    try:
        export_dir = export_run(runs["disco"], int8=True, max_drop=INT8_MAX_DROP)
    except ParityError:
        raise
    except ExportCheckFailed as e:  # the INT8 budget was out of reach: say so, keep going
        log.warning("%s", e)
        export_dir = e.export_dir
    bench_export(export_dir)
    report = build_report(runs["disco"])
    summary = {
        "steps": steps,
        "models": {
            role: {"arch": m.arch, "params": m.params, "knn_top1": m.knn_top1, "linear_top1": m.linear_top1}
            for role, m in scores.items()
        },
        "export": str(export_dir),
        "int8": int8_summary(export_dir),
        "report": str(report),
        "report_md": str(report.with_suffix(".md")),
        "plots": sorted(str(p) for p in report.parent.glob("*.png")),
    }
    if gate_baseline is not None and Path(gate_baseline).is_file():
        gate = run_gate(report, gate_baseline)
        console.print(format_text(gate))
        summary["gate"] = {"baseline": str(gate_baseline), "passed": gate.passed}
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    write_json(out / "demo.json", summary)
    print_summary(summary)
    return summary


def int8_summary(export_dir: Path) -> dict:
    """The INT8 artifact's drop (with its standard error), layers in INT8 and size ratio."""
    from edgedistill.deploy.manifest import read_manifest

    manifest = read_manifest(Path(export_dir), "re-run `edgedistill demo`")
    art = next(a for a in manifest["artifacts"] if a["precision"] == "int8")
    qz, acc = art["quantization"], art["accuracy"]
    return {"file": art["file"], "calibrator": qz["calibration"]["label"], "drop": acc["drop_vs_fp32"],
            "drop_se": acc.get("drop_se"), "ptq_drop": qz["ptq"]["drop"], "ptq_drop_se": qz["ptq"]["accuracy"].get("drop_se"),
            "val_images": manifest["validation"]["images"],
            "int8_layers": qz["int8_layers"], "size_ratio": qz["size_ratio_vs_fp32"],
            "kept_in_float": qz["nodes_kept_in_float"], "delivered_by": qz["delivered_by"],
            "cpu_class": qz["cpu_class"], "recommendation": manifest.get("recommendation")}


def print_summary(summary: dict) -> None:
    from rich.table import Table

    from edgedistill.deploy.manifest import recommendation_text

    table = Table(title=f"edgedistill demo: digits 32x32, {summary['steps']} steps per student")
    for col in ("model", "arch", "params (M)", "kNN top-1", "linear top-1"):
        table.add_column(col, justify="left" if col in ("model", "arch") else "right")
    for role, m in summary["models"].items():
        table.add_row(role, m["arch"], f"{m['params'] / 1e6:.2f}", f"{m['knn_top1']:.1f}", f"{m['linear_top1']:.1f}")
    console.print(table)
    q = summary["int8"]
    console.print(f"INT8 ({q['file']}, {q['calibrator']}): drop {q['drop']:.2f} ± {q['drop_se']:.2f} points on "
                  f"{q['val_images']} images, {q['int8_layers']['int8']}/{q['int8_layers']['weighted_layers']} layers "
                  f"in INT8, {q['size_ratio']:.2f}x smaller than fp32 (built for {q['cpu_class']}, delivered by "
                  f"{q['delivered_by']}" + ("" if q["delivered_by"] == "ptq" else f"; PTQ alone: drop {q['ptq_drop']:.2f}")
                  + ")")
    if q.get("recommendation"):
        console.print(recommendation_text(q["recommendation"]), highlight=False)
    console.print(f"report: {summary['report_md']}  (JSON: {summary['report']})")
    for plot in summary["plots"]:
        console.print(f"plot:   {plot}")
    if "gate" in summary:
        verdict = "[green]passed[/]" if summary["gate"]["passed"] else "[red]FAILED[/]"
        console.print(f"gate against {summary['gate']['baseline']}: {verdict}")
    console.print(f"wall time {summary['wall_s']:.0f}s")
