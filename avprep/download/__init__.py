"""`download`: a published clip list → the raw layout ``avprep extract`` reads (README: Getting
the corpora), img2dataset style: the dataset's adapter turns the list into ``RemoteClip``s
(``Adapter.download``), a bounded pool of connections runs the picklable ``ClipFetcher`` on
them with starts spaced by a rate limit, and every outcome comes back as a ``ClipStatus`` value
that is appended to ``download.jsonl`` as it arrives (``status``).

Resumable and idempotent: a clip is in the layout only once complete (written in the hidden
``.avprep-download/tmp``, checked, renamed), so a rerun keeps every file it finds, skips clips
whose status is final (unavailable, private, removed, geo-blocked, too short, no audio; with
``retry_unavailable`` they are tried again) and fetches the rest. Each run ends by rewriting
``availability.json`` over the whole list.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import outdir
from ..errors import ConfigError
from .fetch import (
    OUTPUT_FORMAT,
    YOUTUBE,
    ClipFetcher,
    FetchSettings,
    FetchTask,
    classify,
    find_ffmpeg,
    import_yt_dlp,
)
from .status import (
    FINAL,
    OK,
    STATE_DIR,
    STATUSES,
    TMP_DIR,
    Availability,
    ClipStatus,
    StatusLog,
    read_availability,
    read_statuses,
    write_availability,
)

__all__ = ["download", "DownloadEvent", "DownloadResult", "RateLimiter", "Availability", "ClipStatus",
           "ClipFetcher", "FetchSettings", "FetchTask", "classify", "find_ffmpeg", "read_availability",
           "read_statuses", "OUTPUT_FORMAT", "YOUTUBE", "STATUSES", "FINAL"]


@dataclass(frozen=True)
class DownloadEvent:
    """Progress: ``kind`` "start" (``total`` clips to fetch this run), "clip" (one finished, its
    ``key``/``status``/``message``) or "finish"."""

    kind: str
    done: int
    total: int
    key: str | None = None
    status: str | None = None
    message: str | None = None


@dataclass
class DownloadResult:
    raw: str
    availability: Availability
    fetched: dict[str, int]             # this run's outcomes by status
    kept: int                           # clips found complete on disk
    skipped: int                        # clips with a final status, not tried again
    notes: list[str] = field(default_factory=list)
    wall_time: float = 0.0


class RateLimiter:
    """Spaces calls of ``wait`` at least ``1 / rate`` seconds apart (None or 0: no limit)."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / rate if rate else 0.0
        self.clock, self.sleep = clock, sleep
        self._next: float | None = None

    def wait(self) -> None:
        now = self.clock()
        if self._next is not None and now < self._next:
            self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


def download(dataset: str, lists: Iterable, raw, *, url_template: str = YOUTUBE, connections: int = 4,
             rate: float | None = 2.0, retries: int = 3, backoff: float = 2.0, timeout: float = 30.0,
             max_height: int = 360, format: str | None = None, ffmpeg: str | None = None,
             cookies: str | None = None, min_fraction: float = 0.5, retry_unavailable: bool = False,
             segments: Iterable = (), limit: int | None = None,
             on_event: Callable[[DownloadEvent], None] | None = None) -> DownloadResult:
    """Fetch the clips of ``lists`` (the dataset's published list files) into ``raw``.

    ``url_template`` makes each clip's URL from ``{id}`` (and ``{start}``, ``{end}``, ``{key}``);
    ``connections`` clips are fetched at once, starts at most ``rate`` per second; transient
    failures are retried ``retries`` times after ``backoff``, ``2*backoff``, ... seconds;
    ``timeout`` is how long a connection may stay silent. ``limit`` fetches at most that many
    clips this run. Raises ConfigError (no yt-dlp, no ffmpeg, a list the dataset cannot read,
    another download running into ``raw``), DatasetLayoutError for an unreadable list.
    """
    from .. import datasets, splits

    t0 = time.monotonic()
    emit = on_event or (lambda e: None)
    adapter = datasets.get(dataset)
    if adapter.download is None:
        choices = ", ".join(n for n, a in datasets.ADAPTERS.items() if a.download is not None)
        raise ConfigError(f"{adapter.name} is not downloaded from YouTube; `avprep download` knows {choices}")
    lists = [Path(p) for p in lists]
    if not lists:
        raise ConfigError("no --list given")
    for p in lists:
        if not p.is_file():
            raise ConfigError(f"{p}: list file not found")
    if connections < 1 or retries < 0 or not 0 < min_fraction <= 1:
        raise ConfigError("connections must be >= 1, retries >= 0 and min_fraction in (0, 1]")
    plan = adapter.download(lists, segments=[Path(p) for p in segments])
    settings = FetchSettings(url_template=url_template, ffmpeg=find_ffmpeg(ffmpeg), max_height=max_height,
                             format=format, timeout=timeout, retries=retries, backoff=backoff,
                             min_fraction=min_fraction, cookies=cookies)
    import_yt_dlp()
    raw = Path(raw)
    with outdir.exclusive(raw, STATE_DIR, "avprep download"):
        tmp_dir = raw / STATE_DIR / TMP_DIR
        shutil.rmtree(tmp_dir, ignore_errors=True)      # a killed run's partial files
        tmp_dir.mkdir(parents=True)
        _write_layout_files(raw, plan.files)
        statuses = read_statuses(raw)
        todo, kept, skipped = [], 0, 0
        with StatusLog(raw) as log:
            for clip in plan.clips:
                final = raw / clip.path
                last = statuses.get(clip.key)
                if final.is_file():         # only complete, checked files are ever renamed there
                    kept += 1
                    if last is None or last.status != OK:
                        statuses[clip.key] = ClipStatus(clip.key, OK, "found complete on disk")
                        log.append(statuses[clip.key])
                elif last is not None and last.status in FINAL and not retry_unavailable:
                    skipped += 1
                else:
                    todo.append(FetchTask(clip, str(final), str(tmp_dir)))
            todo = todo[:limit] if limit is not None else todo
            fetched = _run(ClipFetcher(settings), todo, connections, RateLimiter(rate), log, statuses, emit)
        # the list files themselves, else what they put in the layout (AVE's set files)
        registry = splits.identify(adapter.name, lists) or splits.identify(adapter.name, src=raw)
        lists_record = [{"name": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in lists]
        availability = Availability.build(adapter.name, plan.clips, statuses, lists_record,
                                          registry.record() if registry else None)
        write_availability(raw, availability)
        shutil.rmtree(raw / STATE_DIR / TMP_DIR, ignore_errors=True)
    notes = list(plan.notes) + [f"skipped {n} listed clip(s): {why}" for why, n in plan.skipped.items() if n]
    result = DownloadResult(str(raw), availability, fetched, kept, skipped, notes, time.monotonic() - t0)
    emit(DownloadEvent("finish", len(todo), len(todo)))
    return result


def _run(fetcher, todo: list[FetchTask], connections: int, limiter: RateLimiter, log: StatusLog,
         statuses: dict[str, ClipStatus], emit) -> dict[str, int]:
    """Fetch ``todo`` on ``connections`` threads (starts spaced by ``limiter``), recording each
    outcome as it arrives; returns the count per status."""
    emit(DownloadEvent("start", 0, len(todo)))
    counts: dict[str, int] = {}
    tasks = iter(todo)
    pool = cf.ThreadPoolExecutor(max_workers=connections, thread_name_prefix="avprep-download")
    pending: set[cf.Future] = set()

    def start_next() -> None:
        task = next(tasks, None)
        if task is not None:
            limiter.wait()
            pending.add(pool.submit(fetcher, task))

    try:
        for _ in range(connections):
            start_next()
        done = 0
        while pending:
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                pending.discard(future)
                st: ClipStatus = future.result()
                log.append(st)
                statuses[st.key] = st
                counts[st.status] = counts.get(st.status, 0) + 1
                done += 1
                emit(DownloadEvent("clip", done, len(todo), st.key, st.status, st.message))
                start_next()
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)
    return {s: counts[s] for s in STATUSES if s in counts}


def _write_layout_files(raw: Path, files: dict[str, bytes]) -> None:
    from ..shards import atomic_write_bytes

    for name, data in files.items():
        path = raw / name
        if not (path.is_file() and path.read_bytes() == data):
            atomic_write_bytes(path, data)

