"""avprep.shardformat, the one owner of the shard format: the streaming tar reader, the side
files and the opener of a dataset (over local, http and s3), the sample index and `avprep
index`, the names (nothing else spells them). The loader built on it is tested in test_data.py."""
from __future__ import annotations

import ast
import gzip
import io
import json
import re
import tarfile
import zlib
from pathlib import Path

import pytest

from avprep import shardformat as sf
from avprep.errors import StorageError
from avprep.shards import index_dataset
from avprep.storage import Retry
from avprep.verify import verify
from ogmge_train.data import make_loader
from tests._helpers import publish, raw_header, sample_members, tar_bytes
from tests._servers import write_shard_folder

FAST = Retry(tries=4, base_delay=0.1, max_delay=0.5, budget_s=5.0, connect_timeout=2.0, read_timeout=5.0)
SHARDS = {"train": [5, 4, 6, 3, 5], "val": [4, 3]}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("sf")
    keys = write_shard_folder(out, SHARDS, n_frames=2)
    return out, keys


# -- the streaming tar reader --------------------------------------------------------------------
class _Unseekable(io.RawIOBase):
    """A network-like stream: reads only, no seek (the reader must read-and-discard)."""

    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        return self._f.readinto(b)


def _read_all(data: bytes, seekable: bool, keep=None) -> list[sf.RawSample]:
    """Every sample of a tar held in ``data``, each structurally checked (as every reader does)."""
    stream = io.BufferedReader(io.BytesIO(data) if seekable else _Unseekable(data))
    samples = list(sf.read_shard_samples(stream, "mem.tar", keep=keep))
    for s in samples:
        sf.check_structure(s)
    return samples


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("seekable", [True, False])
def test_tar_reader_matches_tarfile(fmt, seekable):
    """Long names (ustar prefix, GNU longname, pax path), non-ASCII keys and skipped members:
    every kept member's bytes equal what tarfile extracts, each sample's span and CRC-32 are
    its bytes in the tar."""
    long_dir = "d" * 60 + "/" + "e" * 60   # > 100 characters with the file name
    keys = [f"{long_dir}/clip_{i}" for i in range(3)] + (["clïp_ü"] if fmt != tarfile.USTAR_FORMAT else [])
    members = [m for k in keys for m in sample_members(k)] + [("README", b"no extension: not a sample")]
    data = tar_bytes(members, fmt)
    samples = _read_all(data, seekable)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ref = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        firsts = {m.name.split(".", 1)[0]: m.offset for m in reversed(tar.getmembers())}
    assert [s.key for s in samples] == keys
    for s in samples:
        assert {ext: bytes(b) for ext, b in s.members.items()} == {
            name.removeprefix(f"{s.key}."): b for name, b in ref.items() if name.startswith(f"{s.key}.")}
        assert [bytes(f) for f in s.frames] == [ref[f"{s.key}.{sf.frame_name(j)}"] for j in range(3)]
        assert s.offset == firsts[s.key] and zlib.crc32(data[s.offset:s.offset + s.length]) == s.crc32
    # a member not kept is skipped unread, but known to be there
    assert all(sf.JSON not in s.members and sf.JSON in s.present
               for s in _read_all(data, seekable, keep=lambda ext: ext != sf.JSON))


@pytest.mark.parametrize("seekable", [True, False])
@pytest.mark.parametrize("cut", ["member", "boundary", "empty"])
def test_truncated_shard_is_an_error(seekable, cut):
    """A shard cut anywhere (also exactly between two members, where tarfile would stop quietly)
    raises instead of silently dropping samples from an evaluation."""
    data = tar_bytes(sample_members("a") + sample_members("b"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        one = tar.getmember("b.cls").offset   # the boundary between the two samples' members
    data = {"member": data[:one + 700], "boundary": data[:one], "empty": b""}[cut]
    with pytest.raises(sf.ShardDataError, match=r"mem\.tar: not a readable tar shard \((truncated|empty)"):
        _read_all(data, seekable)


def test_corrupt_and_compressed_shards_are_errors():
    data = bytearray(tar_bytes(sample_members("a")))
    data[1024 + 50] ^= 0xFF   # inside the second header (the 1-byte .cls payload fills 512..1024)
    with pytest.raises(sf.ShardDataError, match=r"mem\.tar: not a readable tar shard \(bad header at byte 1024\)"):
        _read_all(bytes(data), True)
    huge = tarfile.TarInfo("a.spec.npy")
    huge.size = 1 << 33     # a hostile header: refused before anything is allocated
    with pytest.raises(sf.ShardDataError, match=r"a member of 8589934592 bytes at byte 0; the limit is 256 MiB"):
        _read_all(huge.tobuf(tarfile.GNU_FORMAT), True)
    with pytest.raises(sf.ShardDataError, match="gzip-compressed"):
        _read_all(gzip.compress(tar_bytes(sample_members("a"))), True)


@pytest.mark.parametrize("seekable", [True, False])
def test_hostile_sizes_are_errors_not_endless_loops(seekable):
    """A negative size (``int(.., 8)`` accepts a sign) would seek backwards onto the same header
    forever; a pax record of length 0 would never advance. Both are bad headers."""
    negative = raw_header("a.xyz", b"-0000001000\0") + bytes(1024)
    with pytest.raises(sf.ShardDataError, match=r"bad header at byte 0"):
        _read_all(negative, seekable)
    record = b"0 path=x\n"
    pax = raw_header("p", b"%011o\0" % len(record), b"x") + record.ljust(512, b"\0") + bytes(1024)
    with pytest.raises(sf.ShardDataError, match=r"bad pax header"):
        _read_all(pax, seekable)
    negative_pax = b"13 size=-512\n"
    pax = raw_header("p", b"%011o\0" % len(negative_pax), b"x") + negative_pax.ljust(512, b"\0") + bytes(1024)
    with pytest.raises(sf.ShardDataError, match=r"bad pax header"):
        _read_all(pax, seekable)


class _CountingReads(io.RawIOBase):
    """A seekable stream that records every byte range read from it."""

    def __init__(self, data: bytes):
        self._f, self.reads = io.BytesIO(data), []

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self._f.seek(offset, whence)

    def tell(self):
        return self._f.tell()

    def readinto(self, b):
        start = self._f.tell()
        n = self._f.readinto(b)
        self.reads.append((start, start + n))
        return n


@pytest.mark.parametrize("ext", ["pkl", "PKL", "ckpt", "pt", "pth", "pickle", "pyd", "spec.Pickle"])
def test_pickle_member_refused_by_name_before_reading(ext):
    """A refused member is a ``security`` problem of its sample, and its payload is never read."""
    payload = b"\x80\x04" + b"P" * 5000
    data = tar_bytes(sample_members("a") + [(f"a.{ext}", payload)] + sample_members("b"))
    at = data.index(payload)
    raw = _CountingReads(data)
    a, b = list(sf.read_shard_samples(raw, "mem.tar", size=len(data), crc=False))    # skips by seeking
    assert sf.is_refused(ext) and ext not in a.members and not b.problems
    assert a.problems == [("security", f"pickle member .{ext} (never loaded)")]
    assert not any(start < at + len(payload) and at < end for start, end in raw.reads)
    with pytest.raises(sf.ShardDataError, match=rf"pickle member \.{ext}") as e:
        sf.check_structure(a)
    assert e.value.check == "security"
    with pytest.raises(sf.ShardDataError, match=r"member \.cls appears twice"):
        _read_all(tar_bytes(sample_members("a") + [("a.cls", b"2")]), True)


# -- the side files and the opener ---------------------------------------------------------------
@pytest.fixture(scope="module")
def remote(ds, http_server, s3_server):
    return publish(ds[0], "sf", http_server, s3_server)


@pytest.mark.parametrize("kind", ["local", "http", "s3"])
def test_open_dataset_reads_the_same_files_everywhere(kind, ds, remote, s3_server):
    out, keys = ds
    opened = sf.open_dataset(remote[kind], s3_endpoint=s3_server.endpoint, retry=FAST)
    assert opened.name == "synthetic" and opened.classes == ["a", "b", "c"] and opened.num_classes == 3
    assert list(opened.splits) == ["train", "val"] and opened.meta.spec_shape == (8, 12)
    for split, counts in SHARDS.items():
        manifest = opened.splits[split]
        assert manifest == sf.Manifest.from_json((out / sf.manifest_name(split)).read_bytes(), split, "x")
        assert [s.num_samples for s in manifest.shards] == counts
        entries = opened.index(split)
        assert [e.key for e in entries] == keys[split]      # shard order, then byte order
        assert [(e.shard, e.offset) for e in entries] == sorted((e.shard, e.offset) for e in entries)


@pytest.mark.parametrize("edit, problem", [
    (lambda d: d.update(spec_shape=[8, 13], config={**d["config"], "spec": {
        "preset": "p", "kind": "stft", "sample_rate": 16000, "duration": 0.1}}), "but the spec config gives"),
    (lambda d: d.update(spec_shape=[8, 12, 1]), "is not a 2-D shape"),
    (lambda d: d.pop("spec_shape"), "no spectrogram shape"),
    (lambda d: d["config"].update(spec_dtype="int8"), "spec_dtype 'int8' is not float16 or float32"),
    (lambda d: d["config"].update(frame_size=-1), "frame_size -1 is not a size"),
    (lambda d: d["config"].update(spec={"preset": "p", "kind": "stft", "sample_rate": 16000, "duration": 1,
                                        "hop_length": 0}), "config.spec gives no spectrogram shape"),
], ids=["shape-vs-config", "shape-3d", "no-shape", "dtype", "frame-size", "zero-hop"])
def test_dataset_json_schema_is_checked_where_it_is_read(tmp_path, edit, problem):
    """The schema facts every reader relies on are checked once, when dataset.json is parsed:
    the loader refuses such a dataset and verify reports the same words."""
    write_shard_folder(tmp_path, {"train": [2], "val": [1]}, n_frames=1)
    d = json.loads((tmp_path / sf.DATASET).read_text())
    edit(d)
    (tmp_path / sf.DATASET).write_text(json.dumps(d))
    with pytest.raises(sf.ShardDataError, match=re.escape(problem)) as e:
        sf.open_dataset(tmp_path)
    assert e.value.check == "manifest" and str(e.value).startswith(f"{tmp_path / sf.DATASET}: ")
    (p,) = verify(tmp_path).problems
    assert (p.shard, p.check) == (sf.DATASET, "manifest") and f"{tmp_path / sf.DATASET}: {p.message}" == str(e.value)


def test_open_dataset_collects_what_it_would_raise(tmp_path):
    write_shard_folder(tmp_path, {"train": [2], "val": [1], "test": [1]}, n_frames=1)
    (tmp_path / "val.manifest.json").write_text("[]")
    (tmp_path / "test.manifest.json").unlink()
    with pytest.raises(sf.ShardDataError, match="val.manifest.json: no shard list"):
        sf.open_dataset(tmp_path)
    problems: list[sf.ShardDataError] = []
    opened = sf.open_dataset(tmp_path, problems=problems)
    assert list(opened.splits) == ["train"]
    assert [(p.shard, p.check) for p in problems] == [("val.manifest.json", "manifest"),
                                                      ("test.manifest.json", "manifest")]
    assert "cannot read" in str(problems[1])
    (tmp_path / "val.manifest.json").unlink()
    with pytest.raises(StorageError, match="val.manifest.json"):     # unreadable, not malformed: a storage error
        sf.open_dataset(tmp_path)
    (tmp_path / sf.DATASET).unlink()
    with pytest.raises(StorageError, match=sf.DATASET):
        sf.open_dataset(tmp_path, problems=[])


# -- the index ----------------------------------------------------------------------------------
def test_writer_index_matches_the_tar(ds):
    out, _ = ds
    for split in SHARDS:
        index = sf.SampleIndex.from_json((out / sf.index_name(split)).read_bytes(), split, "x")
        for shard, entries in index.by_shard().items():
            data = (out / shard).read_bytes()
            spans = [(s.key, s.offset, s.length, s.crc32)
                     for s in sf.read_shard_samples(io.BytesIO(data), shard, size=len(data))]
            assert spans == [(e.key, e.offset, e.length, e.crc32) for e in entries]
            assert all(zlib.crc32(data[e.offset:e.offset + e.length]) == e.crc32 for e in entries)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:   # offsets are real tar header offsets
                firsts = {m.name.split(".", 1)[0]: m.offset for m in reversed(tar.getmembers())}
            assert {e.key: e.offset for e in entries} == firsts


def test_index_command_adds_the_index_without_touching_shards(tmp_path):
    write_shard_folder(tmp_path, {"train": [3, 2], "val": [2]}, n_frames=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for split in SHARDS:    # as an older avprep wrote it: no offsets
        path = tmp_path / sf.index_name(split)
        if path.exists():
            rows = [{k: v for k, v in json.loads(x).items() if k not in (*sf.INDEX_FIELDS, "n_frames")}
                    for x in path.read_text().splitlines()]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / sf.wids_name(split)).unlink(missing_ok=True)
    with pytest.raises(sf.ShardDataError, match=r"no byte offsets in the sample index .*`avprep index OUT`"):
        make_loader(tmp_path, "val", train=False, batch_size=2, frames=1)
    from click.testing import CliRunner

    from cli.avprep_cli import main
    result = CliRunner().invoke(main, ["index", str(tmp_path)])
    assert result.exit_code == 0, result.output
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before      # shards untouched, index and wids index as the writer made them
    assert verify(tmp_path).ok


def test_dataset_json_records_shape_and_frames(raw_dataset, tmp_path):
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract

    raw = raw_dataset("cremad", clips=8)
    cfg = ExtractConfig(spec=spec_preset("paper", "cremad", duration=1.0), frame_size=32, shard_size=3)
    extract("cremad", raw, tmp_path / "o", cfg, workers=1)
    meta = json.loads((tmp_path / "o" / "dataset.json").read_text())
    assert meta["spec_shape"] == list(cfg.spec.shape) and meta["spec_dtype"] == "float16"
    index = [json.loads(x) for s in meta["splits"]
             for x in (tmp_path / "o" / f"{s}.samples.jsonl").read_text().splitlines()]
    assert meta["max_frames"] == max(r["n_frames"] for r in index)
    assert sum(meta["frame_histogram"].values()) == len(index) == sum(meta["splits"].values())
    wids = json.loads((tmp_path / "o" / "train.wids.json").read_text())
    assert wids["wids_version"] == 1 and sum(s["nsamples"] for s in wids["shardlist"]) == meta["splits"]["train"]
    assert verify(tmp_path / "o").ok


def test_missing_index_names_the_fix(tmp_path):
    write_shard_folder(tmp_path, {"train": [2], "val": [2]}, n_frames=1)
    (tmp_path / "val.samples.jsonl").unlink()
    with pytest.raises(sf.ShardDataError, match=r"val\.samples\.jsonl: no sample index .*`avprep index OUT`"):
        sf.open_dataset(tmp_path).index("val")
    index_dataset(tmp_path)
    assert [e.key for e in sf.open_dataset(tmp_path).index("val")] == ["val_00000", "val_00001"]


# -- one owner of the names ---------------------------------------------------------------------
# What avprep writes and reads is spelled in avprep/shardformat only: file names of an output folder
# and sample member names, found in any string of the package sources outside it (docstrings aside).
_OUTPUT_NAMES = re.compile(r"dataset\.json|README\.md|failures\.jsonl|\.manifest\.json|\.samples\.jsonl|\.wids\.json"
                           r"|\.tar\b|spec\.npy|\.npy\b|\.jpg\b")
_MEMBERS = {sf.CLS, sf.JSON}     # also problem checks ("json", "cls"): a member where used as a key or compared
_NOT_OURS = {("avprep/datasets/_base.py", "NOT_MEDIA")}     # raw files discovery skips, not our outputs
_ROOT = Path(__file__).resolve().parent.parent


def _spelled_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    rel = path.relative_to(_ROOT).as_posix()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docstrings:
            continue
        statement = parents.get(id(node))
        while statement is not None and not isinstance(statement, ast.stmt):
            statement = parents.get(id(statement))
        if isinstance(statement, ast.Assign) and any((rel, getattr(t, "id", "")) in _NOT_OURS
                                                     for t in statement.targets):
            continue
        parent = parents.get(id(node))
        while isinstance(parent, (ast.Tuple, ast.List, ast.Set, ast.JoinedStr)):
            parent = parents.get(id(parent))
        as_member = node.value in _MEMBERS and (
            isinstance(parent, (ast.Subscript, ast.Compare))
            or isinstance(parent, ast.Call) and getattr(parent.func, "attr", "") in ("get", "pop"))
        if as_member or _OUTPUT_NAMES.search(node.value):
            found.append(f"{rel}:{node.lineno}: {node.value!r}")
    return found


def test_only_shardformat_spells_the_output_names():
    sources = [p for pkg in ("avprep", "ogmge_train", "cli") for p in sorted((_ROOT / pkg).rglob("*.py"))
               if p.relative_to(_ROOT).parts[:2] != ("avprep", "shardformat")]
    assert len(sources) > 40
    assert [hit for p in sources for hit in _spelled_names(p)] == []


def test_the_names_check_sees_what_it_must(tmp_path):
    """The check above flags a spelled name in code, an f-string, a member key and a comparison,
    and leaves docstrings and problem check labels alone."""
    (tmp_path / "avprep").mkdir()
    probe = tmp_path / "avprep" / "probe.py"
    probe.write_text('"""Writes dataset.json."""\n'
                     'A = out / "dataset.json"\n'
                     'B = f"{split}.manifest.json"\n'
                     'C = members["cls"]\n'
                     'D = ext == "json"\n'
                     'E = bad("json", "no frames")\n'
                     'F = f"frame f{i:03d}.jpg"\n')
    global _ROOT
    root, _ROOT = _ROOT, tmp_path
    try:
        hits = _spelled_names(probe)
    finally:
        _ROOT = root
    assert [h.split(":")[1] for h in hits] == ["2", "3", "4", "5", "7"]
