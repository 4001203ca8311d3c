"""`extract`: raw dataset → WebDataset shards + manifests (SPEC §3–4), resumable.

Pipeline: adapter.discover → plan shards (membership from sorted keys only) → one shard per
task in a process pool → each worker writes its shard atomically and then a small state file
→ the parent writes failures.jsonl, the sample index, the manifests and dataset.json last.

Resume: ``OUT/.avprep-state/options.json`` records the options at the start of a run, and
``OUT/.avprep-state/<shard>.json`` each finished shard (sha256, samples, failures). A re-run
keeps the shards whose bytes still match their state file and redoes the rest, so a run that
was killed at any moment ends byte-identical to one that was not. ``.avprep-state/lock``
keeps a second extraction out of the same folder.

Durability costs one fsync per shard (its data, before the rename) plus a few per run: a
state file is only a claim checked against the shard's sha256, so it needs none, and one
directory fsync before dataset.json makes every rename of the run durable at once.

Failure records name files relative to ``src`` (also inside error messages), so the output
does not depend on where the raw data lives.

Workers are forkserver processes (spawn where there is none): scripts that call ``extract``
with more than one worker need the usual ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import queue as queue_mod
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from . import shardformat
from . import shards as shardlib
from .config import ExtractConfig
from .datasets._base import Discovery
from .errors import AvprepError, ClipError, ConfigError, DatasetLayoutError
from .shardformat import FRAME, INDEX_FIELDS

STATE_DIR = ".avprep-state"
# Discovery problems that count against --max-failures ("missing" does not: VGGSound always
# misses videos, SPEC §2).
_COUNTED_PROBLEMS = {"label", "duplicate"}


@dataclass(frozen=True)
class ExtractEvent:
    """Progress report. ``kind``: "start", "clip", "clip_failed", "shard", "resumed", "finish".

    ``done``/``failed``/``total`` count clips over the whole run (resumed shards included), so
    a progress bar can use them directly; ``key``/``stage``/``error`` describe one clip and
    ``shard`` the shard an event belongs to."""

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
            split_files: Iterable = (), split_by: str | None = None, seed: int = 0,
            overwrite: bool = False, max_failures: float = 0.05, on_event: OnEvent | None = None,
            staging: str | Path | None = None, s3_endpoint: str | None = None) -> ExtractResult:
    """Extract dataset ``dataset`` from the raw folder ``src`` into ``out`` (a folder, or an
    ``s3://bucket/prefix`` reached through a local ``staging`` folder, uploaded at the end).

    Same inputs and options give byte-identical output whatever ``workers`` is: shard
    membership is fixed from sorted keys before decoding. Clips that fail are listed in
    failures.jsonl and never stop the run; ``result.ok`` is False when the failed fraction
    exceeds ``max_failures``. Re-running after an interruption resumes (finished shards are
    kept when their sha256 still matches); ``overwrite`` starts over. Raises ConfigError
    when ``out`` holds an extraction made with other options, DatasetLayoutError from the
    adapter, StorageError from the upload. ``workers`` defaults to all cores; 1 runs in
    this process. ``staging`` defaults to a fixed folder per URL under the temp dir (kept,
    so an interrupted run resumes; the upload skips its dot-folder of resume state).
    """
    t0 = time.monotonic()
    emit = on_event or (lambda e: None)
    remote = str(out) if str(out).startswith("s3://") else None
    out = Path(staging or _staging_dir(remote)) if remote else Path(out)
    src = Path(src)
    adapter = _adapter(dataset)
    dataset = adapter.NAME       # the canonical spelling goes into dataset.json
    split_files = list(split_files)
    cfg = replace(cfg, extra={**cfg.extra, "split_files": _split_file_records(split_files),
                              "split_by": split_by, "seed": seed})
    options = {"name": dataset, "config": cfg.to_dict(), "tool_version": tool_version()}
    if not overwrite:
        _check_options(out, options)
    # discovery before touching ``out``: a layout or option error must leave nothing behind
    disc: Discovery = adapter.discover(src, split_files=split_files, split_by=split_by, seed=seed)
    if not disc.clips:
        raise DatasetLayoutError(_nothing_found(src, adapter, disc))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    with _exclusive(out):
        _prepare_out(out, options, overwrite)
        result = _extract_into(src, out, adapter.NAME, disc, cfg, options, workers, emit, max_failures)
    result.out = remote or str(out)
    if remote:
        _upload(out, remote, s3_endpoint)
    result.wall_time = time.monotonic() - t0
    emit(ExtractEvent("finish", result.num_clips, result.num_clips - result.num_samples,
                      result.num_clips))
    return result


def _extract_into(src: Path, out: Path, dataset: str, disc: Discovery, cfg: ExtractConfig,
                  options: dict, workers: int | None, emit: OnEvent,
                  max_failures: float) -> ExtractResult:
    """Plan, keep the intact shards, extract the rest, then write the indexes (``out`` locked)."""
    plans = shardlib.plan_shards(disc.clips, cfg)
    done_states = {p.name: s for p in plans if (s := _finished_state(out, p)) is not None}
    todo = [p for p in plans if p.name not in done_states]
    if todo:
        (out / "dataset.json").unlink(missing_ok=True)   # it marks a complete output

    progress = _Progress(emit, total=len(disc.clips))
    progress.event("start")
    for p in plans:
        if p.name in done_states:
            st = done_states[p.name]
            progress.add(len(p.clips), len(st["failures"]))
            progress.event("resumed", shard=p.name)
    label_index = {c: i for i, c in enumerate(disc.classes)}
    tasks = [(p, label_index, cfg, src, out, out / STATE_DIR) for p in todo]
    states = dict(done_states)
    for st in _run_tasks(tasks, workers, progress):
        states[st["name"]] = st
        progress.event("shard", shard=st["name"])

    _remove_strays(out, {p.name for p in plans})
    failures = _failures(disc, [states[p.name] for p in plans], src)
    samples = _write_outputs(out, disc, plans, states, failures, options)
    return ExtractResult(
        out=str(out), name=dataset, classes=list(disc.classes), samples=samples,
        failures=failures, failures_by_stage=_count(f["stage"] for f in failures),
        skipped=dict(disc.skipped), notes=list(disc.notes),
        num_clips=len(disc.clips), num_shards=len(plans), resumed_shards=len(done_states),
        wall_time=0.0, max_failures=max_failures)


# ---------------------------------------------------------------- options, output folder

def tool_version() -> str:
    try:
        from importlib.metadata import version
        return version("avprep-ogmge")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


def _adapter(name: str):
    from . import datasets
    return datasets.get(name)


def _nothing_found(src: Path, adapter, disc: Discovery) -> str:
    seen = [f"{n} {why}" for why, n in disc.skipped.items() if n]
    seen += [f"{sum(1 for p in disc.problems if p.stage == st)} {st}"
             for st in sorted({p.stage for p in disc.problems})]
    return (f"{src}: no clips to extract for {adapter.NAME} ({', '.join(seen) or 'nothing found'}); "
            f"expected layout: {adapter.LAYOUT}")


def _split_file_records(split_files: list) -> list[dict]:
    """Split files by name and content hash (not path: the output must not depend on where
    the raw data lives)."""
    from .datasets.splitfiles import infer_split, normalize
    records = []
    for split, path in normalize(split_files):
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read split file: {e.strerror or e}") from None
        records.append({"split": split or infer_split(path), "name": Path(path).name, "sha256": digest})
    return records


def _staging_dir(remote: str) -> Path:
    """A stable local folder per remote prefix, so an interrupted upload run can resume."""
    digest = hashlib.sha256(remote.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"avprep-staging-{digest}"


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _stored_options(out: Path) -> dict | None:
    for path in (out / STATE_DIR / "options.json", out / "dataset.json"):
        if path.exists():
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
                return {k: d.get(k) for k in ("name", "config", "tool_version")}
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path}: unreadable ({e}); use --overwrite to start over") from None
    return None


def _ours(path: Path) -> bool:
    n = path.name
    return (n in ("dataset.json", "failures.jsonl", "README.md") or n.endswith(".tar")
            or n.endswith(".manifest.json") or n.endswith(".samples.jsonl") or n.endswith(".wids.json")
            or shardlib.TMP_MARK in n)


def _check_options(out: Path, options: dict) -> None:
    """Refuse to mix two sets of options (or unknown shards) in one folder; reads only."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    stored = _stored_options(out)
    if stored is None and any(out.glob("*.tar")):
        raise ConfigError(f"{out}: holds shards this tool did not record; use --overwrite to start over")
    if stored is not None and stored != options:
        old, new = _flatten(stored), _flatten(options)
        diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        raise ConfigError(f"{out}: was extracted with other options ({'; '.join(diffs[:5])}); "
                          "use the same options to resume, or --overwrite to start over")


@contextmanager
def _exclusive(out: Path):
    """One extraction per folder at a time (a second one would delete the first's temporary
    files). An advisory lock: the kernel drops it when the holder dies, even by kill -9."""
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    with open(out / STATE_DIR / "lock", "a+b") as f:
        try:
            import fcntl
        except ImportError:      # not POSIX: no lock
            yield
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{out}: another extraction is writing into this folder") from None
        yield


def _prepare_out(out: Path, options: dict, overwrite: bool) -> None:
    """Create ``out`` (emptied of our files with ``overwrite``), drop killed writers' leftovers,
    record ``options`` for later resumes."""
    state = out / STATE_DIR
    if overwrite:
        for p in [*filter(_ours, out.iterdir()), *state.iterdir()]:
            if p.name != "lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    for folder in (out, state):
        for p in folder.glob(f"*{shardlib.TMP_MARK}*"):
            p.unlink(missing_ok=True)
    if not (state / "options.json").exists():
        shardlib.atomic_write_bytes(state / "options.json", _json_bytes(options, indent=1))


def _finished_state(out: Path, plan: shardlib.ShardPlan) -> dict | None:
    """The state of ``plan``'s shard when it is complete and intact, else None."""
    path = out / STATE_DIR / f"{plan.name}.json"
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if st.get("keys") != [c.key for c in plan.clips]:
        return None
    if any(f not in r for r in st.get("samples", []) for f in INDEX_FIELDS):
        return None     # written before the sample index existed: redo it
    shard = out / plan.name
    if st.get("sha256") is None:      # every clip failed: no file expected
        return None if shard.exists() else st
    try:
        if shard.stat().st_size != st["bytes"] or shardlib.sha256_file(shard) != st["sha256"]:
            return None
    except OSError:
        return None
    return st


def _remove_strays(out: Path, planned: set[str]) -> None:
    """Shards (and their state) from an earlier plan that the current one does not have."""
    for p in out.glob("*.tar"):
        if p.name not in planned:
            p.unlink()
    for p in (out / STATE_DIR).glob("*.tar.json"):
        if p.name[:-len(".json")] not in planned:
            p.unlink()
    splits = {name.rsplit("-", 1)[0] for name in planned}
    for suffix in (".manifest.json", ".samples.jsonl", ".wids.json"):
        for p in out.glob(f"*{suffix}"):
            if p.name[:-len(suffix)] not in splits:
                p.unlink()


# ---------------------------------------------------------------- workers

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


_EVENTS = None     # worker side: queue of clip events to the parent


def _worker_init(events) -> None:
    global _EVENTS
    _EVENTS = events


def _run_shard(task, report=None) -> dict:
    """Extract every clip of one shard, write it, record its state. Never raises for a clip:
    per-clip errors come back as values."""
    plan, label_index, cfg, src, out, state = task
    report = report or (lambda *a: _EVENTS.put(a))
    try:
        return _write_shard_of(plan, label_index, cfg, src, out, state, report)
    except OSError as e:        # disk full, permissions: the run's problem, said plainly
        raise AvprepError(f"{out / plan.name}: cannot write: {e.strerror or e}") from None


def _write_shard_of(plan, label_index, cfg, src, out, state, report) -> dict:
    from .sample import extract_clip, relative_source
    records, failures = [], []
    with shardlib.ShardWriter(out / plan.name) as writer:
        for clip in plan.clips:
            source = relative_source(clip.video, src)
            try:
                members = extract_clip(clip, label_index[clip.label], plan.split, cfg, src)
            except ClipError as e:
                failures.append(_failure(clip.key, source, e.stage, str(e), src))
            except Exception as e:  # a bug or an exotic decoder error: the clip's, not the run's
                failures.append(_failure(clip.key, source, "internal",
                                         f"{source}: {type(e).__name__}: {e}", src))
            else:
                span = writer.add(clip.key, members)    # offset, length, crc32 for the sample index
                records.append({"key": clip.key, "label": clip.label,
                                "label_index": label_index[clip.label], "shard": plan.name,
                                "source": source, "duration": json.loads(members["json"])["duration"],
                                "n_frames": sum(1 for m in members if FRAME.fullmatch(m)), **span})
            failed = failures[-1] if failures and failures[-1]["key"] == clip.key else {}
            report(plan.name, clip.key, failed.get("stage"), failed.get("error"))
        # no file for a shard of failures only; the parent fsyncs the folder once for all renames
        written = writer.commit(sync_dir=False) if records else None
    st = {"name": plan.name, "split": plan.split, "keys": [c.key for c in plan.clips],
          "sha256": written and written.sha256, "bytes": written and written.bytes,
          "num_samples": len(records), "samples": records, "failures": failures}
    # no fsync: after a crash a lost or torn state file only means the shard is redone
    shardlib.atomic_write_bytes(state / f"{plan.name}.json", _json_bytes(st), durable=False)
    return st


def _failure(key: str, source: str, stage: str, error: str, src: Path) -> dict:
    """A failures.jsonl line; ``source`` is already relative to ``src``, ``error`` is made so."""
    return {"key": key, "source": source, "stage": stage, "error": _relative_text(error, src)}


def _relative_text(text: str, src) -> str:
    """``text`` with the raw folder ``src`` taken out of the paths it mentions: ``SRC/a/b.mp4``
    becomes ``a/b.mp4`` and ``SRC`` alone ``<src>``. Only whole path components match (``src``
    "raw" leaves "data/raw/x" alone), so the message stays true wherever the raw data lives."""
    root = re.escape(str(src))
    text = re.sub(rf"(?<![\w./-]){root}/+", "", text)
    return re.sub(rf"(?<![\w./-]){root}(?![\w/-]|\.\w)", "<src>", text)


def _cores() -> int:
    """Cores this process may use (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _mp_context():
    # forkserver: workers fork from a clean server that already imported the decoders (fast
    # start), and never from a parent that may hold torch/OpenMP threads (fork would be unsafe).
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["avprep.sample"])
        return ctx
    return mp.get_context("spawn")


def _run_tasks(tasks: list, workers: int | None, progress: _Progress):
    """Yield each task's shard state as it completes (completion order)."""
    if not tasks:
        return
    workers = max(1, min(workers or _cores(), len(tasks)))
    if workers == 1:
        for task in tasks:
            yield _run_shard(task, progress.clip)
        return
    ctx = _mp_context()
    events = ctx.Queue()
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(events,))
    try:
        names = {pool.submit(_run_shard, t): t[0].name for t in tasks}
        pending = set(names)
        while pending:
            finished, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
            _drain(events, progress)
            for fut in finished:
                try:
                    yield fut.result()
                except cf.process.BrokenProcessPool:
                    raise AvprepError("a worker process died (out of memory?); finished shards are "
                                      "kept, re-run the same command to resume") from None
                except AvprepError:
                    raise
                except Exception as e:      # not a clip's fault: the run cannot go on
                    raise AvprepError(f"{names[fut]}: {type(e).__name__}: {e}") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    _drain(events, progress)


def _drain(events, progress: _Progress) -> None:
    while True:
        try:
            progress.clip(*events.get_nowait())
        except queue_mod.Empty:
            return


# ---------------------------------------------------------------- outputs

def _json_bytes(obj, indent: int | None = None) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=indent, ensure_ascii=False,
                       separators=(",", ": ") if indent else (",", ":")) + "\n").encode("utf-8")


def _count(items: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for x in items:
        counts[x] = counts.get(x, 0) + 1
    return dict(sorted(counts.items()))


def _failures(disc: Discovery, states: list[dict], src: Path) -> list[dict]:
    rows = [_failure(p.key, p.source, p.stage, p.error, src) for p in disc.problems]
    rows += [f for st in states for f in st["failures"]]          # made relative by the worker
    return sorted(rows, key=lambda r: (r["key"], r["stage"], r["source"], r["error"]))


def _write_outputs(out: Path, disc: Discovery, plans, states, failures, options) -> dict:
    """failures.jsonl, then per split the sample index and manifest, dataset.json last.

    Each file is fsynced before its rename; one directory fsync before dataset.json makes the
    renames of the whole run (shards included) durable, so dataset.json never outlives them."""
    def write(path: Path, data: bytes) -> None:
        shardlib.atomic_write_bytes(path, data, sync_dir=False)

    write(out / "failures.jsonl", b"".join(_json_bytes(f) for f in failures))
    samples: dict[str, dict[str, int]] = {}
    manifests = {}
    for split in shardlib.split_order({p.split for p in plans}):
        sts = [states[p.name] for p in plans if p.split == split]
        index = shardformat.SampleIndex.from_records(split, [r for st in sts for r in st["samples"]])
        shards = [shardformat.ShardEntry(st["name"], st["num_samples"], st["bytes"], st["sha256"])
                  for st in sts if st["sha256"] is not None]
        manifests[split] = shardformat.write_split_files(out, split, index, shards, list(disc.classes), write)
        samples[split] = manifests[split].class_counts
    meta = shardformat.DatasetMeta.build(options, list(disc.classes), manifests,
                                         [r for st in states.values() for r in st["samples"]],
                                         num_failures=len(failures))
    shardformat.write_card(out, meta, manifests, write)
    shardlib.fsync_dir(out)
    shardlib.atomic_write_bytes(out / "dataset.json", meta.to_json())
    return samples


def _upload(local: Path, remote: str, s3_endpoint: str | None) -> None:
    from .storage import upload_folder
    upload_folder(local, remote, s3_endpoint=s3_endpoint)    # skips .avprep-state; manifests and dataset.json last
