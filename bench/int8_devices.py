"""INT8 per device class: accuracy of the default export for each CPU class (and TensorRT), and
latency of fp32 against INT8 on ONNX Runtime and OpenVINO, side by side, on this CPU.

    python bench/int8_devices.py accuracy runs/int8/sup_mnv3s [...]  # exports, full test set (one thread is fine)
    python bench/int8_devices.py latency runs/int8/sup_mnv3s [...]   # timing: run alone on an idle machine
    python bench/int8_devices.py blocks runs/int8/sup_mnv3s [...]    # per-block INT8 vs float timing (idle)
    python bench/int8_devices.py ops runs/int8/sup_mnv3s [...]       # where the time goes, by kind of node (idle)
    python bench/int8_devices.py table                              # merge -> bench/results/int8_devices.json

Accuracy: every row is the real `edgedistill export --int8 --qad-steps 0` (post-training
quantization alone) of a trained CIFAR-10-JPEG student, scored on the full test set the way the
declared device computes the file (`int8.scored_with` in the manifest): `--cpu x86-vnni` and
`--cpu x86-avx2` (7-bit weights; on a machine of the other class, the exact QDQ reference), the
TensorRT format (always the exact reference), and for each x86 class `--int8-classifier --int8-stem`
(every weighted layer in INT8, the classifier and the stem too). The rows are kept by the CPU class
of the machine that scored them, so the same row name measured on another class sits beside them.

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
import re
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
    "x86-vnni-int8-classifier": {"cpu": "x86-vnni", "int8_classifier": True, "int8_stem": True},
    "x86-avx2-int8-classifier": {"cpu": "x86-avx2", "int8_classifier": True, "int8_stem": True},
}
RUNTIMES = ("ort-cpu", "openvino-cpu")
THREADS = (1, 2)
SPREAD_LIMIT = 1.5
# Measured on this machine: one entry per class of the machine (accuracy: its CPU class, whose INT8
# arithmetic scored the rows; timings: its timing class, the CPU class with `+amx` / `+zen4`:
# runs/int8/devices/NAME.PART.CLASS.json), so a run on another class adds its rows beside the committed ones.
PER_CLASS = ("accuracy", "latency", "blocks", "ops")
# Schema 2 held one accuracy entry, measured on an AMD EPYC with AVX-512 VNNI.
SCHEMA2_ACCURACY_CLASS = "x86-vnni"


def accuracy(runs: list[Path], rows: list[str]) -> None:
    from edgedistill.deploy import export_run
    from edgedistill.deploy.quantize import this_cpu_class
    from edgedistill.envinfo import environment

    WORK.mkdir(parents=True, exist_ok=True)
    cpu_class = this_cpu_class()
    for run in runs:
        done = WORK / f"{run.name}.accuracy.{cpu_class}.json"
        result = json.loads(done.read_text()) if done.is_file() else {"run": str(run), "cpu_class": cpu_class, "rows": {}}
        result["environment"] = environment()
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


def _files_224(run: Path, work: Path, all_int8: bool = False) -> tuple[dict[str, Path], np.ndarray]:
    """fp32 and the INT8 placements `export --placement auto` chooses between, for this machine's
    CPU class, of the run's classifier at 224 px (calibrated on 32 training images: the ranges do
    not change the speed), and one real validation image at 224 px to time them on. `all_int8`:
    also "int8-all", the tuned file with every weighted layer in INT8 (`--int8-classifier --int8-stem`: no
    weight-only head, no float classifier)."""
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
        plan = q.make_plan("ort-cpu", pre, placement, float_classifier=True, float_stem=True)  # export's default
        files[f"int8-{placement}"] = q.quantize(pre, work / f"int8.{placement}.onnx", "qdq-u8s8", calib, plan)
        if all_int8 and placement == "tuned":
            files["int8-all"] = q.quantize(pre, work / "int8.all.onnx", "qdq-u8s8", calib, q.make_plan("ort-cpu", pre, placement))
    return files, ddata.validation_set(cfg, 1)[0]


def latency(runs: list[Path], rounds: int = 5, time_s: float = 1.0) -> None:
    from edgedistill.deploy.quantize import this_cpu_class, timing_class
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
        result = {"run": str(run), "px": 224, "batch": 1, "cpu_class": this_cpu_class(), "timed_on": timing_class(),
                  "rows": rows, "environment": kit.environment()}
        for r in rows:
            print(run.name, r["runtime"], r["threads"], r["file"], r["median_ms"], r["speedup_vs_fastest_fp32"],
                  r["spread_max_min"], flush=True)
        _write(WORK / f"{run.name}.latency.{result['timed_on']}.json", result)


def blocks(runs: list[Path], rounds: int = 5, time_s: float = 0.6) -> None:
    """Which blocks hold INT8 back on ONNX Runtime: at 224 px, batch 1, 1 and 2 threads, the
    all-INT8 file (tuned placement, head float as `export` builds it) against the same file with
    one block's weighted layers in float, every variant timed in the same interleaved rounds; then
    the file with every block that was faster in float kept in float ("hybrid"), timed beside fp32."""
    from edgedistill.deploy import data as ddata
    from edgedistill.deploy import quantize as q
    from edgedistill.deploy.exporter import LATENCY_GAIN
    from edgedistill.deploy.onnx_export import INPUT_NAME, export_onnx, load_deployable, preprocess_spec
    from edgedistill.deploy.quantize import this_cpu_class, timing_class
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
                      "timed_on": timing_class(), "threads": {}, "environment": kit.environment()}
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
        _write(WORK / f"{run.name}.blocks.{result['timed_on']}.json", result)


# `ops`: ONNX Runtime names a fused node after the node (QLinearConv: "<Conv>_token_N") or the tensor
# (NCHWc Conv + activation: "<activation output>_nchwc") it came from.
WARMUP = 20
WEIGHTED_OPS = {"Conv", "FusedConv", "QLinearConv", "Gemm", "QGemm", "MatMul", "QLinearMatMul", "MatMulInteger",
                "ConvInteger", "NchwcConv"}
FUSED_SUFFIX = re.compile(r"(_nchwc|_token_\d+)+$")


def _layer_kinds(graph) -> dict[str, str]:
    """Each Conv / Gemm of an ONNX graph by kind (depthwise: grouped; squeeze-excite: a 1x1 conv of
    an `se` module; pointwise: other 1x1; dense: k x k), under its node name, its output tensor and
    the output of an activation that follows it (what a fused node is named after)."""
    consts = {i.name: list(i.dims) for i in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}

    def weight_dims(node):  # an initializer, or the DequantizeLinear of one
        src = producer.get(node.input[1])
        return consts.get(node.input[1]) or (consts.get(src.input[0]) if src is not None and src.op_type == "DequantizeLinear" else None)

    kinds: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            kernel = (weight_dims(node) or [0, 0, 0, 0])[2:]
            kind = ("depthwise convs" if group > 1 else "squeeze-excite convs" if "/se/" in node.name
                    else "pointwise convs" if kernel == [1, 1] else "dense convs (stem, ResNet)")
        elif node.op_type in ("Gemm", "MatMul"):
            kind = "fully connected"
        else:
            continue
        kinds.update({node.name: kind, **{out: kind for out in node.output}})
    for node in graph.node:  # Conv -> activation, fused and named after the activation's output
        if node.op_type in ("Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid") and node.input[0] in kinds:
            kinds.setdefault(node.output[0], kinds[node.input[0]])
    return kinds


def _node_category(op: str, name: str, kinds: dict[str, str], weight_dq: set[str]) -> str:
    if op in ("QuantizeLinear", "DequantizeLinear"):
        return "weight DequantizeLinear (runs every call)" if name in weight_dq else "activation Q/DQ"
    if op in ("Transpose", "ReorderInput", "ReorderOutput"):
        return "layout (Transpose, NCHWc reorders)"
    if op in WEIGHTED_OPS:
        return kinds.get(FUSED_SUFFIX.sub("", name), "other weighted layers")
    return "float element-wise and pooling"


def ops(runs: list[Path], iterations: int = 200) -> None:
    """Where the time goes on ONNX Runtime: fp32, the tuned INT8 file of `latency` and the same
    with every weighted layer INT8 (224 px, batch 1, 1 and 2 threads), each node timed by ONNX
    Runtime's own profiler over `iterations` calls after a warm-up, summed by what the node is
    (weighted layers by kind, `_layer_kinds`; the Q/DQ of activations; the DequantizeLinear of
    weights that stay int8 in front of a float layer, which ONNX Runtime does not constant-fold;
    layout; the rest). The profiler's overhead is in every node alike: compare within a run."""
    import onnx
    import onnxruntime as ort

    from edgedistill.deploy.quantize import this_cpu_class, timing_class
    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")
    WORK.mkdir(parents=True, exist_ok=True)
    for run in runs:
        result = {"run": str(run), "px": 224, "batch": 1, "runtime": "ort-cpu", "iterations": iterations,
                  "cpu_class": this_cpu_class(), "timed_on": timing_class(), "threads": {},
                  "environment": kit.environment()}
        with tempfile.TemporaryDirectory() as tmp:
            files, x = _files_224(run, Path(tmp), all_int8=True)
            files = {name: files[name] for name in ("fp32", "int8-tuned", "int8-all")}
            kinds, weight_dq = {}, {}  # per file: layer kinds; DequantizeLinear nodes of an initializer (a weight)
            for name, path in files.items():
                graph = onnx.load(str(path)).graph
                consts = {i.name for i in graph.initializer}
                kinds[name] = _layer_kinds(graph)
                weight_dq[name] = {n.name for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
            for threads in THREADS:
                table: dict[str, dict[str, float]] = {}
                for name, path in files.items():
                    so = ort.SessionOptions()
                    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
                    so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / f"profile.{name}.{threads}")
                    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                    feed = {sess.get_inputs()[0].name: x[:1]}
                    for _ in range(WARMUP + iterations):
                        sess.run(None, feed)
                    profile = json.loads(Path(sess.end_profiling()).read_text())
                    starts = sorted(e["ts"] for e in profile if e.get("cat") == "Session" and e["name"] == "model_run")
                    sums: dict[str, float] = {}
                    for event in profile:  # the nodes of the timed calls (after the warm-up ones)
                        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                                and event["ts"] >= starts[WARMUP]):
                            node = event["name"][: -len("_kernel_time")]
                            key = _node_category(event["args"].get("op_name", ""), node, kinds[name], weight_dq[name])
                            sums[key] = sums.get(key, 0.0) + event["dur"] / 1000.0
                    table[name] = {key: round(ms / iterations, 4) for key, ms in sorted(sums.items())}
                    table[name]["total of nodes"] = round(sum(sums.values()) / iterations, 4)
                result["threads"][str(threads)] = table
                print(run.name, threads, json.dumps(table), flush=True)
        _write(WORK / f"{run.name}.ops.{result['timed_on']}.json", result)


def table() -> None:
    """Merge runs/int8/devices/*.json into the committed file: accuracy by the scoring machine's CPU
    class, latency, blocks and ops by timing class; what is not measured here is kept."""
    from edgedistill.envinfo import environment

    committed = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    students: dict[str, dict] = {}
    for name, entry in committed.get("students", {}).items():
        for part, value in entry.items():  # schemas 1-2 held one entry of a part, not one per class
            if part == "accuracy" and "rows" in value:
                value = {**value, "cpu_class": SCHEMA2_ACCURACY_CLASS}
            students.setdefault(name, {})[part] = {value["cpu_class"]: value} if part in PER_CLASS and "cpu_class" in value else value
    for path in sorted(WORK.glob("*.json")):
        name, part = path.name.split(".")[:2]
        data = json.loads(path.read_text())
        entry = students.setdefault(name, {})
        entry.setdefault(part, {})[data.get("timed_on", data["cpu_class"])] = data
    doc = {"schema": "edgedistill.int8_devices/3", "what": __doc__.split("\n\n")[0],
           "commands": ["python bench/int8_devices.py accuracy runs/int8/NAME ...",
                        "python bench/int8_devices.py latency runs/int8/NAME ...  (alone, idle machine)",
                        "python bench/int8_devices.py blocks runs/int8/NAME ...  (alone, idle machine)",
                        "python bench/int8_devices.py ops runs/int8/NAME ...  (alone, idle machine)",
                        "python bench/int8_devices.py table"],
           "layout": "students.NAME.PART.CLASS: accuracy (rows by device row) by the CPU class of the machine that "
                     "scored it; latency, blocks and ops by the timing class they were measured on (the CPU class, "
                     "+amx on an AMX CPU, +zen4 on AMD Zen 4); each with its own environment",
           "students": dict(sorted(students.items())), "environment": environment()}
    _write(RESULT, doc)
    print(markdown(doc))


def markdown(doc: dict) -> str:
    lines = ["| student | measured on | device (scored with) | placement | fp32 top-1 | drop ± se | agreement | "
             "INT8 layers | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for s, entry in doc["students"].items():
        for measured_on, accuracy_entry in (entry.get("accuracy") or {}).items():
            for name, r in accuracy_entry["rows"].items():
                lines.append(f"| {s} | {measured_on} | {name} ({r['scored_with']}) | {r['placement']} | {r['fp32_top1']:.2f} | "
                             f"{r['drop']:.2f} ± {r['drop_se']:.2f} | {r['agreement']:.2f} | "
                             f"{r['int8_layers']['int8']}/{r['int8_layers']['weighted_layers']} | {r['size_ratio']:.2f}x |")
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
    lines += ["", "| student | CPU class | threads | nodes | fp32 ms | INT8 (tuned) ms | INT8 (all layers) ms |",
              "|---|---|---|---|---|---|---|"]
    for s, entry in doc["students"].items():
        for cpu_class, ops_entry in (entry.get("ops") or {}).items():
            for threads, files in ops_entry["threads"].items():
                kinds = sorted(set().union(*files.values()), key=lambda k: (k == "total of nodes", k))
                for kind in kinds:
                    cells = " | ".join(f"{files[f].get(kind, 0):.3f}" for f in ("fp32", "int8-tuned", "int8-all"))
                    lines.append(f"| {s} | {cpu_class} | {threads} | {kind} | {cells} |")
    return "\n".join(lines)


def _write(path: Path, data: dict) -> None:
    from edgedistill.fileio import write_json

    write_json(path, data)  # atomic; the folder exists (WORK is made first, RESULT's is in the repo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("accuracy", "latency", "blocks", "ops", "table"))
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--rows", default=",".join(ROWS), help="accuracy: rows to (re)measure")
    args = parser.parse_args()
    os.chdir(ROOT)
    {"accuracy": lambda: accuracy(args.runs, args.rows.split(",")), "latency": lambda: latency(args.runs),
     "blocks": lambda: blocks(args.runs), "ops": lambda: ops(args.runs), "table": table}[args.phase]()


if __name__ == "__main__":
    sys.exit(main())
