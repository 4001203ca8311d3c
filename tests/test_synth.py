"""avprep.synth: raw layouts with real file names, decodable media, cues of the asked strength."""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from avprep import media, synth
from avprep.errors import ConfigError
from cli._synth_command import synth_cmd

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
KS_CLASSES = json.loads((MANIFESTS / "kinetics-sounds.json").read_text())["classes"]
CREMAD_CLASSES = json.loads((MANIFESTS / "cremad.json").read_text())["classes"]
YTID = r"[A-Za-z0-9_-]{11}"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _tone_power_fraction(wave: np.ndarray, sr: int, f: float) -> float:
    """Share of the power within +-2 FFT bins of f and 2f (the class tone and its octave)."""
    spec = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(wave.size, 1 / sr)
    res = freqs[1]
    near = (np.abs(freqs - f) <= 2 * res) | (np.abs(freqs - 2 * f) <= 2 * res)
    # white noise also falls in those bins: remove its expected share
    noise_density = spec[~near].mean()
    return float((spec[near].sum() - noise_density * near.sum()) / spec.sum())


# ----------------------------------------------------------------------------- layouts

def test_cremad_layout_names_and_media(raw_dataset):
    root = raw_dataset("cremad", 6, duration=None)
    videos = sorted((root / "VideoFlash").iterdir())
    wavs = sorted((root / "AudioWAV").iterdir())
    assert len(videos) == len(wavs) == 6
    assert [p.stem for p in videos] == [p.stem for p in wavs]
    assert {p.suffix for p in videos} == {".flv"} and {p.suffix for p in wavs} == {".wav"}
    pattern = re.compile(r"^(\d{4})_(IEO|TIE|IOM|IWW|TAI|MTI|IWL|ITH|DFA|ITS|TSI|WSI)_"
                         r"(NEU|HAP|SAD|FEA|DIS|ANG)_(LO|MD|HI|XX)$")
    emotions = []
    for p in videos:
        m = pattern.match(p.stem)
        assert m, p.name
        assert 1001 <= int(m.group(1)) <= 1091
        assert m.group(4) == "XX" or m.group(2) == "IEO"      # only IEO has intensity levels
        emotions.append(m.group(3))
    assert sorted(set(emotions)) == sorted(CREMAD_CLASSES)     # balanced over all 6
    with av.open(str(wavs[0])) as c:
        a = c.streams.audio[0]
        assert (a.codec_context.name, a.sample_rate, a.codec_context.channels) == ("pcm_s16le", 16000, 1)
    durations = []
    for p in videos:
        with av.open(str(p)) as c:
            assert c.format.name == "flv"
            assert c.streams.video[0].codec_context.name == "flv"
            assert c.streams.audio[0].codec_context.name.startswith("mp3")
        durations.append(len(media.decode_audio(wavs[videos.index(p)], 16000)) / 16000)
    assert 2.0 <= min(durations) and max(durations) <= 4.0 and max(durations) - min(durations) > 0.3


def test_kinetics_layout(raw_dataset):
    root = raw_dataset("kinetics-sounds", 10, num_classes=5)
    files = _files(root)
    assert len(files) == 10
    pattern = re.compile(rf"^(train|val|test)/([a-z_]+)/{YTID}_(\d{{6}})_(\d{{6}})\.mp4$")
    classes = set()
    for f in files:
        m = pattern.match(f)
        assert m, f
        assert int(m.group(4)) - int(m.group(3)) == 10
        classes.add(m.group(2))
    assert classes == set(KS_CLASSES[:5])


def test_vggsound_layout_lists_missing_rows(raw_dataset):
    root = raw_dataset("vggsound", 6, num_classes=3, missing=2)
    rows = list(csv.reader(open(root / "vggsound.csv", newline="")))
    assert len(rows) == 8 and all(len(r) == 4 for r in rows)
    assert {r[3] for r in rows} <= {"train", "test"}
    videos = {p.name: p for p in root.rglob("*.mp4")}
    present = [r for r in rows if f"{r[0]}_{int(r[1]):06d}.mp4" in videos]
    assert len(present) == 6 and len(videos) == 6
    assert not (root / "vggsound.csv").read_text().startswith("youtube_id")   # no header


def test_ave_layout_and_split_files(raw_dataset):
    root = raw_dataset("ave", 8, num_classes=4)
    header = "Category&VideoID&Quality&StartTime&EndTime"
    ann = (root / "Annotations.txt").read_text().splitlines()
    assert ann[0] == header and len(ann) == 9
    union = []
    for name in ("trainSet.txt", "valSet.txt", "testSet.txt"):
        lines = (root / name).read_text().splitlines()
        assert lines[0] == header
        union += lines[1:]
    assert sorted(union) == sorted(ann[1:])
    for line in ann[1:]:
        cat, vid, quality, start, end = line.split("&")
        assert 0 <= int(start) < int(end) <= 10
        assert (root / "AVE" / f"{vid}.mp4").is_file()


@pytest.mark.parametrize("split_folders", [False, True])
def test_folder_layout(raw_dataset, split_folders):
    root = raw_dataset("folder", 6, num_classes=3, split_folders=split_folders)
    parts = [Path(f).parts for f in _files(root)]
    assert len(parts) == 6
    assert all(len(p) == (3 if split_folders else 2) for p in parts)
    assert {p[-2] for p in parts} == {"alpha", "bravo", "charlie"}
    assert {Path(p[-1]).suffix for p in parts} == {".mp4", ".mkv", ".avi"}
    for p in parts:   # every container decodes
        clip = media.decode_clip(root.joinpath(*p), sample_rate=16000, frame_size=0)
        assert len(clip.frames) == 3 and clip.wave.size >= 3 * 16000


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = synth.make_dataset("cremad", tmp_path / "a", 3, seed=5, duration=1.0)
    b = synth.make_dataset("cremad", tmp_path / "b", 3, seed=5, duration=1.0)
    c = synth.make_dataset("cremad", tmp_path / "c", 3, seed=6, duration=1.0)
    assert _files(a) == _files(b)
    for f in _files(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert _files(a) != _files(c)


def test_progress_callback_and_bad_options(tmp_path):
    seen = []
    synth.make_dataset("ave", tmp_path / "p", 2, duration=0.5, on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
    with pytest.raises(ConfigError, match="1..6"):
        synth.make_dataset("cremad", tmp_path / "x", 2, num_classes=7)
    with pytest.raises(ConfigError, match="unknown dataset"):
        synth.make_dataset("imagenet", tmp_path / "x", 2)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- cues

def test_audio_cue_fraction_leaves_exactly_that_many_tones(tmp_path):
    """The demo's design: the tone on an exact share of clips, chosen independently of labels;
    the other clips' audio is noise only (no power at the class tone above the noise floor)."""
    assert synth.audio_cue_clips(10, 0.7, 0).sum() == 7 and synth.audio_cue_clips(10, 1.0, 3).all()
    assert not synth.audio_cue_clips(10, 0.0, 3).any()
    assert (synth.audio_cue_clips(50, 0.5, 1) != synth.audio_cue_clips(50, 0.5, 2)).any()
    root = synth.make_dataset("cremad", tmp_path / "r", 8, seed=4, duration=0.5, audio_snr=0.0,
                              audio_cue_fraction=0.5, size=(16, 12), fps=2)
    wavs = sorted((root / "AudioWAV").glob("*.wav"))
    toned = []
    for wav in wavs:
        samples, rate = media.read_pcm_wav(wav)
        from avprep.datasets import cremad

        index = cremad.CLASSES.index(wav.stem.split("_")[2])
        spectrum = np.abs(np.fft.rfft(samples[0])) ** 2
        freqs = np.fft.rfftfreq(len(samples[0]), 1 / rate)
        f = synth.tone_frequency(index, 6)
        peak = spectrum[np.abs(freqs - f) < 20].max()
        toned.append(peak > 20 * np.median(spectrum))
    assert sum(toned) == 4
    with pytest.raises(ConfigError, match="audio cue fraction"):
        synth.make_dataset("cremad", tmp_path / "x", 2, audio_cue_fraction=1.5)

@pytest.mark.parametrize("snr_db", [0.0, 10.0])
def test_audio_cue_has_the_requested_snr(tmp_path, snr_db):
    # WAV is lossless, so the measured tone share must match the requested SNR
    synth.write_clip(tmp_path / "v.mp4", duration=2.0, label_index=2, num_classes=6, audio=False,
                     audio_snr=snr_db, audio_path=tmp_path / "a.wav", size=(32, 24))
    wave = media.decode_audio(tmp_path / "a.wav", 16000)
    share = _tone_power_fraction(wave, 16000, synth.tone_frequency(2, 6))
    expected = 1 / (1 + 10 ** (-snr_db / 10))
    assert share == pytest.approx(expected, abs=0.03)


def test_class_tone_dominates_encoded_audio(raw_dataset):
    root = raw_dataset("kinetics-sounds", 4, num_classes=4, audio_snr=30.0)
    for path in root.rglob("*.mp4"):
        label = KS_CLASSES.index(path.parent.name)
        wave = media.decode_audio(path, 16000)
        spectrum = np.abs(np.fft.rfft(wave))
        peak = np.fft.rfftfreq(wave.size, 1 / 16000)[spectrum.argmax()]
        assert peak == pytest.approx(synth.tone_frequency(label, 4), abs=2.0), path


def test_no_audio_cue_at_minus_inf(tmp_path):
    synth.write_clip(tmp_path / "v.mp4", duration=2.0, label_index=2, num_classes=6, audio=False,
                     audio_snr=-math.inf, audio_path=tmp_path / "a.wav", size=(32, 24))
    wave = media.decode_audio(tmp_path / "a.wav", 16000)
    assert abs(_tone_power_fraction(wave, 16000, synth.tone_frequency(2, 6))) < 0.01


@pytest.mark.parametrize("snr_db,tolerance", [(30.0, 25), (-math.inf, None)])
def test_visual_cue_is_the_class_colour(make_clip, snr_db, tolerance):
    path = make_clip(label_index=1, num_classes=3, visual_snr=snr_db, duration=1.0, audio=False)
    frames, _ = media.decode_frames(path, frame_size=0)
    rgb = np.asarray(Image.open(io.BytesIO(frames[0])), np.float64)
    centre = rgb[30:42, 36:60].reshape(-1, 3).mean(axis=0)
    colour = 128 + 60 * synth.class_colour(1, 3) / np.sqrt(np.mean(synth.class_colour(1, 3) ** 2))
    if tolerance is None:   # pure noise: mid-grey on average
        assert np.abs(centre - 128).max() < 12
    else:
        assert np.abs(centre - np.clip(colour, 0, 255)).max() < tolerance


def test_marker_encodes_presentation_time(make_clip):
    path = make_clip(duration=2.0, fps=10, audio=False)
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            sec, frac = synth.read_marker(frame.to_ndarray(format="rgb24"))
            assert sec + frac == pytest.approx(float(frame.time), abs=0.01)


# ----------------------------------------------------------------------------- CLI

def test_cli_writes_dataset_and_rejects_bad_options(tmp_path):
    runner = CliRunner()
    out = tmp_path / "raw"
    ok = runner.invoke(synth_cmd, ["--dataset", "ave", "--out", str(out), "--clips", "2",
                                   "--classes", "2", "--duration", "0.5", "--seed", "3"])
    assert ok.exit_code == 0, ok.output
    assert len(list((out / "AVE").glob("*.mp4"))) == 2
    again = runner.invoke(synth_cmd, ["--dataset", "ave", "--out", str(out), "--clips", "2"])
    assert again.exit_code == 2 and "not empty" in again.output
    too_many = runner.invoke(synth_cmd, ["--dataset", "cremad", "--out", str(tmp_path / "c"),
                                         "--clips", "2", "--classes", "9"])
    assert too_many.exit_code == 2 and "1..6" in too_many.output
    assert not (tmp_path / "c").exists()
    bad_size = runner.invoke(synth_cmd, ["--dataset", "folder", "--out", str(tmp_path / "f"),
                                         "--clips", "1", "--size", "big"])
    assert bad_size.exit_code == 2 and "--size" in bad_size.output


@pytest.mark.parametrize("name", synth.DATASETS)
def test_adapters_find_every_clip_with_the_label_its_cue_encodes(tmp_path, name):
    from avprep.datasets import get

    k = 3
    root = synth.make_dataset(name, tmp_path / name, 6, num_classes=k, duration=1.0, audio_snr=30.0,
                              missing=2 if name == "vggsound" else 0)
    found = get(name).discover(root)
    assert len(found.clips) == 6
    assert [p.stage for p in found.problems] == (["missing"] * 2 if name == "vggsound" else [])
    for clip in found.clips:
        wave = media.decode_audio(clip.audio or clip.video, 16000)
        peak = np.fft.rfftfreq(wave.size, 1 / 16000)[np.abs(np.fft.rfft(wave)).argmax()]
        assert peak == pytest.approx(synth.tone_frequency(found.classes.index(clip.label), k), abs=3.0)
