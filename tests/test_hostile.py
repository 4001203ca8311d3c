"""Hostile inputs through the real `extract` (issue 3): every bad clip becomes one line of
failures.jsonl with a stage and a one-line reason naming the file, every good clip is
extracted, the run never crashes and leaves no partial shard, and the output verifies.

The matrix lives in one ``folder``-layout tree (``RAW/<split>/<class>/<file>``), a good clip
beside each bad one, extracted once with two workers and two samples per shard. The "label
not in the class list" case needs a dataset whose class list is fixed, so it runs in a
Kinetics-Sounds tree (SPEC §2: skipped and counted) and a CREMA-D tree (a "label" failure).

Observed behaviour (avprep as of this test; the lead reports it):

| case | file | outcome | stage | reason / what the sample holds |
|---|---|---|---|---|
| zero-byte file | empty.mp4 | failure | open | "empty file (0 bytes)" |
| random bytes named .mp4 | random.mp4 | failure | open | "cannot open as media: ... Invalid data found when processing input" |
| truncated MP4, moov missing (index at the end, last 30% cut) | no-moov.mp4 | failure | open | "cannot open as media: ... Invalid data found ..." |
| MP4 cut mid-stream (faststart remux, cut at 50%) | cut-mid.mp4 | failure | audio | "audio decode error: ... Invalid data found ... avcodec_send_packet()" (the cut packet is AAC here) |
| video without audio stream | no-audio.mp4 | failure | audio | "no audio stream" |
| audio-only file (AAC in .m4a) | audio-only.m4a | failure | video | "no video stream" |
| 0.3 s clip | short.mp4 | sample | - | 1 frame (the middle one), spec padded by tiling |
| 48 kHz 5.1 audio | surround.mp4 | sample | - | downmixed and resampled: spectrum peak at the class tone |
| 8 kHz mono audio | narrow.mp4 | sample | - | upsampled: spectrum peak at the class tone |
| odd frame size 321x181 (H.264 4:4:4) | odd.mp4 | sample | - | frames 114x64 (short side 64, aspect kept) |
| variable frame rate | vfr.mp4 | sample | - | the frames shown at 0.5 s and 1.5 s (pts 0.3 s and 1.5 s) |
| rotation 90 (display matrix side data, PyAV ``set_display_rotation``) | rotated.mp4 | sample | - | frames rotated to portrait: 64x85 from an 80x60 coded picture |
| spaces + non-ASCII name | "ñandú clip 1.mp4" | sample | - | ASCII key, source path kept exactly |
| same clip name in two splits | train+test dup.mp4 | train copy kept | duplicate | "duplicate key in test (also in train); kept train/alpha/dup.mp4" |
| label not in class list (KS) | train/juggling/x.mp4 | skipped | - | counted in ``skipped``, not a failure (SPEC §2) |
| label not in class list (CREMA-D) | 1002_DFA_XYZ_XX.flv | failure | label | "emotion 'XYZ' of '1002_DFA_XYZ_XX' is not one of NEU, ..." |

Decode failures name the file by its path relative to ``--src``, so failures.jsonl does not
depend on where the raw data lives.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from avprep import synth
from avprep.config import ExtractConfig, spec_preset
from avprep.extract import extract
from avprep.verify import verify
from tests._helpers import read_tar, small_config, write_ks_clip

CLASSES = ("alpha", "bravo")
CFG = ExtractConfig(spec=spec_preset("paper", "folder", duration=2.0), frame_size=64, shard_size=2)
BIN_HZ = 16000 / 512


# ------------------------------------------------------------------ writers of odd media


def clip(path: Path, label: str = "alpha", **kw) -> Path:
    kw = {"duration": 2.0, "fps": 5, "size": (80, 60), "seed": len(path.name), **kw}
    return synth.write_clip(path, label_index=CLASSES.index(label), num_classes=len(CLASSES), **kw)


def write_av(path: Path, *, frame_ms=(), size=(80, 60), audio_s=2.0, rate=16000) -> Path:
    """H.264 frames at the given presentation times (ms; grey level 20*i) and/or a 250 Hz AAC tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=30) if frame_ms else None
        a = c.add_stream("aac", rate=rate, layout="mono") if audio_s else None   # streams before muxing
        if v is not None:
            v.width, v.height, v.pix_fmt = *size, "yuv420p"
            v.time_base = v.codec_context.time_base = Fraction(1, 1000)
            v.options = {"preset": "ultrafast", "threads": "1"}
            for i, t in enumerate(frame_ms):
                f = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 20 * i, np.uint8), format="rgb24")
                f.pts, f.time_base = t, Fraction(1, 1000)
                c.mux(v.encode(f))
            c.mux(v.encode(None))
        if a is not None:
            n, size_ = int(audio_s * rate), a.codec_context.frame_size or 1024
            wave = (0.1 * np.sin(2 * np.pi * 250 * np.arange(n) / rate)).astype(np.float32)
            for s in range(0, n, size_):
                fr = av.AudioFrame.from_ndarray(wave[None, s:s + size_].copy(), format="fltp", layout="mono")
                fr.sample_rate, fr.pts = rate, s
                c.mux(a.encode(fr))
            c.mux(a.encode(None))
    return path


def faststart(src: Path, dst: Path) -> Path:
    """Remux with the moov atom first, so that cutting the file cuts the media data, not the index."""
    with av.open(str(src)) as i, av.open(str(dst), "w", options={"movflags": "+faststart"}) as o:
        streams = {s.index: o.add_stream_from_template(s) for s in i.streams}
        for p in i.demux():
            if p.dts is not None:
                p.stream = streams[p.stream.index]
                o.mux(p)
    return dst


def cut(path: Path, fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _no_moov(p: Path):
    clip(p)
    assert p.read_bytes().find(b"moov") > p.read_bytes().find(b"mdat")   # index at the end
    cut(p, 0.7)


def _cut_mid(p: Path):
    tmp = clip(p.with_name("full-source.mp4"), duration=4.0)
    faststart(tmp, p)
    tmp.unlink()
    cut(p, 0.5)


# ------------------------------------------------------------------ checks of extracted samples


def frames_of(out: Path, rec: dict) -> list[np.ndarray]:
    members = dict(read_tar(out / rec["shard"]))
    n = json.loads(members[f"{rec['key']}.json"])["n_frames"]
    return [np.asarray(Image.open(io.BytesIO(members[f"{rec['key']}.f{i:03d}.jpg"]))) for i in range(n)]


def peak_hz(out: Path, rec: dict) -> float:
    spec = np.load(io.BytesIO(dict(read_tar(out / rec["shard"]))[f"{rec['key']}.spec.npy"]))
    return float(np.argmax(np.exp(spec.astype(np.float64)).mean(axis=1))) * BIN_HZ


def _tone(out, rec):
    expected = synth.tone_frequency(CLASSES.index(rec["label"]), len(CLASSES))
    assert abs(peak_hz(out, rec) - expected) <= BIN_HZ


def _sizes(expected):
    def check(out, rec):
        assert [f.shape[1::-1] for f in frames_of(out, rec)] == expected
    return check


def _short(out, rec):
    assert len(frames_of(out, rec)) == 1 and rec["duration"] == pytest.approx(0.3, abs=0.11)
    _tone(out, rec)


def _vfr(out, rec):
    greys = [f.mean() for f in frames_of(out, rec)]
    # frames at pts 0, 40, 60, 300, 900, 1000, 1010, 1500, 1990 ms: t=0.5 shows #3, t=1.5 shows #7
    assert greys == [pytest.approx(60, abs=3), pytest.approx(140, abs=3)]


def _source_kept(out, rec):
    assert rec["key"].isascii() and " " not in rec["key"] and "." not in rec["key"]


@dataclass(frozen=True)
class Case:
    name: str
    rel: str                               # path under RAW
    write: Callable[[Path], object]
    stage: str | tuple | None              # expected failure stage(s), None = extracted
    check: Callable | None = None          # extra checks of the extracted sample
    reason: str = ""                       # expected words of the failure's reason


CASES = [
    Case("zero-byte", "train/alpha/empty.mp4", lambda p: p.write_bytes(b""), "open", reason="empty"),
    Case("random-bytes", "train/bravo/random.mp4",
         lambda p: p.write_bytes(np.random.default_rng(0).bytes(20000)), "open"),
    Case("truncated-no-moov", "train/alpha/no-moov.mp4", _no_moov, "open", reason="cannot open"),
    # one demux pass: whichever stream hits the cut first names the stage
    Case("cut-mid-stream", "train/bravo/cut-mid.mp4", _cut_mid, ("audio", "video"), reason="decode error"),
    Case("no-audio-stream", "train/alpha/no-audio.mp4", lambda p: clip(p, audio=False), "audio"),
    Case("audio-only", "train/bravo/audio-only.m4a", lambda p: write_av(p), "video"),
    Case("0.3s-clip", "train/alpha/short.mp4", lambda p: clip(p, duration=0.3), None, _short),
    Case("48k-5.1", "train/bravo/surround.mp4",
         lambda p: clip(p, "bravo", sample_rate=48000, audio_layout="5.1"), None, _tone),
    Case("8k-mono", "train/alpha/narrow.mp4", lambda p: clip(p, sample_rate=8000), None, _tone),
    Case("odd-size-321x181", "train/bravo/odd.mp4", lambda p: clip(p, "bravo", size=(321, 181)), None,
         _sizes([(114, 64)] * 2)),     # 321 * 64 / 181 = 113.5, rounded half to even
    Case("variable-frame-rate", "train/alpha/vfr.mp4",
         lambda p: write_av(p, frame_ms=(0, 40, 60, 300, 900, 1000, 1010, 1500, 1990)), None, _vfr),
    Case("rotation-90", "train/bravo/rotated.mp4", lambda p: clip(p, "bravo", rotation=90), None,
         _sizes([(64, 85)] * 2)),
    Case("spaces-non-ascii-name", "train/alpha/ñandú clip 1.mp4", lambda p: clip(p), None, _source_kept),
    Case("duplicate-across-splits", "test/alpha/dup.mp4", lambda p: clip(p), "duplicate", reason="train"),
]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The matrix extracted once: (out, result, samples by source, failures by source)."""
    root = tmp_path_factory.mktemp("hostile")
    raw = root / "raw"
    for case in CASES:
        path = raw / case.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        case.write(path)
        label = path.parent.name
        clip(path.parent / f"good-{case.name}.mp4", label)             # the good neighbour
    clip(raw / "train/alpha/dup.mp4")                                   # the kept copy
    out = root / "out"
    events = []
    result = extract("folder", raw, out, CFG, workers=2, max_failures=1.0, on_event=events.append)
    samples = {}
    for path in sorted(out.glob("*.samples.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            samples[rec["source"]] = rec
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    return out, result, samples, failures, events


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_clip(hostile, case):
    out, result, samples, failures, _ = hostile
    good = f"{Path(case.rel).parent.as_posix()}/good-{case.name}.mp4"
    assert good in samples, f"the good clip beside {case.rel} was not extracted"
    _tone(out, samples[good])
    mine = [f for f in failures if f["source"] == case.rel]
    if case.stage is None:
        assert not mine, mine
        rec = samples[case.rel]
        case.check(out, rec)
        return
    assert case.rel not in samples
    assert len(mine) == 1, failures
    f = mine[0]
    assert f["stage"] in ((case.stage,) if isinstance(case.stage, str) else case.stage), f
    assert "\n" not in f["error"] and case.reason in f["error"], f
    if case.stage != "duplicate":    # decode errors name the file
        assert Path(case.rel).name in f["error"], f


def test_duplicate_keeps_the_first_copy(hostile):
    out, _, samples, failures, _ = hostile
    assert samples["train/alpha/dup.mp4"]["key"] == "dup"
    dup = [f for f in failures if f["stage"] == "duplicate"]
    assert dup == [{"key": "dup", "source": "test/alpha/dup.mp4", "stage": "duplicate",
                    "error": dup[0]["error"]}] and "train/alpha/dup.mp4" in dup[0]["error"]


def test_run_is_whole_and_verifies(hostile):
    out, result, samples, failures, events = hostile
    bad = [c for c in CASES if c.stage]
    assert len(failures) == len(bad) and len(samples) == len(CASES) + 1 + len(CASES) - len(bad)
    assert result.num_samples == len(samples) and events[-1].kind == "finish"
    assert not list(out.rglob("*.tmp-*"))
    report = verify(out)
    assert report.ok, report.problems
    assert report.num_samples == len(samples)
    on_disk = sorted(p.name for p in out.glob("*.tar"))
    listed = sorted(e["name"] for m in out.glob("*.manifest.json") for e in json.loads(m.read_text())["shards"])
    assert on_disk == listed


# ------------------------------------------------------------------ labels outside the class list


def test_label_not_in_kinetics_sounds_is_skipped(tmp_path):
    raw = tmp_path / "raw"
    write_ks_clip(raw, "train", "bowling", 1)
    write_ks_clip(raw, "train", "juggling_balls", 2)            # a Kinetics class outside KS-31
    result = extract("kinetics-sounds", raw, tmp_path / "out", small_config(), workers=1)
    assert result.num_samples == 1 and result.failures == []
    assert sum(result.skipped.values()) == 1
    assert verify(tmp_path / "out").ok


def test_label_not_in_cremad_classes_is_a_failure(tmp_path):
    raw = tmp_path / "raw"
    for name, label in (("1001_DFA_ANG_XX", 5), ("1002_DFA_XYZ_XX", 0)):
        synth.write_clip(raw / "VideoFlash" / f"{name}.flv", duration=2.0, label_index=label, num_classes=6,
                         fps=5, size=(80, 60), audio_path=raw / "AudioWAV" / f"{name}.wav")
    cfg = ExtractConfig(spec=spec_preset("paper", "cremad", duration=2.0), frame_size=64, shard_size=2)
    out = tmp_path / "out"
    result = extract("cremad", raw, out, cfg, workers=1, max_failures=1.0)
    assert result.num_samples == 1
    assert [(f["key"], f["stage"]) for f in result.failures] == [("1002_DFA_XYZ_XX", "label")]
    assert "XYZ" in result.failures[0]["error"]
    lines = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert lines == result.failures
    assert verify(out).ok
