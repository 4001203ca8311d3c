"""avprep.media: which frames, what size, what audio, and how failures are reported."""
from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from avprep import media, synth
from avprep.errors import ClipError
from avprep.media import demux, video


def _rgb(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def _times(frames, scale=1.0) -> list[float]:
    return [sum(synth.read_marker(_rgb(f), scale)) for f in frames]


# ----------------------------------------------------------------------------- frame timing

@pytest.mark.parametrize("fps,expected", [
    (10, [0.5, 1.5, 2.5]),                 # a frame exactly at t = i + 0.5 is the one shown
    (15, [7 / 15, 22 / 15, 37 / 15]),      # otherwise the last one before it (not the nearest)
])
def test_one_frame_per_second_at_half_seconds(make_clip, fps, expected):
    path = make_clip(duration=3.0, fps=fps, audio=False)
    frames, duration = media.decode_frames(path, frame_size=0)
    assert duration == pytest.approx(3.0, abs=1e-6)
    assert _times(frames) == pytest.approx(expected, abs=0.01)


def test_flv_with_shifted_start_and_audio(make_clip):
    # the MP3 priming delay shifts FLV video timestamps by ~50 ms: times count from the stream start
    path = make_clip("clip.flv", duration=2.5)
    frames, duration = media.decode_frames(path, frame_size=0)
    assert len(frames) == 2 and duration == pytest.approx(2.5, abs=0.1)
    assert _times(frames) == pytest.approx([0.5, 1.5], abs=0.01)


def test_short_clip_gives_its_middle_frame(make_clip):
    path = make_clip(duration=0.6, fps=10, audio=False)    # frames at 0.0 .. 0.5
    frames, duration = media.decode_frames(path, frame_size=0)
    assert duration == pytest.approx(0.6, abs=1e-6)
    assert _times(frames) == pytest.approx([0.3], abs=0.01)


@pytest.mark.parametrize("duration,expected", [
    (3.0, [0.0, 1.0, 2.0]),          # the end (t = 3) is not a frame
    (2.5, [0.0, 1.0, 2.0]),          # a partial last second has its frame
    (0.6, [0.0]),
])
def test_start_rule_keeps_the_frames_at_whole_seconds(make_clip, duration, expected):
    """The released OGM-GE CREMA-D script's frames: t = 0, 1, 2 ... s, partial last second included."""
    path = make_clip(duration=duration, fps=10, audio=False)
    clip = media.decode_clip(path, frame_size=0, frame_rule="start")
    assert clip.frame_times == expected
    assert _times(clip.frames) == pytest.approx(expected, abs=0.01)


def test_decoding_stops_at_the_declared_duration(make_clip):
    path = make_clip(duration=2.9, fps=10, audio=False)
    frames, _ = media.decode_frames(path, frame_size=0)
    assert _times(frames) == pytest.approx([0.5, 1.5], abs=0.01)   # floor(2.9) = 2 frames


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("size,frame_size,expected", [
    ((321, 181), 64, (114, 64)),       # 321 * 64 / 181 = 113.50 -> 114
    ((181, 321), 64, (64, 114)),
    ((321, 181), 0, (321, 181)),       # 0 keeps the source size
    ((96, 72), 256, (341, 256)),       # upscaling keeps the aspect too
])
def test_short_side_resize(make_clip, size, frame_size, expected):
    path = make_clip(duration=1.0, size=size, audio=False)
    frames, _ = media.decode_frames(path, frame_size=frame_size)
    assert Image.open(io.BytesIO(frames[0])).size == expected
    clip = media.decode_clip(path, frame_size=frame_size)
    assert clip.frame_size == expected


def test_resized_frames_keep_their_colours(tmp_path):
    # planes come out of swscale as G, B, R: a swap or a chroma error shows against PIL's resize
    yy, xx = np.mgrid[0:360, 0:480]
    img = np.stack([128 + 90 * np.sin(xx / 9), 128 + 90 * np.cos(yy / 8 + xx / 13),
                    128 + 90 * np.sin((xx - yy) / 10)], -1).astype(np.uint8)
    path = tmp_path / "smooth.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10, options={"qp": "0"})   # lossless in YUV
        stream.width, stream.height, stream.pix_fmt = 480, 360, "yuv420p"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    ours = _rgb(media.decode_frames(path, frame_size=192, jpeg_quality=95)[0][0]).astype(np.float64)
    theirs = np.asarray(Image.fromarray(img).resize((256, 192), Image.BICUBIC), np.float64)
    assert ours.shape == theirs.shape == (192, 256, 3)
    assert np.abs(ours - theirs).mean() < 4                    # 4:2:0 chroma + JPEG
    np.testing.assert_allclose(ours.mean(axis=(0, 1)), theirs.mean(axis=(0, 1)), atol=2)


@pytest.mark.parametrize("frame_size", [0, 75])        # unscaled, scaled to an odd width
def test_frames_are_exact_to_the_last_column(make_clip, frame_size):
    # swscale's unscaled YUV -> planar RGB path fills the last columns of a width that is not a
    # multiple of 8 with garbage that changes between calls; these frames must not use it
    import cv2

    path = make_clip(duration=1.0, size=(100, 72), audio=False)
    runs = [media.decode_frames(path, frame_size=frame_size, jpeg_quality=95)[0][0] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    ours = _rgb(runs[0]).astype(np.float64)
    cap = cv2.VideoCapture(str(path))
    for _ in range(6):                      # frame 5 is the one shown at 0.5 s
        ok, bgr = cap.read()
    theirs = bgr[..., ::-1]
    if frame_size:
        theirs = np.asarray(Image.fromarray(theirs).resize(ours.shape[1::-1], Image.BICUBIC))
    edge = np.abs(ours[:, -4:] - theirs[:, -4:].astype(np.float64))
    assert ours.shape == theirs.shape and edge.mean() < 6


def test_jpeg_quality_is_applied(make_clip):
    path = make_clip(duration=1.0, audio=False)
    small = media.decode_frames(path, frame_size=0, jpeg_quality=20)[0][0]
    large = media.decode_frames(path, frame_size=0, jpeg_quality=95)[0][0]
    assert len(small) < len(large) / 2


def test_rotation_metadata_is_applied(make_clip):
    import cv2  # an independent decoder that applies the display matrix itself

    path = make_clip(duration=1.0, rotation=90, audio=False)      # 96x72 coded
    frames, _ = media.decode_frames(path, frame_size=0)
    ours = _rgb(frames[0]).astype(np.float64)
    assert ours.shape == (96, 72, 3)
    cap = cv2.VideoCapture(str(path))
    for _ in range(6):                      # frame 5 is the one shown at 0.5 s
        ok, bgr = cap.read()
    assert ok and bgr.shape == ours.shape
    theirs = bgr[..., ::-1].astype(np.float64)
    b = synth.MARKER_BLOCK
    # the dark "second 0" marker block (top-left when coded) is where OpenCV shows it
    assert theirs[-b + 2:-2, 2:b - 2].mean() < 40
    assert ours[-b + 2:-2, 2:b - 2].mean() < 40
    assert np.abs(ours - theirs).mean() < 6


# ----------------------------------------------------------------------------- GOP skipping

def _encode(path, codec, options, frames=150, fps=25, size=(96, 72)):
    """A video whose every frame differs (moving bars + noise), with explicit timestamps."""
    from fractions import Fraction
    rng = np.random.default_rng(0)
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = options
        for i in range(frames):
            img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
            img[:, (i * 3) % w:, 0] += 150
            img[(i * 2) % h:, :, 1] += 120
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _shown_frames(path, fps, frame_size):
    """Independent reference: decode every frame, keep the last one at or before each target."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        start = stream.start_time or 0
        decoded = [(float((f.pts - start) * stream.time_base), f) for f in c.decode(stream)]
        duration = float(stream.duration * stream.time_base) if stream.duration else \
            float(c.duration / av.time_base)
        jpegs = []
        for i in range(int(duration * fps + 1e-6)):
            shown = [f for t, f in decoded if t <= (i + 0.5) / fps + 1e-9][-1]
            w, h = video._target_size(shown.width, shown.height, frame_size, None)
            jpegs.append(video._encode_jpeg(video._yuv_planes(shown, w, h), 90))
        return jpegs, len(decoded)


@pytest.mark.parametrize("name,codec,options,expect", [
    ("gop12.flv", "flv", {"g": "12"}, "skips"),
    ("bframes.mp4", "libx264", {"preset": "medium", "g": "30", "bf": "3", "threads": "1"}, "skips"),
    # x264's open GOPs: its I-frames are not IDR, so pictures after them may refer to pictures
    # before them although containers flag them as keyframes; only IDR pictures are restarts
    ("opengop.mp4", "libx264", {"preset": "medium", "threads": "1",
                                "x264-params": "keyint=20:open-gop=1:bframes=3:scenecut=0"}, "idr only"),
    # MPEG-4 part 2 and MPEG-2 B-frames shown before the next I-frame refer across it:
    # found at the first one, then the clip is read again without skipping
    ("mpeg4.avi", "mpeg4", {"g": "10", "bf": "2"}, "reread"),
    ("mpeg2.ts", "mpeg2video", {"g": "12", "bf": "2"}, "reread"),
])
@pytest.mark.parametrize("fps", [1, 0.5])
def test_skipping_gops_keeps_exactly_the_frames_a_full_decode_shows(tmp_path, monkeypatch, name,
                                                                     codec, options, expect, fps):
    path = _encode(tmp_path / name, codec, options)
    fed, passes = [], []
    feed, read = video._FramePicker.feed, demux._read
    monkeypatch.setattr(video._FramePicker, "feed", lambda self, f: (fed.append(f.pts), feed(self, f)))
    monkeypatch.setattr(demux, "_read", lambda *a: (passes.append(a[-1]), fed.clear(), read(*a)))

    frames = media.decode_clip(path, fps=fps, frame_size=64, threads=1).frames
    expected, total = _shown_frames(path, fps, 64)
    assert frames == expected
    with av.open(str(path)) as c:
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
        restarts = sum(bool(demux._restart_test(c.streams.video[0])(p)) for p in packets)
        keyframes = sum(p.is_keyframe for p in packets)
    assert keyframes >= 5                       # several GOPs, so there is something to skip
    if expect == "skips":
        assert passes == [True] and restarts == keyframes and len(fed) < 0.7 * total
    elif expect == "idr only":
        assert passes == [True] and restarts < keyframes
    else:
        assert passes == [True, False] and len(fed) >= total * (len(frames) - 0.5) / fps / 6.2


@pytest.mark.parametrize("options", [
    {"preset": "medium", "threads": "1"},                          # x264 defaults: one 250-frame GOP
    {"preset": "medium", "threads": "1", "g": "30", "bf": "3"},     # with GOPs to skip too
    {"preset": "medium", "threads": "1", "x264-params": "b-pyramid=none:bframes=2"},
])
@pytest.mark.parametrize("fps", [1, 0.5])
def test_skipping_non_reference_frames_keeps_exactly_the_full_decode(tmp_path, monkeypatch, options, fps):
    path = _encode(tmp_path / "b.mp4", "libx264", options, frames=250)
    fed = []
    feed = video._FramePicker.feed
    monkeypatch.setattr(video._FramePicker, "feed", lambda self, f: (fed.append(f.pts), feed(self, f)))
    frames = media.decode_clip(path, fps=fps, frame_size=64, threads=1).frames
    skipping = len(fed)
    expected, total = _shown_frames(path, fps, 64)
    assert frames == expected
    fed.clear()
    monkeypatch.setattr(demux._NonRefSkipper, "make", classmethod(lambda cls, s, p: None))
    assert media.decode_clip(path, fps=fps, frame_size=64, threads=1).frames == expected
    with av.open(str(path)) as c:            # the non-reference pictures before the last kept frame
        c.streams.video[0].codec_context.skip_frame = "NONREF"
        last, time_base = (len(expected) - 0.5) / fps, c.streams.video[0].time_base
        refs = {f.pts for f in c.decode(video=0)}
    nonref = [pts for pts in fed if pts not in refs and pts * time_base <= last]
    assert len(nonref) >= 5 and len(fed) - skipping >= 0.8 * len(nonref)    # (nearly) all skipped


def test_packets_held_at_the_end_are_decoded_before_the_flush(make_clip):
    # the frame shown at the last target is still held when the stream ends (FLV: its
    # video stream is not stream 0, which a flush packet's stream_index would claim)
    path = make_clip("clip.flv", duration=1.0, fps=2)
    frames, _ = media.decode_frames(path, frame_size=0, threads=1)
    assert _times(frames) == pytest.approx([0.5], abs=0.01)


# ----------------------------------------------------------------------------- audio

@pytest.mark.parametrize("rate,layout", [(48000, "5.1"), (8000, "mono"), (44100, "stereo")])
def test_audio_any_layout_and_rate_to_16k_mono(tmp_path, rate, layout):
    n = int(2.5 * rate)
    t = np.arange(n) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    channels = {"mono": 1, "stereo": 2, "5.1": 6}[layout]
    planes = np.repeat(tone[None], channels, axis=0)
    if channels == 6:
        planes[3] = 0.0               # silent LFE: FFmpeg's default downmix drops it anyway
    path = synth.write_wav(tmp_path / "a.wav", planes, rate, layout)
    wave = media.decode_audio(path, 16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 40000) <= 2
    freqs = np.fft.rfftfreq(wave.size, 1 / 16000)
    assert freqs[np.abs(np.fft.rfft(wave)).argmax()] == pytest.approx(440, abs=1)
    assert 0.2 < np.abs(wave[1000:-1000]).max() <= 1.0


@pytest.mark.parametrize("width", [2, 3])     # 16-bit; 24-bit (decoded as s32)
def test_mono_pcm_at_the_target_rate_is_exact(tmp_path, width):
    # the CREMA-D case (16 kHz mono WAV) skips the resampler: the values must be FFmpeg's own
    import wave

    bits = 8 * width
    pcm = np.random.default_rng(width).integers(-(1 << bits - 1), 1 << bits - 1, 16000 + 123)
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as w:              # written without FFmpeg
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(16000)
        w.writeframes(b"".join(int(v).to_bytes(width, "little", signed=True) for v in pcm))
    wave_ = media.decode_audio(path, 16000)
    np.testing.assert_array_equal(wave_, (pcm / (1 << bits - 1)).astype(np.float32))
    with av.open(str(path)) as c:                      # swresample's s16/s32 -> float conversion
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        ffmpeg = np.concatenate([f.to_ndarray().reshape(-1) for frame in c.decode(audio=0)
                                 for f in resampler.resample(frame)])
    np.testing.assert_array_equal(wave_, ffmpeg)


def _wav(path, payload: bytes, tag: int, channels: int, rate: int, bits: int, *, extensible=False,
         extra_chunk=b"", data_size=None) -> Path:
    """A WAV written byte by byte (no FFmpeg, no ``wave`` module: they cannot write floats)."""
    align = channels * bits // 8
    fmt = (tag if not extensible else 0xFFFE).to_bytes(2, "little") + channels.to_bytes(2, "little") \
        + rate.to_bytes(4, "little") + (rate * align).to_bytes(4, "little") + align.to_bytes(2, "little") \
        + bits.to_bytes(2, "little")
    if extensible:      # cbSize, valid bits, channel mask, subformat GUID (tag first)
        mask = 3 if channels == 2 else 4
        fmt += (22).to_bytes(2, "little") + bits.to_bytes(2, "little") + mask.to_bytes(4, "little") \
            + tag.to_bytes(2, "little") + bytes.fromhex("000000001000800000aa00389b71")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + extra_chunk \
        + b"data" + (len(payload) if data_size is None else data_size).to_bytes(4, "little") + payload
    Path(path).write_bytes(b"RIFF" + (len(body)).to_bytes(4, "little") + body)
    return Path(path)


def _ffmpeg_path(path, rate):
    """``decode_audio`` through FFmpeg only (the native WAV reader switched off)."""
    real = media.read_pcm_wav
    media.read_pcm_wav = lambda p: None
    try:
        return media.decode_audio(path, rate)
    finally:
        media.read_pcm_wav = real


@pytest.mark.parametrize("tag,bits,dtype", [(1, 8, "u1"), (1, 16, "<i2"), (1, 32, "<i4"), (3, 32, "<f4"),
                                            (3, 64, "<f8")], ids=["u8", "s16", "s32", "f32", "f64"])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [16000, 22050])
def test_native_wav_reader_equals_ffmpeg(tmp_path, tag, bits, dtype, channels, rate):
    """Plain PCM/float WAVs are read with numpy; the samples, downmix and resampling must be
    exactly FFmpeg's path, with extensible headers, odd-sized chunks before the data and a
    trailing half sample frame."""
    rng = np.random.default_rng(bits + channels)
    n = 4000 * channels
    if dtype == "u1":
        raw = rng.integers(0, 256, n).astype("u1")
    elif dtype[1] == "i":
        info = np.iinfo(dtype)
        raw = rng.integers(info.min, info.max, n, endpoint=True).astype(dtype)
    else:
        raw = (rng.uniform(-1, 1, n)).astype(dtype)
    for i, layout in enumerate([{}, {"extensible": True}, {"extra_chunk": b"JUNK\x03\x00\x00\x00abc\x00"}]):
        path = _wav(tmp_path / f"{i}.wav", raw.tobytes() + b"\x01", tag, channels, rate, bits, **layout)
        planes, got_rate = media.read_pcm_wav(path)
        whole = 4000 + (channels * bits == 8)          # the odd byte is a whole u8 mono sample
        assert got_rate == rate and planes.shape == (channels, whole)
        np.testing.assert_array_equal(media.decode_audio(path, 16000), _ffmpeg_path(path, 16000))


@pytest.mark.parametrize("case", ["24-bit", "5.1", "adpcm", "no-data", "empty-data", "rf64", "not-wav"])
def test_native_wav_reader_leaves_the_rest_to_ffmpeg(tmp_path, case):
    """Anything but plain PCM/float in one or two channels goes to FFmpeg, with its messages."""
    pcm = np.zeros(600, "<i2").tobytes()
    path = {
        "24-bit": lambda: _wav(tmp_path / "a.wav", bytes(900), 1, 1, 16000, 24),
        "5.1": lambda: _wav(tmp_path / "a.wav", bytes(1200), 1, 6, 16000, 16),
        "adpcm": lambda: _wav(tmp_path / "a.wav", bytes(256), 2, 1, 16000, 4),
        "no-data": lambda: _wav(tmp_path / "a.wav", b"", 1, 1, 16000, 16, data_size=0)
        .write_bytes(_wav(tmp_path / "b.wav", b"", 1, 1, 16000, 16).read_bytes()[:36]) and tmp_path / "a.wav",
        "empty-data": lambda: _wav(tmp_path / "a.wav", b"", 1, 1, 16000, 16),
        "rf64": lambda: (tmp_path / "a.wav").write_bytes(b"RF64" + _wav(tmp_path / "b.wav", pcm, 1, 1, 16000, 16)
                                                          .read_bytes()[4:]) and tmp_path / "a.wav",
        "not-wav": lambda: (tmp_path / "a.wav").write_bytes(b"RIFF\x10\x00\x00\x00AVI LIST") and tmp_path / "a.wav",
    }[case]()
    assert media.read_pcm_wav(path) is None


def test_encoded_audio_length(make_clip):
    path = make_clip(duration=2.0, fps=10, sample_rate=48000, audio_layout="5.1")
    wave = media.decode_audio(path, 16000)
    assert 32000 <= wave.size <= 32000 + 1024     # AAC pads its last frame


def test_decode_clip_single_pass_matches_separate_calls(make_clip):
    path = make_clip(duration=3.0)
    clip = media.decode_clip(path, sample_rate=16000, frame_size=48, jpeg_quality=80)
    frames, duration = media.decode_frames(path, frame_size=48, jpeg_quality=80)
    assert clip.frames == frames and clip.duration == duration
    assert clip.frame_times == [0.5, 1.5, 2.5]
    np.testing.assert_array_equal(clip.wave, media.decode_audio(path, 16000))


def test_decode_clip_reads_a_separate_audio_file(make_clip, tmp_path):
    path = make_clip("v.mp4", duration=2.0, audio=False, audio_path=tmp_path / "a.wav")
    clip = media.decode_clip(path, tmp_path / "a.wav", sample_rate=16000)
    assert len(clip.frames) == 2 and clip.wave.size == 32000


# ----------------------------------------------------------------------------- fit_duration

def test_fit_duration_tiles_cuts_and_clips():
    wave = np.array([0.5, -2.0, 0.25], np.float32)
    out = media.fit_duration(wave, 7)
    np.testing.assert_array_equal(out, np.clip(np.tile(wave, 3)[:7], -1, 1))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(media.fit_duration(np.arange(10, dtype=np.float32) / 10, 4),
                                  np.arange(4, dtype=np.float32) / 10)
    np.testing.assert_array_equal(media.fit_duration(np.zeros(0, np.float32), 3), np.zeros(3))


# ----------------------------------------------------------------------------- errors

def _stage(fn, *args, **kwargs):
    with pytest.raises(ClipError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return info.value.stage, msg


def test_unopenable_files_fail_at_open(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).bytes(20000))
    for path in (empty, noise, tmp_path / "missing.mp4"):
        for fn, args in ((media.decode_frames, ()), (media.decode_audio, (16000,))):
            stage, msg = _stage(fn, path, *args)
            assert stage == "open" and str(path) in msg


def test_missing_streams(make_clip, tmp_path):
    silent = make_clip("silent.mp4", duration=1.0, audio=False)
    stage, msg = _stage(media.decode_audio, silent, 16000)
    assert stage == "audio" and "no audio stream" in msg and "silent.mp4" in msg
    assert _stage(media.decode_clip, silent, sample_rate=16000)[0] == "audio"
    wav = synth.write_wav(tmp_path / "only.wav", np.zeros(1600), 16000)
    stage, msg = _stage(media.decode_frames, wav)
    assert stage == "video" and "no video stream" in msg


def test_truncated_video_fails_at_video(make_clip, tmp_path):
    # Matroska keeps its duration in the header, so a cut file still opens
    path = make_clip("clip.mkv", duration=4.0, audio=False)
    data = path.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 3])
    stage, msg = _stage(media.decode_frames, cut)
    assert stage == "video" and "truncated" in msg


def test_corrupt_packets_are_skipped_like_ffmpeg_does(make_clip, tmp_path):
    path = make_clip(duration=4.0)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 3000] = np.random.default_rng(1).bytes(3000)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    clip = media.decode_clip(damaged, sample_rate=16000, frame_size=0)
    assert len(clip.frames) == 4 and clip.wave.size >= 4 * 16000 - 2048
