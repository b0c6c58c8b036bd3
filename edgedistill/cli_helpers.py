"""What every command module of the CLI shares: error handling, the `--set` option, list parsing.

A leaf: it imports typer and `edgedistill.errors` only (the console lazily), so command modules
(`deploy.commands`, `bench.commands`, `report.commands`, `compare`, `bench.train_speed`) import it
and `edgedistill.cli` imports them, with no import cycle between the CLI and its commands.
"""

from __future__ import annotations

import functools
from enum import Enum
from typing import Annotated, Optional

import typer

from edgedistill.errors import TrainingDiverged, UserError

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def handle_errors(fn):
    """Turn user errors into one red line and a meaningful exit code (2 bad input, 3 diverged)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from edgedistill.ui import console

        try:
            return fn(*args, **kwargs)
        except TrainingDiverged as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_DIVERGED) from None
        except UserError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe value, e.g. --set train.epochs=10 (repeatable)."),
]


def comma_list(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """'a,b, c' (or a list of such strings) -> ['a', 'b', 'c'], blanks dropped."""
    parts = text.split(",") if isinstance(text, str) else [p for item in text for p in item.split(",")]
    return [p.strip() for p in parts if p.strip()]


def choices(enum: type[Enum]) -> str:
    """The values of a choice enum as 'a, b, c' (for help texts and error messages)."""
    return ", ".join(member.value for member in enum)
