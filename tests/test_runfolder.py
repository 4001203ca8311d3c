"""The run folder's one owner: atomic writes, torn-line-tolerant readers, typed errors."""
from __future__ import annotations

import json
import os

import pytest

from ogmge_train import runfolder
from ogmge_train.errors import RunFolderError, RunWriteError


def test_atomic_write_replaces_whole_and_fsyncs(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text('{"old": 1}')
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])

    def replace(src, dst):
        # the data is on disk (fsynced) and complete before it takes the final name
        assert synced, "rename before fsync"
        assert json.loads(open(src).read()) == {"new": [1, 2]}
        assert json.loads(path.read_text()) == {"old": 1}
        renamed.append((os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    runfolder.write_summary(tmp_path, {"new": [1, 2]})
    assert renamed == [("summary.json.tmp", "summary.json")]
    assert json.loads(path.read_text()) == {"new": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    runfolder.write_config(tmp_path, {"seed": 0})

    def broken(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(RunWriteError, match=r"config\.json: cannot write \(No space left on device\)"):
        runfolder.write_config(tmp_path, {"seed": 1})
    assert not list(tmp_path.glob("*.tmp"))
    assert runfolder.read_config(tmp_path) == {"seed": 0}


def test_jsonl_append_and_torn_last_line(tmp_path):
    path = tmp_path / runfolder.METRICS
    runfolder.append_jsonl(path, [{"epoch": 0, "x": float("nan")}, {"epoch": 1}])
    with open(path, "a") as f:
        f.write('{"epoch": 2, "tr')          # a kill mid-append
    rows = runfolder.read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["x"] != rows[0]["x"]
    # a bad line that is not the last one is corruption, named with its line number
    path.write_text('{"epoch": 0}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl:2: not JSON"):
        runfolder.read_metrics(tmp_path)
    assert runfolder.read_steps(tmp_path) == []       # absent: no rows yet


def test_keep_epochs_drops_replayed_and_torn_lines(tmp_path):
    path = tmp_path / runfolder.STEPS
    path.write_text('{"epoch": 0, "step": 1}\n{"epoch": 1, "step": 2}\n{"epo\n{"epoch": 2, "step": 3}\n')
    runfolder.keep_epochs(path, 1)
    assert [r["step"] for r in runfolder.read_jsonl(path)] == [1, 2]
    assert path.read_text().count("\n") == 2


def test_readers_raise_typed_errors_naming_the_file(tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder"):
        runfolder.read_config(tmp_path)
    assert RunFolderError.exit_code == 2
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(RunFolderError, match=r"config\.json: unreadable JSON"):
        runfolder.read_config(tmp_path)
    assert runfolder.read_summary(tmp_path) is None and runfolder.read_probe(tmp_path, "audio") is None
    assert not runfolder.finished(tmp_path, 1)
    with pytest.raises(RunFolderError, match="best or last"):
        runfolder.checkpoint_path(tmp_path, "newest")


def test_expand_runs_numeric_seed_order(tmp_path):
    for k in (10, 2, 0):
        runfolder.write_config(runfolder.seed_dir(tmp_path / "sw", k).mkdir(parents=True) or
                               runfolder.seed_dir(tmp_path / "sw", k), {"seed": k})
    (tmp_path / "sw" / "seed-x").mkdir()
    assert [p.name for p in runfolder.expand_runs([tmp_path / "sw"])] == ["seed-0", "seed-2", "seed-10"]
    with pytest.raises(RunFolderError, match="neither a run folder"):
        runfolder.expand_runs([tmp_path])


def test_absolute_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runfolder.absolute_location("shards") == str(tmp_path / "shards")
    assert runfolder.absolute_location("s3://b/p") == "s3://b/p"
    assert runfolder.absolute_location("") == ""


def test_new_run_folder_takes_the_next_number_and_never_an_existing_path(tmp_path):
    runs = tmp_path / "runs"
    assert runfolder.run_stem("cremad", "concat", "ogm-ge") == "cremad-concat-ogm-ge"
    assert runfolder.run_stem("cremad", "concat", "none", modality="audio") == "cremad-audio-none"
    for hostile in ("../../etc", "/abs", "..", "", "a/b\nc"):       # dataset.json's name is untrusted
        stem = runfolder.run_stem(hostile, "sum", "ogm")
        assert "/" not in stem and "." not in stem and "\n" not in stem and stem.endswith("-sum-ogm"), stem
    assert runfolder.new_run_folder("cremad-concat-ogm-ge", runs) == runs / "cremad-concat-ogm-ge-1"
    (runs / "cremad-concat-ogm-ge-3").mkdir()                      # a gap: numbers only grow
    (runs / "cremad-concat-ogm-ge-4").write_text("not a folder")    # any existing path is taken
    (runs / "cremad-concat-ogm-ge-x").mkdir()
    (runs / "cremad-concat-ogm-ge-extra-9").mkdir()                 # another stem
    made = runfolder.new_run_folder("cremad-concat-ogm-ge", runs)
    assert made == runs / "cremad-concat-ogm-ge-5" and made.is_dir() and not any(made.iterdir())
    assert runfolder.new_run_folder("cremad-sum-none", runs) == runs / "cremad-sum-none-1"


def test_an_unused_run_folder_is_removed_and_one_with_results_kept(tmp_path):
    runs = tmp_path / "runs"
    unused = runfolder.new_run_folder("ks-sum-umt", runs)
    (unused / runfolder.CONFIG).write_text("{}")
    (unused / runfolder.LOCK).write_text("")
    (unused / runfolder.STEPS).write_text("")
    assert runfolder.remove_unused_run_folder(unused) and not unused.exists()
    for name, text in ((runfolder.STEPS, '{"epoch": 0}\n'), (runfolder.METRICS, ""), ("notes.txt", "mine")):
        run = runfolder.new_run_folder("ks-sum-umt", runs)
        (run / runfolder.CONFIG).write_text("{}")
        (run / name).write_text(text)
        assert not runfolder.remove_unused_run_folder(run) and (run / name).read_text() == text
    sub = runfolder.new_run_folder("ks-sum-umt", runs)
    (sub / "seed-0").mkdir()
    assert not runfolder.remove_unused_run_folder(sub) and (sub / "seed-0").is_dir()
    assert not runfolder.remove_unused_run_folder(runs / "never-made")


def test_runs_racing_for_a_number_each_get_their_own_folder(tmp_path, monkeypatch):
    import threading

    runs, n = tmp_path / "runs", 8
    # every racer lists the folder before any creates one, so all start from the same number
    listed = threading.Barrier(n)
    real_iterdir = type(runs).iterdir

    def iterdir(self):
        found = list(real_iterdir(self))
        listed.wait(timeout=30)
        return iter(found)

    monkeypatch.setattr(type(runs), "iterdir", iterdir)
    made: list = []
    threads = [threading.Thread(target=lambda: made.append(runfolder.new_run_folder("ks-sum-ogm", runs)))
               for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in made) == sorted(f"ks-sum-ogm-{i}" for i in range(1, n + 1))


def test_new_run_folder_in_an_unwritable_place_is_one_typed_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunFolderError, match=r"file.*cannot create the run folder.*pass --out RUN"):
        runfolder.new_run_folder("x", tmp_path / "file" / "runs")
