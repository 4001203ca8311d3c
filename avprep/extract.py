"""`extract`: raw dataset → WebDataset shards + manifests (README: What is extracted, Output), resumable.

The steps (``extract``): discover the clips → plan the shards (membership from sorted keys
only) → keep the shards a killed run already finished → cut the rest into small clip tasks
→ run them on an engine (``engines``: serial, local processes, Ray) → write the results into
shards in plan order (``clipwork``: here, each uploaded in the background as soon as it is
committed when the output is s3://, ``upload.ShardUploader``; under Ray by a task per shard
on the cluster, which uploads it itself) → write failures.jsonl, the sample indexes, the
manifests and dataset.json last (``outdir``), uploaded after every shard.

Same inputs and options give byte-identical output under every engine and worker count.
Failure records name files relative to ``src`` (also inside error messages), so the output
does not depend on where the raw data lives.

The ``local`` engine uses forkserver processes (spawn where there is none): scripts that
call ``extract`` with more than one worker need the usual ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import outdir
from . import shards as shardlib
from .clipwork import ClipWorker, ShardBuilder, failure, make_tasks
from .config import ExtractConfig
from .datasets._base import Discovery
from .engines import Engine, make_engine
from .errors import ConfigError, DatasetLayoutError
from .outdir import tool_version

if TYPE_CHECKING:
    from .download.status import Availability
    from .storage import S3Location
    from .upload import ShardUploader

# Discovery problems that count against --max-failures ("missing" does not: VGGSound always
# misses videos, README: Datasets).
_COUNTED_PROBLEMS = {"label", "duplicate"}


@dataclass(frozen=True)
class ExtractEvent:
    """Progress report. ``kind``: "check" (the shards of an earlier run checked so far, before
    "start": ``done`` counts their clips), "start", "retrying" (``error`` says what), "clip",
    "clip_failed", "shard", "resumed", "finish".

    ``done``/``failed``/``total`` count clips over the whole run (resumed shards included), so
    a progress bar can use them directly; ``key``/``stage``/``error`` describe one clip and
    ``shard`` the shard an event belongs to. Clip and shard events come in plan order, the
    same under every engine."""

    kind: str
    done: int
    failed: int
    total: int
    shard: str | None = None
    key: str | None = None
    stage: str | None = None
    error: str | None = None


@dataclass
class ExtractResult:
    out: str
    name: str
    classes: list[str]
    samples: dict[str, dict[str, int]]          # split -> label -> samples written
    failures: list[dict]                        # failures.jsonl lines
    failures_by_stage: dict[str, int]
    skipped: dict[str, int]                     # discovery's "not an error" skips
    notes: list[str]                            # discovery's remarks (how splits were made)
    num_clips: int                              # clips attempted (discovery's clips)
    num_shards: int
    resumed_shards: int
    wall_time: float
    max_failures: float
    engine: str = "serial"
    worker_pids: set[int] = field(default_factory=set)   # processes that extracted clips
    split_registry: dict | None = None          # the published split used (splits.Match.record)
    availability: list[str] = field(default_factory=list)   # the download's summary lines

    @property
    def num_samples(self) -> int:
        return sum(sum(c.values()) for c in self.samples.values())

    @property
    def num_failed(self) -> int:
        """Failures that count against ``max_failures`` (not missing files)."""
        return sum(1 for f in self.failures if f["stage"] != "missing")

    @property
    def failed_fraction(self) -> float:
        counted_problems = sum(1 for f in self.failures if f["stage"] in _COUNTED_PROBLEMS)
        attempted = self.num_clips + counted_problems
        return self.num_failed / attempted if attempted else 0.0

    @property
    def ok(self) -> bool:
        return self.failed_fraction <= self.max_failures


OnEvent = Callable[[ExtractEvent], None]


def extract(dataset: str, src, out, cfg: ExtractConfig, *, workers: int | None = None,
            engine: str | Engine | None = None, ray_address: str | None = None,
            split_files: Iterable = (), split_by: str | None = None, seed: int = 0,
            overwrite: bool = False, retry_failed: bool = False, max_failures: float = 0.05,
            on_event: OnEvent | None = None, staging: str | Path | None = None,
            s3_endpoint: str | None = None, splits: str | None = None) -> ExtractResult:
    """Extract dataset ``dataset`` from the raw folder ``src`` into ``out`` (a folder, or an
    ``s3://bucket/prefix`` reached through a local ``staging`` folder: each shard is uploaded
    in the background as soon as it is finished, the indexes, manifests and dataset.json after
    the last one).

    Same inputs and options give byte-identical output whatever the engine and ``workers``:
    shard membership is fixed from sorted keys before decoding. Clips that fail are listed
    in failures.jsonl and never stop the run; ``result.ok`` is False when the failed fraction
    exceeds ``max_failures``. Re-running after an interruption resumes (finished shards are
    kept when their sha256 still matches; shards with clips that failed for a missing or
    unreadable file are redone, all failed clips with ``retry_failed``); ``overwrite``
    starts over. ``engine``: "serial", "local", "ray" or an ``Engine`` (default: serial
    for one worker, else local); ``workers`` defaults to all cores (Ray: the cluster's).
    Raises ConfigError when ``out`` holds an extraction made with other options (or its bucket does not exist),
    DatasetLayoutError from the adapter, OutputError when ``out`` cannot be written,
    StorageError from an upload (the run stops there). ``staging`` defaults to a fixed folder
    per URL under the temp dir (kept, so an interrupted run resumes; the resume state is never
    uploaded); a rerun sends again only the kept shards missing from the bucket or of another
    size there, and everything it extracts.

    dataset.json names the published split in use (``avprep.splits``: the entry the split
    files, or the dataset's own lists, match; ``splits`` names the one they must match, a
    ConfigError otherwise) and carries ``src``'s download availability (``avprep download``).
    """
    t0 = time.monotonic()
    emit = on_event or (lambda e: None)
    remote = str(out) if str(out).startswith("s3://") else None
    loc = _s3_location(remote, s3_endpoint) if remote else None     # a bad URL or bucket fails before any work
    out = Path(staging or outdir.staging_dir(remote)) if remote else Path(out)
    src = Path(src)
    adapter = _adapter(dataset)
    split_files = list(split_files)
    options = _options(adapter.name, cfg, split_files, split_by, seed)
    if not overwrite:
        outdir.check_options(out, options)
    runner = engine if isinstance(engine, Engine) else make_engine(engine, workers, ray_address)
    # discovery before touching ``out``: a layout or option error must leave nothing behind
    disc: Discovery = adapter.discover(src, split_files=split_files, split_by=split_by, seed=seed)
    if not disc.clips:
        raise DatasetLayoutError(_nothing_found(src, adapter, disc))
    source = _source_facts(adapter.name, src, split_files, split_by, seed, splits)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    with outdir.exclusive(out), _uploader(loc, out) as uploader:
        outdir.prepare(out, options, overwrite)
        result = _extract_into(src, out, adapter.name, disc, cfg, options, runner, emit,
                               max_failures, retry_failed, uploader, loc, source)
        if uploader is not None:
            uploader.finish()       # waits for the shards; then the indexes, manifests, dataset.json last
    result.out = remote or str(out)
    result.wall_time = time.monotonic() - t0
    emit(ExtractEvent("finish", result.num_clips, result.num_clips - result.num_samples,
                      result.num_clips))
    return result


def _extract_into(src: Path, out: Path, dataset: str, disc: Discovery, cfg: ExtractConfig,
                  options: dict, engine: Engine, emit: OnEvent, max_failures: float,
                  retry_failed: bool, uploader: ShardUploader | None = None,
                  loc: S3Location | None = None, source: _SourceFacts | None = None) -> ExtractResult:
    """Plan, keep the intact shards, extract the rest, then write the indexes (``out`` locked).
    Every shard file in ``out``, kept or new, goes to ``uploader`` when there is one; shards
    the engine built and uploaded elsewhere (``ShardState.in_bucket``) are only in ``loc``."""
    plans = shardlib.plan_shards(disc.clips, cfg)
    kept, retried = _finished_shards(out, plans, loc, retry_failed, emit, len(disc.clips))
    todo = [p for p in plans if p.name not in kept]
    if todo:
        outdir.invalidate(out)

    progress = _Progress(emit, total=len(disc.clips))
    progress.event("start")
    notes = list(disc.notes)
    if retried:
        notes.append(f"{len(retried)} finished shard(s) with clips that failed "
                     f"{'' if retry_failed else 'for a missing, empty or unreadable file '}are extracted again")
        progress.event("retrying", error=notes[-1])
    for p in plans:
        if p.name in kept:
            progress.add(len(p.clips), len(kept[p.name].failures))
            if uploader is not None and kept[p.name].sha256 is not None and not kept[p.name].in_bucket:
                uploader.submit(p.name, unless_present=True)    # may be in the bucket already
            progress.event("resumed", shard=p.name)

    states = dict(kept)

    def shard_done(st: outdir.ShardState) -> None:
        states[st.name] = st
        outdir.save_state(out, st)
        if st.in_bucket:        # an older copy here would be uploaded over it by uploader.finish
            (out / st.name).unlink(missing_ok=True)
        elif uploader is not None and st.sha256 is not None:     # None: every clip failed, no file
            uploader.submit(st.name)
        progress.event("shard", shard=st.name)

    tasks = make_tasks(todo, engine.workers)
    worker = ClipWorker({c: i for i, c in enumerate(disc.classes)}, cfg, src)
    builder = ShardBuilder(str(out), loc)
    pids = engine.build_shards(worker, tasks, builder, progress.clip, shard_done)

    outdir.remove_strays(out, {p.name for p in plans})
    failures = _failures(disc, [states[p.name] for p in plans], src)
    source = source or _SourceFacts()
    samples = outdir.write_outputs(out, disc.classes, plans, states, failures, options, cfg.spec.shape, loc,
                                   source.dataset_json())
    return ExtractResult(
        out=str(out), name=dataset, classes=list(disc.classes), samples=samples,
        failures=failures, failures_by_stage=outdir.count(f["stage"] for f in failures),
        skipped=dict(disc.skipped), notes=notes,
        num_clips=len(disc.clips), num_shards=len(plans), resumed_shards=len(kept),
        wall_time=0.0, max_failures=max_failures, engine=engine.name,
        worker_pids=pids, split_registry=source.split_registry,
        availability=source.availability.lines() if source.availability else [])


@dataclass
class _SourceFacts:
    """What dataset.json says about the raw data beyond the options: the published split it
    used and the download's availability (not options: a resumed run may see them change)."""

    split_registry: dict | None = None
    availability: Availability | None = None

    def dataset_json(self) -> dict:
        facts: dict = {"split_registry": self.split_registry}
        if self.availability is not None:
            facts["availability"] = self.availability.to_dict()
        return facts


def _source_facts(dataset: str, src: Path, split_files: list, split_by, seed: int,
                  requested: str | None) -> _SourceFacts:
    from . import splits
    from .download.status import read_availability

    match = splits.resolve(dataset, requested, split_files, src=src, split_by=split_by, seed=seed)
    try:
        availability = read_availability(src)
    except ValueError as e:
        raise DatasetLayoutError(str(e)) from None
    if availability is not None and availability.dataset != dataset:
        raise DatasetLayoutError(f"{src}: its availability.json is a {availability.dataset} download, "
                                 f"not {dataset}")
    return _SourceFacts(match.record() if match else None, availability)


def _finished_shards(out: Path, plans: list[shardlib.ShardPlan], loc: S3Location | None, retry_failed: bool,
                     emit: OnEvent, total: int) -> tuple[dict[str, outdir.ShardState], set[str]]:
    """The shards of ``plans`` a killed run finished, to keep (name -> state), and the names of
    those that are finished but worth extracting again (``_worth_retrying``)."""
    kept, checked = {}, 0
    for p in plans:         # hashes every shard a killed run left: minutes for a large output
        if (st := outdir.finished_state(out, p, loc)) is not None:
            kept[p.name] = st
        checked += len(p.clips)
        emit(ExtractEvent("check", checked, 0, total, shard=p.name))
    retried = {n for n, s in kept.items() if _worth_retrying(s, retry_failed)}
    return {n: s for n, s in kept.items() if n not in retried}, retried


def _worth_retrying(st: outdir.ShardState, retry_failed: bool) -> bool:
    """A kept shard is redone when one of its clips failed for a missing, empty or unreadable
    file (it may be there now), or when any clip failed, with ``retry_failed``."""
    return bool(st.retry or (retry_failed and st.failures))


class _Progress:
    def __init__(self, emit: OnEvent, total: int):
        self.emit, self.total, self.done, self.failed = emit, total, 0, 0

    def add(self, done: int, failed: int) -> None:
        self.done += done
        self.failed += failed

    def event(self, kind: str, **kw) -> None:
        self.emit(ExtractEvent(kind, self.done, self.failed, self.total, **kw))

    def clip(self, shard: str, key: str, stage: str | None, error: str | None) -> None:
        self.add(1, stage is not None)
        self.event("clip" if stage is None else "clip_failed", shard=shard, key=key,
                   stage=stage, error=error)


def _adapter(name: str):
    from . import datasets
    return datasets.get(name)


def _nothing_found(src: Path, adapter, disc: Discovery) -> str:
    seen = [f"{n} {why}" for why, n in disc.skipped.items() if n]
    seen += [f"{sum(1 for p in disc.problems if p.stage == st)} {st}"
             for st in sorted({p.stage for p in disc.problems})]
    return (f"{src}: no clips to extract for {adapter.name} ({', '.join(seen) or 'nothing found'}); "
            f"expected layout: {adapter.layout}")


def _options(dataset: str, cfg: ExtractConfig, split_files: list, split_by: str | None, seed: int) -> dict:
    """The options an output is made with (``outdir``'s record, dataset.json's ``name``, ``config``
    and ``tool_version``): ``dataset`` (the canonical spelling), ``cfg``, and, as the config's
    ``extra``, the split options discovery is given."""
    splits = {"split_files": _split_file_records(split_files), "split_by": split_by, "seed": seed}
    return {"name": dataset, "config": {**cfg.to_dict(), "extra": splits}, "tool_version": tool_version()}


def _split_file_records(split_files: list) -> list[dict]:
    """Split files by name and content hash (not path: the output must not depend on where
    the raw data lives)."""
    import hashlib

    from .datasets.splitfiles import infer_split, normalize
    records = []
    for split, path in normalize(split_files):
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read split file: {e.strerror or e}") from None
        records.append({"split": split or infer_split(path), "name": Path(path).name, "sha256": digest})
    return records


def _failures(disc: Discovery, states: list[outdir.ShardState], src: Path) -> list[dict]:
    rows = [failure(p.key, p.source, p.stage, p.error, src) for p in disc.problems]
    rows += [f for st in states for f in st.failures]          # made relative by the worker
    return sorted(rows, key=lambda r: (r["key"], r["stage"], r["source"], r["error"]))


def _s3_location(remote: str, s3_endpoint: str | None) -> S3Location:
    from .storage import S3Location, open_location
    from .upload import check_bucket
    loc = open_location(remote, s3_endpoint=s3_endpoint)
    assert isinstance(loc, S3Location)      # the URL starts with s3://
    check_bucket(loc, offer_create=False)
    return loc


def _uploader(loc: S3Location | None, staging: Path) -> contextlib.AbstractContextManager[ShardUploader | None]:
    """The run's shard uploader for an s3:// output; none (no threads) for a local one."""
    if loc is None:
        return contextlib.nullcontext()
    from .upload import ShardUploader
    return ShardUploader(loc, staging)
