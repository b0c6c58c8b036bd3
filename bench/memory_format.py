"""Training-step speed of two settings of one CPU kernel choice, side by side on this machine, for
every recipe given (default: the fidelity table's five, docs/results.md):

- `memory-format`: NCHW against channels_last (NHWC);
- `small-map-grad`: PyTorch's own weight gradient against the tap-by-tap one of
  `models/small_map_conv.py` (`train.cpu_small_map_grad`) where a layer's input is smaller than its kernel.

    OMP_NUM_THREADS=1 python bench/memory_format.py                    # -> bench/results/memory_format_cpu.json
    OMP_NUM_THREADS=1 python bench/memory_format.py --compare small-map-grad   # -> bench/results/small_map_grad_cpu.json
    OMP_NUM_THREADS=1 python bench/memory_format.py recipes/cifar10_disco_r56_mnv3.yaml --steps 5

Synthetic batches (uniform noise of the recipe's batch size and image size; the loader is not
timed), the trainer's own step (`train.setup_training` + `train.train_step`: forward, backward,
optimizer and scheduler), fp32; the two settings of one recipe are timed in interleaved rounds in
one process (the median of the rounds' medians). Run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [ROOT / "recipes" / "fidelity" / f"{name}.yaml" for name in ("mocov2", "simclr", "seed", "disco", "dogo")]
# comparison -> ((name, overrides), (name, overrides)); the speedup is the first's step time over the second's.
COMPARISONS = {
    "memory-format": (("nchw", ["train.channels_last=false"]), ("channels_last", ["train.channels_last=true"])),
    "small-map-grad": (("pytorch", ["train.cpu_small_map_grad=false"]),
                       ("tap_by_tap", ["train.cpu_small_map_grad=true"])),
}
RESULTS = {"memory-format": ROOT / "bench" / "results" / "memory_format_cpu.json",
           "small-map-grad": ROOT / "bench" / "results" / "small_map_grad_cpu.json"}


def step_timer(recipe: Path, overrides: list[str]):
    """A function `(warmup, steps) -> median ms` of one training step of `recipe` with `overrides`
    on the CPU, on a fixed synthetic batch: the trainer's own step via the `bench-train` stepper."""
    import torch

    from edgedistill.bench.train_speed import _Stepper
    from edgedistill.kit import load_kit_module
    from edgedistill.recipe import load_config

    cfg = load_config(recipe, [*overrides, "train.precision=fp32", "train.device=cpu"])
    # the teacher centre stays unset: it does not change the cost
    stepper = _Stepper(cfg, torch.device("cpu"), num_classes=10, compile_=False, total_steps=10**6)
    size, batch = cfg.data.img_size, cfg.train.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    views = [torch.rand(batch, 3, size, size, generator=generator) for _ in range(stepper.method.num_views)]
    labels = torch.zeros(batch, dtype=torch.long)
    kit = load_kit_module("edgekit")
    return lambda warmup, steps: kit.median_ms(kit.time_calls(lambda: stepper.step(views, labels), warmup=warmup,
                                                              runs=steps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", type=Path, default=RECIPES)
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="memory-format")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the two settings")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import torch

    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json
    from edgedistill.recipe import load_config

    settings = COMPARISONS[args.compare]
    rows = []
    for recipe in args.recipes:
        cfg = load_config(recipe)
        row = {"recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
               "method": cfg.method.name, "student": cfg.student.arch, "batch_size": cfg.train.batch_size,
               "img_size": cfg.data.img_size}
        timers = [step_timer(recipe, overrides) for _, overrides in settings]
        rounds = [[timer(args.warmup, args.steps) for timer in timers] for _ in range(args.rounds)]
        for index, (name, _) in enumerate(settings):
            ms = statistics.median(r[index] for r in rounds)
            row[f"{name}_step_ms"] = round(ms, 2)
            row[f"{name}_images_per_s"] = round(cfg.train.batch_size / ms * 1000, 1)
        (first, _), (second, _) = settings
        row["speedup"] = round(row[f"{first}_step_ms"] / row[f"{second}_step_ms"], 2)
        rows.append(row)
        print(f"{row['method']:8s} {first} {row[f'{first}_images_per_s']:7.1f} img/s   {second} "
              f"{row[f'{second}_images_per_s']:7.1f} img/s   x{row['speedup']:.2f}", flush=True)
    out = args.out or RESULTS[args.compare]
    write_json(out, {"benchmark": args.compare.replace("-", "_"), "device": "cpu", "precision": "fp32",
                     "threads": torch.get_num_threads(), "warmup_steps": args.warmup, "timed_steps": args.steps,
                     "rounds": args.rounds, "command": " ".join(["python bench/memory_format.py", *(argv if argv is not None else sys.argv[1:])]),
                     "rows": rows, "environment": environment(torch.get_num_threads())})
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
