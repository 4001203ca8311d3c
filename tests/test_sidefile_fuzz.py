"""``avprep verify`` and the training loader agree on every mutation of the side files (issue 23;
the model of tests/test_fuzz.py, which mutates the tars): seeded edits of the sample indexes
(any field of a line, a duplicated, deleted or moved line), of the manifests (counts, sizes,
hashes, shard entries, class counts) and of dataset.json (split sizes, class names and order).

For every mutant: the loader never yields a sample verify rejects and skips exactly those
(unless it refused the dataset as a whole, with a typed error, when verify found something
too); when verify finds nothing the loader gives exactly the clean dataset's samples and
labels; when the loader refuses, verify does not pass. The default suite runs ``N_DEFAULT``
mutants, ``-m slow`` ``N_SLOW``. Plus the three cases the fault campaign found, each alone.
"""
from __future__ import annotations

import json
import random
import shutil

import pytest

from avprep import shardformat as sf
from avprep.verify import verify
from tests._mutants import assert_agree, verdict

N_DEFAULT = 400
N_SLOW = 2000
INDEX_FIELDS = ("key", "label", "label_index", "shard", "source", "duration", "offset", "length", "crc32", "n_frames")


@pytest.fixture(scope="module")
def clean(raw_dataset, tmp_path_factory):
    from avprep.config import ExtractConfig, spec_preset
    from avprep.extract import extract

    raw = raw_dataset("cremad", clips=12)
    out = tmp_path_factory.mktemp("sidefiles") / "out"
    cfg = ExtractConfig(spec=spec_preset("paper", "cremad", duration=0.5), frame_size=24, shard_size=2)
    extract("cremad", raw, out, cfg, workers=1)
    v = verdict(out, "train")
    assert not v.verify_keys and v.loader_error is None
    return out, v


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _other(rng, value, pool):
    """A different value for a field: another line's, or a nudged one."""
    choices = [v for v in pool if v != value]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (choices and rng.random() < 0.5):
        return rng.choice(choices) if choices else f"{value}x"
    return value + rng.choice([-1, 1, 7, 512])


def mutate(out, rng: random.Random) -> str:
    """One edit of ``out``'s side files; returns what it did."""
    meta = json.loads((out / sf.DATASET).read_text())
    splits = [s for s in meta["splits"] if (out / sf.index_name(s)).exists()]
    split = rng.choice(splits)
    index, manifest = out / sf.index_name(split), out / sf.manifest_name(split)
    rows = _lines(index)
    kind = rng.choice(["field", "field", "field", "dup-line", "del-line", "move-line", "order",
                       "manifest", "manifest", "dataset"])
    if kind == "field":
        i, f = rng.randrange(len(rows)), rng.choice(INDEX_FIELDS)
        rows[i][f] = _other(rng, rows[i][f], [r[f] for r in rows])
        _write_lines(index, rows)
        return f"{split} line {i}: {f} -> {rows[i][f]!r}"
    if kind == "dup-line":
        i = rng.randrange(len(rows))
        rows.insert(rng.randrange(len(rows) + 1), dict(rows[i]))
        _write_lines(index, rows)
        return f"{split} line {i} twice"
    if kind == "del-line":
        i = rng.randrange(len(rows))
        del rows[i]
        _write_lines(index, rows)
        return f"{split} line {i} deleted"
    if kind == "move-line":
        other = rng.choice([s for s in splits if s != split] or [split])
        i = rng.randrange(len(rows))
        row = rows.pop(i)
        _write_lines(index, rows)
        _write_lines(out / sf.index_name(other), _lines(out / sf.index_name(other)) + [row])
        return f"{split} line {i} moved to {other}"
    if kind == "order":
        rng.shuffle(rows)
        _write_lines(index, rows)
        return f"{split} lines shuffled"
    if kind == "manifest":
        m = json.loads(manifest.read_text())
        what = rng.choice(["num_samples", "shard-count", "bytes", "sha256", "name", "drop", "dup", "class_counts"])
        e = rng.choice(m["shards"])
        if what == "num_samples":
            m["num_samples"] += rng.choice([-1, 1])
        elif what == "shard-count":
            e["num_samples"] += rng.choice([-1, 1])
            m["num_samples"] = sum(s["num_samples"] for s in m["shards"])
        elif what == "bytes":
            e["bytes"] += rng.choice([-512, 512])
        elif what == "sha256":
            e["sha256"] = "0" * 64
        elif what == "name":
            e["name"] = rng.choice([s["name"] for s in m["shards"]])
        elif what == "drop":
            m["shards"].remove(e)
            m["num_samples"] = sum(s["num_samples"] for s in m["shards"])
        elif what == "dup":
            m["shards"].append(dict(e))
            m["num_samples"] = sum(s["num_samples"] for s in m["shards"])
        else:
            label = rng.choice(sorted(m["class_counts"]))
            m["class_counts"][label] += 1
        manifest.write_text(json.dumps(m))
        return f"{split} manifest: {what}"
    what = rng.choice(["split-size", "swap", "rename", "append"])
    if what == "split-size":
        meta["splits"][split] += rng.choice([-5, -1, 1, 5])
    elif what == "swap":
        i, j = rng.sample(range(len(meta["classes"])), 2)
        meta["classes"][i], meta["classes"][j] = meta["classes"][j], meta["classes"][i]
    elif what == "rename":
        meta["classes"][rng.randrange(len(meta["classes"]))] += "x"
    else:
        meta["classes"].append("zulu")
    (out / sf.DATASET).write_text(json.dumps(meta))
    return f"dataset.json: {what}"


def _agree(out, clean_verdict, what: str, index_keys) -> None:
    v = verdict(out, "train", index_keys=index_keys)
    assert_agree(v, what)
    report_ok = not v.verify_keys and not v.verify_checks
    if report_ok:      # verify passed: the loader must see exactly the clean dataset
        assert v.loader_error is None and v.loader_yielded == clean_verdict.loader_yielded, what
        assert v.loader_labels == clean_verdict.loader_labels, what
    if v.loader_error is not None:
        assert not report_ok, what


def _run(clean, tmp_path, seed: int, n: int) -> None:
    out, clean_verdict = clean
    index_keys = {r["key"] for r in _lines(out / sf.index_name("train"))}
    rng = random.Random(seed)
    for i in range(n):
        work = tmp_path / f"m{i}"
        shutil.copytree(out, work)
        what = mutate(work, rng)
        _agree(work, clean_verdict, f"mutant {i}: {what}", index_keys)
        shutil.rmtree(work)


def test_verify_and_loader_agree_on_side_file_mutants(clean, tmp_path):
    _run(clean, tmp_path, seed=23, n=N_DEFAULT)


@pytest.mark.slow
def test_verify_and_loader_agree_on_many_side_file_mutants(clean, tmp_path):
    _run(clean, tmp_path, seed=2023, n=N_SLOW)


# ---------------------------------------------------------------- the campaign's three cases

def _copy(clean, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(clean[0], out)
    return out


def test_an_index_label_index_that_disagrees_with_the_tar_is_reported(clean, tmp_path):
    out = _copy(clean, tmp_path)
    rows = _lines(out / "train.samples.jsonl")
    meta = json.loads((out / sf.DATASET).read_text())
    r = rows[0]
    r["label_index"] = (r["label_index"] + 1) % len(meta["classes"])
    r["label"] = meta["classes"][r["label_index"]]
    _write_lines(out / "train.samples.jsonl", rows)
    problems = [(p.shard, p.check, p.message) for p in verify(out).problems]
    assert ("train.samples.jsonl", "index", f"line of {r['key']}: label_index is {r['label_index']}, the sample "
            f"in {r['shard']} has {(r['label_index'] - 1) % len(meta['classes'])}") in problems


def test_a_duplicated_index_line_is_reported(clean, tmp_path):
    out = _copy(clean, tmp_path)
    rows = _lines(out / "train.samples.jsonl")
    _write_lines(out / "train.samples.jsonl", rows + [rows[1]])
    report = verify(out)
    assert not report.ok
    assert any(p.shard == "train.samples.jsonl" and f"key {rows[1]['key']} of {rows[1]['shard']} is also in "
               f"{rows[1]['shard']}" in p.message for p in report.problems), report.problems


def test_dataset_json_split_sizes_are_checked_against_the_manifests(clean, tmp_path):
    out = _copy(clean, tmp_path)
    meta = json.loads((out / sf.DATASET).read_text())
    meta["splits"]["train"] += 5
    (out / sf.DATASET).write_text(json.dumps(meta))
    problems = [(p.shard, p.check, p.message) for p in verify(out).problems]
    n = meta["splits"]["train"] - 5
    assert problems == [("dataset.json", "manifest", f"splits.train is {n + 5} but train.manifest.json lists "
                                                     f"{n} samples")]
