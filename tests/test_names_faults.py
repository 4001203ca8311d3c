"""File names that are not UTF-8 (issue 23), in every adapter: a clip whose name (and, where the
layout lists clips in a text file, its line there) holds the byte 0xff is extracted like any
other, and every file the extraction writes (resume state, sample index, manifests, failures,
dataset.json, the card) is valid UTF-8 JSON that shows the byte as ``\\xff``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avprep import synth
from avprep.config import ExtractConfig, spec_preset
from avprep.extract import extract
from avprep.outdir import STATE_DIR
from avprep.verify import verify

ROOT = Path(__file__).resolve().parent.parent
BAD = b"\xff"


def _name(path: Path) -> bytes:
    return os.fsencode(path)


def _link(src: Path, dst_bytes: bytes) -> None:
    os.link(os.fsencode(src), dst_bytes)


def _add_line(path: Path, line: bytes) -> None:
    with open(path, "ab") as f:
        f.write(line + b"\n")


def _cremad(raw: Path) -> bytes:
    video = sorted((raw / "VideoFlash").iterdir())[0]
    stem = video.stem.rsplit("_", 1)[0] + "_X"          # 1001_DFA_ANG_X\xff: still an ANG clip
    _link(video, _name(raw / "VideoFlash") + b"/" + stem.encode() + BAD + b".flv")
    return stem.encode() + BAD


def _kinetics(raw: Path) -> bytes:
    video = next(p for p in sorted(raw.rglob("*.mp4")))
    stem = b"ab" + BAD + b"cdefghi_000010_000020"
    _link(video, _name(video.parent) + b"/" + stem + b".mp4")
    return stem


def _vggsound(raw: Path) -> bytes:
    video = next(p for p in sorted(raw.rglob("*.mp4")))
    row = (raw / "vggsound.csv").read_text().splitlines()[0].split(",")
    ytid = b"zz" + BAD + b"zzzzzzzz"
    _link(video, _name(video.parent) + b"/" + ytid + b"_000012.mp4")
    _add_line(raw / "vggsound.csv", ytid + b",12," + row[2].encode() + b",train")
    return ytid + b"_000012"


def _ave(raw: Path) -> bytes:
    video = sorted((raw / "AVE").iterdir())[0]
    line = next(ln for ln in (raw / "Annotations.txt").read_text().splitlines()[1:] if video.stem in ln)
    vid = b"yy" + BAD + b"yyyyyyyy"
    _link(video, _name(raw / "AVE") + b"/" + vid + b".mp4")
    new = line.replace(video.stem, "@@").encode().replace(b"@@", vid)
    _add_line(raw / "Annotations.txt", new)
    _add_line(raw / "trainSet.txt", new)
    return vid


def _folder(raw: Path) -> bytes:
    video = next(p for p in sorted(raw.rglob("*.mp4")))
    os.mkdir(_name(raw) + b"/cl" + BAD + b"ss")
    _link(video, _name(raw) + b"/cl" + BAD + b"ss/cl" + BAD + b"p.mp4")
    return b"cl" + BAD + b"p"


ADAPTERS = {"cremad": _cremad, "kinetics-sounds": _kinetics, "vggsound": _vggsound, "ave": _ave, "folder": _folder}


def _check_outputs(out: Path) -> str:
    """Every JSON/JSONL the extraction wrote parses as UTF-8; returns their text together."""
    texts = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".jsonl", ".md"):
            text = p.read_bytes().decode("utf-8")          # raises on any invalid byte
            if p.suffix == ".json":
                json.loads(text)
            elif p.suffix == ".jsonl":
                [json.loads(line) for line in text.splitlines()]
            texts.append(text)
    assert (out / STATE_DIR).is_dir() and any((out / STATE_DIR).glob("*.tar.json"))
    return "\n".join(texts)


@pytest.mark.parametrize("dataset", sorted(ADAPTERS))
def test_a_name_that_is_not_utf8_is_extracted_in_every_adapter(dataset, tmp_path):
    raw = synth.make_dataset(dataset, tmp_path / "raw", 4 if dataset != "kinetics-sounds" else 3,
                             duration=1.0, fps=2, size=(32, 24), num_classes=2 if dataset != "cremad" else None)
    stem = ADAPTERS[dataset](raw)
    out = tmp_path / "out"
    cfg = ExtractConfig(spec=spec_preset("paper", dataset, duration=1.0), frame_size=16, shard_size=100)
    result = extract(dataset, raw, out, cfg, workers=1)
    text = _check_outputs(out)
    shown = stem.decode("utf-8", "backslashreplace").replace("\\", "_")
    keys = [json.loads(line)["key"] for p in out.glob("*.samples.jsonl") for line in p.read_text().splitlines()]
    assert result.num_samples == len(keys)
    assert any(shown in k for k in keys), (shown, keys)
    assert "\\udcff" not in text and "xff" in text
    assert verify(out).ok


def test_the_cremad_case_of_the_issue_through_the_cli(raw_dataset, tmp_path):
    """A hard link ``1091_WSI_ANG_X\\xff.flv`` beside the real clips (it stopped the extraction
    with a UnicodeEncodeError while saving the shard state)."""
    raw = tmp_path / "raw"
    shutil.copytree(raw_dataset("cremad", clips=6, duration=1.0), raw)
    video = sorted((raw / "VideoFlash").iterdir())[0]
    os.link(video, _name(raw / "VideoFlash") + b"/1091_WSI_ANG_X\xff.flv")
    r = subprocess.run([sys.executable, "-m", "cli.avprep_cli", "extract", "--dataset", "cremad", "--src", str(raw),
                        "--out", str(tmp_path / "out"), "--workers", "1", "--duration", "1", "--frame-size", "16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1091_WSI_ANG_X_xff" in _check_outputs(tmp_path / "out")
