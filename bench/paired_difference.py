"""The difference in top-1 between two evaluated runs on the same test images, with its paired
standard error: is one method better than another, or is it the test set's noise?

    python bench/paired_difference.py runs/fidelity6k/dogo runs/fidelity6k/simclr [--pair A B ...] \
        [--out bench/results/fidelity_paired.json]

Each run's deployable classifier (student.safetensors + classifier.safetensors, the linear probe
that `eval` fitted) is run on the run's validation folder; per image, 1 if it is right. For two
runs on the same images the difference of their top-1 is the mean of the per-image differences,
and its standard error is the standard deviation of those differences over sqrt(n): the paired
error, which counts only the images on which the two disagree. The unpaired error
sqrt(p1 q1 / n + p2 q2 / n) treats the two as independent samples and overstates it when their
errors coincide. Neither says anything about a second training seed, which can move a row by
more than either: that is the spread between training runs, not measured here.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

def correct_per_image(run: Path, batch_size: int = 256) -> tuple[np.ndarray, dict]:
    """1/0 per validation image for the run's deployable classifier, and what it was checked against."""
    import json

    from edgedistill.data import val_folder
    from edgedistill.data.torch_loader import eval_loader
    from edgedistill.runfolder.load import load_run_classifier, load_run_config

    cfg = load_run_config(run)
    model = load_run_classifier(run)
    folder = val_folder(cfg.data)
    right = []
    with torch.inference_mode():
        for images, labels in eval_loader(folder, cfg.data, batch_size):
            right.append((model(images).argmax(1) == labels).numpy())
    right = np.concatenate(right).astype(np.float64)
    recorded = json.loads((run / "eval.json").read_text())["student"]["linear_top1"]
    return right, {"run": str(run), "images": int(right.size), "top1": round(100 * right.mean(), 3),
                   "eval_json_linear_top1": recorded, "val": str(folder.root)}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Difference a - b of two 1/0 vectors over the same images, in points, with both errors."""
    if a.size != b.size:
        raise SystemExit(f"the two runs were scored on different numbers of images ({a.size} vs {b.size})")
    n = a.size
    diff = a - b
    pa, pb = a.mean(), b.mean()
    return {"difference": round(100 * diff.mean(), 3),
            "paired_se": round(100 * diff.std(ddof=1) / math.sqrt(n), 3),
            "unpaired_se": round(100 * math.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n), 3),
            "only_first_right": int(((a == 1) & (b == 0)).sum()), "only_second_right": int(((a == 0) & (b == 1)).sum()),
            "images": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--pair", nargs=2, type=Path, action="append", default=[], metavar=("A", "B"),
                        help="another pair of runs (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON (with the environment)")
    args = parser.parse_args()
    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json

    scored: dict[Path, tuple[np.ndarray, dict]] = {}
    rows = []
    for first, second in [(args.first, args.second), *map(tuple, args.pair)]:
        for run in (first, second):
            if run not in scored:
                scored[run] = correct_per_image(run)
                info = scored[run][1]
                print(f"{run}: top-1 {info['top1']:.2f} on {info['images']} images "
                      f"(eval.json {info['eval_json_linear_top1']:.2f})")
        row = {"first": scored[first][1], "second": scored[second][1], **paired(scored[first][0], scored[second][0])}
        rows.append(row)
        print(f"{first.name} - {second.name}: {row['difference']:+.2f} points, paired s.e. {row['paired_se']:.2f} "
              f"(unpaired {row['unpaired_se']:.2f}); right only in the first {row['only_first_right']}, "
              f"only in the second {row['only_second_right']}")
    if args.out:
        write_json(args.out, {"schema": "edgedistill.paired_difference/1",
                              "command": "python bench/paired_difference.py " + " ".join(
                                  [str(args.first), str(args.second)] + [f"--pair {a} {b}" for a, b in args.pair]
                                  + [f"--out {args.out}"]),
                              "rows": rows, "environment": environment()})


if __name__ == "__main__":
    main()
