"""Shared rich helpers for the CLI modules: consoles, exit codes, error mapping, progress, tables.

Exit codes (SPEC §6): 0 success, 1 the job ran but found problems, 2 usage/configuration error.
Messages and progress go to stderr; tables and ``--json`` documents to stdout, so the latter
can be piped.
"""
from __future__ import annotations

import functools
import json
import sys

import click
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from avprep.errors import AvprepError, ConfigError, DatasetLayoutError
from ogmge_train.errors import TrainError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

console = Console(highlight=False)             # results: stdout
err_console = Console(stderr=True, highlight=False)   # progress, warnings, errors: stderr


def error(message: str) -> None:
    """One line in red on stderr: ``error: <message>``."""
    err_console.print(Text("error: ", style="bold red") + Text(str(message)), soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(Text("warning: ", style="yellow") + Text(str(message)), soft_wrap=True)


def fail(message: str, code: int = EXIT_USAGE):
    """Print ``message`` as an error and exit with ``code`` (default 2)."""
    error(message)
    raise click.exceptions.Exit(code)


def exit_code_for(exc: BaseException) -> int:
    """Configuration and layout errors are the user's to fix (2); anything else that stopped
    the job after it started (storage, a dead worker) is 1."""
    code = getattr(exc, "exit_code", None)  # both libraries' errors carry their exit code
    if code is not None:
        return code
    return EXIT_USAGE if isinstance(exc, (ConfigError, DatasetLayoutError)) else EXIT_PROBLEMS


def handle_errors(fn):
    """Decorator for click commands: typed avprep errors become one red line and an exit code,
    Ctrl-C a hint that re-running resumes, instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (AvprepError, TrainError) as e:
            fail(str(e), exit_code_for(e))
        except KeyboardInterrupt:
            fail("interrupted; finished work is kept, re-run the same command to resume", 130)
    return wrapper


class RateColumn(ProgressColumn):
    """Items per second with a unit, e.g. ``12.3 clips/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def make_progress(unit: str = "items", extra: str | None = None, transient: bool = False) -> Progress:
    """A progress bar: description, bar, done/total, rate, elapsed, ETA and an optional field
    ``extra`` (a task field name, e.g. ``"failures"``, shown as ``{task.fields[extra]}``)."""
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
               MofNCompleteColumn(), RateColumn(unit), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(f"{{task.fields[{extra}]}}"))
    return Progress(*columns, console=err_console, transient=transient,
                    disable=not err_console.is_terminal and not _force_progress())


def _force_progress() -> bool:
    # Progress bars in a pipe or log are noise; AVPREP_PROGRESS=1 forces them on.
    import os
    return os.environ.get("AVPREP_PROGRESS") == "1"


def table(title: str | None, columns: list[str], rows, *, numeric: set[int] | None = None,
          show_header: bool = True) -> Table:
    """A rich table; ``numeric`` holds the indexes of right-aligned columns."""
    t = Table(title=title, title_justify="left", header_style="bold", show_header=show_header)
    for i, col in enumerate(columns):
        t.add_column(col, justify="right" if numeric and i in numeric else "left")
    for row in rows:
        t.add_row(*(str(x) for x in row))
    return t


def print_json(obj) -> None:
    """A JSON document on stdout (plain, so it can be piped to jq)."""
    sys.stdout.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
