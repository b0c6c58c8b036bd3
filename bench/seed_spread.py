"""How much a method's top-1 moves with the training seed, and what that says about a difference
between two methods (issue 20: is DoGo ahead of SimCLR, or within noise?).

    python bench/seed_spread.py bench/results/fidelity_cifar10_6000.json runs/seeds6k/s1/compare.json \
        runs/seeds6k/s2/compare.json --diff dogo simclr --out bench/results/fidelity_seeds_6000.json

Inputs are `edgedistill compare` results (compare.json) of the same recipes and budget with
different seeds, or an earlier output of this script (its rows are taken as it collected them,
so seeds run in different sessions, whose run folders are gone, still combine; the first input
that has a method's seed wins). For each method: its kNN and linear top-1 per seed, their mean and standard
deviation over seeds. For `--diff A B`: mean(A) - mean(B) with the standard error of that
difference from the seed spread (each method's own s.d. where it has two seeds or more, else the
other's: one seed of a method says nothing about its spread) and, where the two share two seeds or
more, the paired difference: per shared seed A - B (the same seed gives both runs the same data
order and augmentation draws), its mean and the standard error of that mean. The test-set standard
error of one run (about 0.5 points on 10,000 images) is part of the seed spread, not added to it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("knn_top1", "linear_top1")
SCHEMA = "edgedistill.seed_spread/1"


def collect(files: list[Path], budgets: set | None = None) -> dict[str, dict[int, dict]]:
    """{method: {seed: row}} over the compare results (not their floor and ceiling rows) and earlier
    spreads; refuses results of different budgets (`budgets`, when given, receives them)."""
    sys.path.insert(0, str(ROOT))
    from edgedistill.compare import TEACHER, UNTRAINED

    by_method: dict[str, dict[int, dict]] = {}
    budgets = set() if budgets is None else budgets
    for path in files:
        result = json.loads(path.read_text())
        if result.get("schema") == SCHEMA:  # an earlier spread (older ones did not record their budget)
            budgets.update(tuple(b) for b in result.get("budgets", []))
            for method, m in result["methods"].items():
                for seed, row in m["rows"].items():
                    by_method.setdefault(method, {}).setdefault(int(seed), row)
            continue
        shared = result["shared"]
        budgets.add((shared["train.max_steps"], shared["train.batch_size"], shared["student.arch"], shared["data.train"]))
        for row in result["rows"]:
            if row["method"] in (UNTRAINED, TEACHER):
                continue
            by_method.setdefault(row["method"], {}).setdefault(int(shared["seed"]), {
                "source": str(path), **{m: row[m] for m in METRICS}})
    if len(budgets) > 1:
        raise SystemExit(f"the results differ in budget, batch, student or data: {sorted(budgets)}")
    return by_method


def summary(rows: dict[int, dict]) -> dict:
    out = {"seeds": sorted(rows), "rows": {str(s): rows[s] for s in sorted(rows)}}
    for metric in METRICS:
        values = [rows[s][metric] for s in sorted(rows)]
        out[metric] = {"mean": round(statistics.fmean(values), 3),
                       "sd": round(statistics.stdev(values), 3) if len(values) > 1 else None}
    return out


def difference(a: dict, b: dict) -> dict:
    """mean(a) - mean(b) per metric, with its standard error from the seeds' spread."""
    out = {}
    for metric in METRICS:
        sd_a, sd_b = a[metric]["sd"], b[metric]["sd"]
        sd_a, sd_b = sd_a if sd_a is not None else sd_b, sd_b if sd_b is not None else sd_a
        if sd_a is None:
            out[metric] = {"difference": round(a[metric]["mean"] - b[metric]["mean"], 3), "se": None}
            continue
        se = math.sqrt(sd_a**2 / len(a["seeds"]) + sd_b**2 / len(b["seeds"]))
        diff = a[metric]["mean"] - b[metric]["mean"]
        out[metric] = {"difference": round(diff, 3), "se": round(se, 3), "in_se": round(diff / se, 2) if se else None}
        shared = sorted(set(a["seeds"]) & set(b["seeds"]))
        if len(shared) > 1:
            per_seed = [a["rows"][str(s)][metric] - b["rows"][str(s)][metric] for s in shared]
            mean, se = statistics.fmean(per_seed), statistics.stdev(per_seed) / math.sqrt(len(per_seed))
            out[metric]["paired"] = {"seeds": shared, "differences": [round(d, 3) for d in per_seed],
                                     "mean": round(mean, 3), "se": round(se, 3), "in_se": round(mean / se, 2) if se else None}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="compare.json files (one per seed)")
    parser.add_argument("--diff", nargs=2, action="append", default=[], metavar=("A", "B"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json

    budgets: set = set()
    methods = {name: summary(rows) for name, rows in collect(args.results, budgets).items()}
    diffs = {f"{a} - {b}": difference(methods[a], methods[b]) for a, b in args.diff}
    for name, m in methods.items():
        print(f"{name:12s} seeds {m['seeds']}: " + ", ".join(
            f"{metric} {m[metric]['mean']:.2f} (sd {m[metric]['sd'] if m[metric]['sd'] is not None else '-'})"
            for metric in METRICS))
    for name, d in diffs.items():
        print(f"{name}: " + ", ".join(f"{metric} {v['difference']:+.2f} ± {v['se'] if v['se'] is not None else '-'}"
                                      + (f" (paired over seeds {v['paired']['seeds']}: {v['paired']['mean']:+.2f} ± "
                                         f"{v['paired']['se']})" if "paired" in v else "") for metric, v in d.items()))
    if args.out:
        write_json(args.out, {"schema": SCHEMA, "command": " ".join(["python", *sys.argv]),
                              "inputs": [str(p) for p in args.results], "budgets": sorted(budgets),
                              "methods": methods, "differences": diffs, "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
