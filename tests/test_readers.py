"""Hostile shards and side files against the readers (issue 15 items 2, 5, 6, 9): declared sizes
are never trusted, extension headers never recurse, names never leave the prefix, and verify and
the loader give the same verdict on every sample, with typed one-line errors only."""
from __future__ import annotations

import io
import json
import shutil
import time

import pytest
from click.testing import CliRunner
from PIL import Image

from avprep import shardformat as sf
from avprep.errors import StorageError
from avprep.storage import Retry
from avprep.verify import verify
from ogmge_train.data import read_dataset
from tests._helpers import raw_header
from tests._mutants import assert_agree, verdict
from tests._servers import write_shard_folder

FAST = Retry(tries=2, base_delay=0.1, max_delay=0.2, budget_s=2.0, connect_timeout=2.0, read_timeout=5.0)


@pytest.fixture
def out(tmp_path):
    write_shard_folder(tmp_path / "d", {"train": [2], "val": [3]}, n_frames=2)
    return tmp_path / "d"


def _entries(out, split="val"):
    return read_dataset(out).index(split)


def _patch(out, shard, at, data: bytes):
    p = out / shard
    b = bytearray(p.read_bytes())
    b[at:at + len(data)] = data
    p.write_bytes(bytes(b))


def _pax(records: bytes, name="PaxHeader") -> bytes:
    return raw_header(name, b"%011o\0" % len(records), b"x") + records.ljust(-(-len(records) // 512) * 512, b"\0")


def _check_bounded(v, seconds=20):
    assert v.seconds < seconds, v      # a hang would take minutes (2 s per 8 GiB declared before)


@pytest.mark.parametrize("kind", ["base256", "pax-size", "pax-chain"])
def test_declared_sizes_and_chained_headers_never_hang(out, kind):
    e = _entries(out)[1]
    if kind == "base256":     # GNU base-256 size of 2**62 in the first header of sample 1
        h = bytearray((out / e.shard).read_bytes()[e.offset:e.offset + 512])
        h[124:136] = b"\x80" + (2**62).to_bytes(11, "big")
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\0 " % sum(h)
        _patch(out, e.shard, e.offset, bytes(h))
    else:                     # extension headers spliced over sample 1 (its bytes, so the tar length holds)
        pax = _pax(b"22 size=1099511627776\n") if kind == "pax-size" else _pax(b"14 path=a.b.c\n") * 300
        data = bytearray((out / e.shard).read_bytes())
        data[e.offset:e.offset] = pax
        (out / e.shard).write_bytes(bytes(data))
    v = verdict(out, index_keys={x.key for x in _entries(out)})
    _check_bounded(v)
    assert "tar" in v.verify_checks
    assert e.key in v.verify_keys and e.key in v.loader_skipped
    assert_agree(v, kind)


def test_verify_reports_chained_pax_in_json_not_a_traceback(out, tmp_path):
    e = _entries(out)[0]
    data = bytearray((out / e.shard).read_bytes())
    data[e.offset:e.offset] = _pax(b"14 path=a.b.c\n") * 400
    (out / e.shard).write_bytes(bytes(data))
    from cli._verify_command import verify_cmd
    result = CliRunner().invoke(verify_cmd, [str(out), "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    report = json.loads((tmp_path / "r.json").read_text())
    assert any("extension header" in p["message"] for p in report["problems"])


@pytest.mark.parametrize("damage", ["eoa-bit", "trailing-garbage", "malformed-pax", "npy-trailing"])
def test_verify_and_loader_agree_on_malformations(out, damage):
    entries = _entries(out)
    shard = entries[-1].shard
    eoa = entries[-1].offset + entries[-1].length
    if damage == "eoa-bit":
        _patch(out, shard, eoa + 700, b"\x01")     # inside the second end-of-archive block
    elif damage == "trailing-garbage":
        (out / shard).write_bytes((out / shard).read_bytes() + b"junk")
    elif damage == "malformed-pax":
        e = entries[1]
        data = bytearray((out / shard).read_bytes())
        data[e.offset:e.offset] = _pax(b"99 path=x\n")
        (out / shard).write_bytes(bytes(data))
    else:     # two bytes after the .npy payload, header unchanged (the padding is zeros)
        e = entries[0]
        raw = (out / shard).read_bytes()
        at = raw.index(b"\x93NUMPY", e.offset)
        h = bytearray(raw[at - 512:at])
        size = int(h[124:136].split(b"\0")[0], 8)
        h[124:136] = b"%011o\0" % (size + 2)
        h[148:156] = b" " * 8
        h[148:156] = b"%06o\0 " % sum(h)
        _patch(out, shard, at - 512, bytes(h))
    v = verdict(out, index_keys={x.key for x in entries})
    assert v.verify_checks - {"sha256", "size"}, v     # verify says what is wrong, not only the hash
    assert_agree(v, damage)
    if damage in ("eoa-bit", "trailing-garbage"):    # outside every sample: nothing to skip
        assert v.loader_skipped == set() and v.loader_yielded == {e.key for e in entries}
        assert "tar" in v.verify_checks


def _edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _edit_lines(path, edit):
    rows = edit([json.loads(x) for x in path.read_text().splitlines()])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


SIDE_FILE_DAMAGE = {
    "manifest-not-json": ("val.manifest.json", lambda p: p.write_text("{")),
    "manifest-count-string": ("val.manifest.json",
                              lambda p: _edit_json(p, lambda m: {**m, "num_samples": str(m["num_samples"])})),
    "manifest-other-split": ("val.manifest.json", lambda p: _edit_json(p, lambda m: {**m, "split": "test"})),
    "manifest-unsafe-name": ("val.manifest.json", lambda p: _edit_json(p, lambda m: {
        **m, "shards": [{**m["shards"][0], "name": "../val-000000.tar"}]})),
    "manifest-gone": ("val.manifest.json", lambda p: p.unlink()),
    "index-line-dropped": ("val.samples.jsonl", lambda p: _edit_lines(p, lambda rows: rows[1:])),
    "index-line-doubled": ("val.samples.jsonl", lambda p: _edit_lines(p, lambda rows: rows + rows[:1])),
    "index-no-offsets": ("val.samples.jsonl", lambda p: _edit_lines(p, lambda rows: [
        {k: v for k, v in r.items() if k != "crc32"} for r in rows])),
    "index-bad-line": ("val.samples.jsonl", lambda p: p.write_text(p.read_text() + "[1]\n")),
    "index-gone": ("val.samples.jsonl", lambda p: p.unlink()),
}


@pytest.mark.parametrize("damage", list(SIDE_FILE_DAMAGE))
def test_verify_reports_the_side_file_error_the_loader_raises(out, damage):
    """One parser (``shardformat.open_dataset``) for both: verify's problem is the loader's error."""
    name, edit = SIDE_FILE_DAMAGE[damage]
    edit(out / name)
    with pytest.raises((sf.ShardDataError, StorageError)) as raised:
        read_dataset(out).index("val")
    problems = [p for p in verify(out).problems if p.shard == name]
    # a doubled line is also a key twice (checked across every index): the loader stops at the first
    assert len(problems) == (2 if damage == "index-line-doubled" else 1), problems
    message = str(raised.value)
    if isinstance(raised.value, StorageError):      # a file that is not there: verify cannot read it
        assert problems[0].message == f"cannot read: {message}" and problems[0].check == "manifest"
    else:
        # the same text, less the file's path ("PATH: what" or "PATH line N: what")
        assert message in (f"{out / name}: {problems[0].message}", f"{out / name} {problems[0].message}")
        assert problems[0].check == raised.value.check


def test_hostile_index_length_is_refused_before_reading(out):
    path = out / "val.samples.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["length"] = 1 << 40
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    v = verdict(out)
    assert rows[0]["key"] in v.loader_skipped and rows[0]["key"] in v.verify_keys
    assert_agree(v)


def test_absurd_jpeg_dimensions_are_refused_before_decoding(out):
    big = io.BytesIO()
    Image.new("L", (12000, 8000)).save(big, "JPEG", quality=1)
    with pytest.raises(sf.ShardDataError, match="12000x8000 frame is too large to decode"):
        sf.open_jpeg(big.getvalue())


@pytest.mark.parametrize("name", ["%2e%2e/%2e%2e/secret-000000.tar", "val\x00-000000.tar", "../val-000000.tar",
                                  "val-000000.tar?x=1"])
def test_manifest_names_never_leave_the_prefix(out, http_server, name):
    m = json.loads((out / "val.manifest.json").read_text())
    m["shards"][0]["name"] = name
    (out / "val.manifest.json").write_text(json.dumps(m))
    root = http_server.root / f"esc-{abs(hash(name))}"
    shutil.copytree(out, root / "data")
    (root / "secret-000000.tar").write_bytes((out / "val-000000.tar").read_bytes())
    before = len(http_server.log)
    with pytest.raises(sf.ShardDataError, match="refusing shard name") as e:
        read_dataset(f"{http_server.url}/{root.name}/data", retry=FAST)
    assert e.value.check == "security" and "\n" not in str(e.value)
    assert not any("secret" in path for _, path, _ in http_server.log[before:])
    with pytest.raises(StorageError, match="refusing unsafe object name"):
        from avprep.storage import open_location
        open_location(f"{http_server.url}/{root.name}/data").read_range(name, 0, 10)


@pytest.mark.parametrize("content", ["[1, 2]", "[" * 100_000 + "]" * 100_000, '{"classes": "abc"}'])
def test_info_on_hostile_dataset_json_is_one_line(out, content):
    from cli.avprep_cli import main
    (out / "dataset.json").write_text(content)
    result = CliRunner().invoke(main, ["info", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "dataset.json" in result.output


def test_reader_time_is_bounded_by_real_bytes():
    """A stream whose header declares 2**40 bytes ends at the real end, after a bounded read."""
    data = raw_header("a.spec.npy", b"%011o\0" % (2**33 - 1)) + bytes(4096)
    start = time.perf_counter()
    with pytest.raises(sf.ShardDataError, match="limit is 256 MiB"):
        list(sf.read_shard_samples(io.BytesIO(data), "x.tar"))
    assert time.perf_counter() - start < 5
