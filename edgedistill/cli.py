"""The `edgedistill` command line (Typer). Thin: each command parses flags and calls a module.

Exit codes: 0 success, 1 a check failed (export parity, gate), 2 bad input (a one-line message
naming the file and the fix), 3 training diverged (NaN/inf loss; last good checkpoint kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgedistill.bench.commands import bench
from edgedistill.compare import compare
from edgedistill.bench.train_speed import bench_train
from edgedistill.cli_helpers import SetOption, handle_errors
from edgedistill.deploy.commands import export
from edgedistill.report.commands import gate, report

app = typer.Typer(
    name="edgedistill",
    help="Distil a ResNet teacher into a small student (methods: disco, mocov2, simclr, seed, dogo, supervised), "
    "export it to ONNX / INT8 / TensorRT, time it, report it, and gate it in CI.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
@handle_errors
def train(
    recipe: Annotated[Optional[Path], typer.Argument(help="YAML recipe (see recipes/). Omit for the defaults.")] = None,
    set_: SetOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: <out_dir>/<name> from the recipe).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run folder's last checkpoint.")] = False,
):
    """Train with a recipe; method.name is one of disco, mocov2, simclr, seed, dogo or supervised.

    Writes config.yaml, metrics.jsonl, checkpoint.pt and student.safetensors into the run folder (the full listing: README, "Run folder"). --resume refuses a recipe that differs from the checkpoint's except in train.max_steps, train.epochs (the lr schedule is re-planned), train.log_every, train.checkpoint_every, train.tensorboard, data.workers, name and out_dir. Data goes through DALI on the GPU when CUDA is present, DALI's CPU pipeline otherwise, and torchvision when DALI is missing (force one with --set data.loader=...).
    """
    from edgedistill.recipe import load_config
    from edgedistill.distributed import is_main
    from edgedistill.train import train as run_training
    from edgedistill.ui import console, setup_logging

    setup_logging()
    cfg = load_config(recipe, set_ or [])
    result = run_training(cfg, out, resume)
    if is_main():
        console.print(f"run folder: [bold]{result.run_dir}[/]  ({result.steps} steps, {result.images_per_s:.0f} images/s, loader {result.loader})")


@app.command("eval")
@handle_errors
def eval_(
    run: Annotated[Path, typer.Argument(help="Run folder written by `edgedistill train`.")],
    teacher: Annotated[bool, typer.Option(help="Evaluate the run's teacher the same way, to show the gap.")] = False,
    set_: SetOption = None,
):
    """kNN and linear-probe top-1 of the frozen student on the labelled train/val split.

    Writes eval.json and classifier.safetensors (backbone + classifier = a deployable classifier).
    """
    from edgedistill.distributed import is_main
    from edgedistill.evaluate import evaluate_run, print_eval
    from edgedistill.ui import setup_logging

    setup_logging()
    result = evaluate_run(run, with_teacher=teacher, overrides=set_ or [])
    if is_main():
        print_eval(result)


@app.command()
@handle_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's runs and report.")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option(help="Training steps per student (the budget is the same for each).")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of every run (the committed gate baseline was made with 0).")] = 0,
):
    """The whole path on the embedded digits dataset, on the CPU in a few minutes.

    Teacher fit, DisCo student, MoCo v2 student at the same budget, evaluation and comparison, then export (ONNX + INT8), benchmark, report with plots, and the gate against the committed baseline (baselines/demo.json).
    """
    from edgedistill.demo import run_demo
    from edgedistill.ui import setup_logging

    setup_logging()
    summary = run_demo(out, steps, seed=seed)
    if not summary.get("gate", {}).get("passed", True):
        raise typer.Exit(1)


# The commands that live beside the code they drive, in the order `--help` lists them. The
# shared helpers (`handle_errors`, `--set`) are in `edgedistill.cli_helpers`, a leaf module, so
# these modules never import this one.
app.command()(export)
app.command()(bench)
app.command()(report)
app.command()(gate)
app.command()(compare)
app.command("bench-train")(bench_train)
