"""`avprep splits list | show | check`: the registry of published splits and class lists."""
from __future__ import annotations

import click

from . import _ui


@click.group("splits", cls=_ui.Group)
def splits_group():
    """The registry of published splits and class lists (README: Getting the corpora)."""


def _counts(entry) -> str:
    if entry.kind == "classes":
        return f"{entry.counts.get('classes', '?')} classes"
    if not entry.counts:
        return "unknown"
    return " / ".join(f"{s} {n:,}" for s, n in entry.counts.items())


def _source(entry) -> str:
    src = entry.source
    if src.get("repo"):
        return f"{src['repo']}@{str(src.get('commit', ''))[:7]}".rstrip("@")
    return str(src.get("tool") or src.get("paper") or "?")


@splits_group.command("list")
@click.option("--dataset", type=_ui.DatasetChoice(), show_default="all", help="Only this dataset's entries.")
@click.option("--json", "as_json", is_flag=True, help="Print every entry as JSON.")
def list_cmd(dataset, as_json):
    """Every entry with its source, counts and hash."""
    from avprep import splits

    entries = [e for e in splits.entries() if dataset is None or e.dataset == dataset]
    if as_json:
        _ui.print_json([e.to_dict() for e in entries])
        return
    rows = [(e.id, e.kind, _source(e), _counts(e), (e.hash or "unknown")[:16]) for e in entries]
    _ui.console.print(_ui.table("published splits and class lists", ["entry", "kind", "source", "counts", "hash"],
                                rows))


@splits_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def show_cmd(name, as_json):
    """One entry (NAME: <dataset>/<name>, optionally @<version>) in full."""
    from avprep import splits

    e = splits.get(name)
    if as_json:
        _ui.print_json(e.to_dict())
        return
    rows = [("title", e.title), ("dataset", e.dataset), ("kind", e.kind)]
    rows += [(f"source {k}", _text(v)) for k, v in e.source.items()]
    rows += [("counts", _counts(e)), ("hash", e.hash or "unknown")]
    if e.classes:
        rows.append(("class list", e.classes))
    if e.rule:
        rows.append(("rule", ", ".join(f"{k} {v}" for k, v in e.rule.items())))
    if e.kind == "split":
        rows.append(("ids in two splits", e.overlap))
    rows += [("note", n) for n in e.notes]
    _ui.console.print(_ui.table(e.id, ["", ""], rows, show_header=False))
    if e.files:
        _ui.console.print(_ui.table("published files", ["split", "name", "path", "rows", "sha256", "git blob"],
                                    [(f.split or "all", f.name, f.path, "?" if f.rows is None else f"{f.rows:,}",
                                      f.sha256 or "unknown", f.git_blob or "unknown") for f in e.files]))
    if e.class_names:
        _ui.console.print(", ".join(e.class_names))


@splits_group.command("check")
@click.argument("name", required=False)
@click.option("--split-file", "split_files", multiple=True, show_default="none",
              help="Your copy of the entry's files, PATH or SPLIT=PATH (repeatable).")
@click.option("--shards", show_default="none",
              help="An extraction (folder or URL): its class list and splits are checked too.")
@click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL", show_default="$AWS_ENDPOINT_URL",
              help="S3-compatible endpoint for s3:// locations.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_cmd(name, split_files, shards, s3_endpoint, as_json):
    """Check split files and/or an extraction against the entry NAME (default: the entry the
    files match, or the one the extraction's dataset.json names): file and content hashes, counts,
    clip ids in two splits, and whether the extraction's class list is the entry's.

    Exit status: 0 all hold, 1 a check failed, 2 bad options."""
    from avprep import splits
    from avprep.errors import ConfigError

    classes = keys = dataset = None
    recorded = None
    if shards:
        dataset, classes, keys, recorded = _read_extraction(shards, s3_endpoint)
    if name is None:
        if recorded:
            name = recorded
        elif split_files:
            match = next((m for m in (splits.identify(d, split_files) for d in _datasets(dataset)) if m), None)
            if match is None:
                _ui.fail("the split files match no registry entry (by file or content hash); "
                         "name the entry to compare them with", _ui.EXIT_PROBLEMS)
            name = match.entry.id
        else:
            raise ConfigError("name an entry, or pass --split-file / --shards")
    entry = splits.get(name)
    report = splits.check(entry, split_files, classes=classes, keys_by_split=keys)
    if as_json:
        _ui.print_json(report.to_dict())
    else:
        for fact in report.facts:
            _ui.console.print(f"✓ {fact}")
        for problem in report.problems:
            _ui.console.print(f"✗ {problem}")
        _ui.console.print(f"{entry.id}: {'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    if not report.ok:
        raise click.exceptions.Exit(_ui.EXIT_PROBLEMS)


def _text(value) -> str:
    if isinstance(value, dict):       # e.g. a copy of the files elsewhere: repo@commit paths
        where = f"{value.get('repo', '')}@{str(value.get('commit', ''))[:7]}".strip("@")
        return " ".join([where, _text(value.get("paths", []))]).strip()
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _datasets(dataset):
    from avprep.datasets import ADAPTERS

    return [dataset] if dataset else list(ADAPTERS)


def _read_extraction(location: str, s3_endpoint):
    """(dataset, classes, keys per split, the registry entry dataset.json names) of an extraction."""
    from avprep import shardformat as sf
    from avprep.errors import AvprepError, ConfigError

    try:
        ds = sf.open_dataset(location, s3_endpoint=s3_endpoint)
        keys = {split: {e.key for e in ds.index(split)} for split in ds.splits}
    except (OSError, AvprepError) as e:
        raise ConfigError(f"{location}: not a finished extraction ({e})") from None
    recorded = ds.meta.raw.get("split_registry")
    return ds.name, ds.classes, keys, recorded.get("id") if isinstance(recorded, dict) else None
