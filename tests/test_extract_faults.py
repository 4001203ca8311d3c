"""Hostile raw trees and a failing disk (issue 15 items 3, 4, 7): non-UTF-8 file names are
extracted or reported, folder links never lead outside --src or twice into one folder, and a
disk that fills up ends in one typed line with the temp files removed."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from avprep import shards, synth
from avprep.config import ExtractConfig, spec_preset
from avprep.datasets import get as get_adapter
from avprep.errors import OutputError
from avprep.extract import extract
from avprep.verify import verify


def _cfg() -> ExtractConfig:
    return ExtractConfig(spec=spec_preset("paper", "folder", duration=1.0), frame_size=32, shard_size=100)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return synth.write_clip(tmp_path_factory.mktemp("clip") / "c.mp4", duration=1.0, label_index=0,
                            num_classes=2, fps=5, size=(48, 32))


def _bad(name: bytes) -> str:
    """A file name that is not UTF-8, as Python holds it (lone surrogates)."""
    return os.fsdecode(name)


def test_non_utf8_names_are_extracted_or_reported(clip, tmp_path):
    src = tmp_path / "raw"
    for folder in ("alpha", _bad(b"b\xe9ta")):
        (src / folder).mkdir(parents=True)
    shutil.copy(clip, src / "alpha" / "plain.mp4")
    shutil.copy(clip, src / "alpha" / _bad(b"caf\xe9.mp4"))
    shutil.copy(clip, src / _bad(b"b\xe9ta") / "x.mp4")
    (src / "alpha" / _bad(b"bro\xffken.mp4")).write_bytes(b"not a video")
    out = tmp_path / "out"
    result = extract("folder", src, out, _cfg(), workers=1, max_failures=1.0)
    assert result.num_samples == 3 and result.classes == ["alpha", "b\\xe9ta"]
    assert verify(out).ok
    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text("utf-8").splitlines()]
    assert failure["source"] == "alpha/bro\\xffken.mp4" and failure["stage"] == "open"
    assert "bro\\xffken.mp4" in failure["error"]
    index = [json.loads(line) for s in result.samples for line in
             (out / f"{s}.samples.jsonl").read_text("utf-8").splitlines()]
    assert sorted(r["source"] for r in index) == ["alpha/caf\\xe9.mp4", "alpha/plain.mp4", "b\\xe9ta/x.mp4"]
    assert all(r["key"].isascii() for r in index)
    again = extract("folder", src, out, _cfg(), workers=1, max_failures=1.0)   # and reruns too
    assert again.resumed_shards == again.num_shards


def test_folder_links_never_leave_src_nor_loop(clip, tmp_path):
    outside = tmp_path / "outside" / "gamma"
    outside.mkdir(parents=True)
    shutil.copy(clip, outside / "secret.mp4")
    src = tmp_path / "raw"
    (src / "alpha" / "sub").mkdir(parents=True)
    (src / "beta").mkdir()
    shutil.copy(clip, src / "alpha" / "a.mp4")
    shutil.copy(clip, src / "alpha" / "sub" / "b.mp4")
    shutil.copy(clip, src / "beta" / "c.mp4")
    (src / "alpha" / "sub" / "up").symlink_to("..")              # a loop
    (src / "alpha" / "up2").symlink_to(".")                      # another one
    (src / "beta" / "again").symlink_to("../alpha/sub")          # a folder reached twice
    (src / "beta" / "leak").symlink_to(outside)                  # out of --src
    (src / "gamma").symlink_to(outside)                          # a whole class out of --src
    disc = get_adapter("folder").discover(src)
    assert sorted(c.video.relative_to(src).as_posix() for c in disc.clips) == \
        ["alpha/a.mp4", "alpha/sub/b.mp4", "beta/c.mp4"]
    assert disc.classes == ["alpha", "beta"]
    assert disc.skipped["folder link leading outside --src"] == 2
    assert disc.skipped["folder reached twice (link)"] == 3


def test_abort_removes_the_temp_file_when_close_fails(tmp_path):
    writer = shards.ShardWriter(tmp_path / "x.tar")
    writer.add("a", {"cls": b"0"})
    real = writer._file

    class Full:
        closed = False

        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._file = Full()
    writer.abort()
    assert not writer.tmp.exists() and not (tmp_path / "x.tar").exists()


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    """The one atomic-file helper (output folders and run folders both write through it)."""
    from avprep import atomicfile
    from ogmge_train import runfolder
    from ogmge_train.errors import RunWriteError

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for name in ("dataset.json", "summary.json"):
        (tmp_path / name).write_bytes(b"old")
    with pytest.raises(OSError):
        shards.write_atomic(tmp_path / "dataset.json", full, tmp=shards.tmp_path(tmp_path / "dataset.json"))
    with pytest.raises(RunWriteError, match="summary.json: cannot write"):
        runfolder._write_atomic(tmp_path / "summary.json", full)
    assert runfolder.write_atomic is atomicfile.write_atomic is shards.write_atomic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "summary.json"]
    assert {p.read_bytes() for p in tmp_path.iterdir()} == {b"old"}


@pytest.mark.parametrize("code,text", [(errno.ENOSPC, "no space left on the device"),
                                       (errno.EROFS, "read-only file system")])
def test_disk_full_while_writing_manifests_is_one_typed_line(clip, tmp_path, monkeypatch, code, text):
    src = tmp_path / "raw"
    (src / "alpha").mkdir(parents=True)
    shutil.copy(clip, src / "alpha" / "a.mp4")
    real = shards.atomic_write_bytes

    def full(path, data, **kw):
        if str(path).endswith(".manifest.json"):
            raise OSError(code, os.strerror(code))
        return real(path, data, **kw)

    monkeypatch.setattr(shards, "atomic_write_bytes", full)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        extract("folder", src, out, _cfg(), workers=1)
    message = str(e.value)
    assert "\n" not in message and text in message and "manifest.json" in message
    assert list(out.glob("*.tar")) and not (out / "dataset.json").exists()     # nothing lost
    monkeypatch.setattr(shards, "atomic_write_bytes", real)
    result = extract("folder", src, out, _cfg(), workers=1)                   # resumes
    assert result.resumed_shards == result.num_shards and verify(out).ok
