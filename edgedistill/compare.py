"""`edgedistill compare RECIPE...`: several methods, like for like, in one table.

Every recipe is trained and evaluated with the same data, student, budget (epochs, max_steps,
batch size), evaluation protocol and seed. Recipes that disagree on any of these are refused
with the list of differences; shared `--set` overrides apply to every recipe and are the way to
force agreement (e.g. `--set train.epochs=5 --set data.max_images=5000`). Method
hyper-parameters, teachers and optimizers may differ: they are what is being compared.

Output folder (default runs/compare): one run folder per recipe (the usual `train` + `eval`
contents) and
    compare.json   machine-readable rows (schema edgedistill.compare/1) + the shared settings
    compare.md     the same as a Markdown table
A finished run folder whose config.yaml equals the recipe's resolved config is reused (trained
and evaluated once); an interrupted one is resumed from its checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
SCHEMA = "edgedistill.compare/1"

# The same `--set` as the other commands (defined here: annotations are evaluated in this module).
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a value in every recipe, e.g. --set train.epochs=10 (repeatable)."),
]

# Settings that must agree across the compared recipes (dotted paths into the resolved config).
SHARED_KEYS = ("seed", "student", "data", "train.epochs", "train.max_steps", "train.batch_size", "eval")
# Loader choices change speed, not what is learnt: they may differ.
LOADER_ONLY = ("data.loader", "data.workers", "data.strict")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def shared_settings(cfg) -> dict:
    """The settings of `cfg` that every compared recipe must share, flattened."""
    from edgedistill.config import to_dict

    flat = _flatten(to_dict(cfg))
    keep = {}
    for key, value in flat.items():
        if key.startswith(LOADER_ONLY):
            continue
        if any(key == s or key.startswith(s + ".") for s in SHARED_KEYS):
            keep[key] = value
    return keep


def check_agreement(configs: list[tuple[str, object]]) -> None:
    """Raise a UserError listing every shared setting on which the recipes disagree."""
    from edgedistill.errors import UserError

    settings = [(name, shared_settings(cfg)) for name, cfg in configs]
    keys = sorted(set().union(*(s for _, s in settings)))
    problems = []
    for key in keys:
        values = [(name, s.get(key)) for name, s in settings]
        if len({repr(v) for _, v in values}) > 1:
            problems.append(f"{key} (" + ", ".join(f"{Path(n).name}: {v!r}" for n, v in values) + ")")
    if problems:
        first = problems[0].split(" ", 1)[0]
        raise UserError(
            f"the recipes are not like for like: they differ in {'; '.join(problems)}. "
            f"Make the recipes agree, or force a value for all of them, e.g. --set {first}=..."
        )


def _teacher_label(cfg) -> str:
    if cfg.method.name == "dogo":
        return f"{cfg.method.peer.arch} (peer, from scratch)"
    if cfg.teacher is not None:
        return cfg.teacher.arch
    return "-"


def _run_dirs(configs, out: Path) -> list[Path]:
    dirs, seen = [], {}
    for _, cfg in configs:
        n = seen.get(cfg.name, 0)
        seen[cfg.name] = n + 1
        dirs.append(out / (cfg.name if n == 0 else f"{cfg.name}-{n + 1}"))
    return dirs


def _train_and_eval(cfg, run_dir: Path, reuse: bool) -> tuple[dict, dict, bool]:
    """Train (or reuse / resume) and evaluate one run; returns (run.json, eval.json, reused)."""
    import json

    from edgedistill.config import config_to_yaml
    from edgedistill.errors import UserError
    from edgedistill.evaluate import EVAL_FILE, evaluate_run
    from edgedistill.train import CHECKPOINT_FILE, train

    config_file, run_file, eval_file = run_dir / "config.yaml", run_dir / "run.json", run_dir / EVAL_FILE
    resume = False
    if run_dir.exists() and any(run_dir.iterdir()):
        same = config_file.is_file() and config_file.read_text() == config_to_yaml(cfg)
        if not (reuse and same):
            why = "--no-reuse was given" if not reuse else "its config.yaml differs from this recipe's"
            raise UserError(f"{run_dir} already holds a run and {why}: choose another --out or remove that folder")
        finished = run_file.is_file() and json.loads(run_file.read_text()).get("status") == "complete"
        if finished and eval_file.is_file():
            return json.loads(run_file.read_text()), json.loads(eval_file.read_text()), True
        resume = not finished and (run_dir / CHECKPOINT_FILE).is_file()
    if not (run_file.is_file() and json.loads(run_file.read_text()).get("status") == "complete"):
        train(cfg, run_dir, resume=resume)
    evaluate_run(run_dir)
    return json.loads(run_file.read_text()), json.loads(eval_file.read_text()), False


def run_compare(recipes: list[Path], overrides: list[str] | None = None, out: Path = Path("runs/compare"),
                reuse: bool = True) -> dict:
    """Train + evaluate every recipe at the same budget; write compare.json / compare.md."""
    import time

    from edgedistill.config import load_config
    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json
    from edgedistill.errors import UserError

    if len(recipes) < 1:
        raise UserError("compare needs at least one recipe (usually two or more)")
    overrides = list(overrides or [])
    configs = [(str(r), load_config(r, overrides)) for r in recipes]
    check_agreement(configs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "schema": SCHEMA,
        "recipes": [r for r, _ in configs],
        "overrides": overrides,
        "shared": shared_settings(configs[0][1]),
        "complete": False,
        "rows": [],
        "environment": environment(),
    }
    rows = result["rows"]
    for (recipe, cfg), run_dir in zip(configs, _run_dirs(configs, out)):
        start = time.perf_counter()
        run, ev, reused = _train_and_eval(cfg, run_dir, reuse)
        student = ev["student"]
        rows.append({
            "recipe": recipe,
            "run": str(run_dir),
            "method": cfg.method.name,
            "teacher": _teacher_label(cfg),
            "student": cfg.student.arch,
            "params": student["params"],
            "knn_top1": student["knn_top1"],
            "linear_top1": student["linear_top1"],
            "images_per_s": run.get("images_per_s"),
            "train_wall_s": run.get("wall_s"),
            "steps": run.get("steps"),
            "eval_images": {"train": ev.get("n_train"), "val": ev.get("n_val")},
            "final_losses": run.get("final_losses", {}),
            "reused": reused,
            "wall_s": round(time.perf_counter() - start, 2),
        })
        # Written after every run: a long comparison that is stopped still leaves its table.
        result["complete"] = len(rows) == len(configs)
        write_json(out / COMPARE_JSON, result)
        (out / COMPARE_MD).write_text(markdown_table(result))
    return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(result: dict) -> str:
    s = result["shared"]
    budget = f"{s.get('train.epochs')} epoch(s)"
    if s.get("train.max_steps"):
        budget += f", at most {s['train.max_steps']} steps"
    lines = [
        "# edgedistill compare",
        "",
        f"Same data ({s.get('data.train')}, {s.get('data.max_images') or 'all'} training images, "
        f"{s.get('data.img_size')}x{s.get('data.img_size')}), student {s.get('student.arch')}, budget {budget} "
        f"of batch {s.get('train.batch_size')}, seed {s.get('seed')}. kNN (k={s.get('eval.knn_k')}) and linear "
        "probe on frozen student features; images/s and wall time are training only.",
        "",
        "| method | teacher | student | parameters | kNN top-1 | linear top-1 | images/s | wall time (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['teacher']} | {r['student']} | {r['params'] / 1e6:.2f}M | {_fmt(r['knn_top1'], '.2f')} "
            f"| {_fmt(r['linear_top1'], '.2f')} | {_fmt(r['images_per_s'], '.1f')} | {_fmt(r['train_wall_s'], '.1f')} |"
        )
    if result.get("overrides"):
        lines += ["", "Shared overrides: " + " ".join(f"`--set {o}`" for o in result["overrides"])]
    if not result.get("complete", True):
        done = {r["recipe"] for r in result["rows"]}
        lines += ["", "Incomplete: still to run: " + ", ".join(r for r in result["recipes"] if r not in done)]
    return "\n".join(lines) + "\n"


def print_compare(result: dict) -> None:
    from rich.table import Table

    from edgedistill.ui import console

    table = Table(title="edgedistill compare (same data, student, budget, seed)")
    for col in ("method", "teacher", "student", "params (M)", "kNN top-1", "linear top-1", "images/s", "wall (s)"):
        table.add_column(col, justify="left" if col in ("method", "teacher", "student") else "right")
    for r in result["rows"]:
        table.add_row(r["method"], r["teacher"], r["student"], f"{r['params'] / 1e6:.2f}", _fmt(r["knn_top1"], ".2f"),
                      _fmt(r["linear_top1"], ".2f"), _fmt(r["images_per_s"], ".1f"), _fmt(r["train_wall_s"], ".1f"))
    console.print(table)


def register(app) -> None:
    """Add `compare` to the Typer app."""
    from edgedistill.cli_helpers import handle_errors

    @app.command()
    @handle_errors
    def compare(
        recipes: Annotated[list[Path], typer.Argument(metavar="RECIPE...", help="Two or more YAML recipes (e.g. recipes/cifar10_*.yaml).")],
        set_: SetOption = None,
        out: Annotated[Path, typer.Option(help="Folder for the runs and compare.md / compare.json.")] = Path("runs/compare"),
        reuse: Annotated[bool, typer.Option(help="Reuse (or resume) a run folder whose config matches.")] = True,
    ):
        """Train and evaluate several recipes like for like (same data, student, budget, seed) and
        write one table: method, teacher, student, parameters, kNN / linear top-1, images/s, wall time.

        Recipes that differ in data, student, epochs/steps, batch size, evaluation or seed are
        refused; shared --set overrides apply to every recipe and can force them to agree.
        """
        from edgedistill.ui import console, setup_logging

        setup_logging()
        result = run_compare(recipes, set_ or [], out, reuse)
        print_compare(result)
        console.print(f"table: [bold]{Path(out) / COMPARE_MD}[/] and {Path(out) / COMPARE_JSON}", highlight=False)
