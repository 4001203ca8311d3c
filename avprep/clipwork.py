"""The extraction's unit of work (a short run of clips of one shard) and the shard writers.

Workers turn a ``ClipTask`` into a ``TaskResult``: per clip, its sample already encoded as
tar bytes (headers, payloads, padding; ``shards.encode_sample``) or a failure value (never an
exception for a clip's own fault). ``ShardBuild`` appends one shard's outcomes in plan order,
whatever order the tasks finished in, so a shard's bytes are fixed by the plan: identical for
every engine and worker count. Two owners drive it:

- ``Assembler``, in the extracting process (serial and local engines): results stream in,
  each is written as soon as the ones before it are, and clip events follow each clip. Its
  share per clip is one write and one hash update, so on a cluster it would bound the run.
- ``ShardBuilder``, a picklable callable run as one task per shard (Ray): it gets the shard's
  task results on its node, writes the shard into the output folder (storage every node
  sees) or, for an s3:// output, into a temp folder of its node that it uploads and deletes,
  and returns only the ``ShardState`` (``BuiltShard``). The driver derives the clip events
  from the state (``clip_reports``). The trade-off: a builder holds its shard's samples in
  memory (about a shard's size), and clip events arrive a shard at a time.

Tasks are small (a few clips), so N workers keep N cores busy even on a one-shard split and
the tail balances.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import outdir, shardformat
from . import shards as shardlib
from .config import ExtractConfig
from .datasets._base import Clip, safe_text
from .errors import ClipError

if TYPE_CHECKING:
    from .storage import S3Location

# a task is at most this many clips: enough to amortise a task's overhead (~1 ms on Ray)
MAX_TASK_CLIPS = 8


@dataclass(frozen=True)
class ClipTask:
    """Consecutive clips of one shard. ``last``: the shard's final task."""

    shard: str
    split: str
    clips: tuple[Clip, ...]
    last: bool

    @property
    def label(self) -> str:
        return f"{self.shard} ({self.clips[0].key}..{self.clips[-1].key})"


@dataclass(frozen=True)
class ClipDone:
    key: str
    sample: shardlib.EncodedSample   # its tar bytes, encoded by the worker
    record: dict                     # the sample index line, but for its place in the shard


@dataclass(frozen=True)
class ClipFailed:
    key: str
    failure: dict                  # the failures.jsonl line
    retryable: bool = False        # missing, empty or unreadable file: a rerun tries again


ClipOutcome = ClipDone | ClipFailed


@dataclass(frozen=True)
class TaskResult:
    clips: tuple[ClipOutcome, ...]
    pid: int                       # the process that did the work


def make_tasks(plans: list[shardlib.ShardPlan], workers: int) -> list[ClipTask]:
    """Cut each shard into runs of consecutive clips, in plan order. A run is a quarter of
    each worker's share of the clips still to come, at most ``MAX_TASK_CLIPS`` and at least
    one: long runs while there is much left (few tasks, little overhead), single clips at the
    end, so no worker idles long while another finishes (guided self-scheduling)."""
    remaining = sum(len(p.clips) for p in plans)
    tasks = []
    for p in plans:
        start = 0
        while start < len(p.clips):
            size = max(1, min(MAX_TASK_CLIPS, -(-remaining // (4 * max(1, workers)))))
            clips = p.clips[start:start + size]
            start += len(clips)
            remaining -= len(clips)
            tasks.append(ClipTask(p.name, p.split, clips, start == len(p.clips)))
    return tasks


@dataclass(frozen=True)
class ClipWorker:
    """The picklable callable every engine runs: ``ClipTask`` → ``TaskResult``."""

    label_index: dict[str, int]
    cfg: ExtractConfig
    src: Path

    def __call__(self, task: ClipTask) -> TaskResult:
        return TaskResult(tuple(self.clip(c, task.split, task.shard) for c in task.clips), os.getpid())

    def clip(self, clip: Clip, split: str, shard: str) -> ClipOutcome:
        from .sample import extract_clip, relative_source
        source = safe_text(relative_source(clip.video, self.src))
        try:
            members = extract_clip(clip, self.label_index[clip.label], split, self.cfg, self.src)
        except ClipError as e:
            return ClipFailed(clip.key, failure(clip.key, source, e.stage, str(e), self.src),
                              e.retryable)
        except Exception as e:  # a bug or an exotic decoder error: the clip's, not the run's
            return ClipFailed(clip.key, failure(clip.key, source, "internal",
                                                f"{source}: {type(e).__name__}: {e}", self.src))
        record = {"key": clip.key, "label": clip.label, "label_index": self.label_index[clip.label],
                  "shard": shard, "source": source,
                  "duration": json.loads(members[shardformat.JSON])["duration"],
                  "n_frames": sum(1 for m in members if shardformat.FRAME.fullmatch(m))}
        return ClipDone(clip.key, shardlib.encode_sample(clip.key, members), record)


def failure(key: str, source: str, stage: str, error: str, src) -> dict:
    """A failures.jsonl line; ``source`` is already relative to ``src``, ``error`` is made so."""
    return {"key": key, "source": safe_text(source), "stage": stage,
            "error": safe_text(relative_text(error, src))}


def relative_text(text: str, src) -> str:
    """``text`` with the raw folder ``src`` taken out of the paths it mentions: ``SRC/a/b.mp4``
    becomes ``a/b.mp4`` and ``SRC`` alone ``<src>``. Only whole path components match (``src``
    "raw" leaves "data/raw/x" alone), so the message stays true wherever the raw data lives."""
    root = re.escape(str(src))
    text = re.sub(rf"(?<![\w./-]){root}/+", "", text)
    return re.sub(rf"(?<![\w./-]){root}(?![\w/-]|\.\w)", "<src>", text)


def report(outcome: ClipOutcome) -> tuple[str, str | None, str | None]:
    """``(key, stage, error)`` of a clip event: stage and error None for a written sample."""
    if isinstance(outcome, ClipDone):
        return outcome.key, None, None
    return outcome.key, outcome.failure["stage"], outcome.failure["error"]


def clip_reports(st: outdir.ShardState) -> Iterator[tuple[str, str | None, str | None]]:
    """The ``report`` of each of a finished shard's clips, in plan order, from its state alone
    (what the driver gets back from a ``ShardBuilder``)."""
    failed = {f["key"]: f for f in st.failures}
    for key in st.keys:
        f = failed.get(key)
        yield (key, None, None) if f is None else (key, f["stage"], f["error"])


class ShardBuild:
    """One shard being written at ``path``: outcomes appended in plan order (``ShardWriter``:
    a temp file, fsynced and renamed on ``commit``), its index lines, failures and keys kept
    for its ``ShardState``. No file is made for a shard whose clips all failed."""

    def __init__(self, path: Path, split: str):
        self.path, self.split = path, split
        self.writer: shardlib.ShardWriter | None = None
        self.samples: list[dict] = []
        self.failures: list[dict] = []
        self.keys: list[str] = []
        self.retry: list[str] = []

    def add(self, outcome: ClipOutcome) -> None:
        self.keys.append(outcome.key)
        if isinstance(outcome, ClipDone):
            with outdir.writing(self.path):
                if self.writer is None:
                    self.writer = shardlib.ShardWriter(self.path)
                span = self.writer.add_encoded(outcome.sample)  # offset, length, crc32
            self.samples.append({**outcome.record, **span})
        else:
            self.failures.append(outcome.failure)
            if outcome.retryable:
                self.retry.append(outcome.key)

    def commit(self) -> outdir.ShardState:
        written = None
        if self.writer is not None:
            with outdir.writing(self.path):
                # the folder is fsynced once for all renames, before dataset.json
                written = self.writer.commit(sync_dir=False)
            self.writer = None
        return outdir.ShardState(self.path.name, self.split, self.keys,
                                 written.sha256 if written else None, written.bytes if written else None,
                                 len(self.samples), self.samples, self.failures, self.retry)

    def abort(self) -> None:
        """Drop the temp file of a shard that will not be committed."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


class Assembler:
    """Writes task results into shards in task (= plan) order, in this process; holds back
    early finishers.

    ``on_clip(shard, key, stage, error)`` is called per clip as soon as it is written and
    ``on_shard(state)`` per committed shard, both in plan order, so progress events are the
    same under every engine. The caller saves the state (``outdir.save_state``)."""

    def __init__(self, out: Path, tasks: list[ClipTask],
                 on_clip: Callable[[str, str, str | None, str | None], None],
                 on_shard: Callable[[outdir.ShardState], None]):
        self.out, self.tasks, self.on_clip, self.on_shard = out, tasks, on_clip, on_shard
        self.waiting: dict[int, TaskResult] = {}
        self.next = 0
        self.shard: ShardBuild | None = None
        self.pids: set[int] = set()

    def add(self, i: int, result: TaskResult) -> None:
        self.pids.add(result.pid)
        self.waiting[i] = result
        while self.next in self.waiting:
            self._consume(self.tasks[self.next], self.waiting.pop(self.next))
            self.next += 1

    def _consume(self, task: ClipTask, result: TaskResult) -> None:
        if self.shard is None:
            self.shard = ShardBuild(self.out / task.shard, task.split)
        for outcome in result.clips:
            self.shard.add(outcome)
            self.on_clip(task.shard, *report(outcome))
        if task.last:
            st, self.shard = self.shard.commit(), None
            self.on_shard(st)

    def close(self) -> None:
        """Drop an unfinished shard's temp file (the run stopped)."""
        if self.shard is not None:
            self.shard.abort()
            self.shard = None


@dataclass(frozen=True)
class BuiltShard:
    """What a ``ShardBuilder`` sends back: small, whatever the shard's size."""

    state: outdir.ShardState
    pids: frozenset[int]           # the processes that extracted its clips
    writer: int                    # the process that wrote it


@dataclass(frozen=True)
class ShardBuilder:
    """The picklable callable that writes one whole shard where it runs (a Ray task):
    ``(shard, split, its tasks' results in plan order)`` → ``BuiltShard``.

    Without ``bucket`` the shard goes into the folder ``out``, which must be storage every node
    sees (on one machine, the output folder itself). With ``bucket`` (the output's
    ``S3Location``: it pickles without its client, which each node makes from its own
    environment's credentials) it is written in a temp folder of the node, uploaded with
    ``S3Location.put_file`` and deleted: the shard then exists only in the bucket
    (``ShardState.in_bucket``). The state is saved by the driver. A builder killed mid-write
    leaves its ``.tmp-<pid>`` file (in ``out``: removed by ``outdir.remove_strays``; in the
    node's temp folder: left to the OS)."""

    out: str
    bucket: S3Location | None = None

    def __call__(self, shard: str, split: str, results: Iterable[TaskResult]) -> BuiltShard:
        if self.bucket is None:
            return self._write(Path(self.out) / shard, split, results)
        with tempfile.TemporaryDirectory(prefix="avprep-shard-") as tmp:
            built = self._write(Path(tmp) / shard, split, results)
            if built.state.sha256 is None:          # every clip failed: nothing to send
                return built
            self.bucket.put_file(shard, Path(tmp) / shard)
        return replace(built, state=replace(built.state, in_bucket=True))

    @staticmethod
    def _write(path: Path, split: str, results: Iterable[TaskResult]) -> BuiltShard:
        build, pids = ShardBuild(path, split), set()
        try:
            for result in results:
                pids.add(result.pid)
                for outcome in result.clips:
                    build.add(outcome)
            return BuiltShard(build.commit(), frozenset(pids), os.getpid())
        finally:
            build.abort()           # a no-op once committed
