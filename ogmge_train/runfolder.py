"""The run folder: the one owner of every file ``ogmge-train --out RUN`` and its tools write.

Files (ARCHITECTURE.md "Run folder"): ``config.json``, ``metrics.jsonl`` (one line per epoch),
``steps.jsonl`` (one line per optimizer step), ``summary.json``, ``last.pt`` / ``best.pt`` and
``probe_<modality>.json``. A sweep folder holds ``seed-<k>`` run folders. ``.lock`` keeps a
second training run out of a folder while one writes into it (``writer_lock``).

Without ``--out`` a run gets a new numbered folder, ``runs/<dataset>-<fusion>-<method>-<n>``
(``new_run_folder``), created with one ``mkdir`` so two runs starting at once never share one.

Writes are atomic (temporary name, fsync, rename), so a kill never leaves a half-written JSON
or checkpoint under its final name; jsonl lines are appended and fsynced. Readers tolerate a
torn *last* line of a jsonl file (a kill mid-append) and raise ``RunFolderError`` naming the
file for anything else. Nothing here imports torch at module level.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from avprep.atomicfile import write_atomic

from .errors import RunFolderError, RunWriteError

__all__ = ["CONFIG", "METRICS", "STEPS", "SUMMARY", "LAST", "BEST", "SEED_DIR", "probe_path",
           "checkpoint_path", "seed_dir", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_save", "atomic_copy", "json_line", "append_jsonl", "read_json", "read_jsonl",
           "keep_epochs", "read_config", "read_summary", "read_metrics", "read_steps", "read_probe",
           "write_config", "write_summary", "write_probe", "record_of", "is_run", "expand_runs",
           "finished", "absolute_location", "LOCK", "writer_lock", "remove_temp", "RUNS_DIR", "run_stem",
           "new_run_folder", "remove_unused_run_folder"]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
SUMMARY = "summary.json"
LAST = "last.pt"
BEST = "best.pt"
SEED_DIR = re.compile(r"^seed-(\d+)$")
TMP_SUFFIX = ".tmp"          # what atomic writes append; a kill -9 can leave one behind


def probe_path(run, modality: str) -> Path:
    return Path(run) / f"probe_{modality}.json"


def checkpoint_path(run, which: str) -> Path:
    if which not in ("best", "last"):
        raise RunFolderError(f"--which must be best or last, not {which!r}")
    return Path(run) / (BEST if which == "best" else LAST)


def seed_dir(out, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


# ----------------------------------------------------------------------------- writing

def _write_atomic(path, write) -> Path:
    """``write(tmp)``, fsync, rename over ``path`` (``avprep.atomicfile.write_atomic``: all or
    nothing, the previous version kept); an OSError (disk full, read-only folder) becomes a
    one-line ``RunWriteError`` naming the file."""
    path = Path(path)
    try:
        return write_atomic(path, write, tmp=path.with_name(path.name + TMP_SUFFIX))
    except OSError as e:
        raise RunWriteError(f"{path}: cannot write ({e.strerror or e}); the previous version is kept") from None


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via ``path.tmp``: fsync, then rename (all or nothing)."""
    return _write_atomic(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_save(obj, path) -> Path:
    """``torch.save`` through the same tmp + fsync + rename."""
    import torch

    return _write_atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src, dst) -> Path:
    """Copy ``src`` to ``dst`` atomically (best.pt from last.pt)."""
    return atomic_write_bytes(dst, Path(src).read_bytes())


def json_line(obj) -> str:
    return json.dumps(obj, sort_keys=True, allow_nan=True) + "\n"


def append_jsonl(path, rows: Iterable[dict]) -> None:
    """Append one line per row and fsync (a kill can tear only the last line)."""
    with open(path, "a") as f:
        f.writelines(json_line(r) for r in rows)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- reading

def read_json(path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path}: unreadable JSON ({e})") from None


def read_jsonl(path) -> list[dict]:
    """Rows of a jsonl file ([] when absent). A torn last line (kill mid-append) is dropped;
    a bad line elsewhere is an error naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: unreadable ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if n == len(lines):
                break
            raise RunFolderError(f"{path}:{n}: not JSON ({e})") from None
    return rows


def keep_epochs(path, last_epoch: int) -> None:
    """Keep the jsonl lines of epochs <= ``last_epoch`` (resume replays the later ones).

    Unlike the readers this drops *every* unparsable line: each line of a checkpointed epoch was
    complete before that checkpoint was saved, so a torn one belongs to a replayed epoch."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            continue
        if epoch <= last_epoch:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def is_run(path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_config(run) -> dict:
    run = Path(run)
    if not is_run(run):
        raise RunFolderError(f"{run}: not a run folder (no {CONFIG})")
    return read_json(run / CONFIG)


def read_summary(run) -> dict | None:
    """summary.json, or None while the run has not finished an epoch."""
    path = Path(run) / SUMMARY
    return read_json(path) if path.exists() else None


def read_metrics(run) -> list[dict]:
    return read_jsonl(Path(run) / METRICS)


def read_steps(run) -> list[dict]:
    return read_jsonl(Path(run) / STEPS)


def read_probe(run, modality: str) -> dict | None:
    path = probe_path(run, modality)
    return read_json(path) if path.exists() else None


def write_config(run, config: dict) -> Path:
    return atomic_write_json(Path(run) / CONFIG, config)


def write_summary(run, summary: dict) -> Path:
    return atomic_write_json(Path(run) / SUMMARY, summary)


def write_probe(run, modality: str, results: dict) -> Path:
    return atomic_write_json(probe_path(run, modality), results)


def record_of(run, epoch: int) -> dict | None:
    """The metrics.jsonl line of ``epoch`` (None when absent)."""
    if epoch < 0:
        return None
    for row in read_metrics(run):
        if row.get("epoch") == epoch:
            return row
    return None


def expand_runs(paths) -> list[Path]:
    """Run folders named by ``paths``: a run folder itself, or a sweep folder's ``seed-<k>``
    folders in numeric seed order."""
    out = []
    for p in map(Path, paths):
        if is_run(p):
            out.append(p)
            continue
        numbered = [(int(m.group(1)), d) for d in p.glob("seed-*")
                    if (m := SEED_DIR.match(d.name)) is not None and is_run(d)]
        seeds = [d for _k, d in sorted(numbered)]
        if not seeds:
            raise RunFolderError(f"{p}: neither a run folder ({CONFIG}) nor a sweep (seed-<k>/)")
        out.extend(seeds)
    return out


def finished(run, epochs: int) -> bool:
    """Whether the run's summary counts at least ``epochs`` epochs."""
    try:
        summary = read_summary(run)
    except RunFolderError:
        return False
    return summary is not None and int(summary.get("epochs", -1)) >= epochs


def absolute_location(shards: str) -> str:
    """A local shard folder as an absolute path (URLs unchanged), so the config.json of a run
    names data that evaluate/probe find from any directory."""
    if not shards or "://" in shards:
        return shards
    return str(Path(shards).resolve())


# ----------------------------------------------------------------------------- the writer's lock

LOCK = ".lock"
_HELD: set[int] = set()      # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    # A forked child (a DataLoader worker) shares the parent's lock; closing its copy keeps a
    # killed parent's orphans from holding the folder after the parent is gone.
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def _holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {int(h['pid'])} on {h['host']}, since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "starting"


@contextmanager
def writer_lock(run) -> Iterator[None]:
    """Hold ``RUN/.lock`` while training writes into ``run`` (created when missing): a second
    writer is refused with a ``RunFolderError`` naming the holder (pid, host, start time). An
    advisory ``flock``: the kernel drops it when the holder dies, even by kill -9, so a stale
    lock is simply taken over (its holder line rewritten). Not POSIX: no lock."""
    run = Path(run)
    try:
        import fcntl
    except ImportError:
        yield
        return
    run.mkdir(parents=True, exist_ok=True)      # an OSError names the folder (the CLI maps it)
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunFolderError(f"{run}: another run is writing into this folder ({_holder(fd)}); "
                                 "wait for it to finish or choose another --out") from None
        _HELD.add(fd)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
        try:
            yield
        finally:
            _HELD.discard(fd)
    finally:
        os.close(fd)


def remove_temp(run) -> list[Path]:
    """Delete the temporary files a killed writer left in ``run`` (``last.pt.tmp``, ...); call
    it while holding ``writer_lock``. Returns what was removed."""
    gone = [p for p in Path(run).glob(f"*{TMP_SUFFIX}") if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


# ----------------------------------------------------------------------------- default run folders

RUNS_DIR = "runs"       # parent of the numbered run folders, relative to the working directory


def run_stem(dataset: str, fusion: str, modulation: str, modality: str = "both") -> str:
    """``cremad-concat-ogm-ge``; a unimodal run is named for its modality (``cremad-audio-none``).
    The dataset name comes from the shards (untrusted): only letters, digits, ``-`` and ``_``
    are kept, so it can never name a path outside ``runs/``."""
    head = fusion if modality == "both" else modality
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", dataset).strip("_-") or "dataset"
    return f"{name}-{head}-{modulation}"


def new_run_folder(stem: str, parent=RUNS_DIR) -> Path:
    """Create and return ``parent/<stem>-<n>``, n one more than the highest existing one (from 1).

    Never reuses an existing path (file or folder), and ``mkdir`` either creates the folder or
    fails, so runs racing for the same number each end up with their own folder."""
    parent = Path(parent)
    pattern = re.compile(re.escape(stem) + r"-(\d+)")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in parent.iterdir() if (m := pattern.fullmatch(p.name))]
        n = max(taken, default=0) + 1
        while True:
            path = parent / f"{stem}-{n}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                n += 1
    except OSError as e:
        raise RunFolderError(f"{e.filename or parent}: cannot create the run folder ({e.strerror or e}); "
                             "pass --out RUN") from None


def remove_unused_run_folder(run) -> bool:
    """Remove ``run`` (a folder ``new_run_folder`` made) when a run stopped before its first step
    left nothing in it but its config, lock and an empty steps file, so a typo in a flag checked
    late (e.g. a teacher run's path) does not leave numbered folders behind. Anything else in it,
    and the folder stays. Returns whether it was removed."""
    def disposable(p: Path) -> bool:
        return p.is_file() and (p.name in (CONFIG, LOCK) or (p.name == STEPS and p.stat().st_size == 0))

    run = Path(run)
    try:
        entries = list(run.iterdir())
        if not all(disposable(p) for p in entries):
            return False
        for p in entries:
            p.unlink()
        run.rmdir()
    except OSError:
        return False
    return True
