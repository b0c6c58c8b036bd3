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
