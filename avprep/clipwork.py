"""The extraction's unit of work (a short run of clips of one shard) and the shard assembler.

Workers turn a ``ClipTask`` into a ``TaskResult``: per clip, its sample already encoded as
tar bytes (headers, payloads, padding; ``shards.encode_sample``) or a failure value (never an
exception for a clip's own fault). The ``Assembler`` in the parent appends the results to
shards in plan order, whatever order they finish in, so a shard's bytes are fixed by the
plan: identical for every engine and worker count. Its share per clip is one write and one
hash update (its cost bounds a cluster run). Tasks are small (a few clips), so N workers keep
N cores busy even on a one-shard split and the tail balances.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import outdir, shardformat
from . import shards as shardlib
from .config import ExtractConfig
from .datasets._base import Clip, safe_text
from .errors import ClipError

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
                  "duration": json.loads(members["json"])["duration"],
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


class Assembler:
    """Writes task results into shards in task (= plan) order; holds back early finishers.

    ``on_clip(shard, key, stage, error)`` is called per clip and ``on_shard(state)`` per
    finished shard, both in plan order, so progress events are the same under every engine."""

    def __init__(self, out: Path, tasks: list[ClipTask],
                 on_clip: Callable[[str, str, str | None, str | None], None],
                 on_shard: Callable[[outdir.ShardState], None]):
        self.out, self.tasks, self.on_clip, self.on_shard = out, tasks, on_clip, on_shard
        self.waiting: dict[int, TaskResult] = {}
        self.next = 0
        self.writer: shardlib.ShardWriter | None = None
        self.samples: list[dict] = []
        self.failures: list[dict] = []
        self.keys: list[str] = []
        self.retry: list[str] = []
        self.pids: set[int] = set()

    def add(self, i: int, result: TaskResult) -> None:
        self.pids.add(result.pid)
        self.waiting[i] = result
        while self.next in self.waiting:
            self._consume(self.tasks[self.next], self.waiting.pop(self.next))
            self.next += 1

    def _consume(self, task: ClipTask, result: TaskResult) -> None:
        path = self.out / task.shard
        for outcome in result.clips:
            self.keys.append(outcome.key)
            if isinstance(outcome, ClipDone):
                with outdir.writing(path):
                    if self.writer is None:
                        self.writer = shardlib.ShardWriter(path)
                    span = self.writer.add_encoded(outcome.sample)  # offset, length, crc32
                self.samples.append({**outcome.record, **span})
                self.on_clip(task.shard, outcome.key, None, None)
            else:
                self.failures.append(outcome.failure)
                if outcome.retryable:
                    self.retry.append(outcome.key)
                self.on_clip(task.shard, outcome.key, outcome.failure["stage"], outcome.failure["error"])
        if task.last:
            self._finish(task)

    def _finish(self, task: ClipTask) -> None:
        written = None
        if self.writer is not None:       # no file for a shard of failures only
            with outdir.writing(self.writer.path):
                # the folder is fsynced once for all renames, before dataset.json
                written = self.writer.commit(sync_dir=False)
            self.writer = None
        st = outdir.ShardState(task.shard, task.split, self.keys, written.sha256 if written else None,
                               written.bytes if written else None, len(self.samples), self.samples,
                               self.failures, self.retry)
        outdir.save_state(self.out, st)
        self.samples, self.failures, self.keys, self.retry = [], [], [], []
        self.on_shard(st)

    def close(self) -> None:
        """Drop an unfinished shard's temp file (the run stopped)."""
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
