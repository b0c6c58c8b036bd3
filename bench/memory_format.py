"""Training-step speed in NCHW against channels_last (NHWC) on this machine, side by side, for
every recipe given (default: the fidelity table's five, docs/results.md).

    OMP_NUM_THREADS=1 python bench/memory_format.py                    # -> bench/results/memory_format_cpu.json
    OMP_NUM_THREADS=1 python bench/memory_format.py recipes/cifar10_disco_r56_mnv3.yaml --steps 5

Synthetic batches (uniform noise of the recipe's batch size and image size; the loader is not
timed), the trainer's own step (`train.setup_training` + `train.train_step`: forward, backward,
optimizer and scheduler), fp32, the two formats of one recipe timed one after the other in one
process. Run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [ROOT / "recipes" / "fidelity" / f"{name}.yaml" for name in ("mocov2", "simclr", "seed", "disco", "dogo")]
RESULT = ROOT / "bench" / "results" / "memory_format_cpu.json"


def step_ms(recipe: Path, channels_last: bool, warmup: int, steps: int) -> float:
    """Median ms of one training step of `recipe` on the CPU in the given memory format."""
    import torch

    from edgedistill.kit import load_kit_module
    from edgedistill.methods import create_method
    from edgedistill.recipe import load_config
    from edgedistill.train import setup_training, train_step

    overrides = [f"train.channels_last={'true' if channels_last else 'false'}", "train.precision=fp32",
                 "train.device=cpu"]
    cfg = load_config(recipe, overrides)
    torch.manual_seed(cfg.seed)
    method = create_method(cfg, num_classes=10)  # the teacher centre stays unset: it does not change the cost
    state = setup_training(cfg, method, torch.device("cpu"), 1, warmup + steps)
    method.train()
    size, batch = cfg.data.img_size, cfg.train.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    views = state.prepare_views([torch.rand(batch, 3, size, size, generator=generator)
                                 for _ in range(method.num_views)])
    labels = torch.zeros(batch, dtype=torch.long)
    kit = load_kit_module("edgekit")
    return kit.median_ms(kit.time_calls(lambda: train_step(method, views, labels, state), warmup=warmup, runs=steps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", type=Path, default=RECIPES)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)

    import torch

    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json
    from edgedistill.recipe import load_config

    rows = []
    for recipe in args.recipes:
        cfg = load_config(recipe)
        row = {"recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
               "method": cfg.method.name, "student": cfg.student.arch, "batch_size": cfg.train.batch_size,
               "img_size": cfg.data.img_size}
        for name, flag in (("nchw", False), ("channels_last", True)):
            ms = step_ms(recipe, flag, args.warmup, args.steps)
            row[f"{name}_step_ms"] = round(ms, 2)
            row[f"{name}_images_per_s"] = round(cfg.train.batch_size / ms * 1000, 1)
        row["speedup"] = round(row["nchw_step_ms"] / row["channels_last_step_ms"], 2)
        rows.append(row)
        print(f"{row['method']:8s} NCHW {row['nchw_images_per_s']:7.1f} img/s   channels_last "
              f"{row['channels_last_images_per_s']:7.1f} img/s   x{row['speedup']:.2f}", flush=True)
    write_json(args.out, {"benchmark": "memory_format", "device": "cpu", "precision": "fp32",
                          "threads": torch.get_num_threads(), "warmup_steps": args.warmup, "timed_steps": args.steps,
                          "rows": rows, "environment": environment(torch.get_num_threads())})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
