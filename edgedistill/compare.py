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
    compare.png    per method the losses per step (contrastive, against ln(K+1) for queue
                   methods; distillation term) and the final linear top-1
A DoGo run adds a row for its peer; `--untrained` adds the student as initialised (0 steps), the
floor every method must clear; `--teacher` adds the teacher of the first distilling recipe, scored
by the same evaluation (the ceiling). `eval.protocol: paper` adds the papers' linear protocol column.
A finished run folder whose config.yaml equals the recipe's resolved config is reused (trained
and evaluated once); an interrupted one is resumed from its checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgedistill.runfolder import CONFIG_FILE, EVAL_FILE, RUN_FILE, read_metrics
from edgedistill.cli_helpers import SetOption, handle_errors

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_PNG = "compare.png"
UNTRAINED = "untrained"
TEACHER = "teacher"
SCHEMA = "edgedistill.compare/1"

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
    if cfg.method.name == UNTRAINED:
        return "-"
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


def _train_and_eval(cfg, run_dir: Path, reuse: bool, with_teacher: bool = False) -> tuple[dict, dict, bool]:
    """Train (or reuse / resume) and evaluate one run (with its teacher if asked); returns (run.json, eval.json,
    reused)."""
    import json

    from edgedistill.config import config_to_yaml
    from edgedistill.errors import UserError
    from edgedistill.evaluate import evaluate_run
    from edgedistill.train import CHECKPOINT_FILE, train

    config_file, run_file, eval_file = run_dir / CONFIG_FILE, run_dir / RUN_FILE, run_dir / EVAL_FILE
    resume = False
    if run_dir.exists() and any(run_dir.iterdir()):
        same = config_file.is_file() and config_file.read_text() == config_to_yaml(cfg)
        if not (reuse and same):
            why = "--no-reuse was given" if not reuse else "its config.yaml differs from this recipe's"
            raise UserError(f"{run_dir} already holds a run and {why}: choose another --out or remove that folder")
        finished = run_file.is_file() and json.loads(run_file.read_text()).get("status") == "complete"
        if finished and eval_file.is_file():
            ev = json.loads(eval_file.read_text())
            if with_teacher and not ev.get("teacher"):  # evaluated before the teacher row was asked for
                evaluate_run(run_dir, with_teacher=True)
                ev = json.loads(eval_file.read_text())
            return json.loads(run_file.read_text()), ev, True
        resume = not finished and (run_dir / CHECKPOINT_FILE).is_file()
    if not (run_file.is_file() and json.loads(run_file.read_text()).get("status") == "complete"):
        train(cfg, run_dir, resume=resume and cfg.train.max_steps != 0)
    evaluate_run(run_dir, with_teacher=with_teacher)
    return json.loads(run_file.read_text()), json.loads(eval_file.read_text()), False


def _untrained_config(cfg):
    """The first recipe at 0 steps: its student exactly as initialised (seeded), no teacher."""
    import copy

    from edgedistill.methods import method_config_class

    untrained = copy.deepcopy(cfg)
    untrained.name = UNTRAINED
    untrained.teacher = None
    untrained.train.max_steps = 0
    untrained.method = method_config_class("supervised")()
    untrained.method.name = "supervised"
    return untrained


def _row(recipe: str, run_dir: Path, method: str, teacher: str, cfg, scores: dict, run: dict, ev: dict,
         reused: bool, wall: float) -> dict:
    return {
        "recipe": recipe,
        "run": str(run_dir),
        "method": method,
        "teacher": teacher,
        "student": scores["arch"],
        "params": scores["params"],
        "knn_top1": scores["knn_top1"],
        "linear_top1": scores["linear_top1"],
        "paper_linear_top1": scores.get("paper_linear_top1"),
        "images_per_s": run.get("images_per_s") or None,  # None, not 0, for rows that did not train
        "train_wall_s": run.get("wall_s") or None,
        "steps": run.get("steps"),
        "queue_size": getattr(cfg.method, "queue_size", None) if method in ("mocov2", "disco") else None,
        "eval_images": {"train": ev.get("n_train"), "val": ev.get("n_val")},
        "final_losses": run.get("final_losses", {}),
        "reused": reused,
        "wall_s": round(wall, 2),
    }


def draw_curves(result: dict, path: Path) -> Path | None:
    """compare.png from the rows' metrics.jsonl (None when matplotlib is missing)."""
    try:
        from edgedistill.report.plots import training_curves
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    curves = []
    for row in result["rows"]:
        records = read_metrics(row["run"])
        own = row["method"] not in ("dogo (peer)", TEACHER)  # rows that share another row's run folder
        label = row["method"] if row["method"] != "dogo (peer)" else "dogo peer"
        curves.append({"label": label, "records": records if own else [],
                       "queue_size": row.get("queue_size"), "linear_top1": row.get("linear_top1"),
                       "paper_linear_top1": row.get("paper_linear_top1")})
    return training_curves(curves, path)


def run_compare(recipes: list[Path], overrides: list[str] | None = None, out: Path = Path("runs/compare"),
                reuse: bool = True, untrained: bool = False, teacher: bool = False) -> dict:
    """Train + evaluate every recipe at the same budget; write compare.json / .md / .png."""
    import time

    from edgedistill.recipe import load_config
    from edgedistill.envinfo import environment
    from edgedistill.fileio import write_json, write_text
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
    rows: list[dict] = []
    todo = list(zip(configs, _run_dirs(configs, out)))
    if untrained:
        todo.insert(0, ((UNTRAINED, _untrained_config(configs[0][1])), out / UNTRAINED))
        result["recipes"].insert(0, UNTRAINED)
    # The teacher row comes from the first recipe that distils from a teacher (evaluated with it).
    scored_teacher = next((recipe for recipe, cfg in configs if cfg.teacher is not None), None) if teacher else None
    if teacher and scored_teacher is None:
        raise UserError("--teacher: none of these recipes has a teacher (DisCo and SEED have one): drop --teacher")
    teacher_row = []  # the last row of the table, once scored
    for (recipe, cfg), run_dir in todo:
        start = time.perf_counter()
        run, ev, reused = _train_and_eval(cfg, run_dir, reuse, with_teacher=recipe == scored_teacher)
        wall = time.perf_counter() - start
        method = UNTRAINED if recipe == UNTRAINED else cfg.method.name
        rows.append(_row(recipe, run_dir, method, _teacher_label(cfg), cfg, ev["student"], run, ev, reused, wall))
        if ev.get("peer"):
            rows.append(_row(recipe, run_dir, "dogo (peer)", f"{cfg.student.arch} (student)", cfg, ev["peer"], run,
                             ev, reused, 0.0))
        if recipe == scored_teacher:  # not trained here: no images/s, steps or losses of its own
            teacher_row = [_row(recipe, run_dir, TEACHER, "-", cfg, ev["teacher"], {}, ev, reused, 0.0)]
        result["rows"] = rows + teacher_row
        # Written after every run: a long comparison that is stopped still leaves its table.
        result["complete"] = len({r["recipe"] for r in rows}) == len(todo)
        write_json(out / COMPARE_JSON, result)
        write_text(out / COMPARE_MD, markdown_table(result))
        draw_curves(result, out / COMPARE_PNG)
    return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(result: dict) -> str:
    s = result["shared"]
    budget = f"{s.get('train.epochs')} epoch(s)"
    if s.get("train.max_steps"):
        budget += f", at most {s['train.max_steps']} steps"
    paper = s.get("eval.protocol") == "paper"
    protocol = ("linear probe on frozen student features (frozen protocol) and the papers' protocol "
                f"({s.get('eval.paper_epochs')} epochs of random-resized-crop + flip views, SGD, no weight decay)"
                if paper else "linear probe on frozen student features (frozen protocol)")
    lines = [
        "# edgedistill compare",
        "",
        f"Same data ({s.get('data.train')}, {s.get('data.max_images') or 'all'} training images, "
        f"{s.get('data.img_size')}x{s.get('data.img_size')}), student {s.get('student.arch')}, budget {budget} "
        f"of batch {s.get('train.batch_size')}, seed {s.get('seed')}. kNN (k={s.get('eval.knn_k')}) and "
        f"{protocol}; images/s and wall time are training only.",
        "",
        "| method | teacher | student | parameters | kNN top-1 | linear top-1 |"
        + (" linear top-1 (paper) |" if paper else "") + " images/s | wall time (s) |",
        "|---|---|---|---:|---:|---:|" + ("---:|" if paper else "") + "---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['teacher']} | {r['student']} | {r['params'] / 1e6:.2f}M | {_fmt(r['knn_top1'], '.2f')} "
            f"| {_fmt(r['linear_top1'], '.2f')} |" + (f" {_fmt(r.get('paper_linear_top1'), '.2f')} |" if paper else "")
            + f" {_fmt(r['images_per_s'], '.1f')} | {_fmt(r['train_wall_s'], '.1f')} |"
        )
    moco = [r for r in result["rows"] if r["method"] in ("mocov2", "disco") and r.get("queue_size")]
    for r in moco:
        final = (r.get("final_losses") or {}).get("info_nce")
        if final is not None:
            import math

            lines += ["", f"{r['method']}: final InfoNCE {final:.3f} against ln(K+1) = "
                          f"{math.log(r['queue_size'] + 1):.3f} (K = {r['queue_size']}; an encoder that has learnt "
                          "nothing sits at ln(K+1))."]
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


@handle_errors
def compare(
    recipes: Annotated[list[Path], typer.Argument(metavar="RECIPE...", help="Two or more YAML recipes (e.g. recipes/cifar10_*.yaml).")],
    set_: SetOption = None,
    out: Annotated[Path, typer.Option(help="Folder for the runs and compare.md / compare.json.")] = Path("runs/compare"),
    reuse: Annotated[bool, typer.Option(help="Reuse (or resume) a run folder whose config matches.")] = True,
    untrained: Annotated[bool, typer.Option(help="Add a row for the student as initialised (0 steps), the floor every method must clear.")] = False,
    teacher: Annotated[bool, typer.Option(help="Add a row for the teacher of the first recipe that has one, scored by the same evaluation (the ceiling).")] = False,
):
    """Train and evaluate several recipes like for like (same data, student, budget, seed; any of the methods disco, mocov2, simclr, seed, dogo, supervised) and write one table (method, teacher, student, parameters, kNN / linear top-1, images/s, wall time) and a PNG of the training curves beside it.

    Recipes that differ in data, student, epochs/steps, batch size, evaluation or seed are refused; shared --set overrides apply to every recipe and can force them to agree.
    """
    from edgedistill.ui import console, setup_logging

    setup_logging()
    result = run_compare(recipes, set_ or [], out, reuse, untrained, teacher)
    print_compare(result)
    console.print(f"table: [bold]{Path(out) / COMPARE_MD}[/] and {Path(out) / COMPARE_JSON}; curves: "
                  f"{Path(out) / COMPARE_PNG}", highlight=False)
