"""`avprep download`: a published clip list → the raw layout `avprep extract` reads."""
from __future__ import annotations

from pathlib import Path

import click

from avprep.datasets import ADAPTERS
from avprep.download.fetch import OUTPUT_FORMAT, YOUTUBE
from avprep.shardformat import DATASET

from . import _ui

DOWNLOADABLE = tuple(name for name, adapter in ADAPTERS.items() if adapter.download is not None)

_HELP = f"""Fetch the clips of a published DATASET list from YouTube into OUT: each clip's own window
only, as {OUTPUT_FORMAT}. Every clip gets a status in OUT/download.jsonl and the availability per
split and class goes to OUT/availability.json (and into {DATASET} at extraction).

Exit status: 0 done, 1 some clips ended with an error (a rerun tries them again), 2 bad options."""


@click.command("download", help=_HELP)
@click.option("--dataset", required=True, type=click.Choice(DOWNLOADABLE), help="Dataset whose list this is.")
@click.option("--list", "lists", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="The published list: vggsound.csv (or train.csv/test.csv), Kinetics CSVs or the OGM-GE / "
                   "TPAMI Kinetics-Sounds split files, AVE's Annotations.txt (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Raw dataset folder to write (what `avprep extract --src` reads); a rerun resumes.")
@click.option("--segments", multiple=True, type=click.Path(exists=True, dir_okay=False), show_default="none",
              help="AVE only: AudioSet segment CSVs, where each AVE clip is in its YouTube video (repeatable).")
@click.option("--url-template", default=YOUTUBE, show_default=True,
              help="Clip URL from {id} (also {start}, {end}, {key}); e.g. a mirror or a test server.")
@click.option("--connections", default=4, show_default=True, type=click.IntRange(min=1),
              help="Clips fetched at once.")
@click.option("--rate", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="At most this many clip starts per second (0: no limit).")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(min=0),
              help="Further attempts after a transient failure (time-out, 403/429/5xx, truncated answer).")
@click.option("--backoff", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds before the first retry, doubled for each next one.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a connection may stay silent.")
@click.option("--max-height", default=360, show_default=True, type=click.IntRange(min=1),
              help="Highest source resolution picked (lines).")
@click.option("--format", "fmt", show_default="best video <= --max-height + best audio",
              help="yt-dlp format selector, instead of the --max-height one.")
@click.option("--min-fraction", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Shortest clip kept, as a fraction of its window (shorter: too-short).")
@click.option("--retry-unavailable", is_flag=True,
              help="Try again the clips an earlier run found unavailable, private, removed, geo-blocked, "
                   "too short or without audio.")
@click.option("--limit", type=click.IntRange(min=1), show_default="all", help="Fetch at most this many clips.")
@click.option("--ffmpeg", show_default="imageio-ffmpeg's, else ffmpeg on PATH", help="FFmpeg executable.")
@click.option("--cookies", type=click.Path(exists=True, dir_okay=False), show_default="none",
              help="cookies.txt for yt-dlp (videos that need a login).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (availability included) as JSON.")
def download_cmd(dataset, lists, out, segments, url_template, connections, rate, retries, backoff, timeout,
                 max_height, fmt, min_fraction, retry_unavailable, limit, ffmpeg, cookies, as_json):
    from avprep.download import download

    with _ui.make_progress("clips", extra="status") as progress:
        task = None

        def on_event(e):
            nonlocal task
            if e.kind == "start":
                task = progress.add_task(f"download {dataset}", total=e.total, status="")
            elif e.kind == "clip" and task is not None:
                progress.update(task, completed=e.done, status=f"{e.key}: {e.status}")

        result = download(dataset, lists, out, url_template=url_template, connections=connections,
                          rate=rate or None, retries=retries, backoff=backoff, timeout=timeout,
                          max_height=max_height, format=fmt, ffmpeg=ffmpeg, cookies=cookies,
                          min_fraction=min_fraction, retry_unavailable=retry_unavailable, segments=segments,
                          limit=limit, on_event=on_event)
    errors = result.fetched.get("error", 0)
    if as_json:
        _ui.print_json({"raw": result.raw, "fetched": result.fetched, "kept": result.kept,
                        "skipped": result.skipped, "notes": result.notes,
                        "availability": result.availability.to_dict()})
    else:
        av = result.availability
        rows = [(s, n) for s, n in av.statuses.items()]
        _ui.console.print(_ui.table(f"{av.listed:,} listed clips", ["status", "clips"], rows, numeric={1}))
        _print_classes(av)
        for note in result.notes:
            _ui.console.print(f"note: {note}")
        for line in av.lines():
            _ui.console.print(line)
        fetched = sum(result.fetched.values())
        _ui.console.print(f"{fetched} fetched this run, {result.kept} already there, {result.skipped} skipped "
                          f"(final status) → {result.raw}  ({result.wall_time:.1f} s)")
        if av.split_registry:
            _ui.console.print(f"list: {av.split_registry['id']} ({av.split_registry['title']})")
    if errors:
        _ui.error(f"{errors} clip(s) ended with an error (see {Path(result.raw) / 'download.jsonl'}); "
                  f"rerun the same command to try them again")
        raise click.exceptions.Exit(_ui.EXIT_PROBLEMS)


def _print_classes(av) -> None:
    """Available / listed per class and split: every class up to 40, else the 10 least available."""
    classes = sorted({c for sp in av.splits.values() for c in sp.per_class})

    def frac(c):
        a = sum(sp.per_class.get(c, [0, 0])[0] for sp in av.splits.values())
        return a / sum(sp.per_class.get(c, [0, 1])[1] for sp in av.splits.values())

    title = "available / listed per class"
    if len(classes) > 40:
        classes, title = sorted(classes, key=lambda c: (frac(c), c))[:10], "the 10 least available classes"
    rows = [[c] + [f"{sp.per_class[c][0]:,} / {sp.per_class[c][1]:,}" if c in sp.per_class else "-"
                   for sp in av.splits.values()] for c in classes]
    _ui.console.print(_ui.table(title, ["class", *av.splits], rows, numeric=set(range(1, len(av.splits) + 1))))
