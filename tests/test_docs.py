"""The docs against the code: the methods every help text lists, the run-folder listing."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from edgedistill.cli import app

REPO = Path(__file__).resolve().parents[1]


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_every_help_that_lists_methods_lists_every_registered_method():
    """`edgedistill --help`, `train --help` and `compare --help` name every method of the
    registry; any other command that names two or more of them names them all."""
    from edgedistill.methods.registry import REGISTRY
    import edgedistill.methods  # noqa: F401 - registers every method

    methods = sorted(REGISTRY)
    assert {"mocov2", "simclr", "disco", "seed", "dogo", "supervised"} <= set(methods)
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    must = {"", "train", "compare"}
    for name in ["", *commands]:
        text = _help(name) if name else _help()
        named = {m for m in methods if re.search(rf"\b{m}\b", text)}
        if name in must or len(named - {"seed"}) >= 2:  # "seed" alone is usually the random seed
            assert named == set(methods), f"`edgedistill {name} --help` lacks {sorted(set(methods) - named)}"


def _readme_run_folder() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Run folder", 1)[1].split("```", 2)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith(" ")]


def test_readme_run_folder_is_the_runfolder_listing():
    from edgedistill.runfolder import RUN_FOLDER

    assert _readme_run_folder() == [name for name, _ in RUN_FOLDER]
    design = (REPO / "docs" / "design.md").read_text()
    for name, _ in RUN_FOLDER:
        if name not in ("export/", "report/"):
            assert f"`{name}`" in design, f"docs/design.md section 5 does not name {name}"


def test_a_trained_run_writes_only_listed_files(trained_run):
    from edgedistill.runfolder import RUN_FOLDER

    listed = {name.rstrip("/") for name, _ in RUN_FOLDER}
    written = {p.name for p in trained_run.iterdir() if not p.name.startswith("export-")}
    assert written <= listed, f"written but not in runfolder.RUN_FOLDER: {sorted(written - listed)}"


def test_docs_do_not_cite_the_development_share():
    """Users do not have ../shared: the docs must not send them there."""
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "export" / "README.md"]:
        text = path.read_text()
        assert "../shared" not in text and "/work/shared" not in text, path


def _import_graph() -> dict[str, set[str]]:
    """edgedistill's modules -> the edgedistill modules they import (module level or inside
    functions), from the source."""
    import ast

    root = REPO / "edgedistill"
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import submodule` depends on the submodule, not on pkg/__init__'s names
                targets = subs if all(s in modules for s in subs) else [base] + subs
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name:
                    graph[name].add(t)
    return graph


def test_no_import_cycles_and_export_bench_report_do_not_read_runs_through_eval():
    graph = _import_graph()
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not sccs, f"import cycles: {sccs}"
    # Reading a run folder is runfolder's job: bench and report do not import the evaluation.
    for name, deps in graph.items():
        if name.startswith(("edgedistill.bench", "edgedistill.report")):
            assert "edgedistill.evaluate" not in deps, name
    assert graph["edgedistill.runfolder"] <= {"edgedistill.errors"}  # a leaf
