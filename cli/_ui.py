"""Shared helpers of the CLI modules: consoles, exit codes, error mapping, progress, tables.

Exit codes: 0 success, 1 the job ran but found problems, 2 usage/configuration error.
Messages and progress go to stderr; tables and ``--json`` documents to stdout, so the latter
can be piped. Every failure is one red line on stderr (``error: ...``), never a traceback:
library errors (``avprep.errors.AvprepError``, ``ogmge_train.errors.TrainError``) carry their
own ``exit_code``; OS errors (disk full, read-only folder) name the file; anything else is
shown as one line too, with ``OGMGE_TRACEBACK=1`` to see the traceback.
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from avprep.errors import AvprepError
from ogmge_train.errors import TrainError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# Outside a terminal rich would cut tables at 80 columns (`conca…`): logs get a wide console.
_LOG_WIDTH = 400


_RULE_WIDTH = 80     # a rule in a log: as wide as a terminal would draw it, not _LOG_WIDTH


class _Console(Console):
    """Outside a terminal a rule is one plain line of ``_RULE_WIDTH`` characters."""

    def rule(self, title="", *, characters: str = "─", **kwargs) -> None:
        if self.is_terminal:
            return super().rule(title, characters=characters, **kwargs)
        text = Text.from_markup(title).plain if isinstance(title, str) else Text(title).plain
        head = f"{characters * 2} {text} " if text else ""
        self.print(head + characters * max(_RULE_WIDTH - len(head), 2), markup=False, highlight=False,
                   soft_wrap=True)


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else _LOG_WIDTH
    return _Console(stderr=stderr, highlight=False, width=width)


console = _console(stderr=False)       # results: stdout
err_console = _console(stderr=True)    # progress, warnings, errors: stderr

# Ctrl-C hints: ``{command}`` is the command the user typed (``typed_command``).
RESUME_HINT = "interrupted; finished work is kept: `{command}` resumes"
RESTART_HINT = "interrupted: `{command}` starts it again"


def error(message: str) -> None:
    """One line in red on stderr: ``error: <message>``."""
    err_console.print(Text("error: ", style="bold red") + Text(str(message)), soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(Text("warning: ", style="yellow") + Text(str(message)), soft_wrap=True)


def fail(message: str, code: int = EXIT_USAGE):
    """Print ``message`` as an error and exit with ``code`` (default 2)."""
    error(message)
    raise click.exceptions.Exit(code)


# A read-only or missing target is the user's to fix (2); a full disk or an I/O error is a job
# that ran and failed (1).
_USAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                 errno.EEXIST}


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code of an exception that stopped a command."""
    if isinstance(exc, (AvprepError, TrainError)):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError) and exc.errno is not None:
        where = exc.filename if exc.filename is not None else ""
        what = exc.strerror or str(exc)
        text = f"{where}: {what}" if where else what
        if exc.errno == errno.ENOSPC:
            text += " (free some space and re-run the same command: finished work is kept)"
        return text, EXIT_USAGE if exc.errno in _USAGE_ERRNOS else EXIT_PROBLEMS
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"unexpected {type(exc).__name__}{': ' + first if first else ''} "
            "(a bug; OGMGE_TRACEBACK=1 shows the traceback)"), EXIT_PROBLEMS


# ----------------------------------------------------------------------------- the typed command

_TYPED = "cli.typed"          # click meta key: [program, *arguments] as the user typed them
_OUTER: list[str] = []        # hints of the commands running ours in-process (cli.demo), outermost first

Hint = str | Callable[[], str]


def typed_command(extra: Sequence[str] = ()) -> str:
    """The command the user typed, shell-quoted, with ``extra`` arguments appended (each flag of
    ``extra`` already typed, with its value, is left out).

    The program is what click was started as (``ogmge-train``, ``python -m ogmge_train``);
    ``$OGMGE_COMMAND`` names it instead when a wrapper started it (``make demo``), and under
    torchrun it is ``torchrun … -m ogmge_train``, since torchrun's own options are not ours to see."""
    prog, *args = _typed()
    if os.environ.get("OGMGE_COMMAND"):
        prog, args = os.environ["OGMGE_COMMAND"], []
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        prog = "torchrun … " + (prog.removeprefix("python ") if prog.startswith("python -m ") else prog)
    return " ".join([prog, *map(shlex.quote, args + _missing(args, list(extra)))])


def _typed() -> list[str]:
    """[program, *arguments]: recorded by ``Group``, else (a plain command started from the
    shell, such as cli.demo) the program click detected and ``sys.argv``."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get(_TYPED):
        return list(ctx.meta[_TYPED])
    prog = ctx.find_root().info_name if ctx is not None else None
    return [prog or Path(sys.argv[0]).name, *sys.argv[1:]]


def _missing(args: list[str], extra: list[str]) -> list[str]:
    """The flags of ``extra`` (each with the values up to the next flag) not in ``args``."""
    out, i = [], 0
    while i < len(extra):
        j = i + 1
        while j < len(extra) and not extra[j].startswith("-"):
            j += 1
        if extra[i] not in args and not any(a.startswith(extra[i] + "=") for a in args):
            out += extra[i:j]
        i = j
    return out


def typed_arguments() -> list[str]:
    """The arguments of ``typed_command`` (without the program)."""
    return _typed()[1:]


def add_typed_arguments(*args: str) -> None:
    """Arguments the command decided for itself (a default run folder): later hints show them,
    so the command they print continues what this one started."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and _TYPED in ctx.meta:
        ctx.meta[_TYPED] = [*ctx.meta[_TYPED], *_missing(ctx.meta[_TYPED], list(args))]


@contextlib.contextmanager
def outer_command(hint: Hint):
    """Commands run in-process inside this block are steps of the outer command the user typed
    (cli.demo): Ctrl-C in any of them prints the outer command's ``hint`` (rendered here, where
    the outer command is the current one), not theirs."""
    _OUTER.append(render_hint(hint))
    try:
        yield
    finally:
        _OUTER.pop()


def render_hint(hint: Hint) -> str:
    return hint() if callable(hint) else hint.replace("{command}", typed_command())


def handle_errors(fn: Callable | None = None, *, interrupt_hint: Hint = RESTART_HINT):
    """Decorator for click commands: any exception becomes one red line and an exit code,
    Ctrl-C ``interrupt_hint`` (a ``{command}`` template, or a function returning the text) and
    exit 130; inside ``outer_command`` the outer command's hint. Click's own exceptions pass through."""
    if fn is None:
        return functools.partial(handle_errors, interrupt_hint=interrupt_hint)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            fail(render_hint(_OUTER[0] if _OUTER else interrupt_hint), EXIT_INTERRUPTED)
        except Exception as e:
            if os.environ.get("OGMGE_TRACEBACK") == "1":
                raise
            message, code = describe(e)
            fail(message, code)
    wrapper._handles_errors = True  # type: ignore[attr-defined]
    return wrapper


class Group(click.Group):
    """A click group whose subcommands all get ``handle_errors`` (commands may also wrap
    themselves, e.g. for a specific Ctrl-C hint) and whose unknown-command message suggests the
    closest name (``No such command 'evalute'. Did you mean 'evaluate'?``)."""

    def make_context(self, info_name, args, parent=None, **extra):
        typed = [info_name or "", *args]
        ctx = super().make_context(info_name, args, parent=parent, **extra)
        if parent is None:           # the meta dict is shared with the subcommands' contexts
            ctx.meta[_TYPED] = typed
        return ctx

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if cmd.callback is not None and not getattr(cmd.callback, "_handles_errors", False):
            cmd.callback = handle_errors(cmd.callback)
        super().add_command(cmd, name)

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            ctx.fail(f"No such command {name!r}.{hint}")
        return super().resolve_command(ctx, args)


class DatasetChoice(click.Choice):
    """``--dataset`` of every command: a name of the adapter registry (``avprep.datasets.ADAPTERS``),
    listed in ``--help``; other spellings of a name (``kinetics_sounds``, ``CREMAD``) are accepted."""

    def __init__(self):
        from avprep.datasets import ADAPTERS

        super().__init__(list(ADAPTERS))

    def convert(self, value, param, ctx):
        return super().convert(str(value).strip().lower().replace("_", "-"), param, ctx)


class RateColumn(ProgressColumn):
    """Items per second since the task started, e.g. ``12.3 clips/s``: the same average a summary
    line reports, not rich's short-window speed."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        speed = task.completed / elapsed if elapsed else None
        return Text(f"{_rate(speed)} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class EtaColumn(ProgressColumn):
    """``ETA 0:01:40`` from the average rate since the task started (rich's own estimate needs
    several updates within 30 s, so slow steps never get one)."""

    def render(self, task) -> Text:
        if task.finished or not task.total or not task.completed or not task.elapsed:
            return Text("ETA -:--:--" if not task.finished else "", style="cyan")
        rate = task.completed / task.elapsed
        return Text(f"ETA {_clock((task.total - task.completed) / rate)}", style="cyan")


def make_progress(unit: str = "items", extra: str | None = None, transient: bool = False):
    """A progress display: on a terminal (or with ``AVPREP_PROGRESS=1``) a rich bar with
    description, done/total, rate, elapsed, ETA and an optional task field ``extra`` (e.g.
    ``"failures"``); otherwise (a log file, a pipe) a plain line every ``AVPREP_PROGRESS_INTERVAL``
    seconds (10) while a task runs."""
    if not err_console.is_terminal and os.environ.get("AVPREP_PROGRESS") != "1":
        return LogProgress(unit, extra)
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
               MofNCompleteColumn(), RateColumn(unit), TimeElapsedColumn(), EtaColumn()]
    if extra:
        columns.append(TextColumn(f"{{task.fields[{extra}]}}"))
    return Progress(*columns, console=err_console, transient=transient)


class LogProgress:
    """The subset of ``rich.progress.Progress`` the commands use, writing plain periodic lines:
    ``extract: 120/200 clips (60%), 45.1 clips/s, ETA 0:00:02``. Quiet for jobs shorter than the
    interval, so short runs' logs stay as they were."""

    def __init__(self, unit: str, extra: str | None = None, interval: float | None = None):
        self.unit, self.extra = unit, extra
        self.interval = interval if interval is not None else float(os.environ.get("AVPREP_PROGRESS_INTERVAL", 10))
        self.console = err_console
        self.tasks: dict[int, dict] = {}
        self._next_id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        now = time.monotonic()
        self._next_id += 1
        self.tasks[self._next_id] = {"description": description, "total": total, "completed": completed,
                                     "fields": fields, "start": now, "printed": now}
        return self._next_id

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        t = self.tasks.get(task_id)
        if t is None:
            return
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        if description is not None:
            t["description"] = description
        t["fields"].update(fields)
        now = time.monotonic()
        if now - t["printed"] >= self.interval:
            t["printed"] = now
            self.console.print(self.line(t, now), soft_wrap=True, markup=False, highlight=False)

    def line(self, t: dict, now: float) -> str:
        done, total, elapsed = t["completed"], t["total"], now - t["start"]
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{t['description']}: {done:.0f}" + (f"/{total:.0f}" if total else "") + f" {self.unit}"]
        if total:
            parts[0] += f" ({100 * done / total:.0f}%)"
        parts.append(f"{_rate(rate)} {self.unit}/s")
        if total and rate > 0 and done < total:
            parts.append(f"ETA {_clock((total - done) / rate)}")
        extra = Text.from_markup(str(t["fields"].get(self.extra, ""))).plain if self.extra else ""
        if extra:
            parts.append(extra)
        return ", ".join(parts)


def _rate(x: float) -> str:
    """``89.3``, or ``0.02`` for slow steps (a 50-s step is not ``0.0``)."""
    return f"{x:.1f}" if x >= 1 or x == 0 else f"{x:.2g}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def table(title: str | None, columns: list[str], rows, *, numeric: set[int] | None = None,
          show_header: bool = True) -> Table:
    """A rich table; ``numeric`` holds the indexes of right-aligned columns. Cells fold rather
    than being cut when a terminal is too narrow."""
    t = Table(title=title, title_justify="left", header_style="bold", show_header=show_header)
    for i, col in enumerate(columns):
        t.add_column(col, justify="right" if numeric and i in numeric else "left", overflow="fold")
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
