"""`avprep verify OUT|URL`: check shards against manifests and the sample schema."""
from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from avprep import outdir
from avprep.errors import ConfigError
from avprep.verify import VerifyReport, verify

from ._ui import EXIT_OK, EXIT_PROBLEMS, console, err_console, handle_errors, make_progress, print_json


@click.command("verify")
@click.argument("location", metavar="[OUT|URL]", required=False)
@click.option("--quick", is_flag=True, help="Only check manifests, shard sizes and sha256 (no decoding).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of a table.")
@click.option("--report", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              show_default="no file", help="Also write the report as JSON to this file.")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", metavar="URL", show_default="$AWS_ENDPOINT_URL",
              help="Endpoint of an S3-compatible server for s3:// locations.")
@handle_errors
def verify_cmd(location: str | None, quick: bool, as_json: bool, json_path: Path | None, s3_endpoint: str | None):
    """Verify an extracted dataset at OUT (a folder, http(s):// or s3:// prefix): every shard
    against its manifest (presence, size, sha256, sample count) and, unless --quick, every
    sample against the schema. Shards are untrusted: nothing is unpickled or written to disk.

    Without OUT: the output of the last `avprep extract` here, i.e. of the folders holding
    .avprep-state/ (the current folder and the folders in it), the one written most recently
    (an s3:// output's URL must be given).

    Exit status: 0 clean, 1 problems found, 2 not a dataset or bad options.
    """
    if location is None:
        location = _last_output()
    with make_progress("shards", transient=True) as progress:
        task = progress.add_task("verify", total=None)

        def on_progress(done: int, total: int, shard: str):
            progress.update(task, completed=done, total=total, description=f"verify {shard}")

        report = verify(location, quick=quick, on_progress=on_progress, s3_endpoint=s3_endpoint)
    if json_path:
        json_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if as_json:
        print_json(report.to_dict())
    else:
        _print_report(report)
    raise click.exceptions.Exit(EXIT_OK if report.ok else EXIT_PROBLEMS)


def _last_output() -> str:
    found = outdir.find_outputs(".")
    if not found:
        raise ConfigError(f"no extraction output here (a folder holding {outdir.STATE_DIR}/ in . or a folder in "
                          "it): pass one, e.g. `avprep verify shards/` or `avprep verify s3://bucket/prefix`")
    location = str(found[0])
    err_console.print(f"verifying {location} (the last extraction here)", soft_wrap=True, markup=False)
    return location


def _print_report(report: VerifyReport) -> None:
    if report.ok:
        quick = " (quick: sizes and hashes only)" if report.quick else ""
        console.print(f"[green]✓ {report.num_shards} shards, {report.num_samples} samples verified{quick}[/green]")
        return
    table = Table(title=Text(f"verify {_safe(report.location)}"), title_justify="left", header_style="bold")
    for name, style in (("file", "cyan"), ("key", ""), ("check", "bold"), ("problem", "")):
        table.add_column(name, style=style, overflow="fold")
    for shard, group in groupby(report.problems, key=lambda p: p.shard):
        for i, p in enumerate(group):
            check = Text(p.check, style="red" if p.check == "security" else "")
            table.add_row(Text(_safe(shard) if i == 0 else ""), Text(_safe(p.key)), check, Text(_safe(p.message)))
        table.rows[-1].end_section = True
    console.print(table)
    files = len({p.shard for p in report.problems})
    security = len(report.security_problems)
    console.print(f"[red]✗ {len(report.problems)} problem(s) in {files} file(s)"
                  f"{f', {security} security' if security else ''}[/red] "
                  f"({report.num_shards} shards, {report.num_samples} samples)")


def _safe(text: str) -> str:
    """Names from a hostile shard may hold terminal control characters: show them escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
