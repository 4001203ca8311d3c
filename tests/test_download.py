"""`avprep download` (issue 26): a published clip list fetched through yt-dlp and FFmpeg into the
raw layout `avprep extract` reads, against a local HTTP server (yt-dlp's generic extractor) whose
URLs answer 404, 403, 5xx, slowly, not at all or truncated. The YouTube-only outcomes (private,
removed, geo-blocked) are classified from the messages yt-dlp's source raises."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest

from avprep import synth
from avprep.config import ExtractConfig, spec_preset
from avprep.datasets import get as get_adapter
from avprep.datasets._base import RemoteClip
from avprep.download import (
    ClipFetcher,
    FetchSettings,
    RateLimiter,
    classify,
    download,
    find_ffmpeg,
    read_availability,
    read_statuses,
)
from avprep.download import fetch as fetch_module
from avprep.errors import ConfigError
from avprep.extract import extract
from avprep.verify import verify
from tests._servers import FileServer

pytest.importorskip("yt_dlp")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- classification

# Messages as yt-dlp raises them (DownloadError text, "ERROR: " stripped): the reasons are the
# strings in yt-dlp's source - yt_dlp/extractor/youtube/_video.py (its test cases' 'skip' reasons,
# the geo subreason it raises GeoRestrictedError with, the rate-limit and age-gate reasons),
# yt_dlp/extractor/common.py (raise_geo_restricted's default) - and the generic extractor's
# HTTP errors as this test's server makes it raise them.
REAL_MESSAGES = [
    ("[youtube] yZIXLfi8CZQ: Private video. Sign in if you've been granted access to this video", "private", False),
    ("[youtube] 6SJNVb0GnPI: This video has been removed for violating YouTube's policy on hate speech.",
     "removed", False),
    ("[youtube] abcdefghijk: Video unavailable. This video is no longer available because the YouTube account "
     "associated with this video has been terminated.", "removed", False),
    ("[youtube] abcdefghijk: The uploader has not made this video available in your country.", "geo-blocked", False),
    ("[youtube] abcdefghijk: This video is not available from your location due to geo restriction",
     "geo-blocked", False),
    ("[youtube] s7_qI6_mIXc: Video unavailable", "unavailable", False),
    ("[youtube] Ms7iBXnlUO8: This video is not available.", "unavailable", False),
    ("[youtube] abcdefghijk: This video does not exist.", "unavailable", False),
    ("[generic] x: Unable to download webpage: HTTP Error 404: Not Found (caused by <HTTPError 404: Not Found>)",
     "unavailable", False),
    ("[youtube] abcdefghijk: This content isn't available, try again later. The current session has been "
     "rate-limited by YouTube for up to an hour.", "error", True),
    ("[generic] x: Unable to download webpage: HTTP Error 403: Forbidden (caused by <HTTPError 403: Forbidden>)",
     "error", True),
    ("[generic] x: Unable to download webpage: HTTPConnectionPool(host='127.0.0.1', port=1): Read timed out.",
     "error", True),
    ("ffmpeg: Error opening input file http://127.0.0.1/x.mp4. / Error opening input files: End of file",
     "error", True),
    ("[youtube] abcdefghijk: Sign in to confirm your age. This video may be inappropriate for some users.",
     "error", False),
]


@pytest.mark.parametrize("message,status,transient", REAL_MESSAGES)
def test_classify_real_messages(message, status, transient):
    assert classify(message) == (status, transient)


def test_rate_limiter_spaces_starts():
    now, slept = [0.0], []

    def sleep(s):
        slept.append(s)
        now[0] += s

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for t in (0.0, 0.0, 0.1, 1.0):
        now[0] = max(now[0], t)
        limiter.wait()
    assert slept == pytest.approx([0.25, 0.25])        # starts at 0, 0.25, 0.5 and 1.0 s
    RateLimiter(None, clock=lambda: 0.0, sleep=lambda s: pytest.fail("no limit, no sleep")).wait()


def test_fetcher_pickles_and_backs_off(monkeypatch):
    fetcher = ClipFetcher(FetchSettings(url_template="http://x/{id}", ffmpeg="ffmpeg", retries=3, backoff=0.5))
    assert pickle.loads(pickle.dumps(fetcher)).settings == fetcher.settings
    slept = []
    fetcher.sleep = slept.append
    monkeypatch.setattr(fetch_module, "_resolve", lambda url, s: ({}, "HTTP Error 503: Service Unavailable"))
    task = fetch_module.FetchTask(RemoteClip("k", "abcdefghijk", 0.0, 10.0, "a", "train", "v/k.mp4"), "/nonexistent",
                                  "/nonexistent")
    st = fetcher(task)
    assert (st.status, st.attempts) == ("error", 4) and "503" in st.message
    assert slept == [0.5, 1.0, 2.0]


def test_ffmpeg_absent_is_named(monkeypatch, tmp_path):
    import imageio_ffmpeg
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: (_ for _ in ()).throw(RuntimeError("no binary")))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="no ffmpeg executable: install imageio-ffmpeg"):
        find_ffmpeg()
    with pytest.raises(ConfigError, match="--ffmpeg /no/such/ffmpeg: not an executable ffmpeg"):
        find_ffmpeg("/no/such/ffmpeg")


# ----------------------------------------------------------------------------- list plans

def test_kinetics_plans_from_csv_and_ogmge_lists(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                        "playing bagpipes,abcdefghijk,20,30,train,0\n"
                        "abseiling,bcdefghijkl,0,10,train,0\n"            # not a KS class
                        "tapping pen,cdefghijklm,5,15,val,0\n")
    lst = tmp_path / "my_test.txt"
    lst.write_text("-3Mwkq-7TV4_2,10,23\n--4-0ihtnBU_000058_000068,10,4\n")
    plan = get_adapter("kinetics-sounds").download([csv_path, lst])
    got = [(c.key, c.start, c.end, c.split, c.label, c.path) for c in plan.clips]
    assert got == [
        ("abcdefghijk_000020_000030", 20.0, 30.0, "train", "playing_bagpipes",
         "train/playing_bagpipes/abcdefghijk_000020_000030.mp4"),
        ("cdefghijklm_000005_000015", 5.0, 15.0, "val", "tapping_pen", "val/tapping_pen/cdefghijklm_000005_000015.mp4"),
        ("-3Mwkq-7TV4_000002_000012", 2.0, 12.0, "test", "shoveling_snow",
         "test/shoveling_snow/-3Mwkq-7TV4_000002_000012.mp4"),
        ("--4-0ihtnBU_000058_000068", 58.0, 68.0, "test", "dribbling_basketball",
         "test/dribbling_basketball/--4-0ihtnBU_000058_000068.mp4"),
    ]
    assert plan.skipped == {"class not in Kinetics-Sounds": 1}


def test_ave_plan_takes_windows_from_audioset_segments(tmp_path):
    (tmp_path / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n"
                                              "Bark&abcdefghijk&good&2&6\nBark&abcdefghijk&good&7&9\n"
                                              "Flute&bcdefghijkl&good&0&10\nCat&cdefghijklm&good&1&3\n")
    (tmp_path / "testSet.txt").write_text("Flute&bcdefghijkl&good&0&10\n")
    (tmp_path / "trainSet.txt").write_text("Bark&abcdefghijk&good&2&6\nCat&cdefghijklm&good&1&3\n")
    seg = tmp_path / "eval_segments.csv"
    seg.write_text("# Segments csv created Sun Mar  5 10:54:31 2017\n# YTID, start_seconds, end_seconds, "
                   "positive_labels\nabcdefghijk, 30.000, 40.000, \"/m/05tny_\"\nbcdefghijkl, 0.000, 10.000, "
                   "\"/m/0l14j_\"\n")
    adapter = get_adapter("ave")
    with pytest.raises(ConfigError, match="--segments"):
        adapter.download([tmp_path / "Annotations.txt"])
    plan = adapter.download([tmp_path / "Annotations.txt"], segments=[seg])
    assert [(c.key, c.start, c.end, c.split, c.label, c.path) for c in plan.clips] == [
        ("abcdefghijk", 30.0, 40.0, "train", "Bark", "AVE/abcdefghijk.mp4"),
        ("bcdefghijkl", 0.0, 10.0, "test", "Flute", "AVE/bcdefghijkl.mp4"),
        ("cdefghijklm", None, None, "train", "Cat", "AVE/cdefghijklm.mp4")]
    assert sorted(plan.files) == ["Annotations.txt", "testSet.txt", "trainSet.txt"]
    assert plan.notes == ["1 video(s) are in none of the --segments files: no window, not fetched"]


# ----------------------------------------------------------------------------- end to end

LABELS = ("dog barking", "helicopter", "rain on surface")
# 30 clips: (server rules for the clip's URL, media served, final status). Rules are taken one per
# request, the last one kept (tests/_servers.py); clips 10.. answer their first request slowly so
# the killed run is still running when it is killed.
SPECS = [
    ([], "av", "ok"), ([], "av", "ok"), (["404"], "av", "unavailable"), ([], "av", "ok"),
    ([], "video", "no-audio"), ([], "av", "ok"), ([], "short", "too-short"), ([], "av", "ok"),
    ([], "av", "ok"), (["404"], "av", "unavailable"),
    (["slow:0.4", "serve"], "av", "ok"), (["403"], "av", "error"), (["403", "serve"], "av", "ok"),
    (["500", "serve"], "av", "ok"), (["truncate"], "av", "error"), (["truncate", "serve"], "av", "ok"),
    (["stall:1.5"], "av", "error"), (["slow:0.4", "serve"], "av", "ok"), (["slow:0.4", "serve"], "av", "ok"),
    (["slow:0.4", "serve"], "av", "ok"), (["slow:0.4", "serve"], "av", "ok"), (["slow:0.4", "serve"], "av", "ok"),
    (["slow:0.4", "serve"], "av", "ok"), (["slow:0.4", "serve"], "av", "ok"), (["slow:0.4", "serve"], "av", "ok"),
    (["slow:0.4", "serve"], "av", "ok"), (["slow:0.4", "serve"], "av", "ok"), (["slow:0.4", "serve"], "av", "ok"),
    (["slow:0.4", "serve"], "av", "ok"), (["slow:0.4", "serve"], "av", "ok"),
]
# What the list and SPECS make, worked out by hand: every 5th clip (i % 5 == 4) is in test, the
# label is LABELS[i % 3]. train: 24 clips, 20 ok (dog barking 7/8: 6 too short; helicopter 7/8:
# 16 stalls; rain 6/8: 2 is 404, 11 always 403); test (4 9 14 19 24 29): 19 24 29 ok, one a class.
EXPECTED_LINES = [
    "vggsound train: 20 of 24 available (83.3%), 3 classes, smallest class 75%",
    "vggsound test: 3 of 6 available (50.0%), 3 classes, smallest class 50%",
]
EXPECTED_STATUSES = {"ok": 23, "unavailable": 2, "too-short": 1, "no-audio": 1, "error": 3}


def _ytid(i: int) -> str:
    return f"clip{i:03d}" + "x" * 4              # 11 characters, like a YouTube id


def _expected_per_class():
    out: dict = {}
    for i, (_, _, status) in enumerate(SPECS):
        split, label = ("test" if i % 5 == 4 else "train"), LABELS[i % 3]
        counts = out.setdefault(split, {}).setdefault(label, [0, 0])
        counts[0] += status == "ok"
        counts[1] += 1
    return out


@pytest.fixture
def clip_server(tmp_path):
    media = tmp_path / "media"
    kinds = {"av": {}, "video": {"audio": False}, "short": {"duration": 3.0}}
    made = {k: synth.write_clip(media / f"{k}.mp4", **{"duration": 14.0, "label_index": 0, "num_classes": 3,
                                                       "fps": 5, "size": (64, 48), **kw})
            for k, kw in kinds.items()}
    server = FileServer(tmp_path / "www")
    server.root.mkdir()
    for i, (rules, kind, _) in enumerate(SPECS):
        shutil.copy(made[kind], server.root / f"{_ytid(i)}.mp4")
        if rules:
            server.rules[f"{_ytid(i)}.mp4"] = list(rules)
    server.start()
    yield server
    server.stop()


def _options(server) -> list[str]:
    return ["--url-template", server.url + "/{id}.mp4", "--connections", "3", "--rate", "0", "--retries", "1",
            "--backoff", "0.05", "--timeout", "0.5"]


def test_download_30_clips_killed_resumed_extracted(clip_server, tmp_path):
    assert sum(1 for s in SPECS if s[2] == "ok") == EXPECTED_STATUSES["ok"]
    lst = tmp_path / "vggsound.csv"
    lst.write_text("".join(f"{_ytid(i)},{i % 4},{LABELS[i % 3]},{'test' if i % 5 == 4 else 'train'}\n"
                           for i in range(len(SPECS))))
    raw = tmp_path / "raw"
    cmd = [sys.executable, "-m", "cli.avprep_cli", "download", "--dataset", "vggsound", "--list", str(lst),
           "--out", str(raw), *_options(clip_server)]

    # 1. killed (SIGKILL to its whole process group, FFmpeg included) once 10 clips are recorded
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(read_statuses(raw)) < 10:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the download never recorded 10 clips"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_statuses(raw)
    assert 10 <= len(before) < len(SPECS)
    # nothing partial where extraction reads: every file in the layout is a whole, checked clip
    layout = [p for p in raw.rglob("*") if p.is_file() and ".avprep-download" not in p.parts]
    for path in layout:
        if path.suffix == ".mp4":
            with av.open(str(path)) as c:
                assert c.streams.video and c.streams.audio and abs(c.duration / 1e6 - 10.0) < 0.3
    assert {p.name for p in layout if p.suffix != ".mp4"} <= {"vggsound.csv", "download.jsonl"}
    assert not (raw / "availability.json").exists()

    # 2. the rerun fetches only what is missing: nothing for clips with a final status or a file
    n_log = len(clip_server.log)
    result = download("vggsound", [lst], raw, url_template=clip_server.url + "/{id}.mp4", connections=3, rate=None,
                      retries=1, backoff=0.05, timeout=0.5)
    asked = {path for _, path, _ in clip_server.log[n_log:]}
    done_before = {k for k, st in before.items() if st.status != "error"}
    assert not asked & {f"{k.rsplit('_', 1)[0]}.mp4" for k in done_before}
    assert result.kept >= sum(1 for st in before.values() if st.status == "ok")     # (+ one renamed unrecorded)
    assert result.skipped == sum(1 for st in before.values() if st.status not in ("ok", "error"))
    statuses = read_statuses(raw)
    assert {k: st.status for k, st in statuses.items()} == {f"{_ytid(i)}_{i % 4:06d}": s for i, (_, _, s)
                                                            in enumerate(SPECS)}

    # 3. the availability summary: exactly the numbers SPECS make
    avail = read_availability(raw)
    assert avail.lines() == EXPECTED_LINES == result.availability.lines()
    assert avail.statuses == EXPECTED_STATUSES
    assert {s: sp.per_class for s, sp in avail.splits.items()} == _expected_per_class()
    ok_keys = sorted(f"{_ytid(i)}_{i % 4:06d}" for i, s in enumerate(SPECS) if s[2] == "ok")
    import hashlib
    assert avail.available_sha256 == hashlib.sha256("".join(k + "\n" for k in ok_keys).encode()).hexdigest()
    # each clip is its own window: clip 3 starts at second 3 of its source (synth's time marker)
    with av.open(str(raw / "video" / "c" / f"{_ytid(3)}_000003.mp4")) as c:
        first = next(c.decode(c.streams.video[0]))
    assert synth.read_marker(first.to_ndarray(format="rgb24"))[0] == 3

    # 4. a third run is idempotent: no request but for the clips that ended with an error
    n_log = len(clip_server.log)
    again = download("vggsound", [lst], raw, url_template=clip_server.url + "/{id}.mp4", connections=3,
                     rate=None, retries=0, timeout=0.5)
    assert again.fetched == {"error": 3} and again.kept == 23 and again.skipped == 4
    assert {p for _, p, _ in clip_server.log[n_log:]} == {f"{_ytid(i)}.mp4" for i in (11, 14, 16)}
    assert again.availability.to_dict() == avail.to_dict()

    # 5. extracted and verified; dataset.json carries the availability
    cfg = ExtractConfig(spec=spec_preset("paper", "vggsound", duration=2.0, n_fft=256, win_length=256,
                                         hop_length=128), frame_size=32, shard_size=100)
    out = tmp_path / "shards"
    extracted = extract("vggsound", raw, out, cfg, workers=1)
    assert extracted.num_samples == 23 and extracted.availability == EXPECTED_LINES
    assert verify(out).ok
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["availability"] == avail.to_dict() and meta["split_registry"] is None
    assert sorted(meta["classes"]) == sorted(LABELS)


def test_youtube_only_outcomes_are_recorded(monkeypatch, tmp_path):
    """private / removed / geo-blocked come from YouTube's messages: the worker records what
    classify makes of them (the resolution step stands in for YouTube)."""
    answers = {"aaaaaaaaaaa": "[youtube] aaaaaaaaaaa: Private video. Sign in if you've been granted access",
               "bbbbbbbbbbb": "[youtube] bbbbbbbbbbb: This video has been removed by the uploader",
               "ccccccccccc": "[youtube] ccccccccccc: The uploader has not made this video available in your country"}
    monkeypatch.setattr(fetch_module, "_resolve",
                        lambda url, s: ({}, answers[url.rsplit("=", 1)[1]]))
    lst = tmp_path / "vggsound.csv"
    lst.write_text("".join(f"{y},0,dog barking,train\n" for y in answers))
    result = download("vggsound", [lst], tmp_path / "raw", rate=None, retries=0)
    assert {k: st.status for k, st in read_statuses(tmp_path / "raw").items()} == {
        "aaaaaaaaaaa_000000": "private", "bbbbbbbbbbb_000000": "removed", "ccccccccccc_000000": "geo-blocked"}
    assert result.availability.lines() == ["vggsound train: 0 of 3 available (0.0%), 1 classes, smallest class 0%"]
    assert result.availability.statuses == {"private": 1, "removed": 1, "geo-blocked": 1}


def test_kinetics_sounds_and_ave_downloads_extract(tmp_path):
    """The layouts the other two datasets download into are the ones their adapters read."""
    server = FileServer(tmp_path / "www")
    server.root.mkdir()
    ids = ["ksaaaaaaaaa", "ksbbbbbbbbb", "avecccccccc", "aveddddddd_"]
    for i, y in enumerate(ids):
        synth.write_clip(server.root / f"{y}.mp4", duration=12.0, label_index=i % 2, num_classes=2, fps=5,
                         size=(64, 48))
    server.start()
    try:
        options = {"url_template": server.url + "/{id}.mp4", "rate": None, "retries": 0, "timeout": 2.0}
        cfg = ExtractConfig(spec=spec_preset("paper", "kinetics-sounds", duration=2.0, n_fft=256, win_length=256,
                                             hop_length=128), frame_size=32, shard_size=100)
        train, test = tmp_path / "my_train.txt", tmp_path / "my_test.txt"   # OGM-GE list formats
        train.write_text("ksaaaaaaaaa_000001_000011,10,2\n")
        test.write_text("ksbbbbbbbbb_2,10,5\n")
        ks = download("kinetics-sounds", [train, test], tmp_path / "ks", **options)
        assert ks.availability.lines() == ["kinetics-sounds train: 1 of 1 available (100.0%), 1 classes, "
                                           "smallest class 100%",
                                           "kinetics-sounds test: 1 of 1 available (100.0%), 1 classes, "
                                           "smallest class 100%"]
        assert ks.availability.split_registry is None            # not the published lists
        got = extract("kinetics-sounds", tmp_path / "ks", tmp_path / "ks-out", cfg, workers=1,
                      split_files=[train, test])
        assert got.num_samples == 2 and not got.failures

        (tmp_path / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n"
                                                  "Bark&avecccccccc&good&1&4\nFlute&aveddddddd_&good&0&10\n")
        segments = tmp_path / "segments.csv"
        segments.write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                            "avecccccccc, 1.000, 11.000, \"/m/05tny_\"\naveddddddd_, 0.000, 10.000, \"/m/0l14j_\"\n")
        ave = download("ave", [tmp_path / "Annotations.txt"], tmp_path / "ave", segments=[segments], **options)
        assert ave.availability.lines() == ["ave all: 2 of 2 available (100.0%), 2 classes, smallest class 100%"]
        got = extract("ave", tmp_path / "ave", tmp_path / "ave-out", cfg, workers=1)
        assert got.num_samples == 2 and sorted(got.classes) == ["Bark", "Flute"]
        assert json.loads((tmp_path / "ave-out" / "dataset.json").read_text())["availability"]["available"] == 2
    finally:
        server.stop()


def test_cli_prints_the_summary_and_exits_1_while_errors_remain(tmp_path):
    from click.testing import CliRunner

    from cli.avprep_cli import main

    server = FileServer(tmp_path / "www")
    server.root.mkdir()
    for y in ("okokokokoko", "forbiddenxx"):
        synth.write_clip(server.root / f"{y}.mp4", duration=11.0, label_index=0, num_classes=2, fps=5, size=(64, 48))
    server.rules["forbiddenxx.mp4"] = ["403"]
    server.start()
    try:
        lst = tmp_path / "vggsound.csv"
        lst.write_text("okokokokoko,0,dog barking,train\nforbiddenxx,0,dog barking,test\n")
        args = ["download", "--dataset", "vggsound", "--list", str(lst), "--out", str(tmp_path / "raw"),
                "--url-template", server.url + "/{id}.mp4", "--rate", "0", "--retries", "0"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "vggsound train: 1 of 1 available (100.0%), 1 classes, smallest class 100%" in result.output
        assert "vggsound test: 0 of 1 available (0.0%), 1 classes, smallest class 0%" in result.output
        assert "│ dog barking │ 1 / 1 │ 0 / 1 │" in result.output
        assert "1 clip(s) ended with an error" in result.output and "rerun the same command" in result.output
        as_json = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)      # the rerun: one fetch
        assert as_json["fetched"] == {"error": 1} and as_json["kept"] == 1
        assert as_json["availability"]["splits"]["test"]["statuses"] == {"error": 1}
    finally:
        server.stop()


def test_a_second_download_into_the_same_folder_is_refused(tmp_path):
    import fcntl

    lst = tmp_path / "vggsound.csv"
    lst.write_text("aaaaaaaaaaa,0,dog barking,train\n")
    (tmp_path / "raw" / ".avprep-download").mkdir(parents=True)
    with open(tmp_path / "raw" / ".avprep-download" / "lock", "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another avprep download is writing into this folder"):
            download("vggsound", [lst], tmp_path / "raw", rate=None)
