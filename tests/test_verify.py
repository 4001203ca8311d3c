"""`avprep verify`: a clean extraction passes; each kind of damage or hostile content is
reported against the right shard (and key), never crashes, and never executes a payload."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
from itertools import groupby
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from avprep import shardformat as sf
from avprep.config import ExtractConfig, spec_preset
from avprep.shardformat import ShardDataError
from avprep.verify import verify
from cli._verify_command import verify_cmd
from ogmge_train.data import read_dataset
from tests._helpers import KS_CLASSES, read_tar, small_config, write_ks_clip  # noqa: F401
from tests._servers import write_shard_folder

TRAIN0 = "train-000000.tar"
def build_clean_dataset(root: Path) -> Path:
    """A real extraction: 4 train + 2 test clips, 2 per shard (3 shards)."""
    from avprep.extract import extract

    raw = root / "raw"
    for n, (split, label) in enumerate([("train", "bowling"), ("train", "blowing_nose"),
                                        ("train", "bowling"), ("train", "blowing_nose"),
                                        ("test", "bowling"), ("test", "blowing_nose")]):
        write_ks_clip(raw, split, label, n)
    out = root / "out"
    result = extract("kinetics-sounds", raw, out, small_config(), workers=1)
    assert result.num_samples == 6 and not result.failures, result.failures
    return out


def write_tar(path: Path, members) -> None:
    """A tar with exactly these (name, bytes) members, names taken literally; a member
    (name, None, target) is a symlink to target."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, *link in members:
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link[0]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def rehash(out: Path, shard: str) -> None:
    """Make the manifest (size, sha256, sample counts), dataset.json's split size and the sample
    index (offsets, lengths, CRC-32 and frame counts of the samples the tar holds, as far as it
    reads; label and source of a new key from its .cls and .json) agree with the shard's bytes
    again, as ``avprep index`` would."""

    split = shard.rsplit("-", 1)[0]
    data = (out / shard).read_bytes()
    spans = {}
    try:
        for s in sf.read_shard_samples(io.BytesIO(data), shard):
            spans.setdefault(s.key, (s.offset, s.length, s.crc32,
                                     sum(1 for e in s.present if sf.FRAME.fullmatch(e)), s.members))
    except sf.ShardDataError:
        pass
    path = out / f"{split}.manifest.json"
    m = json.loads(path.read_text())
    for entry in m["shards"]:
        if entry["name"] == shard:
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), num_samples=len(spans))
    m["num_samples"] = sum(e["num_samples"] for e in m["shards"])
    path.write_text(json.dumps(m))
    meta = json.loads((out / "dataset.json").read_text())
    meta["splits"][split] = m["num_samples"]
    (out / "dataset.json").write_text(json.dumps(meta))
    index = out / f"{split}.samples.jsonl"
    records = [r for r in map(json.loads, index.read_text().splitlines()) if r["shard"] != shard]
    old = {r["key"]: r for r in map(json.loads, index.read_text().splitlines())}
    classes = json.loads((out / "dataset.json").read_text())["classes"]
    for key, (offset, length, crc, n_frames, members) in spans.items():      # as `avprep index` does
        fields = {f: old[key][f] for f in ("label", "label_index", "source", "duration")} \
            if key in old else _fields(members, classes)
        records.append({"key": key, **fields, "shard": shard, "offset": offset, "length": length, "crc32": crc,
                        "n_frames": n_frames})
    index.write_text("".join(json.dumps(r) + "\n" for r in records))


def _fields(members, classes) -> dict:
    """The index fields of a sample not indexed before, from its .cls and .json."""
    try:
        label = sf.parse_cls(members[sf.CLS], len(classes))
        meta = json.loads(bytes(members[sf.JSON]))
        return {"label_index": label, "label": classes[label], "source": meta["source"], "duration": meta["duration"]}
    except (KeyError, ValueError, sf.ShardDataError):
        return {"label_index": 0}


@pytest.fixture(scope="module")
def clean_master(tmp_path_factory) -> Path:
    return build_clean_dataset(tmp_path_factory.mktemp("verify-clean"))


@pytest.fixture
def out(clean_master, tmp_path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(clean_master, dst)
    return dst


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(verify_cmd, [str(a) for a in args])
    return result.exit_code, result.output


def manifest(out: Path, split: str) -> dict:
    return json.loads((out / f"{split}.manifest.json").read_text())


def all_shards(out: Path) -> list[dict]:
    """Manifest entries of every split, in verify's order (train, val, test)."""
    splits = json.loads((out / "dataset.json").read_text())["splits"]
    return [e for split in ("train", "val", "test") if split in splits for e in manifest(out, split)["shards"]]


def checks(report, shard=None) -> set[tuple[str, str]]:
    return {(p.shard, p.check) for p in report.problems if shard is None or p.shard == shard}


# ------------------------------------------------------------------ clean


def test_clean_dataset_verifies(out):
    code, text = run_cli(out)
    assert code == 0, text
    shards = all_shards(out)
    total = sum(s["num_samples"] for s in shards)
    assert f"{len(shards)} shards, {total} samples verified" in text
    report = verify(out)
    assert report.ok and report.num_samples == total and report.num_shards == len(shards) >= 3
    assert verify(out, quick=True).ok


def test_progress_reports_every_shard_in_order(out):
    seen = []
    verify(out, on_progress=lambda done, total, name: seen.append((done, total, name)))
    names = [s["name"] for s in all_shards(out)]
    assert seen == [(i + 1, len(names), n) for i, n in enumerate(names)]


# ------------------------------------------------------------------ damage to shards / manifests


def _flip(out):
    p = out / TRAIN0
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def _truncate(out):
    p = out / TRAIN0
    p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 3])


def _delete(out):
    (out / TRAIN0).unlink()


def _edit_manifest(field):
    def edit(out):
        m = manifest(out, "train")
        if field == "num_samples":
            m["shards"][0]["num_samples"] += 1
            m["num_samples"] += 1          # consistent totals: only the shard's count is wrong
            meta = json.loads((out / "dataset.json").read_text())
            meta["splits"]["train"] += 1
            (out / "dataset.json").write_text(json.dumps(meta))
        else:
            m["shards"][0]["sha256"] = hashlib.sha256(b"other").hexdigest()
        (out / "train.manifest.json").write_text(json.dumps(m))
    return edit


@pytest.mark.parametrize("damage, expected, quick_catches, index_refused", [
    (_flip, {"sha256"}, True, False),
    (_truncate, {"size", "sha256", "tar"}, True, False),
    (_delete, {"missing"}, True, False),
    (_edit_manifest("num_samples"), {"count"}, False, True),
    (_edit_manifest("sha256"), {"sha256"}, True, False),
], ids=["flip-byte", "truncate", "delete", "manifest-count", "manifest-hash"])
def test_damage_is_caught_and_names_the_shard(out, damage, expected, quick_catches, index_refused):
    damage(out)
    code, text = run_cli(out)
    assert code == 1
    assert TRAIN0 in text
    report = verify(out)
    # a manifest count the sample index disagrees with: the loader refuses the index, verify says so
    index = {"train.samples.jsonl"} if index_refused else set()
    assert {p.shard for p in report.problems} == {TRAIN0} | index
    if index_refused:
        assert [p.message for p in report.problems if p.shard in index] == [
            "does not match train.manifest.json (samples per shard differ); rebuild it with `avprep index`"]
        with pytest.raises(ShardDataError, match="does not match train.manifest.json"):
            read_dataset(out).index("train")
    assert expected <= {p.check for p in report.problems}
    quick = verify(out, quick=True)
    assert (not quick.ok) == quick_catches
    if quick_catches:
        assert {p.shard for p in quick.problems} == {TRAIN0}


# ------------------------------------------------------------------ hostile / wrong content
# Each case rewrites one shard and fixes its manifest entry (size, sha256), so the hash
# check passes and only the content check can find it.


class _Payload:
    """Creates ``marker`` when unpickled: proof of execution if it ever exists."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickled_npy(marker: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_Payload(marker), 1], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def test_payloads_are_live(tmp_path):
    """The payloads below really execute when loaded the unsafe way (so their markers mean something)."""
    pickle.loads(pickle.dumps(_Payload(tmp_path / "a")))
    np.load(io.BytesIO(_pickled_npy(tmp_path / "b")), allow_pickle=True)
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


def _first_key(members) -> str:
    return members[0][0].split(".", 1)[0]


def _replace(ext, make):
    """Replace member ``<first key>.<ext>`` by ``make(old_bytes)``."""
    def edit(members, marker):
        key = _first_key(members)
        return [(n, make(d) if n == f"{key}.{ext}" else d) for n, d in members]
    return edit


def _add(name_fn, data_fn):
    def edit(members, marker):
        key = _first_key(members)
        return members + [(name_fn(key), data_fn(marker))]
    return edit


def _spec(transform):
    def make(old):
        return _npy(transform(np.load(io.BytesIO(old), allow_pickle=False)))
    return make


def _json_edit(**changes):
    def make(old):
        return json.dumps({**json.loads(old), **changes}).encode()
    return make


def _huge_npy(old):
    """A .npy header claiming ~2 TB of float16 over a few real bytes (np.load would allocate it)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False,
                                               "shape": (10**12,)})
    return buf.getvalue() + b"\0" * 64


def _with_nan(a):
    a = a.copy()
    a[3, 5] = np.nan
    return a


def _small_jpeg(old):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (10, 8), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


def _move_first_member_last(members, marker):
    return members[1:] + members[:1]


def _drop(ext):
    def edit(members, marker):
        key = _first_key(members)
        return [(n, d) for n, d in members if n != f"{key}.{ext}"]
    return edit


HOSTILE = {
    # security: reported, never loaded
    "pyd-member": (_add(lambda k: f"{k}.pyd", lambda m: pickle.dumps(_Payload(m))), "security"),
    "pickle-member": (_add(lambda k: f"{k}.pickle", lambda m: pickle.dumps(_Payload(m))), "security"),
    "object-npy": (lambda ms, m: _replace("spec.npy", lambda old: _pickled_npy(m))(ms, m), "security"),
    "raw-pickle-as-npy": (lambda ms, m: _replace("spec.npy", lambda old: pickle.dumps(_Payload(m)))(ms, m),
                          "security"),
    "absolute-name": (_add(lambda k: f"/tmp/{k}.cls", lambda m: b"0"), "security"),
    "dotdot-name": (_add(lambda k: f"../{k}.cls", lambda m: b"0"), "security"),
    "symlink-member": (lambda ms, m: ms + [(f"{_first_key(ms)}.f009.jpg", None, "/etc/passwd")], "security"),
    # schema
    "spec-shape": (_replace("spec.npy", _spec(lambda a: a[:, :-1])), "spec"),
    "spec-nan": (_replace("spec.npy", _spec(_with_nan)), "spec"),
    "spec-dtype": (_replace("spec.npy", _spec(lambda a: a.astype(np.float64))), "spec"),
    "spec-huge-header": (_replace("spec.npy", _huge_npy), "spec"),
    "cls-out-of-range": (_replace("cls", lambda old: b"99"), "cls"),
    "cls-not-int": (_replace("cls", lambda old: b"one"), "cls"),
    "json-broken": (_replace("json", lambda old: old[:-3]), "json"),
    "json-wrong-label": (_replace("json", _json_edit(label_index=1, label="nope")), "json"),
    "json-wrong-split": (_replace("json", _json_edit(split="test")), "json"),
    "json-n-frames": (_replace("json", _json_edit(n_frames=7)), "json"),
    "frame-not-jpeg": (_replace("f000.jpg", lambda old: b"\xff\xd8garbage"), "frame"),
    "frame-wrong-size": (_replace("f000.jpg", _small_jpeg), "frame"),
    "frame-truncated": (_replace("f000.jpg", lambda old: old[: len(old) // 2]), "frame"),
    "json-deeply-nested": (_replace("json", lambda old: b"[" * 100_000 + b"]" * 100_000), "json"),
    "missing-frame": (_drop("f000.jpg"), "frame"),
    "missing-spec": (_drop("spec.npy"), "members"),
    "unknown-member": (_add(lambda k: f"{k}.txt", lambda m: b"hi"), "member"),
    "not-contiguous": (_move_first_member_last, "contiguity"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_content_is_reported_not_executed(out, tmp_path, case):
    edit, expected = HOSTILE[case]
    marker = tmp_path / "PAYLOAD-RAN"
    members = read_tar(out / TRAIN0)
    key = _first_key(members)
    write_tar(out / TRAIN0, edit(members, marker))
    rehash(out, TRAIN0)

    report = verify(out)
    assert not marker.exists(), "verify executed a pickle payload"
    assert {p.shard for p in report.problems} == {TRAIN0}, report.problems
    hits = [p for p in report.problems if p.check == expected]
    assert hits, report.problems
    if expected != "contiguity":     # (an unsafe member name keeps its path in the key)
        # a member appended after the other samples is a fragment outside the key's indexed bytes:
        # reported for the shard, naming the key
        assert all(p.key.endswith(key) or f"sample {key}" in p.message for p in hits)
    assert not {"sha256", "size"} & {p.check for p in report.problems}
    code, text = run_cli(out)
    assert code == 1 and not marker.exists()
    assert verify(out, quick=True).ok      # quick trusts a consistent manifest, by design


def test_control_characters_in_names_are_escaped_in_the_cli(out):
    members = read_tar(out / TRAIN0)
    write_tar(out / TRAIN0, members + [(f"{_first_key(members)}.\x1b[2Jx.txt", b"hi")])
    rehash(out, TRAIN0)
    code, text = run_cli(out)
    assert code == 1 and "\x1b" not in text and "\\x1b[2Jx.txt" in text


@pytest.mark.parametrize("edit", [
    lambda ds: ds["config"]["spec"].update(hop_length=0),
    lambda ds: ds.update(classes=None),
    lambda ds: ds.update(config="nope"),
], ids=["zero-hop", "no-classes", "config-not-object"])
def test_hostile_dataset_json_is_a_problem(out, edit):
    ds = json.loads((out / "dataset.json").read_text())
    edit(ds)
    (out / "dataset.json").write_text(json.dumps(ds))
    assert checks(verify(out)) == {("dataset.json", "manifest")}


def test_hostile_manifest_is_a_problem(out):
    m = manifest(out, "train")
    m["shards"][0]["num_samples"] = "2"
    (out / "train.manifest.json").write_text(json.dumps(m))
    (out / "val.manifest.json").write_text("{")
    report = verify(out)
    assert {("train.manifest.json", "manifest"), ("val.manifest.json", "manifest")} <= checks(report)


def test_not_a_tar_is_one_problem(out):
    (out / TRAIN0).write_bytes(b"\x00garbage" * 1000)
    rehash(out, TRAIN0)
    report = verify(out)
    assert [(p.shard, p.check) for p in report.problems] == [(TRAIN0, "tar")]


def _add_sample(out, split, index, members, *, first):
    """Put one more sample's ``members`` into shard ``index`` of ``split`` (before or after the
    others) and update the manifest's counts and hash, so only the sample itself is wrong."""
    shard = manifest(out, split)["shards"][index]["name"]
    existing = read_tar(out / shard)
    write_tar(out / shard, members + existing if first else existing + members)
    m = manifest(out, split)
    m["shards"][index]["num_samples"] += 1
    m["num_samples"] += 1
    (out / f"{split}.manifest.json").write_text(json.dumps(m))
    rehash(out, shard)
    return shard


def test_key_leakage_across_splits(out):
    train = read_tar(out / TRAIN0)
    key = _first_key(train)
    leaked = [(n, _json_edit(split="test")(d) if n.endswith(".json") else d)
              for n, d in train if n.startswith(key + ".")]
    test_shard = _add_sample(out, "test", 0, leaked, first=False)

    report = verify(out)
    assert [(p.shard, p.key, p.check) for p in report.problems] == [("test.samples.jsonl", "", "index"),
                                                                    (test_shard, key, "leakage")]
    assert report.problems[0].message == (f"key {key} of {test_shard} is also in {TRAIN0} of split train (a "
                                          "sample must appear once: a leak between splits, or a repeated clip)")
    assert "train" in report.problems[0].message and TRAIN0 in report.problems[0].message


def test_duplicate_key_within_split(out):
    first = read_tar(out / TRAIN0)
    key = _first_key(first)
    second = _add_sample(out, "train", 1, [m for m in first if m[0].startswith(key + ".")], first=True)
    report = verify(out)
    assert [(p.shard, p.key, p.check) for p in report.problems] == [("train.samples.jsonl", "", "index"),
                                                                    (second, key, "duplicate")]


def test_unsafe_shard_name_in_manifest_is_never_opened(out, tmp_path):
    (tmp_path / "secret-000000.tar").write_bytes(b"x")
    m = manifest(out, "train")
    m["shards"].append({"name": "../secret-000000.tar", "num_samples": 0, "bytes": 1, "sha256": "0"})
    (out / "train.manifest.json").write_text(json.dumps(m))
    report = verify(out)
    assert ("train.manifest.json", "security") in checks(report)


def test_stray_shard_and_temp_file(out):
    shutil.copy(out / TRAIN0, out / "train-000099.tar")
    (out / f"{TRAIN0}.tmp-1234").write_bytes(b"partial")
    report = verify(out)
    assert checks(report) == {("train-000099.tar", "stray"), (f"{TRAIN0}.tmp-1234", "stray")}


def test_problem_order_is_deterministic(out):
    _flip(out)
    (out / "test-000000.tar").unlink()
    a, b = verify(out), verify(out)
    assert a.problems == b.problems
    # grouped by shard, shards in verify order (train before test)
    assert [k for k, _ in groupby(p.shard for p in a.problems)] == [TRAIN0, "test-000000.tar"]


def test_json_report(out, tmp_path):
    _flip(out)
    path = tmp_path / "report.json"
    code, _ = run_cli(out, "--report", path)
    assert code == 1
    doc = json.loads(path.read_text())
    code, text = run_cli(out, "--json")       # --json prints the same document on stdout
    assert code == 1 and json.loads(text) == doc
    assert doc["ok"] is False and doc["quick"] is False
    assert {"shard": TRAIN0, "key": "", "check": "sha256",
            "message": "content does not match the manifest's sha256"} in doc["problems"]
    assert doc["num_shards"] >= 3


# ------------------------------------------------------------------ usage errors


def test_usage_errors_exit_2(tmp_path):
    code, text = run_cli(tmp_path / "nope")
    assert code == 2 and "no such folder" in " ".join(text.split())
    (tmp_path / "empty").mkdir()
    code, text = run_cli(tmp_path / "empty")
    assert code == 2 and "dataset.json" in text


# ------------------------------------------------------------------ remote locations


def test_verify_over_http_matches_local(out, http_server):
    sub = f"verify-{out.parent.name}"
    shutil.copytree(out, http_server.root / sub)
    url = f"{http_server.url}/{sub}"
    local = verify(out)
    remote = verify(url)
    assert remote.ok and (remote.num_shards, remote.num_samples) == (local.num_shards, local.num_samples)

    _flip(http_server.root / sub)
    (http_server.root / sub / "val-000000.tar").unlink()
    expected = [(p.shard, p.key, p.check) for p in verify(http_server.root / sub).problems
                if p.check != "stray"]
    report = verify(url)
    assert [(p.shard, p.key, p.check) for p in report.problems] == expected
    assert ("val-000000.tar", "missing") in checks(report) and (TRAIN0, "sha256") in checks(report)


def test_verify_s3_through_cli(out, s3_server):
    from avprep.upload import upload_folder

    bucket = s3_server.new_bucket()
    upload_folder(out, f"s3://{bucket}/ds", s3_endpoint=s3_server.endpoint)
    code, text = run_cli(f"s3://{bucket}/ds", "--s3-endpoint", s3_server.endpoint)
    assert code == 0, text
    assert f"{len(all_shards(out))} shards, 6 samples verified" in text
    code, text = run_cli(f"s3://{bucket}/nothing-here", "--s3-endpoint", s3_server.endpoint)
    assert code == 2 and "dataset.json" in text


def test_fbank_shape_is_time_by_mel(tmp_path):
    from avprep.extract import extract

    raw = tmp_path / "raw"
    write_ks_clip(raw, "train", "bowling", 0)
    write_ks_clip(raw, "test", "bowling", 1)
    cfg = ExtractConfig(spec=spec_preset("fbank", "kinetics-sounds", duration=2.0), frame_size=64)
    out = tmp_path / "out"
    extract("kinetics-sounds", raw, out, cfg, workers=1)
    assert verify(out).ok
    shard = manifest(out, "test")["shards"][0]["name"]
    transposed = _replace("spec.npy", _spec(lambda a: np.ascontiguousarray(a.T)))
    write_tar(out / shard, transposed(read_tar(out / shard), None))
    rehash(out, shard)
    [problem] = verify(out).problems
    assert (problem.shard, problem.check) == (shard, "spec")
    assert "shape (128, 1024), the dataset's is (1024, 128)" in problem.message


# ------------------------------------------------------------------ the sample index


def test_verify_catches_a_wrong_offset(tmp_path):
    write_shard_folder(tmp_path, {"train": [3], "val": [2]}, n_frames=1)
    path = tmp_path / "train.samples.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    lines[1]["offset"] += 512
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = verify(tmp_path)
    key = lines[1]["key"]
    # the key is judged by the bytes the index points at (what the loader would read) ...
    assert [(p.shard, p.key, p.check) for p in report.problems if p.key] == [("train-000000.tar", key, "checksum")]
    # ... and the shard reports where the sample really is
    assert any(p.check == "index" and f"sample {key}: offset/length/crc32" in p.message for p in report.problems)
    assert {p.shard for p in report.problems} == {"train-000000.tar"}
