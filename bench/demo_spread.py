"""The demo over seeds and thread counts: what its gate and its INT8 budget must hold across.

    OMP_NUM_THREADS=T python bench/demo_spread.py run --seed S      # one demo, runs/demo_spread/tT_sS
    python bench/demo_spread.py table                                # -> bench/results/demo_spread.json

Each run is the real `edgedistill demo` (train, eval, export with the demo's 1-point INT8 budget,
bench, report, gate). A row records its students' top-1, the INT8 file's drop and how it was
delivered (`ptq` = post-training quantization alone met the budget; `qad` / `fallback` = it did
not), the CPU class the file was built for, the recommendation, and the demo's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "demo_spread"
RESULT = ROOT / "bench" / "results" / "demo_spread.json"


def run(seed: int) -> None:
    from edgedistill.demo import run_demo
    from edgedistill.ui import setup_logging

    setup_logging()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    run_demo(WORK / f"t{threads or 'default'}_s{seed}", seed=seed)


def _row(folder: Path) -> dict:
    """One demo run's row: its students' top-1, the INT8 file, the gate, the wall time and the CPU."""
    from edgedistill.demo import int8_summary
    from edgedistill.deploy.manifest import read_manifest
    from edgedistill.deploy.quantize import timing_class
    from edgedistill.report.build import cpu_features

    threads, seed = folder.name[1:].split("_s")
    demo = folder / "demo.json"
    if demo.is_file():
        d = json.loads(demo.read_text())
    else:  # stopped after its export (bench/report/gate not reached): the trained and exported parts
        d = {"models": {role: json.loads((folder / role / "eval.json").read_text())["student"]
                        for role in ("disco", "mocov2")}, "int8": int8_summary(folder / "disco" / "export"),
             "wall_s": None, "stopped_after": "export"}
    cpu = read_manifest(folder / "disco" / "export", "re-run the demo").get("environment", {}).get("cpu", {})
    return {"threads": threads, "seed": int(seed), "cpu": cpu.get("model"), "cpu_features": cpu_features(cpu),
            "timed_on": timing_class(cpu),
            **{f"{k}_linear_top1": v["linear_top1"] for k, v in d["models"].items()},
            "disco_knn_top1": d["models"]["disco"]["knn_top1"], "int8": d["int8"],
            "gate_passed": (d.get("gate") or {}).get("passed"), "wall_s": d["wall_s"],
            **({"stopped_after": d["stopped_after"]} if "stopped_after" in d else {})}


def _key(row: dict) -> tuple:
    """A row is replaced only by a run of the same timing class (the class its INT8 file was built for,
    `+amx` on an AMX CPU: its wall time and kernels differ from a VNNI-only CPU's)."""
    return row.get("timed_on") or row["int8"]["cpu_class"], str(row["threads"]), row["seed"]


def table() -> None:
    """Rows of the runs under runs/demo_spread, merged into the committed file: a run replaces the
    row of the same timing class, threads and seed; rows of other classes are kept."""
    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json

    fresh = [_row(f) for f in sorted(WORK.glob("t*_s*")) if (f / "disco" / "export" / "manifest.json").is_file()]
    kept = json.loads(RESULT.read_text())["rows"] if RESULT.is_file() else []
    replaced = {_key(r) for r in fresh}
    rows = [r for r in kept if _key(r) not in replaced] + fresh
    write_json(RESULT, {"schema": "edgedistill.demo_spread/3",
                        "what": "edgedistill demo (200 steps per student, 355 validation images) with 1 and 2 torch "
                                "threads and seeds 0 and 1, per CPU class: the spread its gate and INT8 budget must "
                                "hold across",
                        "commands": ["OMP_NUM_THREADS={1,2} python bench/demo_spread.py run --seed {0,1}",
                                     "python bench/demo_spread.py table"],
                        "note": "wall_s: as run (see each row's cpu_features; the 1-thread runs ran side by side "
                                "with other work unless said otherwise); the idle-machine wall time of the demo is in "
                                "docs/int8.md. environment: the machine of the last table command",
                        "rows": rows, "environment": environment()})
    for r in rows:
        q = r["int8"]
        print(f"{r.get('cpu_features') or q['cpu_class']}: t{r['threads']} s{r['seed']}: disco "
              f"{r['disco_linear_top1']:.2f}, INT8 drop {q['drop']:.2f} ± {q['drop_se']:.2f} "
              f"({q['delivered_by']}, {q['int8_layers']['int8']}/{q['int8_layers']['weighted_layers']} layers, "
              f"{q['size_ratio']:.2f}x), gate {r['gate_passed']}, {r['wall_s'] or '-'} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("run", "table"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.chdir(ROOT)
    run(args.seed) if args.phase == "run" else table()


if __name__ == "__main__":
    sys.exit(main())
