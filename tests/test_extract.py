"""avprep.extract on real (synthetic) media: schema, determinism, bad inputs, resume."""
from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avprep import synth
from avprep.config import ExtractConfig, spec_preset
from avprep.datasets import get as get_adapter
from avprep.datasets._base import Clip
from avprep.errors import ConfigError
from avprep.extract import extract
from avprep.outdir import STATE_DIR
from avprep.shards import ShardWriter, estimate_sample_bytes, plan_shards, write_shard

N_CLIPS = 8
FRAME = 48


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(spec=spec_preset("paper", "cremad"), frame_size=FRAME,
                         shard_size=kw.pop("shard_size", 3), **kw)


def _public_files(out: Path) -> dict[str, bytes]:
    """Everything a user sees (the resume state is a dot-folder)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _samples(shard: Path) -> dict[str, list[tuple[str, bytes]]]:
    """key -> [(ext, bytes)] in tar order, checking that a sample's members are contiguous."""
    out: dict[str, list] = {}
    order = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if not order or order[-1] != key:
                assert key not in out, f"{key}: members not contiguous"
                order.append(key)
            out.setdefault(key, []).append((ext, tar.extractfile(m).read()))
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return synth.make_dataset("cremad", tmp_path_factory.mktemp("raw") / "cremad", N_CLIPS, seed=3)


@pytest.fixture(scope="module")
def out1(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out1")
    result = extract("cremad", raw, out, _cfg(), workers=1)
    assert result.ok and result.num_samples == N_CLIPS
    return out


def test_samples_match_schema(raw, out1):
    disc = get_adapter("cremad").discover(raw)
    clips = {c.key: c for c in disc.clips}
    dataset = json.loads((out1 / "dataset.json").read_text())
    assert dataset["classes"] == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    assert dataset["config"]["spec"]["hop_length"] == 159 and dataset["config"]["frame_size"] == FRAME
    n_frames = [json.loads(dict(m)["json"])["n_frames"] for shard in out1.glob("*.tar")
                for m in _samples(shard).values()]
    assert dataset["spec_shape"] == [257, 299] and dataset["max_frames"] == max(n_frames)
    seen = {}
    for split in dataset["splits"]:
        manifest = json.loads((out1 / f"{split}.manifest.json").read_text())
        index = [json.loads(line) for line in (out1 / f"{split}.samples.jsonl").read_text().splitlines()]
        assert manifest["num_samples"] == len(index) == dataset["splits"][split]
        keys_in_split = []
        for entry in manifest["shards"]:
            shard = out1 / entry["name"]
            data = shard.read_bytes()
            assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            samples = _samples(shard)
            assert len(samples) == entry["num_samples"] <= 3
            keys_in_split += list(samples)
            for key, members in samples.items():
                seen[key] = (split, entry["name"], members)
        assert keys_in_split == sorted(keys_in_split) == [r["key"] for r in index]
        assert [r["shard"] for r in index] == [seen[k][1] for k in keys_in_split]
        counts = {}
        for r in index:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
        assert manifest["class_counts"] == counts
    assert set(seen) == set(clips)

    for key, (split, _, members) in seen.items():
        clip = clips[key]
        exts = [e for e, _ in members]
        n = len(exts) - 3
        assert exts == ["cls", "json", "spec.npy"] + [f"f{i:03d}.jpg" for i in range(n)]
        m = dict(members)
        meta = json.loads(m["json"])
        label_index = dataset["classes"].index(clip.label)
        assert m["cls"] == str(label_index).encode()
        assert (meta["key"], meta["label"], meta["label_index"], meta["split"]) == (key, clip.label, label_index, split)
        assert meta["source"] == f"VideoFlash/{key}.flv" and meta["audio_source"] == f"AudioWAV/{key}.wav"
        assert meta["speaker"] == key.split("_")[0]
        # synthetic CREMA-D clips last 2-4 s: one frame per whole second, at i + 0.5 s
        assert n == meta["n_frames"] == math.floor(meta["duration"] + 1e-6) >= 2
        assert meta["frame_times"] == [i + 0.5 for i in range(n)]
        spec = np.load(io.BytesIO(m["spec.npy"]), allow_pickle=False)
        assert spec.shape == (257, 299) and spec.dtype == np.float16 and np.isfinite(spec).all()
        assert meta["spec_shape"] == [257, 299] and meta["sample_rate"] == 16000
        for i in range(n):
            with Image.open(io.BytesIO(m[f"f{i:03d}.jpg"])) as im:
                assert im.format == "JPEG" and min(im.size) == FRAME and list(im.size) == meta["frame_size"]
                # the synthetic frame's marker says which second it shows
                sec, frac = synth.read_marker(np.asarray(im.convert("RGB")), scale=FRAME / 72)
                assert sec == i


def test_spectrogram_is_the_wav_through_the_preset(raw, out1):
    """The stored spec is log|STFT| of the WAV tiled to 3 s, by an independent numpy STFT."""
    from scipy.io import wavfile

    index = [json.loads(line) for line in (out1 / "train.samples.jsonl").read_text().splitlines()]
    row = next(r for r in index if r["duration"] < 3)       # one that needs tiling
    spec = np.load(io.BytesIO(dict(_samples(out1 / row["shard"])[row["key"]])["spec.npy"]))
    sr, pcm = wavfile.read(raw / "AudioWAV" / f"{row['key']}.wav")
    assert sr == 16000
    wave = np.tile(pcm / 32768.0, 2)[:48000]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)      # periodic Hann
    starts = np.arange(0, 48000 - 512 + 1, 159)
    ref = np.log(np.abs(np.fft.rfft(wave[starts[:, None] + np.arange(512)] * window, axis=1)).T + 1e-7)
    assert ref.shape == spec.shape == (257, 299)
    np.testing.assert_allclose(spec.astype(np.float64), ref, atol=2e-2, rtol=2e-3)


def test_two_workers_give_identical_bytes(raw, out1, tmp_path):
    events = []
    result = extract("cremad", raw, tmp_path, _cfg(), workers=2, on_event=events.append)
    assert result.ok
    assert _public_files(tmp_path) == _public_files(out1)
    clip_events = [e for e in events if e.kind == "clip"]
    indexes = [out1 / f"{s}.samples.jsonl" for s in ("train", "val", "test")]
    assert sorted(e.key for e in clip_events) == sorted(json.loads(line)["key"] for p in indexes if p.exists()
                                                       for line in p.read_text().splitlines())
    assert events[-1].kind == "finish" and events[-1].done == events[-1].total == N_CLIPS


def test_shards_read_by_webdataset_and_tar(out1):
    import webdataset as wds

    shards = sorted(str(p) for p in out1.glob("*.tar"))
    keys = set()
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        assert {"cls", "json", "spec.npy", "f000.jpg", "f001.jpg"} <= set(sample)
        assert json.loads(sample["json"])["key"] == sample["__key__"]
        keys.add(sample["__key__"])
    assert len(keys) == N_CLIPS
    listing = subprocess.run(["tar", "-tf", shards[0]], check=True, capture_output=True, text=True).stdout.split()
    with tarfile.open(shards[0]) as tar:
        assert listing == tar.getnames()


@pytest.fixture(scope="module")
def bad_raw(raw, tmp_path_factory) -> Path:
    """Three good clips plus a zero-byte file, random bytes, a video without audio, an unknown label."""
    src = tmp_path_factory.mktemp("bad") / "cremad"
    good = sorted((raw / "VideoFlash").iterdir())[:3]
    for f in good:
        for sub, ext in (("VideoFlash", ".flv"), ("AudioWAV", ".wav")):
            (src / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(raw / sub / (f.stem + ext), src / sub)
    (src / "VideoFlash" / "1001_DFA_ANG_XX.flv").write_bytes(b"")
    (src / "VideoFlash" / "1001_DFA_HAP_XX.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    synth.write_clip(src / "VideoFlash" / "1001_DFA_SAD_XX.flv", duration=2.0, label_index=2,
                     num_classes=6, audio=False, size=(64, 48))
    shutil.copy(good[0], src / "VideoFlash" / "1001_DFA_XXX_XX.flv")
    return src


def test_bad_inputs_are_listed_and_good_clips_kept(bad_raw, tmp_path):
    result = extract("cremad", bad_raw, tmp_path, _cfg(), workers=1, max_failures=0.05)
    stages = {f["key"]: f["stage"] for f in result.failures}
    assert stages == {"1001_DFA_ANG_XX": "open", "1001_DFA_HAP_XX": "open",
                      "1001_DFA_SAD_XX": "audio", "1001_DFA_XXX_XX": "label"}
    lines = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert lines == sorted(lines, key=lambda r: r["key"]) and len(lines) == 4
    for line in lines:
        assert set(line) == {"key", "source", "stage", "error"}
        assert "\n" not in line["error"] and line["error"]
    assert next(f for f in lines if f["key"] == "1001_DFA_HAP_XX")["source"] == "VideoFlash/1001_DFA_HAP_XX.mp4"
    assert result.num_samples == 3
    assert result.failures_by_stage == {"audio": 1, "label": 1, "open": 2}
    assert result.failed_fraction == pytest.approx(4 / 7) and not result.ok
    result.max_failures = 0.6
    assert result.ok


def test_output_does_not_depend_on_where_the_raw_data_lives(bad_raw, tmp_path):
    # decode errors, a missing listed clip and the label problem all name files relative to src
    split = tmp_path / "train.csv"
    listed = sorted(p.stem for p in (bad_raw / "VideoFlash").iterdir())[:-1] + ["1009_IEO_NEU_XX"]
    split.write_text("".join(f"{clip},{clip.split('_')[2]}\n" for clip in listed))
    for split_files in ((), (split,)):
        outs = []
        for where in ("a", "b/deeper"):
            src = tmp_path / where / f"raw{len(split_files)}"
            shutil.copytree(bad_raw, src)
            outs.append(tmp_path / f"out-{where[0]}{len(split_files)}")
            extract("cremad", src, outs[-1], _cfg(), workers=1, split_files=split_files, max_failures=1.0)
            assert str(tmp_path) not in (outs[-1] / "failures.jsonl").read_text()
        assert _public_files(outs[0]) == _public_files(outs[1])
        errors = {f["key"]: f["error"] for f in
                  map(json.loads, (outs[0] / "failures.jsonl").read_text().splitlines())}
        assert errors["1001_DFA_ANG_XX"] == "VideoFlash/1001_DFA_ANG_XX.flv: empty file (0 bytes)"
        assert errors["1001_DFA_SAD_XX"] == "VideoFlash/1001_DFA_SAD_XX.flv: no audio stream"
    assert errors["1009_IEO_NEU_XX"] == f"listed in train.csv:{len(listed)} but not in VideoFlash"


def test_relative_text_takes_out_whole_path_components_only():
    from avprep.clipwork import relative_text as _relative_text

    assert _relative_text("raw/x.flv: bad; also data/raw/y and rawer/z", Path("raw")) == \
        "x.flv: bad; also data/raw/y and rawer/z"
    assert _relative_text("no video a.mp4 under /d/raw.", Path("/d/raw")) == "no video a.mp4 under <src>."


def test_resume_after_interruption_is_byte_identical(raw, out1, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(out1, out)
    shards = sorted(p.name for p in out.glob("*.tar"))
    # interrupted: one shard never renamed (a tmp left behind), one corrupted, no manifests yet
    (out / shards[0]).unlink()
    (out / f"{shards[0]}.tmp-4242").write_bytes(b"partial")
    (out / STATE_DIR / "x.json.tmp-4242").write_bytes(b"partial")
    data = bytearray((out / shards[1]).read_bytes())
    data[700] ^= 0xFF
    (out / shards[1]).write_bytes(bytes(data))
    for p in [*out.glob("*.manifest.json"), *out.glob("*.samples.jsonl"), out / "dataset.json"]:
        p.unlink()
    events = []
    result = extract("cremad", raw, out, _cfg(), workers=1, on_event=events.append)
    assert result.resumed_shards == len(shards) - 2
    redone = {e.shard for e in events if e.kind == "shard"}
    assert redone == {shards[0], shards[1]}
    assert _public_files(out) == _public_files(out1)
    assert not list(out.rglob("*.tmp-*"))
    # the earlier run's shards are checked (hashed) with progress, one event each, before "start"
    check = events[:[e.kind for e in events].index("start")]
    assert [e.kind for e in check] == ["check"] * len(shards) and sorted(e.shard for e in check) == shards
    assert [e.done for e in check] == sorted(e.done for e in check) and check[-1].done == check[-1].total == N_CLIPS


def test_refuses_to_resume_with_other_options(raw, out1, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(out1, out)
    before = _public_files(out)
    with pytest.raises(ConfigError, match=r"jpeg_quality: 90 -> 80"):
        extract("cremad", raw, out, _cfg(jpeg_quality=80), workers=1)
    with pytest.raises(ConfigError, match="seed"):
        extract("cremad", raw, out, _cfg(), workers=1, seed=1)
    assert _public_files(out) == before


def test_overwrite_starts_over(raw, out1, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(out1, out)
    (out / "train-000099.tar").write_bytes(b"stale")
    result = extract("cremad", raw, out, _cfg(shard_size=100), workers=1, overwrite=True)
    assert result.resumed_shards == 0
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == [f"{s}-000000.tar" for s in ("test", "train", "val") if result.samples.get(s)]
    assert json.loads((out / "dataset.json").read_text())["config"]["shard_size"] == 100
    # same samples, only regrouped
    def index(folder):
        return sorted((r["key"], r["label"], r["duration"]) for p in folder.glob("*.samples.jsonl")
                      for r in map(json.loads, p.read_text().splitlines()))
    assert index(out) == index(out1)


# ---------------------------------------------------------------- planning and writing

def _clip(key: str, split: str = "train") -> Clip:
    return Clip(key, "NEU", split, Path(f"/x/{key}.flv"))


def test_plan_is_sorted_chunked_and_order_independent():
    clips = [_clip(f"k{i:02d}", "test" if i % 4 == 0 else "train") for i in range(10)]
    cfg = _cfg(shard_size=3)
    plans = plan_shards(reversed(clips), cfg)
    assert plans == plan_shards(clips, cfg)
    assert [(p.name, [c.key for c in p.clips]) for p in plans] == [
        ("train-000000.tar", ["k01", "k02", "k03"]), ("train-000001.tar", ["k05", "k06", "k07"]),
        ("train-000002.tar", ["k09"]), ("test-000000.tar", ["k00", "k04", "k08"])]


def test_plan_caps_estimated_bytes():
    cfg = _cfg(shard_size=100, shard_max_bytes=1)
    per = estimate_sample_bytes(cfg)
    assert per > 257 * 299 * 2      # the spectrogram alone
    clips = [_clip(f"k{i}") for i in range(7)]
    assert [len(p.clips) for p in plan_shards(clips, cfg)] == [1] * 7   # at least one per shard
    cfg = _cfg(shard_size=100, shard_max_bytes=3 * per)
    assert [len(p.clips) for p in plan_shards(clips, cfg)] == [3, 3, 1]


def test_write_shard_is_deterministic_and_atomic(tmp_path):
    samples = {"b": {"cls": b"1", "json": b"{}"}, "a": {"cls": b"0", "json": b"{}", "f000.jpg": b"x" * 600}}
    w = write_shard(tmp_path / "t-000000.tar", samples)
    data = (tmp_path / "t-000000.tar").read_bytes()
    assert (w.bytes, w.sha256, w.num_samples) == (len(data), hashlib.sha256(data).hexdigest(), 2)
    assert list(tmp_path.iterdir()) == [tmp_path / "t-000000.tar"]
    with tarfile.open(tmp_path / "t-000000.tar") as tar:
        assert tar.getnames() == ["a.cls", "a.json", "a.f000.jpg", "b.cls", "b.json"]
    w2 = write_shard(tmp_path / "u-000000.tar", dict(reversed(samples.items())))
    assert w2.sha256 == w.sha256
    # a writer that fails half-way leaves neither a final nor a temporary file
    with pytest.raises(ValueError, match="keys must increase"):
        with ShardWriter(tmp_path / "v-000000.tar") as writer:
            writer.add("b", {"cls": b"1"})
            writer.add("a", {"cls": b"0"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-000000.tar", "u-000000.tar"]


def _tarfile_reference(samples: dict) -> bytes:
    """What Python's tarfile writes for ``samples`` in PAX format with fixed headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("sizes", [[0], [511, 512, 513], [10240 - 3 * 512], [3000] * 7],
                         ids=["empty", "block-edges", "record-edge", "many"])
def test_encoded_samples_are_byte_identical_to_tarfile(tmp_path, sizes):
    """Workers encode samples (headers, payload, padding) and the writer only appends them and
    closes the archive: the shard is byte for byte what tarfile writes, long (pax) names included."""
    from avprep.shards import encode_sample
    rng = np.random.default_rng(len(sizes))
    samples = {f"k{i:02d}" + "x" * (120 if i == 1 else 0): {"cls": b"1", f"f{i:03d}.jpg": rng.bytes(n)}
               for i, n in enumerate(sizes)}
    with ShardWriter(tmp_path / "s.tar") as writer:
        spans = [writer.add_encoded(encode_sample(k, m)) for k, m in samples.items()]
        written = writer.commit()
    data = (tmp_path / "s.tar").read_bytes()
    assert data == _tarfile_reference(samples)
    assert (written.bytes, written.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    for span, (k, m) in zip(spans, samples.items()):
        chunk = data[span["offset"]:span["offset"] + span["length"]]
        assert chunk == _tarfile_reference({k: m})[:len(chunk)] and zlib.crc32(chunk) == span["crc32"]


def test_member_headers_are_tarfiles_at_the_edges():
    """The fast header builder equals tarfile's for names up to and past 100 bytes, non-ASCII
    names (pax records) and sizes up to and past what 11 octal digits hold."""
    from avprep.shards import _member
    for name in ["a", "k.cls", "x" * 99, "x" * 100, "x" * 101, "clé.f000.jpg"]:
        for size in [0, 1, 511, 512, 8 ** 11 - 1, 8 ** 11]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
            info.uname = info.gname = ""
            assert _member(name, size) == info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def test_one_extraction_per_folder(raw, out1, tmp_path):
    import fcntl

    out = tmp_path / "out"
    shutil.copytree(out1, out)
    with open(out / STATE_DIR / "lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another extraction"):
            extract("cremad", raw, out, _cfg(), workers=1)
    assert extract("cremad", raw, out, _cfg(), workers=1).resumed_shards > 0


def test_a_tree_without_clips_is_a_layout_error(raw, tmp_path):
    from avprep.errors import DatasetLayoutError

    with pytest.raises(DatasetLayoutError, match=r"no clips to extract for kinetics-sounds .*class not in"):
        extract("kinetics-sounds", raw, tmp_path / "out", _cfg(), workers=1)
    assert not (tmp_path / "out").exists()


def test_shards_whose_clips_all_failed_leave_no_file_and_resume(bad_raw, tmp_path):
    first = extract("cremad", bad_raw, tmp_path, _cfg(shard_size=1), workers=1, max_failures=1.0)
    assert first.num_shards == 6 and first.num_samples == 3       # 3 good, 3 failing clips
    listed = {e["name"] for s in first.samples
              for e in json.loads((tmp_path / f"{s}.manifest.json").read_text())["shards"]}
    assert listed == {p.name for p in tmp_path.glob("*.tar")} and len(listed) == 3
    before = _public_files(tmp_path)
    again = extract("cremad", bad_raw, tmp_path, _cfg(shard_size=1), workers=1, max_failures=1.0)
    # the empty file's shard is tried again (it may have been a download in progress), and says so
    assert again.resumed_shards == 5 and again.failures == first.failures
    assert any("1 finished shard(s)" in n and "empty or unreadable" in n for n in again.notes)
    assert _public_files(tmp_path) == before
    forced = extract("cremad", bad_raw, tmp_path, _cfg(shard_size=1), workers=1, max_failures=1.0,
                     retry_failed=True)
    assert forced.resumed_shards == 3 and _public_files(tmp_path) == before


def test_a_file_that_was_missing_is_extracted_on_a_plain_rerun(raw, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(raw, src)
    wav = sorted((src / "AudioWAV").iterdir())[0]
    saved = wav.read_bytes()
    wav.write_bytes(b"")           # still downloading
    first = extract("cremad", src, tmp_path / "out", _cfg(), workers=1, max_failures=1.0)
    assert [f["stage"] for f in first.failures] == ["open"]
    wav.write_bytes(saved)
    again = extract("cremad", src, tmp_path / "out", _cfg(), workers=1)
    assert again.failures == [] and again.num_samples == N_CLIPS
    assert any("extracted again" in n for n in again.notes)


def test_extract_config_rejects_fps_below_one():
    with pytest.raises(ConfigError, match="--fps"):
        ExtractConfig(spec=spec_preset("paper", "cremad"), fps=0)


def test_frame_rule_and_preset_are_recorded_and_applied(raw, tmp_path):
    import scipy.signal

    cfg = ExtractConfig(spec=spec_preset("paper-scipy", "cremad"), frame_size=FRAME, frame_rule="start",
                        spec_dtype="float32", shard_size=100)
    extract("cremad", raw, tmp_path, cfg, workers=1)
    config = json.loads((tmp_path / "dataset.json").read_text())["config"]
    assert config["frame_rule"] == "start"
    assert config["spec"] == {"preset": "paper-scipy", "kind": "scipy-psd", "sample_rate": 16000,
                              "duration": 3.0, "n_fft": 512, "win_length": 512, "hop_length": 159,
                              "resampler": "soxr"}
    sample = _samples(tmp_path / "train-000000.tar")
    key, members = next(iter(sample.items()))
    members = dict(members)
    meta = json.loads(members["json"])
    n = math.ceil(meta["duration"] - 1e-6)
    assert meta["frame_times"] == [float(i) for i in range(n)] and f"f{n - 1:03d}.jpg" in members
    wav = next(raw.glob(f"AudioWAV/{key}.wav"))
    from avprep import media
    wave = media.fit_duration(media.decode_audio(wav, 16000), 48000)
    _, _, power = scipy.signal.spectrogram(wave, 16000, nperseg=512, noverlap=353)
    log = np.log(power + 1e-7)
    spec = np.load(io.BytesIO(members["spec.npy"]))
    assert np.abs(spec - (log - log.mean()) / log.std()).max() <= 1e-4
