"""The registry of published splits and class lists (issue 26): every entry listed with its
source, counts and hash; `check` catches clip ids in two splits, a hash or count mismatch and a
class list other than the run's; extractions record the entry they used. The real OGM-GE and
TPAMI files (/work/shared/reference-splits, never committed) are checked when present."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from avprep import splits
from avprep.config import ExtractConfig, spec_preset
from avprep.datasets import cremad
from avprep.datasets._base import hash_split
from avprep.errors import ConfigError
from avprep.extract import extract
from cli.avprep_cli import main

REF = Path("/work/shared/reference-splits")
needs_ref = pytest.mark.skipif(not (REF / "ks_train_val_test.json").is_file(), reason="reference split files absent")


def run(*args):
    return CliRunner().invoke(main, ["splits", *map(str, args)])


def _naive_content_hash(rows) -> str:
    """The registry's content hash, written out independently: sorted '<split>\\t<clip>\\t<label>\\n'."""
    return hashlib.sha256("".join(sorted(f"{s}\t{c}\t{lab}\n" for s, c, lab in rows)).encode()).hexdigest()


def test_list_shows_every_entry_with_source_counts_and_hash():
    result = run("list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for e in splits.entries():
        (line,) = [ln for ln in lines if f" {e.id} " in ln]
        assert (e.hash[:16] if e.hash else "unknown") in line
        counts = (f"{e.counts['classes']} classes" if e.kind == "classes" else
                  " / ".join(f"{s} {n:,}" for s, n in e.counts.items()) or "unknown")
        assert counts in line
        assert (e.source.get("repo") or e.source.get("tool") or e.source["paper"])[:20] in line
    as_json = json.loads(run("list", "--json").output)
    assert [d["id"] for d in as_json] == [e.id for e in splits.entries()]
    assert {e.dataset for e in splits.entries()} == {"cremad", "kinetics-sounds", "vggsound", "ave"}


def test_entries_name_their_sources_and_class_lists():
    for e in splits.entries():
        assert e.source and e.title and e.kind in splits.KINDS
        if e.kind != "classes":
            listing = splits.class_list(e)
            assert listing is not None and listing.dataset == e.dataset
        for f in e.files:                  # a file is known by a hash, else it could not be checked
            assert f.sha256 or f.git_blob
    # the shipped class lists are the adapters' (one list, one order)
    assert splits.get("cremad/classes").class_names == tuple(cremad.CLASSES)
    assert run("show", "kinetics-sounds/ogmge@1").exit_code == 0
    assert run("show", "nope/none").exit_code == 2


def test_git_blob_ids_are_what_git_records(tmp_path):
    f = tmp_path / "x.csv"
    f.write_bytes(b"abc,1\n")
    assert splits.file_hashes(f)[1] == hashlib.sha1(b"blob 6\0abc,1\n").hexdigest()


@needs_ref
@pytest.mark.parametrize("name,files", [
    ("cremad/ogmge", ["cremad_ogmge_train.csv", "cremad_ogmge_test.csv"]),
    ("kinetics-sounds/ogmge", ["ks_ogmge_train.txt", "ks_ogmge_test.txt"]),
    ("kinetics-sounds/tpami", ["ks_train_val_test.json"]),
])
def test_reference_files_are_their_entries(name, files):
    entry = splits.get(name)
    paths = [REF / f for f in files]
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths} == {f.sha256 for f in entry.files}
    report = splits.check(entry, paths)
    assert report.ok, report.problems
    # the content hash, recomputed without the registry's reader
    names = list(splits.class_list(entry).class_names)
    rows = []
    for p in paths:
        if p.suffix == ".json":
            db = json.loads(p.read_text())["database"]
            subset = {"training": "train", "validation": "val", "testing": "test"}
            rows += [(subset[v["subset"]], k, v["label"]) for k, v in db.items()]
        else:
            split = "train" if "train" in p.name else "test"
            for r in csv.reader(p.read_text().splitlines()):
                rows.append((split, r[0], names[int(r[2])] if len(r) == 3 else r[1]))
    assert _naive_content_hash(rows) == entry.content_sha256
    assert splits.identify(entry.dataset, paths).entry.id == entry.id


@needs_ref
def test_cremad_rule_entries_recomputed_from_all_7442_clips():
    clips = [r[0] for f in ("cremad_ogmge_train.csv", "cremad_ogmge_test.csv")
             for r in csv.reader((REF / f).read_text().splitlines()) if r]
    assert len(set(clips)) == 7442
    for name, unit in (("cremad/clip-hash", lambda c: c), ("cremad/speaker-hash", lambda c: c.split("_")[0])):
        rows = [(hash_split(unit(c), 0), c, c.split("_")[2]) for c in clips]
        entry = splits.get(name)
        assert _naive_content_hash(rows) == entry.content_sha256
        assert {s: sum(1 for r in rows if r[0] == s) for s in ("train", "val", "test")} == entry.counts
    speakers = {}
    for c in clips:
        speakers.setdefault(c.split("_")[0], set()).add(hash_split(c.split("_")[0], 0))
    assert len(speakers) == 91 and all(len(s) == 1 for s in speakers.values())   # no actor in two splits


@needs_ref
def test_a_copy_with_other_line_ends_matches_by_content_an_edited_one_does_not(tmp_path):
    entry = splits.get("cremad/ogmge")
    lf = [tmp_path / "train.csv", tmp_path / "test.csv"]
    for src, dst in zip(["cremad_ogmge_train.csv", "cremad_ogmge_test.csv"], lf):
        dst.write_bytes((REF / src).read_bytes().replace(b"\r\n", b"\n"))
    assert splits.file_hashes(lf[0])[0] != entry.files[0].sha256
    assert splits.check(entry, lf).ok and splits.identify("cremad", lf).how == "content"
    text = lf[0].read_text().splitlines()
    name, label = text[0].split(",")
    text[0] = f"{name},{'HAP' if label != 'HAP' else 'SAD'}"       # one label changed: same counts
    lf[0].write_text("\n".join(text) + "\n")
    result = run("check", "cremad/ogmge", "--split-file", lf[0], "--split-file", lf[1])
    assert result.exit_code == 1
    assert "✗ content hash" in result.output and "not the published rows" in result.output
    assert "✓ counts train 6,698, test 744 match" in result.output


def _write_cremad_lists(tmp_path, train, test):
    paths = []
    for split, names in (("train", train), ("test", test)):
        p = tmp_path / f"{split}.csv"
        p.write_text("".join(f"{n},{n.split('_')[2]}\n" for n in names))
        paths.append(p)
    return paths


def test_check_catches_an_overlap_and_a_hash_mismatch(tmp_path):
    train = [f"10{i:02d}_IEO_NEU_XX" for i in range(10, 20)]
    test = ["1010_IEO_NEU_XX", "1050_IEO_HAP_XX"]                 # the first is in train too
    paths = _write_cremad_lists(tmp_path, train, test)
    result = run("check", "cremad/ogmge", "--split-file", f"train={paths[0]}", "--split-file", f"test={paths[1]}")
    assert result.exit_code == 1, result.output
    assert "✗ 1 clip id(s) in more than one split (e.g. 1010_IEO_NEU_XX)" in result.output
    assert "differs from cremad/ogmge@1's 62982c24a5f4: not the published rows" in result.output
    assert "✗ train: 10 rows, cremad/ogmge@1 has 6,698" in result.output
    report = json.loads(run("check", "cremad/ogmge", "--split-file", paths[0], "--split-file", paths[1],
                            "--json").output)
    assert not report["ok"] and report["counts"] == {"train": 10, "test": 2}
    # files that match no entry are said to
    result = run("check", "--split-file", paths[0], "--split-file", paths[1])
    assert result.exit_code == 1 and "match no registry entry" in result.output


def test_extractions_record_their_entry_and_check_class_lists(raw_dataset, tmp_path):
    cfg = ExtractConfig(spec=spec_preset("paper", "cremad", duration=1.0, n_fft=256, win_length=256,
                                         hop_length=128), frame_size=32, shard_size=100)
    raw = raw_dataset("cremad", clips=12)
    for split_by, entry in ((None, "cremad/clip-hash@1"), ("speaker", "cremad/speaker-hash@1")):
        out = tmp_path / f"out-{split_by}"
        result = extract("cremad", raw, out, cfg, workers=1, split_by=split_by)
        assert result.split_registry["id"] == entry and result.split_registry["match"] == "rule"
        assert json.loads((out / "dataset.json").read_text())["split_registry"] == result.split_registry
    check = run("check", "--shards", tmp_path / "out-speaker")          # the entry dataset.json names
    assert check.exit_code == 0, check.output
    assert "✓ the run's 6 classes are cremad/classes@1 (same names, same order)" in check.output
    assert "✓ no sample key is in two splits of the extraction" in check.output
    # --splits names the entry the splits must be
    assert splits.resolve("cremad", "cremad/speaker-hash", split_by="speaker").entry.id == "cremad/speaker-hash@1"
    with pytest.raises(ConfigError, match="--splits cremad/ogmge@1: the dataset's own splits do not match it; "
                                          "pass its files with --split-file"):
        extract("cremad", raw, tmp_path / "never", cfg, workers=1, splits="cremad/ogmge")
    assert not (tmp_path / "never").exists()
    with pytest.raises(ConfigError, match="is a kinetics-sounds entry"):
        extract("cremad", raw, tmp_path / "never", cfg, workers=1, splits="kinetics-sounds/ogmge")


def test_check_catches_a_class_list_other_than_the_runs(raw_dataset, tmp_path):
    raw = raw_dataset("ave", clips=6, num_classes=3)
    out = tmp_path / "out"
    cfg = ExtractConfig(spec=spec_preset("paper", "ave", duration=1.0, n_fft=256, win_length=256, hop_length=128),
                        frame_size=32, shard_size=100)
    extract("ave", raw, out, cfg, workers=1)
    result = run("check", "ave/classes", "--shards", out)
    assert result.exit_code == 1
    assert "✗ the run's class list differs from ave/classes@1: missing: " in result.output
    # the run's own split files are the synthetic ones, not AVE's: nothing recorded
    assert json.loads((out / "dataset.json").read_text())["split_registry"] is None
    keys = {"train": {"a", "b"}, "test": {"b"}}
    report = splits.check(splits.get("ave/official"), keys_by_split=keys)
    assert report.problems == ["1 sample key(s) in more than one split of the extraction (e.g. b)"]
