"""INT8 per device class: accuracy of the default export for each CPU class (and TensorRT), and
latency of fp32 against INT8 on ONNX Runtime and OpenVINO, side by side, on this CPU.

    python bench/int8_devices.py accuracy runs/int8/sup_mnv3s [...]  # exports, full test set (one thread is fine)
    python bench/int8_devices.py latency runs/int8/sup_mnv3s [...]   # timing: run alone on an idle machine
    python bench/int8_devices.py blocks runs/int8/sup_mnv3s [...]    # per-block INT8 vs float timing (idle)
    python bench/int8_devices.py table                              # merge -> bench/results/int8_devices.json

Accuracy: every row is the real `edgedistill export --int8 --qad-steps 0` (post-training
quantization alone) of a trained CIFAR-10-JPEG student, scored on the full test set the way the
declared device computes the file (`int8.scored_with` in the manifest): `--cpu x86-vnni` and
`--cpu x86-avx2` (7-bit weights; on a machine of the other class, the exact QDQ reference), the
TensorRT format (always the exact reference), and `--int8-classifier` (every weighted layer in
INT8, the classifier too).

Latency: the same weights exported at 224 px, fp32 and the INT8 placements `export` chooses
between (tuned; split-hardswish where the model has HardSwish), for this machine's class, at batch
1 with 1 and 2 threads on ONNX Runtime and OpenVINO (which runs the same QDQ file). Files and
runtimes are timed in interleaved rounds (a disturbance hits all alike); a row reports the median
of its rounds' medians and their max/min spread; a measurement whose spread exceeds 1.5 is taken
again once, and marked when it stays above.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "int8" / "devices"
RESULT = ROOT / "bench" / "results" / "int8_devices.json"
# Accuracy rows: (name, export options).
ROWS = {
    "x86-vnni": {"cpu": "x86-vnni"},
    "x86-avx2": {"cpu": "x86-avx2"},
    "tensorrt": {"target": "tensorrt"},
    "x86-vnni-int8-classifier": {"cpu": "x86-vnni", "int8_classifier": True},
}
RUNTIMES = ("ort-cpu", "openvino-cpu")
THREADS = (1, 2)
SPREAD_LIMIT = 1.5
# Timed on this machine: one entry per CPU class (runs/int8/devices/NAME.PART.CLASS.json), so a run on
# another class adds its rows beside the committed ones.
PER_CLASS = ("latency", "blocks")


def accuracy(runs: list[Path], rows: list[str]) -> None:
    from edgedistill.deploy import export_run

    WORK.mkdir(parents=True, exist_ok=True)
    for run in runs:
        done = WORK / f"{run.name}.accuracy.json"
        result = json.loads(done.read_text()) if done.is_file() else {"run": str(run), "rows": {}}
        for name in rows:
            with tempfile.TemporaryDirectory() as tmp:
                out = export_run(run, int8=True, qad_steps=0, val_count=None, out=Path(tmp) / "ex", **ROWS[name])
                m = json.loads((out / "manifest.json").read_text())
            fp32 = next(a for a in m["artifacts"] if a["name"] == "onnx-fp32")
            int8 = next(a for a in m["artifacts"] if a["precision"] == "int8")
            q = int8["quantization"]
            result["rows"][name] = {
                "options": ROWS[name], "fp32_top1": fp32["accuracy"]["top1"], "int8_top1": int8["accuracy"]["top1"],
                "drop": int8["accuracy"]["drop_vs_fp32"], "drop_se": int8["accuracy"]["drop_se"],
                "agreement": int8["accuracy"]["agreement"], "images": m["validation"]["images"],
                "format": q["name"], "weights": q["weights"], "calibrator": q["calibration"]["label"],
                "placement": q["placement"]["name"], "int8_layers": q["int8_layers"],
                "size_ratio": q["size_ratio_vs_fp32"], "scored_with": m["int8"]["scored_with"]["name"],
                "recommendation": m["recommendation"], "environment_cpu": m["environment"]["cpu"]["model"]}
            print(run.name, name, {k: result["rows"][name][k] for k in ("drop", "drop_se", "placement", "int8_layers")},
                  flush=True)
            _write(done, result)


def _files_224(run: Path, work: Path) -> tuple[dict[str, Path], np.ndarray]:
    """fp32 and the INT8 placements `export --placement auto` chooses between, for this machine's
    CPU class, of the run's classifier at 224 px (calibrated on 32 training images: the ranges do
    not change the speed), and one real validation image at 224 px to time them on."""
    import onnx

    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import quantize as q
    from edgedistill.deploy.onnx_export import INPUT_NAME, export_onnx, load_deployable, preprocess_spec

    dep = load_deployable(run)
    cfg = dataclasses.replace(dep.cfg, data=dataclasses.replace(dep.cfg.data, img_size=224))
    dep = dataclasses.replace(dep, cfg=cfg)
    files = {"fp32": work / "model.onnx"}
    export_onnx(dep, files["fp32"])
    calib_files, _ = ddata.calibration_files(cfg, None, 32, True)
    for placement in ("tuned", "split-hardswish"):
        pre = work / f"pre.{placement}.onnx"
        q.prepare(files["fp32"], pre, placement)
        if placement != "tuned" and not any(n.op_type == "HardSigmoid" for n in onnx.load(str(pre)).graph.node):
            continue  # nothing was split: the same file as tuned
        calib = q.Calibration(pre, calib_files, ddata.file_list_fingerprint(calib_files), q.QuantSettings("minmax"),
                              preprocess_spec(dep), work / "cache",
                              lambda: ddata.make_reader(calib_files, cfg, INPUT_NAME, 32))
        plan = q.make_plan("ort-cpu", pre, placement, float_classifier=True)
        files[f"int8-{placement}"] = q.quantize(pre, work / f"int8.{placement}.onnx", "qdq-u8s8", calib, plan)
    return files, ddata.validation_set(cfg, 1)[0]


def latency(runs: list[Path], rounds: int = 5, time_s: float = 1.0) -> None:
    from edgedistill.deploy.quantize import this_cpu_class
    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")
    WORK.mkdir(parents=True, exist_ok=True)
    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            files, x = _files_224(run, Path(tmp))
            runners = {(rt, threads, name): kit.make_runner(rt, path, threads)
                       for rt in RUNTIMES for threads in THREADS for name, path in files.items()}
            medians: dict[tuple, list[float]] = {key: [] for key in runners}
            for _ in range(rounds):
                for key, runner in runners.items():
                    medians[key].append(kit.measure(runner, x, 10, None, time_s / rounds)["latency_ms"]["p50"])
            rows = []
            for (rt, threads, name), values in medians.items():
                spread = max(values) / min(values)
                if spread > SPREAD_LIMIT:  # disturbed: once more, alone
                    again = [kit.measure(runners[(rt, threads, name)], x, 10, None, time_s / rounds)["latency_ms"]["p50"]
                             for _ in range(rounds)]
                    if max(again) / min(again) < spread:
                        values, spread = again, max(again) / min(again)
                rows.append({"runtime": rt, "threads": threads, "file": name, "median_ms": round(float(np.median(values)), 4),
                             "rounds": [round(v, 4) for v in values], "spread_max_min": round(spread, 3),
                             "unreliable": spread > SPREAD_LIMIT})
            for row in rows:  # against the fastest fp32 of the same thread count
                fastest = min(r["median_ms"] for r in rows if r["file"] == "fp32" and r["threads"] == row["threads"])
                row["speedup_vs_fastest_fp32"] = round(fastest / row["median_ms"], 3)
            del runners
        result = {"run": str(run), "px": 224, "batch": 1, "cpu_class": this_cpu_class(), "rows": rows,
                  "environment": kit.environment()}
        for r in rows:
            print(run.name, r["runtime"], r["threads"], r["file"], r["median_ms"], r["speedup_vs_fastest_fp32"],
                  r["spread_max_min"], flush=True)
        _write(WORK / f"{run.name}.latency.{result['cpu_class']}.json", result)


def blocks(runs: list[Path], rounds: int = 5, time_s: float = 0.6) -> None:
    """Which blocks hold INT8 back on ONNX Runtime: at 224 px, batch 1, 1 and 2 threads, the
    all-INT8 file (tuned placement, head float as `export` builds it) against the same file with
    one block's weighted layers in float, every variant timed in the same interleaved rounds; then
    the file with every block that was faster in float kept in float ("hybrid"), timed beside fp32."""
    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import quantize as q
    from edgedistill.deploy.exporter import LATENCY_GAIN
    from edgedistill.deploy.onnx_export import INPUT_NAME, export_onnx, load_deployable, preprocess_spec
    from edgedistill.deploy.quantize import this_cpu_class
    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")
    WORK.mkdir(parents=True, exist_ok=True)

    def timed(files: dict[str, Path], x, threads: int) -> dict[str, dict]:
        runners = {name: kit.make_runner("ort-cpu", path, threads) for name, path in files.items()}
        values: dict[str, list[float]] = {name: [] for name in files}
        for _ in range(rounds):
            for name, runner in runners.items():
                values[name].append(kit.measure(runner, x, 10, None, time_s / rounds)["latency_ms"]["p50"])
        return {name: {"median_ms": round(float(np.median(v)), 4), "spread_max_min": round(max(v) / min(v), 3)}
                for name, v in values.items()}

    for run in runs:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            dep = load_deployable(run)
            cfg = dataclasses.replace(dep.cfg, data=dataclasses.replace(dep.cfg.data, img_size=224))
            dep = dataclasses.replace(dep, cfg=cfg)
            fp32, pre = work / "model.onnx", work / "pre.onnx"
            export_onnx(dep, fp32)
            q.prepare(fp32, pre, "tuned")
            calib_files, _ = ddata.calibration_files(cfg, None, 32, True)
            calib = q.Calibration(pre, calib_files, ddata.file_list_fingerprint(calib_files), q.QuantSettings("minmax"),
                                  preprocess_spec(dep), work / "cache", lambda: ddata.make_reader(calib_files, cfg, INPUT_NAME, 32))
            plan = q.make_plan("ort-cpu", pre, "tuned", float_classifier=True)
            groups = q.layer_groups(pre, skip=set(plan.float_nodes))

            def build(name: str, excluded: list[str]) -> Path:
                return q.quantize(pre, work / f"{name}.onnx", "qdq-u8s8", calib, plan, nodes_to_exclude=excluded)

            files = {"fp32": fp32, "int8": build("int8", [])}
            files.update({g: build(f"float{k}", layers) for k, (g, layers) in enumerate(groups.items())})
            x = ddata.validation_set(cfg, 1)[0]
            result = {"run": str(run), "px": 224, "batch": 1, "runtime": "ort-cpu", "cpu_class": this_cpu_class(),
                      "threads": {}, "environment": kit.environment()}
            for threads in THREADS:
                table = timed(files, x, threads)
                base = table["int8"]["median_ms"]
                rows = [{"block": g, "layers": len(groups[g]), "ms_with_block_float": table[g]["median_ms"],
                         "gain_vs_all_int8": round(base / table[g]["median_ms"], 3), "spread": table[g]["spread_max_min"]}
                        for g in groups]
                faster = [r["block"] for r in rows if r["gain_vs_all_int8"] > LATENCY_GAIN]
                hybrid = {"fp32": fp32, "int8": files["int8"],
                          "hybrid": build(f"hybrid{threads}", [n for g in faster for n in groups[g]])}
                again = timed(hybrid, x, threads)
                result["threads"][str(threads)] = {
                    "fp32_ms": table["fp32"]["median_ms"], "int8_ms": base, "blocks": rows, "kept_in_float": faster,
                    "hybrid": {**again["hybrid"], "layers_in_float": sum(len(groups[g]) for g in faster),
                               "bytes": hybrid["hybrid"].stat().st_size, "int8_bytes": files["int8"].stat().st_size,
                               "fp32_bytes": fp32.stat().st_size},
                    "side_by_side_ms": {k: v["median_ms"] for k, v in again.items()}}
                print(run.name, threads, "fp32", table["fp32"]["median_ms"], "int8", base, "hybrid",
                      again["hybrid"]["median_ms"], f"({len(faster)} of {len(groups)} blocks float)", flush=True)
        _write(WORK / f"{run.name}.blocks.{result['cpu_class']}.json", result)


def table() -> None:
    """Merge runs/int8/devices/*.json into the committed file: accuracy rows by name, latency and
    blocks by CPU class; what is not measured here is kept."""
    from edgedistill.envinfo import environment

    committed = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    students: dict[str, dict] = {}
    for name, entry in committed.get("students", {}).items():
        for part, value in entry.items():  # schema 1 held one latency / blocks entry, of its cpu_class
            students.setdefault(name, {})[part] = {value["cpu_class"]: value} if part in PER_CLASS and "cpu_class" in value else value
    for path in sorted(WORK.glob("*.json")):
        name, part = path.name.split(".")[:2]
        data = json.loads(path.read_text())
        entry = students.setdefault(name, {})
        if part in PER_CLASS:
            entry.setdefault(part, {})[data["cpu_class"]] = data
        else:
            entry.setdefault(part, {"run": data["run"], "rows": {}})["rows"].update(data["rows"])
    doc = {"schema": "edgedistill.int8_devices/2", "what": __doc__.split("\n\n")[0],
           "commands": ["python bench/int8_devices.py accuracy runs/int8/NAME ...",
                        "python bench/int8_devices.py latency runs/int8/NAME ...  (alone, idle machine)",
                        "python bench/int8_devices.py blocks runs/int8/NAME ...  (alone, idle machine)",
                        "python bench/int8_devices.py table"],
           "layout": "students.NAME: accuracy.rows by device row; latency and blocks by the CPU class they were timed "
                     "on (each with its own environment)",
           "students": dict(sorted(students.items())), "environment": environment()}
    _write(RESULT, doc)
    print(markdown(doc))


def markdown(doc: dict) -> str:
    lines = ["| student | device (scored with) | placement | drop ± se | agreement | INT8 layers | ratio |",
             "|---|---|---|---|---|---|---|"]
    for s, entry in doc["students"].items():
        for name, r in (entry.get("accuracy") or {}).get("rows", {}).items():
            lines.append(f"| {s} | {name} ({r['scored_with']}) | {r['placement']} | {r['drop']:.2f} ± {r['drop_se']:.2f} | "
                         f"{r['agreement']:.2f} | {r['int8_layers']['int8']}/{r['int8_layers']['weighted_layers']} | "
                         f"{r['size_ratio']:.2f}x |")
    lines += ["", "| student | CPU class | threads | file | ORT ms (x) | OpenVINO ms (x) |", "|---|---|---|---|---|---|"]

    def fmt(r):
        return (f"{r['median_ms']:.3f} ({r['speedup_vs_fastest_fp32']:.2f}x"
                + (f", spread {r['spread_max_min']:.2f}" if r["unreliable"] else "") + ")") if r else "-"

    for s, entry in doc["students"].items():
        for cpu_class, latency in (entry.get("latency") or {}).items():
            rows = latency["rows"]
            for threads in THREADS:
                for name in dict.fromkeys(r["file"] for r in rows):
                    cell = {r["runtime"]: r for r in rows if r["threads"] == threads and r["file"] == name}
                    lines.append(f"| {s} | {cpu_class} | {threads} | {name} | {fmt(cell.get('ort-cpu'))} | "
                                 f"{fmt(cell.get('openvino-cpu'))} |")
    return "\n".join(lines)


def _write(path: Path, data: dict) -> None:
    from edgedistill.fileio import write_json

    write_json(path, data)  # atomic; the folder exists (WORK is made first, RESULT's is in the repo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("accuracy", "latency", "blocks", "table"))
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--rows", default=",".join(ROWS), help="accuracy: rows to (re)measure")
    args = parser.parse_args()
    os.chdir(ROOT)
    {"accuracy": lambda: accuracy(args.runs, args.rows.split(",")), "latency": lambda: latency(args.runs),
     "blocks": lambda: blocks(args.runs), "table": table}[args.phase]()


if __name__ == "__main__":
    sys.exit(main())
