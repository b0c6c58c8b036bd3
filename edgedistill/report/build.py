"""`edgedistill report RUN`: one table that joins every artifact's size, cost, accuracy and latency.

Inputs (all read, none modified):
    RUN/eval.json                 student (and optional teacher) scores, `edgedistill eval`
    RUN/export/manifest.json      artifacts: file, format, precision, bytes, params, accuracy
    RUN/export/bench*.json        latency measured here (`edgedistill bench`)
    RUN/export/check*.json        accuracy checks run on devices (`kit/edgekit.py check`)
    --device-results FILE ...     latency measured on devices (`kit/edgekit.py bench`), same schema,
                                  or their accuracy checks (`kit/edgekit.py check`)
Outputs in RUN/report/: report.json ("edgedistill.report/1"), report.md, accuracy_vs_size.png,
accuracy_vs_latency.png.

Accuracy is the export's accuracy on the validation set (manifest `accuracy`), the torch student's
is eval.json's linear-probe top-1; "drop vs fp32" is taken against the fp32 ONNX artifact when the
export has one (same images, same preprocessing), else against the torch student.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path

from edgedistill.deploy.manifest import CHECK_SCHEMA, MANIFEST_FILE, TORCH_ARTIFACT, bench_results, read_manifest
from edgedistill.runfolder import CLASSIFIER_FILE, STUDENT_FILE, read_eval
from edgedistill.errors import UserError
from edgedistill.fileio import write_json, write_text

log = logging.getLogger(__name__)

SCHEMA = "edgedistill.report/1"
REPORT_DIR = "report"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_SIZE = "accuracy_vs_size.png"
PLOT_LATENCY = "accuracy_vs_latency.png"


def _check_rows(docs) -> list[dict]:
    """One row per artifact x runtime x device of the accuracy checks run on devices."""
    rows = []
    for path, doc in docs:
        env = doc.get("environment") or {}
        for r in doc.get("results", []):
            rows.append({"artifact": r["artifact"], "runtime": r["runtime"], "precision": r.get("precision"),
                         "host": env.get("host"), "cpu": (env.get("cpu") or {}).get("model"),
                         "samples": r.get("samples"), "agreement": r.get("agreement"), "divergence": r.get("divergence"),
                         "max_rel_diff": r.get("max_rel_diff"), "passed": r.get("passed"), "source": str(path)})
    return rows


def cpu_features(cpu: dict | None) -> str | None:
    """What, besides its model name, makes a CPU time a model differently: the ISA extensions the
    environment stamp found and the cores the process may use ("avx2+avx512f+avx512_vnni, 2 cores").
    Two AMD EPYC machines, one with AVX-512 VNNI and one with AVX2 only, have the same model name."""
    if not cpu or not cpu.get("isa"):
        return None
    isa = "+".join(name for name, present in cpu["isa"].items() if present and name != "int8_dot") or "baseline"
    return f"{isa}, {cpu.get('affinity_cores') or cpu.get('logical_cores')} cores"


def _latency_rows(docs) -> list[dict]:
    rows = []
    for source, doc in docs:
        env = doc.get("environment", {})
        cpu = (env.get("cpu") or {}).get("model")
        features = cpu_features(env.get("cpu"))
        gpus = env.get("gpu") or []
        for r in doc.get("results", []):
            lat = r.get("latency_ms", {})
            rows.append({
                "artifact": r["artifact"], "runtime": r["runtime"], "provider": r.get("provider"),
                "precision": r.get("precision"), "host": r.get("host") or env.get("host"), "cpu": cpu,
                "cpu_features": features, "gpu": gpus[0]["name"] if gpus else None, "source": source, "batch": int(r["batch"]),
                "threads": r.get("threads"), "runs": r.get("runs"),
                "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"), "p99_ms": lat.get("p99"),
                "mean_ms": lat.get("mean"), "std_ms": lat.get("std"), "throughput_ips": r.get("throughput_ips"),
                "h2d_ms": r.get("h2d_ms"), "d2h_ms": r.get("d2h_ms"), "top1_samples": r.get("top1"),
                "spread_p90_p50": r.get("spread_p90_p50"), "unreliable": bool(r.get("unreliable")),
                "clock": r.get("clock"),
            })
    return rows


def _torch_model(run_dir: Path):
    try:
        from edgedistill.runfolder.load import load_run_classifier

        return load_run_classifier(run_dir)
    except UserError as e:
        log.warning("torch student not loadable (%s): MACs come from the ONNX graph", e)
        return None


def _summary(artifacts: list[dict], latency: list[dict]) -> list[dict]:
    """One row per artifact x runtime x host: batch-1 (or smallest batch) latency, best throughput."""
    out = []
    by_key: dict[tuple, list[dict]] = {}
    for r in latency:
        by_key.setdefault((r["artifact"], r["runtime"], r["host"], r["source"]), []).append(r)
    for a in artifacts:
        keys = [k for k in by_key if k[0] == a["name"]]
        base = {"artifact": a["name"], "format": a.get("format"), "precision": a.get("precision"),
                "size_mb": a.get("size_mb"), "params": a.get("params"), "macs": a.get("macs"), "top1": a.get("top1"),
                "drop_vs_fp32": a.get("drop_vs_fp32")}
        if not keys:
            out.append({**base, "runtime": None, "host": None})
            continue
        for k in keys:
            rows = sorted(by_key[k], key=lambda r: r["batch"])
            first = rows[0]
            best = max(rows, key=lambda r: r["throughput_ips"] or 0)
            out.append({**base, "runtime": k[1], "host": k[2], "source": k[3], "latency_batch": first["batch"],
                        "p50_ms": first["p50_ms"], "p99_ms": first["p99_ms"],
                        "throughput_ips": best["throughput_ips"], "throughput_batch": best["batch"]})
    return out


def _notes(artifacts: list[dict], latency: list[dict], docs, manifest: dict | None = None) -> list[str]:
    notes = []
    if manifest and manifest.get("status", "ok") != "ok":
        notes.append(f"export status {manifest['status']!r}: " + "; ".join(map(str, manifest.get("problems") or [])))
    by = {(r["artifact"], r["runtime"], r["host"], r["source"], r["batch"]): r for r in latency}
    prec = {a["name"]: a.get("precision") for a in artifacts}
    for (name, runtime, host, source, batch), r in sorted(by.items(), key=lambda kv: str(kv[0])):
        if prec.get(name) != "int8" or batch != 1:
            continue
        ref = by.get(("onnx-fp32", runtime, host, source, batch))
        if ref and ref["p50_ms"] and r["p50_ms"]:
            ratio = r["p50_ms"] / ref["p50_ms"]
            verdict = (f"{1 / ratio:.2f}x faster than" if ratio < 0.95 else
                       f"{ratio:.2f}x slower than" if ratio > 1.05 else "as fast as")
            notes.append(f"{name} on {runtime} ({host}) is {verdict} onnx-fp32 at batch 1 "
                         f"({r['p50_ms']:.3f} vs {ref['p50_ms']:.3f} ms p50).")
    for a in artifacts:
        if a.get("precision") != "fp32" and a.get("drop_vs_fp32") is not None and a["drop_vs_fp32"] > 1.0:
            notes.append(f"{a['name']} loses {a['drop_vs_fp32']:.2f} points of top-1 against fp32: check the "
                         "calibration (images, method) or keep sensitive layers in higher precision.")
    for source, doc in docs:
        env = doc.get("environment", {})
        cpu = env.get("cpu") or {}
        load, cores = env.get("load_average"), cpu.get("affinity_cores")
        if load and cores and load[0] > 0.5 * cores:
            notes.append(f"{source}: measured with load average {load[0]} on {cores} cores: latencies are noisy.")
        noisy = [f"{r['artifact']} on {r['runtime']} at batch {r['batch']}" for r in doc.get("results", [])
                 if r.get("unreliable")]
        if noisy:
            notes.append(f"{source}: unreliable timings (p90/p50 still above the limit after re-measuring; the "
                         f"machine was busy): {'; '.join(noisy)}.")
        if doc.get("pick") is not None:
            notes.append(f"{source} ({env.get('host')}): ship {doc['pick']['reason']}.")
        isa = cpu.get("isa") or {}
        if isa and not isa.get("int8_dot", True) and any(r["precision"] == "int8" for r in doc.get("results", [])):
            notes.append(f"{source}: this CPU ({cpu.get('model')}) has no VNNI/AMX INT8 dot-product instructions, "
                         "so INT8 on it is usually no faster than FP32.")
    return notes


def build_report(run_dir, device_results=(), export_dir=None, out_dir=None) -> Path:
    """Join eval.json, the export manifest and benchmark results; returns RUN/report/report.json."""
    from edgedistill.envinfo import environment
    from edgedistill.report import plots
    from edgedistill.report.macs import onnx_macs, torch_macs

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run folder: pass the folder written by `edgedistill train`")
    ev = read_eval(run_dir)
    export_dir = Path(export_dir) if export_dir else run_dir / "export"
    manifest = None
    if (export_dir / MANIFEST_FILE).is_file():
        manifest = read_manifest(export_dir, f"re-run `edgedistill export {run_dir}`")
    else:
        log.warning("%s has no manifest.json: the report covers the torch student only "
                    "(run `edgedistill export %s`)", export_dir, run_dir)
    stale: list[str] = []
    docs = bench_results(export_dir if manifest else None, device_results, stale)
    device_checks = _check_rows(bench_results(export_dir if manifest else None, device_results, stale, CHECK_SCHEMA))
    latency = _latency_rows(docs)

    student = ev["student"]
    input_shape = (manifest or {}).get("input", {}).get("shape") or [-1, 3, 32, 32]
    model = _torch_model(run_dir)
    t_macs = torch_macs(model, input_shape) if model is not None else None

    artifacts: list[dict] = []
    torch_bytes = sum((run_dir / f).stat().st_size for f in (STUDENT_FILE, CLASSIFIER_FILE)
                      if (run_dir / f).is_file())
    torch_params = sum(p.numel() for p in model.parameters()) if model is not None else \
        (manifest or {}).get("params") or student.get("params")
    # The torch student: eval.json's linear-probe top-1 on the whole validation split, replaced by
    # the export's own score when the manifest has one (same images as the other artifacts).
    artifacts.append({
        "name": TORCH_ARTIFACT, "format": "torch", "precision": "fp32", "target": "torch",
        "file": "student.safetensors + classifier.safetensors", "bytes": torch_bytes or None,
        "params": torch_params, "macs": t_macs, "top1": student.get("linear_top1"), "agreement_fp32": 100.0,
        "n": ev.get("n_val"), "accuracy_source": "eval.json (linear probe, full validation split)",
    })
    n_default = ((manifest or {}).get("validation") or {}).get("images")
    for art in (manifest or {}).get("artifacts", []):
        if not isinstance(art, dict) or not art.get("name"):
            continue
        acc = art.get("accuracy") or {}
        agreement = acc.get("agreement_fp32", acc.get("agreement"))
        if art["name"] == TORCH_ARTIFACT or not art.get("file"):
            if art["name"] == TORCH_ARTIFACT and acc.get("top1") is not None:
                artifacts[0].update(top1=acc["top1"], n=acc.get("n") or n_default,
                                    accuracy_source="export manifest (same images as the other artifacts)")
            continue
        path = export_dir / art["file"]
        size = art.get("bytes") or (path.stat().st_size if path.is_file() else None)
        fmt = str(art.get("format") or "onnx")
        macs = None
        if fmt.startswith("onnx") and path.is_file():
            try:
                macs = onnx_macs(path)
            except Exception as e:  # an unusual graph: fall back to the torch count
                log.warning("MACs of %s not counted from ONNX (%s)", path, e)
        artifacts.append({
            "name": art["name"], "format": fmt, "precision": art.get("precision"), "target": art.get("target"),
            "file": art["file"], "sha256": art.get("sha256"), "bytes": size,
            "params": art.get("params") or torch_params, "macs": macs or t_macs,
            "top1": acc.get("top1"), "agreement_fp32": agreement, "n": acc.get("n") or n_default,
            "accuracy_source": "export manifest",
        })
    known = {a["name"] for a in artifacts}
    for r in latency:  # e.g. TensorRT engines built on the device: latency only
        if r["artifact"] not in known:
            known.add(r["artifact"])
            artifacts.append({"name": r["artifact"], "format": "tensorrt" if r["runtime"] == "tensorrt" else None,
                              "precision": r.get("precision"), "target": r["runtime"], "file": None, "bytes": None,
                              "params": torch_params, "macs": t_macs, "top1": None,
                              "agreement_fp32": None, "n": None, "accuracy_source": None})
    # The fp32 reference: the torch student when scored on the export's images, else the fp32 ONNX.
    ref = artifacts[0]
    onnx_ref = next((a for a in artifacts if a["name"] == "onnx-fp32" and a.get("top1") is not None), None)
    if onnx_ref is not None and ref.get("n") != onnx_ref.get("n"):
        ref = onnx_ref
    for a in artifacts:
        a["size_mb"] = round(a["bytes"] / 1e6, 3) if a.get("bytes") else None
        # Only against a reference scored on the same images (the export may score a subset).
        comparable = a is ref or not (a.get("n") and ref.get("n")) or a["n"] == ref["n"]
        a["drop_vs_fp32"] = (round(ref["top1"] - a["top1"], 3)
                             if comparable and a.get("top1") is not None and ref.get("top1") is not None else None)

    teacher = ev.get("teacher")
    comparison = None
    if teacher and teacher.get("params"):
        comparison = {
            "params_pct_of_teacher": round(100.0 * student["params"] / teacher["params"], 2),
            "top1_gap": round(teacher["linear_top1"] - student["linear_top1"], 3),
            "knn_gap": round(teacher["knn_top1"] - student["knn_top1"], 3),
        }

    out_dir = Path(out_dir) if out_dir else run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run_dir),
        "export_dir": str(export_dir) if manifest else None,
        "input_shape": input_shape,
        "classes": (manifest or {}).get("classes") or ev.get("classes"),
        "n_val": ev.get("n_val"),
        "models": {"student": student, "teacher": teacher, "comparison": comparison},
        "reference": {"artifact": ref["name"], "top1": ref.get("top1")},
        "artifacts": artifacts,
        "latency": latency,
        "device_checks": device_checks,
        "summary": _summary(artifacts, latency),
        "notes": [f"{p} skipped: stale (it timed an earlier export of this folder; re-run `edgedistill bench`)"
                  for p in stale] + _notes(artifacts, latency, docs, manifest),
        "int8": _int8_section(manifest, export_dir),
        "macs_method": "conv + linear multiply-accumulates for one image (ONNX graph per artifact; torch hooks "
                       "for the torch student); activations, norms, pooling not counted",
        "plots": {"accuracy_vs_size": PLOT_SIZE, "accuracy_vs_latency": PLOT_LATENCY},
        "environment": {
            "report": environment(),
            "export": (manifest or {}).get("environment"),
            "eval": ev.get("environment"),
            "bench": [{"source": s, "environment": d.get("environment"), "settings": d.get("settings"),
                       "skipped": d.get("skipped", [])} for s, d in docs],
        },
    }
    plots.accuracy_vs_size(report, out_dir / PLOT_SIZE)
    plots.accuracy_vs_latency(report, out_dir / PLOT_LATENCY)
    path = out_dir / REPORT_JSON
    write_json(path, report)
    write_text(out_dir / REPORT_MD, render_markdown(report))
    return path


# ----------------------------------------------------------------------------- markdown


def _int8_section(manifest: dict | None, export_dir: Path) -> dict | None:
    """How the INT8 artifact was made: calibrator (and the auto scores), layers in INT8, size ratio,
    drop with its standard error, what stayed in float and the most sensitive layers."""
    int8 = (manifest or {}).get("int8")
    if not int8:
        return None
    art = next((a for a in manifest["artifacts"] if a.get("precision") == "int8"), {})
    sens_file = export_dir / (int8.get("sensitivity_file") or "")
    sens = json.loads(sens_file.read_text()) if int8.get("sensitivity_file") and sens_file.is_file() else None
    return {"artifact": art.get("name"), "format": int8.get("format"), "calibrator": int8["calibration"].get("label"),
            "auto_scores": int8["calibration"].get("auto_scores"), "int8_layers": int8.get("int8_layers"),
            "size_ratio_vs_fp32": int8.get("size_ratio_vs_fp32"),
            "drop": (art.get("accuracy") or {}).get("drop_vs_fp32"), "drop_se": (art.get("accuracy") or {}).get("drop_se"),
            "kept_in_float": (int8.get("max_drop") or {}).get("kept_in_float") or [],
            "delivered_by": int8.get("delivered_by", "ptq"), "ptq_drop": (int8.get("ptq") or {}).get("drop"),
            "qad": {k: int8["qad"].get(k) for k in ("steps", "seconds", "parity")} if int8.get("qad") else None,
            "most_sensitive": (sens or {}).get("layers", [])[:5], "sensitivity_metric": (sens or {}).get("metric")}


def _f(v, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    m = report["models"]
    s, t, c = m["student"], m.get("teacher"), m.get("comparison")
    out = [f"# edgedistill report: `{Path(report['run']).name}`", "",
           f"Run `{report['run']}`, created {report['created']}, input {report['input_shape']}, "
           f"{report.get('n_val')} validation images.", ""]
    out += ["## Student and teacher", ""]
    rows = [["student", s["arch"], _f(s["params"] / 1e6), _f(s.get("knn_top1")), _f(s.get("linear_top1"))]]
    if t:
        rows.append(["teacher", t["arch"], _f(t["params"] / 1e6), _f(t.get("knn_top1")), _f(t.get("linear_top1"))])
    out += [_table(["model", "arch", "params (M)", "kNN top-1", "linear top-1"], rows), ""]
    if c:
        def rel(gap: float) -> str:
            return f"{gap:.2f} points behind" if gap > 0 else f"{-gap:.2f} points ahead of" if gap < 0 else "level with"

        out += [f"The student has **{c['params_pct_of_teacher']:.1f}% of the teacher's parameters** and is "
                f"{rel(c['top1_gap'])} it in linear top-1 ({rel(c['knn_gap'])} it in kNN top-1).", ""]
    else:
        out += ["(No teacher scores: run `edgedistill eval RUN --teacher` to compare.)", ""]

    out += ["## Artifacts", "",
            f"Δ top-1 is against `{report['reference']['artifact']}`; latency is p50/p99 at the smallest "
            "batch measured (batch 1 by default), throughput the best over the batch sweep.", ""]
    rows = []
    for r in report["summary"]:
        where = f"{r['runtime']} @ {r['host']}" if r.get("runtime") else "-"
        drop = None if r.get("drop_vs_fp32") is None else (-r["drop_vs_fp32"] or 0.0)
        lat = (f"{_f(r.get('p50_ms'), '{:.3f}')} / {_f(r.get('p99_ms'), '{:.3f}')}"
               + (f" (b{r['latency_batch']})" if r.get("latency_batch") not in (None, 1) else "")) if r.get("runtime") else "-"
        thr = f"{_f(r.get('throughput_ips'), '{:.0f}')} (b{r['throughput_batch']})" if r.get("runtime") else "-"
        rows.append([f"`{r['artifact']}`", where, str(r.get("format") or "-"), str(r.get("precision") or "-"),
                     _f(r.get("size_mb"), "{:.2f}"), _f(r["params"] / 1e6 if r.get("params") else None, "{:.3f}"),
                     _f(r["macs"] / 1e6 if r.get("macs") else None, "{:.1f}"), _f(r.get("top1")),
                     _f(drop, "{:+.2f}"), lat, thr])
    out += [_table(["artifact", "runtime @ host", "format", "precision", "size (MB)", "params (M)", "MMACs",
                    "top-1 (%)", "Δ top-1 (pp)", "p50 / p99 (ms)", "img/s (batch)"], rows), ""]
    if report["notes"]:
        out += ["### Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    q = report.get("int8")
    if q:
        layers = q["int8_layers"] or {}
        out += ["## INT8", "",
                f"`{q['artifact']}` ({q['format']}, calibrator {q['calibrator']}): {layers.get('int8')} of "
                f"{layers.get('weighted_layers')} weighted layers in INT8, file {_f(q['size_ratio_vs_fp32'])}x smaller "
                f"than fp32, top-1 drop {_f(q['drop'])} ± {_f(q['drop_se'])} points (± one standard error).", ""]
        if q.get("qad"):
            qd = q["qad"]
            out += [f"Delivered by **{q['delivered_by']}**: post-training quantization lost {_f(q['ptq_drop'])} points; "
                    f"quantization-aware distillation ({qd['steps']} steps, {_f(qd['seconds'], '{:.0f}')} s, the fp32 "
                    f"model as teacher) followed, its QDQ file matching the torch fake-quant model on "
                    f"{_f(100 * (qd['parity'] or {}).get('match_share', 0), '{:.1f}')}% of the images.", ""]
        elif q.get("delivered_by") == "fallback":
            out += ["Delivered by **fallback**: post-training quantization missed the budget; layers kept in float.", ""]
        if q["auto_scores"]:
            out += ["Calibrators tried (output KL against fp32 on held-out calibration images; lowest kept): "
                    + ", ".join(f"{c['calibrator']} {c['output_divergence']:.4f}" for c in q["auto_scores"]) + ".", ""]
        if q["kept_in_float"]:
            out += [f"Kept in float to meet the budget: {', '.join(f'`{n}`' for n in q['kept_in_float'])}.", ""]
        if q["most_sensitive"]:
            out += [f"Most sensitive layers ({q['sensitivity_metric']} gained by keeping the layer in float):", "",
                    _table(["layer", "op", "gain"], [[f"`{r['node']}`", r["op"], f"{r['gain']:.4f}"]
                                                     for r in q["most_sensitive"]]), ""]

    out += ["## Plots", "", f"![accuracy vs size]({report['plots']['accuracy_vs_size']})", "",
            "Top-1 against file size (log scale), one point per artifact (colour = precision); the teacher, "
            "when evaluated, at its fp32 weight size for scale. Up and to the left is better.", "",
            f"![accuracy vs latency]({report['plots']['accuracy_vs_latency']})", "",
            "Top-1 against p50 latency at batch 1 (log scale; whisker to p99), one point per artifact and "
            "runtime (marker = runtime @ host). Up and to the left is better.", ""]

    if report["latency"]:
        out += ["## All latency measurements", ""]
        rows = []
        for r in sorted(report["latency"], key=lambda r: (r["host"] or "", r["runtime"], r["artifact"], r["batch"])):
            rows.append([f"`{r['artifact']}`", r["runtime"], str(r.get("host")), str(r["batch"]),
                         str(r.get("threads") or "-"), _f(r["p50_ms"], "{:.3f}"), _f(r["p90_ms"], "{:.3f}"),
                         _f(r["p99_ms"], "{:.3f}"), _f(r["std_ms"], "{:.3f}"), _f(r["throughput_ips"], "{:.1f}"),
                         _f(r.get("h2d_ms"), "{:.3f}"), _f(r.get("d2h_ms"), "{:.3f}"), str(r.get("clock") or "-")])
        out += [_table(["artifact", "runtime", "host", "batch", "threads", "p50", "p90", "p99", "std", "img/s",
                        "H2D", "D2H", "clock"], rows), "",
                "Milliseconds. `clock` says what each time is: `cuda-events`, device time between CUDA events "
                "(TensorRT engines, torch on CUDA); `host`, the wall time of one synchronous call (the CPU, and "
                "ONNX Runtime's CUDA / TensorRT providers, whose time includes launch and synchronisation). "
                "On a GPU, H2D/D2H are the copies, measured apart.", ""]

    if report.get("device_checks"):
        out += ["## Accuracy checks on the devices", "",
                "Each artifact run on the device on the export's sample images, against the fp32 reference "
                "outputs (`kit/edgekit.py check`).", ""]
        rows = [[f"`{r['artifact']}`", r["runtime"], str(r.get("host")), str(r.get("samples")),
                 _f(r.get("agreement")), _f(r.get("divergence"), "{:.2e}"), _f(r.get("max_rel_diff"), "{:.2e}"),
                 "ok" if r.get("passed") else "**beyond tolerance**"] for r in report["device_checks"]]
        out += [_table(["artifact", "runtime", "host", "samples", "agreement (%)", "divergence", "max rel diff",
                        "verdict"], rows), ""]

    env = report["environment"]
    rep = env.get("report") or {}
    out += ["## Environment", ""]
    versions = rep.get("versions") or {}
    out.append("Report built with " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".")
    out.append("")
    for b in env.get("bench", []):
        e = b.get("environment") or {}
        cpu = e.get("cpu") or {}
        isa = ", ".join(k for k, v in (cpu.get("isa") or {}).items() if v) or "-"
        gpus = ", ".join(f"{g['name']} (driver {g['driver']})" for g in (e.get("gpu") or [])) or "none"
        vers = ", ".join(f"{k} {v}" for k, v in (e.get("versions") or {}).items())
        out.append(f"- `{b['source']}`: host {e.get('host')}, {cpu.get('model')} ({cpu.get('affinity_cores')} cores; "
                   f"{isa}), GPU {gpus}; {vers}; settings {json.dumps(b.get('settings'))}.")
        for sk in b.get("skipped", []):
            what = f"{sk.get('artifact')} on " if sk.get("artifact") else ""
            out.append(f"  - skipped {what}{sk['runtime']}: {sk['reason']}")
    if not env.get("bench"):
        out.append("No latency measured: run `edgedistill bench RUN/export` (or the device kit) and rebuild.")
    out += ["", f"MACs: {report['macs_method']}.", ""]
    return "\n".join(out)
