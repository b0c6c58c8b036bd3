"""Console output: logging through rich, and the progress bars of long work."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)

_FILE_HANDLER: logging.Handler | None = None


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log to the console (rich) and, when given, to a file in the run folder."""
    global _FILE_HANDLER
    root = logging.getLogger("edgedistill")
    root.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False))
    if _FILE_HANDLER is not None:
        root.removeHandler(_FILE_HANDLER)
        _FILE_HANDLER.close()
        _FILE_HANDLER = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        _FILE_HANDLER = logging.FileHandler(log_file)
        _FILE_HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(_FILE_HANDLER)


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and n:
            self._progress.advance(self._task, n)

    def update_fields(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, show_loss: bool = True):
    """A rich progress bar (steps, loss, images/s, ETA); silent when disabled or not a terminal."""
    if not enabled or not console.is_terminal:
        yield _Bar(None, None)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if show_loss:
        columns += [TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.0f} img/s")]
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, loss=float("nan"), ips=0.0)
        yield _Bar(progress, task)
