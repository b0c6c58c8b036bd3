"""INT8 quality table: every student x format x PTQ variant, scored on the full test set, plus
batch-1 latency of fp32 and INT8 at 32 px and 224 px on this CPU.

    python bench/int8_quality.py quality runs/int8/sup_mnv3s [...]   # accuracy (one thread each is fine)
    python bench/int8_quality.py quality runs/int8/sup_mnv3s --variants tuned-auto-qad  # only the QAD rows
    python bench/int8_quality.py latency runs/int8/sup_mnv3s [...]   # timing: run alone on an idle machine
    python bench/int8_quality.py table                              # merge -> bench/results/int8_quality.json
    python bench/int8_quality.py table --variants tuned-auto-qad    # merge only the QAD rows

Variants, for each format (u8s8 = ONNX Runtime on x86, s8s8 = TensorRT's symmetric format):
- `ort-default`: ONNX Runtime's stock `quant_pre_process` + `quantize_static`, MinMax (what
  edgedistill did before its INT8 tuning);
- `tuned-auto`: edgedistill's preparation and placement, `--calibrator auto`, all INT8;
- `tuned-auto-fallback`: the same with `--max-drop 0.5` (layers back in float only if needed);
- `tuned-auto-qad`: the all-INT8 model after 300 steps of quantization-aware distillation
  (`--qad-steps 300`, the fp32 student as teacher; nothing kept in float).
Every variant is the real `edgedistill export` (`export_run`); the numbers are read back from the
manifest it writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "int8" / "quality"
RESULT = ROOT / "bench" / "results" / "int8_quality.json"
FORMATS = {"u8s8": {"target": "ort-cpu", "int8_format": "qdq-u8s8"}, "s8s8": {"target": "tensorrt"}}
MAX_DROP = 0.5
# One export per variant; `tuned-auto` is read from the fallback export's record of its all-INT8
# model before any layer went back to float (the same file that export starts from).
QAD_STEPS = 300
VARIANTS = {
    "ort-default": {"placement": "ort-default", "calibrator": "minmax", "qad_steps": 0},
    "tuned-auto-fallback": {"placement": "tuned", "calibrator": "auto", "max_drop": MAX_DROP, "qad_steps": 0},
    "tuned-auto-qad": {"placement": "tuned", "calibrator": "auto", "qad_steps": QAD_STEPS},
}
ORDER = ["ort-default", "tuned-auto", "tuned-auto-fallback", "tuned-auto-qad"]


def quality(runs: list[Path], formats: list[str], variants: list[str]) -> None:
    """Export `variants` of `formats`; rows already measured for other formats or variants are kept."""
    from edgedistill.deploy import export_run
    from edgedistill.deploy.exporter import ExportCheckFailed

    for run in runs:
        done = WORK / f"{run.name}.quality.json"
        remeasured = {(f, v) for f in formats for v in variants} | {(f, "tuned-auto") for f in formats
                                                                    if "tuned-auto-fallback" in variants}
        rows = []
        for fmt in formats:
            fmt_opts = FORMATS[fmt]
            for variant in variants:
                var_opts = VARIANTS[variant]
                out = WORK / run.name / f"{fmt}.{variant}"
                t0 = time.perf_counter()
                try:
                    export_run(run, int8=True, out=out, val_count=None, **fmt_opts, **var_opts)
                except ExportCheckFailed as e:  # budget not reached: still a row, marked
                    print(f"{run.name} {fmt} {variant}: {e}", file=sys.stderr)
                seconds = time.perf_counter() - t0
                if variant == "tuned-auto-fallback":
                    rows.append(_row(run, fmt, "tuned-auto", out, seconds, before_fallback=True))
                rows.append(_row(run, fmt, variant, out, seconds))
                print(json.dumps(rows[-1]), flush=True)
        # Read what is there only now: another format's lane may have written this student meanwhile.
        kept = [r for r in json.loads(done.read_text())["rows"] if (r["format"], r["variant"]) not in remeasured] \
            if done.is_file() else []
        rows = sorted(kept + rows, key=lambda r: (list(FORMATS).index(r["format"]), ORDER.index(r["variant"])))
        _write(done, {"run": str(run), "rows": rows})


def _row(run: Path, fmt: str, variant: str, out: Path, seconds: float, before_fallback: bool = False) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    fp32 = next(a for a in m["artifacts"] if a["name"] == "onnx-fp32")
    int8 = dict(next(a for a in m["artifacts"] if a["precision"] == "int8"))
    qz, acc = dict(int8["quantization"]), int8["accuracy"]
    if before_fallback:
        initial = m["int8"]["max_drop"]["initial"]
        acc = {**initial["accuracy"], "drop_vs_fp32": m["int8"]["max_drop"]["initial_drop"]}
        int8["bytes"] = initial["bytes"]
        qz.update(int8_layers=initial["int8_layers"], nodes_kept_in_float=[],
                  size_ratio_vs_fp32=round(fp32["bytes"] / initial["bytes"], 3))
    return {
        "student": run.name, "arch": m["arch"], "params": m["params"], "format": fmt, "variant": variant,
        "calibrator": qz["calibration"]["label"], "test_images": m["validation"]["images"],
        "fp32_top1": fp32["accuracy"]["top1"], "int8_top1": acc["top1"], "drop": acc["drop_vs_fp32"],
        "drop_se": acc["drop_se"], "agreement": acc["agreement"], "kl_vs_fp32": acc["kl_vs_fp32"],
        "int8_layers": qz["int8_layers"]["int8"], "weighted_layers": qz["int8_layers"]["weighted_layers"],
        "int8_share": qz["int8_layers"]["share"], "kept_in_float": qz["nodes_kept_in_float"],
        "fp32_kb": round(fp32["bytes"] / 1024, 1), "int8_kb": round(int8["bytes"] / 1024, 1),
        "size_ratio": qz["size_ratio_vs_fp32"], "status": m["status"],
        "auto_scores": qz["calibration"].get("auto_scores"), "export_seconds": round(seconds, 1),
        "classifier_check": (m.get("int8") or {}).get("classifier_check"),
        "delivered_by": "ptq" if before_fallback else (m.get("int8") or {}).get("delivered_by", "ptq"),
        "qad": None if before_fallback or not (m.get("int8") or {}).get("qad") else {
            "steps": m["int8"]["qad"]["steps"], "seconds": m["int8"]["qad"]["seconds"],
            "images_per_s": m["int8"]["qad"]["images_per_s"], "ptq_drop": m["int8"]["ptq"]["drop"],
            "ptq_kl_vs_fp32": m["int8"]["ptq"]["accuracy"]["kl_vs_fp32"],
            "parity_match_share": m["int8"]["qad"]["parity"]["match_share"],
            "activation_ranges": m["int8"]["qad"]["activation_ranges"]},
    }


def _files_224(run: Path, work: Path) -> dict[str, Path]:
    """fp32 and INT8 (tuned u8s8, tuned s8s8 for TensorRT, ort-default u8s8) ONNX files of the run's
    classifier at 224 px, calibrated on 32 training images (the ranges do not change the speed)."""
    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import quantize as q
    from edgedistill.deploy.onnx_export import INPUT_NAME, export_onnx, load_deployable, preprocess_spec

    dep = load_deployable(run)
    cfg = dataclasses.replace(dep.cfg, data=dataclasses.replace(dep.cfg.data, img_size=224))
    dep = dataclasses.replace(dep, cfg=cfg)
    files = {"fp32": work / "model.onnx"}
    export_onnx(dep, files["fp32"])
    calib_files, _ = ddata.calibration_files(cfg, None, 32, True)
    for name, target, fmt, placement in (("int8-u8s8", "ort-cpu", "qdq-u8s8", "tuned"),
                                         ("int8-s8s8", "tensorrt", "qdq-s8s8-sym", "tuned"),
                                         ("int8-u8s8-ort-default", "ort-cpu", "qdq-u8s8", "ort-default")):
        pre = work / f"pre.{placement}.onnx"
        q.prepare(files["fp32"], pre, placement)
        calib = q.Calibration(pre, calib_files, ddata.file_list_fingerprint(calib_files), q.QuantSettings("minmax"),
                              preprocess_spec(dep), work / "cache",
                              lambda: ddata.make_reader(calib_files, cfg, INPUT_NAME, 32))
        files[name] = q.quantize(pre, work / f"{name}.onnx", fmt, calib, q.make_plan(target, pre, placement))
    return files


def latency(runs: list[Path], rounds: int = 5, budget_s: float = 1.0) -> None:
    """Batch-1 latency, every file of a run and size timed in interleaved rounds (a disturbance
    hits all alike); median of the rounds' medians."""
    from edgedistill.deploy.runtime import cpu_threads, latency_ms, session
    from edgedistill.envinfo import cpu_info

    for run in runs:
        result = {"run": str(run), "threads": cpu_threads(), "batch": 1, "cpu": cpu_info(), "sizes": {}}
        base = WORK / run.name
        sizes = {32: {"fp32": base / "u8s8.tuned-auto-fallback" / "model.onnx",
                      "int8-u8s8": base / "u8s8.tuned-auto-fallback" / "model.int8.u8s8.onnx",
                      "int8-s8s8": base / "s8s8.tuned-auto-fallback" / "model.int8.s8s8.onnx",
                      "int8-u8s8-ort-default": base / "u8s8.ort-default" / "model.int8.u8s8.onnx"}}
        with tempfile.TemporaryDirectory() as tmp:
            sizes[224] = _files_224(run, Path(tmp))
            for px, files in sizes.items():
                sample = np.random.default_rng(0).standard_normal((1, 3, px, px)).astype(np.float32)
                sessions = {name: session(path) for name, path in files.items()}
                medians: dict[str, list[float]] = {name: [] for name in files}
                for _ in range(rounds):
                    for name, sess in sessions.items():
                        medians[name].append(latency_ms(sess, sample, budget_s=budget_s, warmup=5)["median_ms"])
                table = {name: {"median_ms": round(float(np.median(v)), 4), "rounds": v} for name, v in medians.items()}
                fp32 = table["fp32"]["median_ms"]
                for name, entry in table.items():
                    entry["speedup_vs_fp32"] = round(fp32 / entry["median_ms"], 3)
                result["sizes"][str(px)] = table
                print(run.name, px, {k: v["median_ms"] for k, v in table.items()}, flush=True)
                del sessions
        _write(WORK / f"{run.name}.latency.json", result)


def table(variants: list[str]) -> None:
    """Merge the measured rows of `variants` (all by default) into bench/results/int8_quality.json;
    rows of other variants (and the latency) stay as committed, with the environment they were
    measured in."""
    from edgedistill.envinfo import environment

    committed = json.loads(RESULT.read_text()) if RESULT.is_file() else {"rows": [], "latency": {}}
    students = sorted({p.name.split(".")[0] for p in WORK.glob("*.quality.json")})
    merged = set(variants) | ({"tuned-auto"} if "tuned-auto-fallback" in variants else set())
    rows = [r for r in committed["rows"] if r["variant"] not in merged]
    lat = committed.get("latency", {})
    for s in students:
        rows += [r for r in json.loads((WORK / f"{s}.quality.json").read_text())["rows"] if r["variant"] in merged]
        if (WORK / f"{s}.latency.json").is_file() and "latency" in variants:
            lat[s] = json.loads((WORK / f"{s}.latency.json").read_text())
    rows.sort(key=lambda r: (r["student"], list(FORMATS).index(r["format"]), ORDER.index(r["variant"])))
    # Where each variant's rows were measured: this machine for the merged ones, the committed
    # record (older files: one `environment` for all) for the rest.
    here = environment()
    before = committed.get("environments") or {v: committed["environment"] for v in VARIANTS if "environment" in committed}
    environments = {**before, **{v: here for v in sorted(merged)}}
    _write(RESULT, {
        "schema": "edgedistill.int8_quality/1",
        "what": "INT8 PTQ and QAD of CIFAR-10-JPEG students: top-1 on the full test set (10,000 images), drop vs "
                "the fp32 ONNX model with its paired standard error, agreement and output KL; weighted (Conv/Gemm) "
                "layers in INT8; file sizes; QAD steps and seconds; batch-1 latency on this CPU at 32 and 224 px",
        "commands": ["edgedistill train recipes/cifar10_supervised_student.yaml --set student.arch=ARCH "
                     "--set train.epochs=E --set data.workers=1 --out runs/int8/NAME",
                     "python bench/int8_quality.py quality runs/int8/NAME",
                     "python bench/int8_quality.py quality runs/int8/NAME --variants tuned-auto-qad --formats FMT "
                     "(one format per process, one thread each)",
                     "python bench/int8_quality.py latency runs/int8/NAME  (alone, idle machine)",
                     "python bench/int8_quality.py table"],
        "max_drop": MAX_DROP, "qad_steps": QAD_STEPS, "rows": rows, "latency": lat,
        "environments": environments,  # per variant: where its rows were measured
    })
    print(markdown(rows, lat))


def markdown(rows: list[dict], lat: dict) -> str:
    lines = ["| student | format | variant | calibrator | fp32 top-1 | INT8 top-1 | drop ± se | agreement | KL | "
             "INT8 layers | size fp32 / INT8 (KB) | ratio | QAD steps, s |", "|" + "---|" * 13]
    for r in rows:
        qad = r.get("qad")
        qad_cell = f"{qad['steps']}, {qad['seconds']:.0f}" if qad else "-"
        lines.append(f"| {r['student']} | {r['format']} | {r['variant']} | {r['calibrator']} | {r['fp32_top1']:.2f} | "
                     f"{r['int8_top1']:.2f} | {r['drop']:.2f} ± {r['drop_se']:.2f} | {r['agreement']:.2f} | "
                     f"{r['kl_vs_fp32']:.4f} | {r['int8_layers']}/{r['weighted_layers']} | {r['fp32_kb']:.0f} / "
                     f"{r['int8_kb']:.0f} | {r['size_ratio']:.2f}x | "
                     f"{qad_cell} |")
    if lat:
        lines += ["", "| student | px | fp32 ms | INT8 u8s8 ms (x) | INT8 s8s8 ms (x) | ORT-default u8s8 ms (x) |",
                  "|---|---|---|---|---|---|"]
        for s, res in lat.items():
            for px, t in res["sizes"].items():
                cell = lambda k: f"{t[k]['median_ms']:.3f} ({t[k]['speedup_vs_fp32']:.2f}x)"  # noqa: E731
                lines.append(f"| {s} | {px} | {t['fp32']['median_ms']:.3f} | {cell('int8-u8s8')} | {cell('int8-s8s8')} | "
                             f"{cell('int8-u8s8-ort-default')} |")
    return "\n".join(lines)


def _write(path: Path, data: dict) -> None:
    from edgedistill.fileio import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("quality", "latency", "table"))
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--formats", default=",".join(FORMATS), help="quality: formats to (re)measure")
    parser.add_argument("--variants", default=",".join([*VARIANTS, "latency"]),
                        help="quality: variants to (re)measure; table: variants (and 'latency') to merge")
    args = parser.parse_args()
    os.chdir(ROOT)
    variants = args.variants.split(",")
    {"quality": lambda: quality(args.runs, args.formats.split(","), [v for v in variants if v in VARIANTS]),
     "latency": lambda: latency(args.runs),
     "table": lambda: table(variants)}[args.phase]()


if __name__ == "__main__":
    main()
