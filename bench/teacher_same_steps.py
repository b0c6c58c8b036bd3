"""Issue 20's same-steps check: DisCo with the fp32 teacher against `teacher.precision: auto` at the
same steps and seeds, and the mean paired difference with its standard error.

    edgedistill train recipes/fidelity/disco.yaml --set train.max_steps=1200 --set seed=S \\
        --set teacher.precision=fp32 --out runs/issue20/disco_fp32_1200[_s1]
    edgedistill train recipes/fidelity/disco.yaml --set train.max_steps=1200 --set seed=S \\
        --set teacher.precision=auto --set teacher.compile=true --out runs/issue20/disco_auto_1200[_s1]
    edgedistill eval RUN --set eval.linear_solver=sgd      # runs/issue20: the probe these runs were first scored with
    edgedistill eval COPY                                    # runs/issue20_lbfgs: copies of the runs, the default probe
    python bench/teacher_same_steps.py      # -> bench/results/teacher_same_steps.json

Seed-0 sets, each run `edgedistill train ... --set teacher.precision=MODE` then `edgedistill eval
RUN` (L-BFGS probe), the first of a set the fp32 teacher: `openvino_modes`, the OpenVINO modes on an
AMD EPYC Zen 4 (`runs/issue20/disco_{fp32,bf16-openvino,int8-openvino}_1200`), and `x86_avx2_auto`,
`auto` on an AVX2-only CPU, where a 1,200-step run (153,600 images) has it measure and take
int8-openvino (`runs/issue20/disco_{fp32,auto}_1200_avx2`). A pair or set whose runs are not in this
checkout keeps the entry already in the JSON.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBES = {"sgd": ROOT / "runs" / "issue20", "lbfgs": ROOT / "runs" / "issue20_lbfgs"}
RESULT = ROOT / "bench" / "results" / "teacher_same_steps.json"
PAIRS = {0: ("disco_fp32_1200", "disco_auto_1200"), 1: ("disco_fp32_1200_s1", "disco_auto_1200_s1")}
SEED0_RUNS = ROOT / "runs" / "issue20"
SEED0_SETS = {"openvino_modes": ("disco_fp32_1200", "disco_bf16-openvino_1200", "disco_int8-openvino_1200"),
              "x86_avx2_auto": ("disco_fp32_1200_avx2", "disco_auto_1200_avx2")}


def row(run: Path) -> dict:
    ev = json.loads((run / "eval.json").read_text())
    fidelity = json.loads((run / "teacher_fidelity.json").read_text())
    last = json.loads((run / "metrics.jsonl").read_text().strip().splitlines()[-1])
    student = ev["student"]
    return {"run": run.name, "teacher": fidelity["chosen"], "steps": last["step"], "knn_top1": student["knn_top1"],
            "linear_top1": student["linear_top1"], "probe": student["probe"], "info_nce": last["info_nce"],
            "distill": last["distill"], "teacher_mean_cosine": (fidelity["modes"].get(fidelity["chosen"]) or {}).get("mean_cosine"),
            "environment": ev["environment"]}


def paired(rows: dict[int, list[dict]]) -> dict:
    summary = {}
    for metric in ("knn_top1", "linear_top1"):
        diffs = [fast[metric] - fp32[metric] for fp32, fast in rows.values()]
        summary[metric] = {"differences_auto_minus_fp32": [round(d, 3) for d in diffs],
                           "mean": round(statistics.mean(diffs), 3),
                           "standard_error": round(statistics.stdev(diffs) / math.sqrt(len(diffs)), 3)}
    return summary


def main() -> None:
    from edgedistill.fileio import write_json

    doc = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    doc.update({"schema": "edgedistill.teacher_same_steps/3", "commands": __doc__.strip().splitlines()[3:10]})
    doc.setdefault("probes", {})
    for probe, folder in PROBES.items():
        if not all((folder / name / "eval.json").is_file() for names in PAIRS.values() for name in names):
            continue
        rows = {seed: [row(folder / name) for name in names] for seed, names in PAIRS.items()}
        doc["probes"][probe] = {"rows": {str(k): v for k, v in rows.items()}, "paired": paired(rows)}
        print(probe, json.dumps(doc["probes"][probe]["paired"]))
    for entry, names in SEED0_SETS.items():
        runs = [SEED0_RUNS / name for name in names]
        if all((run / "eval.json").is_file() for run in runs):
            rows = [row(run) for run in runs]
            doc[entry] = {"seed": 0, "rows": rows, "minus_fp32": {
                r["teacher"]: {m: round(r[m] - rows[0][m], 2) for m in ("knn_top1", "linear_top1")} for r in rows[1:]}}
            print(entry, json.dumps(doc[entry]["minus_fp32"]))
    write_json(RESULT, doc)


if __name__ == "__main__":
    main()
