"""The extraction output folder: options record, lock, resume state, strays and final writes.

Resume: ``OUT/.avprep-state/options.json`` records the options at the start of a run, and
``OUT/.avprep-state/<shard>.json`` each finished shard (a ``ShardState``). A re-run keeps the
shards whose bytes still match their state file and redoes the rest, so a run that was killed
at any moment ends byte-identical to one that was not. A shard built and uploaded on a cluster
node (``ShardState.in_bucket``) has no local file: it is kept while the bucket holds an object
of its size (``finished_state``). ``.avprep-state/lock`` keeps a second
extraction out of the same folder.

Durability costs one fsync per shard (its data, before the rename) plus a few per run: a
state file is only a claim checked against the shard's sha256, so it needs none, and one
directory fsync before dataset.json makes every rename of the run durable at once.

``write_outputs`` is the one place that writes failures.jsonl, the sample indexes, the
manifests and dataset.json.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from . import shardformat
from . import shards as shardlib
from .atomicfile import fsync_dir
from .errors import ConfigError, OutputError

if TYPE_CHECKING:
    from .storage import Location

STATE_DIR = ".avprep-state"
_STATE_SUFFIX = ".json"         # OUT/.avprep-state/<shard>.json


def _state_path(out: Path, shard: str) -> Path:
    return out / STATE_DIR / (shard + _STATE_SUFFIX)


@dataclass
class ShardState:
    """What a finished shard holds (its state file): enough to resume and to write the indexes."""

    name: str
    split: str
    keys: list[str]                                     # every planned clip, failed ones included
    sha256: str | None                                  # None: every clip failed, no file
    bytes: int | None
    num_samples: int
    samples: list[dict] = field(default_factory=list)   # sample index lines
    failures: list[dict] = field(default_factory=list)  # failures.jsonl lines
    retry: list[str] = field(default_factory=list)      # failed keys a rerun tries again
    in_bucket: bool = False                             # built on a node, uploaded, no local file

    def to_dict(self) -> dict:
        # shallow (its lists hold JSON values already): asdict's deep copy cost ~0.5 ms a sample
        return {f: getattr(self, f) for f in _STATE_FIELDS}

    @classmethod
    def from_json(cls, d: dict) -> ShardState:
        return cls(**{k: d[k] for k in ("name", "split", "keys", "sha256", "bytes", "num_samples",
                                        "samples", "failures")}, retry=d.get("retry", []),
                   in_bucket=bool(d.get("in_bucket", False)))


_STATE_FIELDS = tuple(f.name for f in fields(ShardState))


def tool_version() -> str:
    try:
        from importlib.metadata import version
        return version("avprep-ogmge")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"


def staging_dir(remote: str) -> Path:
    """A stable local folder per remote prefix, so an interrupted upload run can resume."""
    digest = hashlib.sha256(remote.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"avprep-staging-{digest}"


def find_outputs(folder) -> list[Path]:
    """The extraction output folders in ``folder`` itself and its direct subfolders (those
    holding ``.avprep-state/``), the most recently written first (the later of the state
    folder's and dataset.json's modification times). Reads only; nothing records "the last
    extraction", so nothing is left behind in the working folder."""
    folder = Path(folder)

    def written(out: Path) -> float:
        return max(p.stat().st_mtime for p in (out / STATE_DIR, out / shardformat.DATASET) if p.exists())

    try:
        candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
    except OSError:
        return []
    found = [p for p in candidates if (p / STATE_DIR).is_dir()]
    return sorted(found, key=written, reverse=True)


# ---------------------------------------------------------------- options

def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _stored_options(out: Path) -> dict | None:
    for path in (out / STATE_DIR / "options.json", out / shardformat.DATASET):
        if path.exists():
            try:
                data = path.read_bytes()
                d = (json.loads(data) if path.parent.name == STATE_DIR
                     else shardformat.DatasetMeta.from_json(data, str(path)).raw)
                return {k: d.get(k) for k in ("name", "config", "tool_version")}
            except (OSError, ValueError, AttributeError, shardformat.ShardDataError) as e:
                raise ConfigError(f"{path}: unreadable ({e}); use --overwrite to start over") from None
    return None


def check_options(out: Path, options: dict) -> None:
    """Refuse to mix two sets of options (or unknown shards) in one folder; reads only."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    stored = _stored_options(out)
    if stored is None and any(out.glob(f"*{shardformat.SHARD_SUFFIX}")):
        raise ConfigError(f"{out}: holds shards this tool did not record; use --overwrite to start over")
    if stored is not None and stored != options:
        old, new = _flatten(stored), _flatten(options)
        diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        raise ConfigError(f"{out}: was extracted with other options ({'; '.join(diffs[:5])}); "
                          "use the same options to resume, or --overwrite to start over")


# ---------------------------------------------------------------- lock, preparation

def _write_error(path: Path, e: OSError) -> OutputError:
    why = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
           errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}.get(
        e.errno or 0, e.strerror or str(e))
    usage = e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    return OutputError(f"{path}: cannot write: {why}; finished shards are kept, re-run the same "
                       "command to resume", exit_code=2 if usage else 1)


@contextmanager
def writing(path: Path):
    """Turn an OSError raised while writing ``path`` into a one-line ``OutputError``."""
    try:
        yield
    except OSError as e:
        raise _write_error(path, e) from None


@contextmanager
def exclusive(out: Path, state_dir: str = STATE_DIR, job: str = "extraction"):
    """One ``job`` per folder at a time (a second one would delete the first's temporary
    files): a lock file in ``out/state_dir``. An advisory lock: the kernel drops it when the
    holder dies, even by kill -9."""
    with writing(out):
        (out / state_dir).mkdir(parents=True, exist_ok=True)
        f = open(out / state_dir / "lock", "a+b")
    with f:
        try:
            import fcntl
        except ImportError:      # not POSIX: no lock
            yield
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{out}: another {job} is writing into this folder") from None
        yield


def prepare(out: Path, options: dict, overwrite: bool) -> None:
    """Empty ``out`` of our files with ``overwrite``, drop killed writers' leftovers, record
    ``options`` for later resumes."""
    state = out / STATE_DIR
    with writing(out):
        if overwrite:
            for p in [*(p for p in out.iterdir() if shardformat.is_output_file(p.name)), *state.iterdir()]:
                if p.name != "lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        for folder in (out, state):
            for p in folder.glob(f"*{shardformat.TMP_MARK}*"):
                p.unlink(missing_ok=True)
        if not (state / "options.json").exists():
            shardlib.atomic_write_bytes(state / "options.json", shardformat.dump_json(options, indent=1))


def finished_state(out: Path, plan: shardlib.ShardPlan, bucket: Location | None = None) -> ShardState | None:
    """The state of ``plan``'s shard when it is complete and intact, else None. Intact: the
    file in ``out`` has the state's size and sha256, or, for a shard that exists only in the
    output's ``bucket`` (``in_bucket``), the bucket holds an object of the state's size (one
    HEAD; S3 objects appear only whole and a shard's bytes are fixed by its plan, as for
    ``upload.ShardUploader``). Raises StorageError when the bucket cannot be asked."""
    path = _state_path(out, plan.name)
    try:
        st = ShardState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if st.keys != [c.key for c in plan.clips]:
        return None
    if any(f not in r for r in st.samples for f in shardformat.INDEX_FIELDS):
        return None     # written before the sample index existed: redo it
    shard = out / plan.name
    if st.sha256 is None:      # every clip failed: no file expected
        return None if shard.exists() else st
    if st.in_bucket:
        return st if bucket is not None and bucket.present_size(plan.name) == st.bytes else None
    try:
        if shard.stat().st_size != st.bytes or shardlib.sha256_file(shard) != st.sha256:
            return None
    except OSError:
        return None
    return st


def save_state(out: Path, st: ShardState) -> None:
    # no fsync: after a crash a lost or torn state file only means the shard is redone
    with writing(out / STATE_DIR):
        shardlib.atomic_write_bytes(_state_path(out, st.name), shardformat.dump_json(st.to_dict()),
                                    durable=False)


def invalidate(out: Path) -> None:
    """dataset.json marks a complete output: gone while shards are being redone."""
    with writing(out):
        (out / shardformat.DATASET).unlink(missing_ok=True)


def remove_strays(out: Path, planned: set[str]) -> None:
    """Shards (and their state) from an earlier plan that the current one does not have, and
    temp files of shard writers that died (a Ray builder retried after its worker was killed).
    Called once every shard is written."""
    with writing(out):
        shards = f"*{shardformat.SHARD_SUFFIX}"
        for p in out.glob(shards):
            if p.name not in planned:
                p.unlink()
        for p in out.glob(f"{shards}{shardformat.TMP_MARK}*"):
            p.unlink(missing_ok=True)
        for p in (out / STATE_DIR).glob(shards + _STATE_SUFFIX):
            if p.name.removesuffix(_STATE_SUFFIX) not in planned:
                p.unlink()
        splits = {name.rsplit("-", 1)[0] for name in planned}
        for suffix in shardformat.SPLIT_FILE_SUFFIXES:
            for p in out.glob(f"*{suffix}"):
                if p.name[:-len(suffix)] not in splits:
                    p.unlink()


# ---------------------------------------------------------------- final writes

def count(items: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for x in items:
        counts[x] = counts.get(x, 0) + 1
    return dict(sorted(counts.items()))


def write_outputs(out: Path, classes: list[str], plans: list[shardlib.ShardPlan],
                  states: dict[str, ShardState], failures: list[dict], options: dict,
                  spec_shape: tuple[int, int], bucket: Location | None = None, extra: dict | None = None) -> dict:
    """failures.jsonl, then per split the sample index and manifest, dataset.json last.
    ``extra`` goes into dataset.json as it is. Returns ``{split: {label: samples}}``. A shard
    that exists only in the output's ``bucket`` (``in_bucket``) is read from there for the
    dataset card's example.

    Each file is fsynced before its rename; one directory fsync before dataset.json makes the
    renames of the whole run (shards included) durable, so dataset.json never outlives them."""
    def write(path: Path, data: bytes, **kw) -> None:
        with writing(path):
            shardlib.atomic_write_bytes(path, data, **kw)

    write(out / shardformat.FAILURES, b"".join(shardformat.dump_json(f) for f in failures), sync_dir=False)
    manifests: dict[str, shardformat.Manifest] = {}
    for split in shardlib.split_order({p.split for p in plans}):
        sts = [states[p.name] for p in plans if p.split == split]
        index = shardformat.SampleIndex.from_records(split, [r for st in sts for r in st.samples])
        shards = []
        for st in sts:
            if st.sha256 is not None:
                assert st.bytes is not None     # set together with sha256 when the shard was written
                shards.append(shardformat.ShardEntry(st.name, st.num_samples, st.bytes, st.sha256))
        manifests[split] = shardformat.write_split_files(out, split, index, shards, list(classes),
                                                         functools.partial(write, sync_dir=False))
    meta = shardformat.DatasetMeta.build(options, list(classes), manifests,
                                         [r for st in states.values() for r in st.samples],
                                         num_failures=len(failures), spec_shape=spec_shape, extra=extra)
    def open_shard(name: str):
        if states[name].in_bucket and bucket is not None:
            return bucket.open(name)
        return open(out / name, "rb")

    shardformat.write_card(out, meta, manifests, functools.partial(write, sync_dir=False), open_shard)
    fsync_dir(out)
    write(out / shardformat.DATASET, meta.to_json())
    return {split: m.class_counts for split, m in manifests.items()}
