"""Surround sound and long clips (issue 23): any channel count downmixed without native crashes,
to exact samples; extraction memory that does not grow with the clip's length.

Files are written with PyAV in every standard layout FFmpeg names (1 to 16 channels, and 22.2),
as packed PCM (WAV, MOV, MKV) and planar PCM (NUT, s16p), plus AAC 7.1 (planar float) and PCM
7.1 in a .mov with video (the two cases that crashed). The expected mono is computed two ways:
FFmpeg's own downmix of the decoder's frames (``aresample`` with ``ochl=mono``, as ``ffmpeg
-ac 1``; fed the decoder's frames directly, no array round trip), and a naive per-sample numpy
sum of the written channels with the channel weights (for layouts FFmpeg has no matrix for: the
mean of the non-LFE channels).
"""
from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from avprep import media
from avprep.media.audio import mono_weights

ROOT = Path(__file__).resolve().parent.parent

STANDARD = ["mono", "stereo", "2.1", "3.0", "3.0(back)", "4.0", "quad", "quad(side)", "3.1", "5.0", "5.0(side)",
            "4.1", "5.1", "5.1(side)", "6.0", "6.0(front)", "3.1.2", "hexagonal", "6.1", "6.1(back)", "6.1(front)",
            "7.0", "7.0(front)", "7.1", "7.1(wide)", "7.1(wide-side)", "5.1.2", "octagonal", "cube", "5.1.4",
            "7.1.2", "7.1.4", "7.2.3", "9.1.4", "9.1.6", "hexadecagonal", "downmix", "22.2"]
# (suffix, codec): packed s16 in WAV (a channel mask), MOV (a channel layout atom), MKV (a count
# only: the decoder reports "N channels"); planar s16p in NUT
CONTAINERS = [("wav", "pcm_s16le"), ("mov", "pcm_s16le"), ("mkv", "pcm_s16le"), ("nut", "pcm_s16le_planar")]
# a custom order FFmpeg has a matrix for, and (layout, container) pairs it has none for: a custom
# order with a lone top channel, and unordered odd counts (MKV and NUT report only "N channels")
CUSTOM = "FL+FR+FC+BL+BR+SL+SR+TFL+TFR+TBL+TBR"
LONE_TOP = "FL+FR+FC+LFE+BL+BR+SL+SR+TFL"
NO_MATRIX = [(LONE_TOP, "wav", "pcm_s16le"), (LONE_TOP, "nut", "pcm_s16le_planar"),
             (CUSTOM, "mkv", "pcm_s16le"), ("FL+FR+FC+LFE+BL+BR+FLC+FRC+BC+SL+SR+TC+TFL", "mkv", "pcm_s16le"),
             ("FL+FR+FC+LFE+BL+BR+FLC+FRC+BC+SL+SR+TC+TFL+TFC+TFR", "nut", "pcm_s16le_planar")]


def _signal(channels: int, n: int) -> np.ndarray:
    """A distinct int16 signal per channel (exactly representable after /32768)."""
    c = np.arange(channels)[:, None]
    return ((c + 1) * 300 + (np.arange(n)[None] * (c + 3)) % 701 - 350).astype(np.int16)


def write_audio(path: Path, codec: str, layout: str, rate: int = 16000, n: int = 1000, video: bool = False):
    """``_signal`` in ``layout`` (packed s16 frames converted by FFmpeg to what the encoder takes)."""
    x = _signal(len(av.AudioLayout(layout).channels), n)
    with av.open(str(path), "w") as c:
        if video:
            v = c.add_stream("mpeg4", rate=1)
            v.width, v.height, v.pix_fmt = 32, 24, "yuv420p"
        s = c.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame(format="s16", layout=layout, samples=n)
        frame.planes[0].update(np.ascontiguousarray(x.T).tobytes())
        frame.sample_rate, frame.pts = rate, 0
        for f in av.AudioResampler(format=s.format.name, layout=layout, rate=rate).resample(frame):
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
        if video:
            for i in range(max(1, n // rate)):
                img = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 40 * i % 255, np.uint8), format="rgb24")
                img.pts, img.time_base = i, Fraction(1, 1)
                for p in v.encode(img):
                    c.mux(p)
            for p in v.encode(None):
                c.mux(p)
    return x


def ffmpeg_mono(path: Path) -> np.ndarray:
    """FFmpeg's own downmix of the decoder's frames (no array round trip through PyAV)."""
    out, graph = [], None

    def drain():
        while True:
            try:
                out.append(graph.pull().to_ndarray().reshape(-1))
            except (av.BlockingIOError, av.EOFError):
                return

    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        for frame in c.decode(stream):
            if graph is None:
                graph = av.filter.Graph()
                src = graph.add_abuffer(format=frame.format.name, sample_rate=frame.sample_rate,
                                        layout=frame.layout, time_base=stream.time_base)
                node = graph.add("aresample", "ochl=mono:osf=flt:rematrix_maxval=1.0:internal_sample_fmt=fltp")
                sink = graph.add("abuffersink")
                src.link_to(node)
                node.link_to(sink)
                graph.configure()
            graph.push(frame)
            drain()
        graph.push(None)
        drain()
    return np.concatenate(out)


def naive_mono(x: np.ndarray, weights) -> np.ndarray:
    """Sum over channels, in order, of weight × sample, in float32, one sample at a time."""
    planes = x.astype(np.float32) / np.float32(32768)
    out = np.empty(planes.shape[1], np.float32)
    for t in range(planes.shape[1]):
        acc = np.float32(0)
        for c, w in enumerate(weights):
            if w:
                acc = np.float32(acc + np.float32(planes[c, t] * np.float32(w)))
        out[t] = acc
    return out


def _decoded_layout(path: Path) -> str:
    with av.open(str(path)) as c:
        return next(c.decode(audio=0)).layout.name


@pytest.mark.parametrize("layout,suffix,codec", [*((layout, *c) for layout in STANDARD for c in CONTAINERS),
                                                 (CUSTOM, "wav", "pcm_s16le"), (CUSTOM, "mov", "pcm_s16le")])
def test_every_standard_layout_downmixes_to_ffmpegs_exact_samples(tmp_path, layout, suffix, codec):
    path = tmp_path / f"a.{suffix}"
    x = write_audio(path, codec, layout)
    got = media.decode_audio(path, 16000)
    np.testing.assert_array_equal(got, ffmpeg_mono(path))
    np.testing.assert_array_equal(got, naive_mono(x, mono_weights(_decoded_layout(path))))


@pytest.mark.parametrize("layout,suffix,codec", NO_MATRIX)
def test_layouts_without_an_ffmpeg_matrix_are_the_mean_of_their_non_lfe_channels(tmp_path, layout, suffix, codec):
    path = tmp_path / f"a.{suffix}"
    x = write_audio(path, codec, layout)
    reported = av.AudioLayout(_decoded_layout(path))
    names = [c.name for c in reported.channels]
    kept = [n not in ("LFE", "LFE2") for n in names]
    expected = [1 / sum(kept) if k else 0.0 for k in kept]
    with pytest.raises(av.error.FFmpegError):       # FFmpeg itself cannot downmix these
        ffmpeg_mono(path)
    assert mono_weights(reported.name) == pytest.approx(expected, abs=0)
    np.testing.assert_array_equal(media.decode_audio(path, 16000), naive_mono(x, expected))


@pytest.mark.parametrize("codec,layout,suffix", [("aac", "7.1", "mp4"), ("pcm_s16le", "7.1", "mov"),
                                                 ("pcm_s16le", "hexadecagonal", "mov"),
                                                 ("pcm_s16le_planar", "hexadecagonal", "nut")])
def test_the_surround_clips_that_crashed_extract(tmp_path, codec, layout, suffix):
    """7.1 AAC (planar float) and 7.1 PCM in a .mov with video, through ``decode_clip`` in a
    child process (a native crash must fail the test, not the test run)."""
    path = tmp_path / f"clip.{suffix}"
    write_audio(path, codec, layout, rate=48000, n=48000 * 2, video=True)
    code = ("import sys, numpy as np; from avprep import media; "
            "c = media.decode_clip(sys.argv[1], sample_rate=48000, fps=1, frame_size=0); "
            "np.save(sys.argv[2], c.wave); print(len(c.frames))")
    r = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "wave.npy")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout) >= 1
    np.testing.assert_array_equal(np.load(tmp_path / "wave.npy"), ffmpeg_mono(path))


# ---------------------------------------------------------------- memory independent of clip length

def _long_clip(path: Path, seconds: int, rate: int = 16000) -> Path:
    """32x24 MPEG-4 video at 1 fps and mono AAC, written a second at a time (constant memory)."""
    t = np.arange(rate) / rate
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=1)
        v.width, v.height, v.pix_fmt = 32, 24, "yuv420p"
        a = c.add_stream("aac", rate=rate, layout="mono")
        convert = av.AudioResampler(format=a.format.name, layout="mono", rate=rate)
        for i in range(seconds):
            img = av.VideoFrame.from_ndarray(np.full((24, 32, 3), i * 7 % 255, np.uint8), format="rgb24")
            img.pts, img.time_base = i, Fraction(1, 1)
            for p in v.encode(img):
                c.mux(p)
            wave = (0.3 * np.sin(2 * np.pi * (440 + i % 50) * (t + i))).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts = rate, i * rate
            for f in convert.resample(frame):
                for p in a.encode(f):
                    c.mux(p)
        for s in (v, a):
            for p in s.encode(None):
                c.mux(p)
    return path


def _peak_rss_mb(clip: Path, work: Path) -> float:
    """Peak RSS of an ``avprep extract`` (one process) of a folder tree holding ``clip`` twice."""
    for cls in ("a", "b"):
        (work / "raw" / cls).mkdir(parents=True)
        os.link(clip, work / "raw" / cls / f"{cls}_{clip.name}")
    code = ("import resource, sys; from cli.avprep_cli import main; sys.argv[0] = 'avprep'\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, "extract", "--dataset", "folder", "--src", str(work / "raw"),
                        "--out", str(work / "out"), "--workers", "1", "--frame-size", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1]) / 1024


@pytest.mark.slow
def test_extraction_memory_does_not_grow_with_clip_length(tmp_path):
    """A 2-hour clip peaks within 64 MB of a 10-second one (README states the bound); before,
    ~0.7 GB per hour of clip."""
    short = _peak_rss_mb(_long_clip(tmp_path / "short.mkv", 10), tmp_path / "s")
    long = _peak_rss_mb(_long_clip(tmp_path / "long.mkv", 2 * 3600), tmp_path / "l")
    assert long - short < 64, (short, long)


@pytest.mark.parametrize("resampler", ["soxr", "ffmpeg"])
@pytest.mark.parametrize("suffix,codec,rate", [("wav", "pcm_s16le", 44100), ("mkv", "aac", 48000),
                                               ("wav", "pcm_s16le", 16000)])
def test_the_audio_kept_for_a_clip_length_is_the_start_of_the_whole(tmp_path, resampler, suffix, codec, rate):
    """Decoding stops after the spectrogram's clip length (+ a margin): the samples it keeps are
    exactly the first ones of the whole file's result, so extraction output is unchanged."""
    path = tmp_path / f"a.{suffix}"
    write_audio(path, codec, "stereo", rate=rate, n=rate * 8)
    whole = media.decode_audio(path, 16000, resampler)
    part = media.decode_audio(path, 16000, resampler, seconds=3.0)
    assert 3 * 16000 <= part.size < whole.size
    np.testing.assert_array_equal(part[:3 * 16000], whole[:3 * 16000])
