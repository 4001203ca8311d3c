"""Decoding with PyAV (README: What is extracted): 1-fps JPEG frames, mono resampled audio, duration fitting.

Speed: video is read sequentially (seeking per frame costs a GOP each time), but only what
the kept frames need is decoded: GOPs that end before the next kept frame are skipped
undecoded and decoding stops after the last kept frame. Only the kept frames are converted:
one swscale call per frame (the resize, staying in Y'CbCr 4:2:0) with one scaler context
reused per thread, then a JPEG encoded straight from those planes (``simplejpeg``), as the
ffmpeg CLI does. ``decode_clip`` reads video and audio of one file in a single demux pass.
Audio that is already mono at the target rate is converted to float32 with numpy (no filter
graph); WAV files are opened without FFmpeg's stream probing (their header says everything,
and probing decodes up to 5 MB of PCM).

Every failure is a ``ClipError`` whose stage is "open" (missing, empty or not a media file),
"video" or "audio", with a one-line message that names the file.
"""
from __future__ import annotations

import bisect
import collections
import itertools
import math
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import simplejpeg
from av.video.reformatter import Interpolation, VideoReformatter

from .errors import ClipError

__all__ = ["decode_frames", "decode_audio", "decode_clip", "fit_duration", "DecodedClip",
           "open_media", "video_stream"]

# a video may end this much before its declared duration before we call it truncated
_TRUNCATION_SLACK_S = 1.0


@dataclass
class DecodedClip:
    frames: list[bytes]          # JPEG bytes, in time order
    frame_times: list[float]     # the sampled times t = (i + 0.5) / fps, seconds
    frame_size: tuple[int, int]  # (width, height) of the JPEGs
    duration: float              # seconds, of the video stream
    wave: np.ndarray | None      # float32 mono at the requested rate (None when not asked)


# ----------------------------------------------------------------------------- opening

def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _is_wav(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE"


def open_media(path) -> av.container.InputContainer:
    """Open ``path`` for decoding; ``ClipError("open", ...)`` when it is missing, empty or not
    media. WAV files skip FFmpeg's stream probing (up to 5 MB of PCM decoded for nothing:
    the WAV header already gives codec, rate and channels), which makes opening ~10x faster."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ClipError("open", f"{path}: empty file (0 bytes)", retryable=True)
        options = {"probesize": "32"} if _is_wav(path) else {}
        return av.open(str(path), metadata_errors="ignore", options=options)
    except ClipError:
        raise
    except FileNotFoundError:
        raise ClipError("open", f"{path}: no such file", retryable=True) from None
    except PermissionError:
        raise ClipError("open", f"{path}: permission denied", retryable=True) from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise ClipError("open", f"{path}: cannot open as media: {_one_line(e)}") from None


def video_stream(container, path, threads: int = 0):
    """The first video stream, its decoder set to ``threads`` threads (0: FFmpeg's choice, one
    per core, frame + slice threading; 1: no threads, the fastest per core when one process
    runs per core). Threading never changes the decoded pixels."""
    if not container.streams.video:
        raise ClipError("video", f"{path}: no video stream")
    stream = container.streams.video[0]
    if threads != 1:
        stream.thread_type = "AUTO"          # frame + slice threads
    stream.codec_context.thread_count = threads
    return stream


def _audio_stream(container, path):
    if not container.streams.audio:
        raise ClipError("audio", f"{path}: no audio stream")
    return container.streams.audio[0]


_MKV_DURATION = re.compile(r"^(\d+):(\d+):(\d+(?:\.\d+)?)$")


def _declared_duration(container, stream) -> float | None:
    """The video stream's duration from the headers; None when nothing says."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    tags = [v for k, v in stream.metadata.items() if k.upper().startswith("DURATION")]
    tag = _MKV_DURATION.match(tags[0].strip()) if tags else None
    if tag:  # Matroska stores per-track durations as tags ("DURATION" or "DURATION-eng")
        h, m, s = tag.groups()
        return int(h) * 3600 + int(m) * 60 + float(s)
    if container.duration is not None and container.duration > 0:
        d = container.duration / av.time_base
        if stream.start_time is not None and container.start_time is not None:
            d -= max(0.0, float(stream.start_time * stream.time_base) - container.start_time / av.time_base)
        return d
    return None


# ----------------------------------------------------------------------------- frames

def _target_size(w: int, h: int, frame_size: int, sar) -> tuple[int, int]:
    """Size that shows the frame with square pixels and short side ``frame_size`` (0: keep)."""
    if sar and sar.numerator > 0 and sar != 1:
        w = max(1, round(w * sar))
    if frame_size <= 0:
        return w, h
    if w <= h:
        return frame_size, max(1, round(h * frame_size / w))
    return max(1, round(w * frame_size / h)), frame_size


class _FramePicker:
    """Consumes decoded frames in order; keeps the frame shown at each (i + 0.5) / fps (rule
    "middle"), or at each i / fps with a partial last interval included (rule "start").

    Times are compared as integers in the stream's time base (ticks since the stream start), so
    a frame exactly at a target counts as shown there. With a known duration the targets are
    fixed up front and ``done`` turns true once the last one is settled; without one, targets
    are open-ended and cut when the stream ends.
    """

    def __init__(self, path, *, fps, frame_size, jpeg_quality, duration, start, time_base, rate,
                 sar=None, rule="middle"):
        self.path, self.fps, self.rule = path, Fraction(fps), rule
        self.frame_size, self.jpeg_quality = frame_size, jpeg_quality
        self.duration = duration
        self.n_targets = None if duration is None else self._count(duration)
        self.rate = Fraction(rate) if rate else None
        self.time_base = Fraction(time_base) if time_base else (1 / self.rate if self.rate else None)
        self.start, self.sar = start, sar
        self.prev = None                   # the last frame fed
        self.prev_jpeg = None              # its JPEG, once converted
        self.frames: list[bytes] = []
        self.size = None
        self.seen = 0
        self.end_ticks = 0                 # end of the last frame fed, in ticks
        # ticks of a frame without a duration; 0 when the rate is unknown
        self._step = round(1 / (self.rate * self.time_base)) if self.rate and self.time_base else 0
        self._limit = self._last_tick(0)   # frames after this tick are past the pending target
        self.done = False                  # every target has its frame

    def _count(self, duration: float) -> int:
        if self.rule == "start":        # t = 0, 1/fps, ...: a partial last interval counts
            return max(1, int(math.ceil(duration * self.fps - 1e-6)))
        return max(1, int(math.floor(duration * self.fps + 1e-6)))

    def target(self, i: int) -> Fraction:
        """Target time of frame i in seconds since the stream start."""
        if self.rule == "start":
            return Fraction(i) / self.fps
        if self.duration is not None and self.duration * self.fps < 1:
            return Fraction(self.duration).limit_denominator(1_000_000) / 2   # the middle frame
        return (2 * i + 1) / (2 * self.fps)

    def _last_tick(self, i: int) -> float:
        """The last tick shown at target i; infinite once every target is settled."""
        if self.n_targets is not None and i >= self.n_targets:
            return math.inf
        if self.time_base is None:     # no times at all: the first frame fails in _ticks
            return -1
        return math.floor(self.target(i) / self.time_base)

    @property
    def limit(self) -> float:
        """The last tick shown at the pending target (infinite once every target has its frame)."""
        return self._limit

    def ticks_of(self, pts) -> int | None:
        """``pts`` in ticks since the stream start; None when it cannot be placed yet."""
        if pts is None or self.start is None or self.time_base is None:
            return None
        return pts - self.start

    @property
    def end_time(self) -> float:
        return float(self.end_ticks * self.time_base) if self.time_base else 0.0

    def _ticks(self, frame) -> int:
        if self.time_base is None:
            raise ClipError("video", f"{self.path}: frames have no timestamps and the stream no frame rate")
        if frame.pts is None:          # no timestamps: count frames at the nominal rate
            return round(self.seen / self.rate / self.time_base) if self.rate else self.seen
        if self.start is None:
            self.start = frame.pts     # times count from the first frame
        return frame.pts - self.start

    def _emit(self, frame) -> None:
        if self.prev_jpeg is None:
            self.prev_jpeg = self._jpeg(frame)
        self.frames.append(self.prev_jpeg)
        self._limit = self._last_tick(len(self.frames))
        self.done = self._limit == math.inf

    def feed(self, frame) -> None:
        # the hot path (every decoded frame): integer compares only
        ticks = self._ticks(frame)
        self.seen += 1
        # ``frame`` comes after the pending target: the previous frame is the one shown there
        while ticks > self._limit:
            if self.prev is None:       # the stream starts after the target: nothing earlier
                self.prev, self.prev_jpeg = frame, None
            self._emit(self.prev)
        self.end_ticks = max(self.end_ticks, ticks + (frame.duration or self._step))
        if self.prev is not frame:
            self.prev, self.prev_jpeg = frame, None

    def finish(self) -> list[bytes]:
        if self.prev is None:
            raise ClipError("video", f"{self.path}: no decodable video frames")
        if self.n_targets is None:
            self.duration = self.end_time
            self.n_targets = self._count(self.end_time)
            del self.frames[self.n_targets:]
            self._limit = self._last_tick(len(self.frames))
            self.done = self._limit == math.inf
        elif not self.done and self.end_time < self.duration - _TRUNCATION_SLACK_S:
            raise ClipError("video", f"{self.path}: video decode error: frames stop at "
                                     f"{self.end_time:.2f} s of {self.duration:.2f} s (truncated file?)")
        while not self.done:                # targets after the last frame see the last frame
            self._emit(self.prev)
        return self.frames

    def _jpeg(self, frame) -> bytes:
        w, h = _target_size(frame.width, frame.height, self.frame_size, self.sar)
        try:
            planes = _yuv_planes(frame, w, h)
        except (av.error.FFmpegError, ValueError) as e:
            raise ClipError("video", f"{self.path}: cannot convert frame: {_one_line(e)}") from None
        # frame.rotation is counter-clockwise degrees, as np.rot90 turns
        turns = {90: 1, 180: 2, 270: 3}.get(round(frame.rotation or 0) % 360, 0)
        if turns:
            planes = [np.rot90(p, turns) for p in planes]
        self.size = planes[0].shape[::-1]
        return _encode_jpeg(planes, self.jpeg_quality)


_local = threading.local()     # one scaler context per thread: an SwsContext is not thread-safe


def _yuv_planes(frame, width: int, height: int) -> list[np.ndarray]:
    """``frame`` as full-range (JFIF) 4:2:0 Y, Cb, Cr planes of ``width`` x ``height``, in one
    swscale call (bicubic, accurate rounding).

    The JPEG is encoded straight from these planes, as ``ffmpeg -i clip -vf scale out.jpg``
    does: no RGB round trip and no chroma resampling by the encoder. That is ~3x faster than
    converting to RGB and letting the encoder convert back; the pixels differ from that path
    by about one level in 255 (bicubic on the chroma planes rather than on RGB). The context
    is reused: building one (~3 ms) costs more than a frame."""
    reformatter = getattr(_local, "reformatter", None)
    if reformatter is None:
        reformatter = _local.reformatter = VideoReformatter()
    yuv = reformatter.reformat(frame, width=width, height=height, format="yuv420p",
                               dst_color_range="JPEG", threads=1,
                               interpolation=Interpolation.BICUBIC | Interpolation.ACCURATE_RND)
    return [np.frombuffer(memoryview(p), np.uint8).reshape(p.height, p.line_size)[:, :p.width]
            for p in yuv.planes]


def _encode_jpeg(planes: list[np.ndarray], quality: int) -> bytes:
    """JPEG (libjpeg-turbo) of full-range 4:2:0 planes. The encoder reads whole 16x16 blocks,
    past the bottom and right edges of a plane whose size is not a multiple: each plane is
    handed over inside a buffer that repeats its last row and column up to the block size,
    so those reads are defined and every run gives the same bytes."""
    views = []
    for plane, block in zip(planes, (16, 8, 8)):
        h, w = plane.shape
        buf = np.empty((-(-h // block) * block, -(-w // block) * block), np.uint8)
        buf[:h, :w] = plane
        buf[h:, :w] = plane[-1]
        buf[:, w:] = buf[:, w - 1:w]
        views.append(buf[:h, :w])
    return simplejpeg.encode_jpeg_yuv_planes(*views, quality=quality)


# ----------------------------------------------------------------------------- audio

# av_channel_layout_default: what FFmpeg assumes for an unordered layout of n channels
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


# FFmpeg's sample formats as numpy sees them: (dtype, scale to [-1, 1), offset), converted
# exactly as swresample (and libsndfile, under librosa.load) do: x / 2^(bits-1), u8 centred.
_FORMATS = {"u8": ("u1", 1 / (1 << 7), 128), "s16": ("=i2", 1 / (1 << 15), 0),
            "s32": ("=i4", 1 / (1 << 31), 0), "s64": ("=i8", 1 / (1 << 63), 0),
            "flt": ("=f4", None, 0), "dbl": ("=f8", None, 0)}


def _to_float(data: bytes, sample_format: str) -> np.ndarray:
    dtype, scale, offset = _FORMATS[sample_format.rstrip("p")]
    out = np.frombuffer(data, dtype).astype(np.float32, copy=scale is not None)
    if offset:
        out -= np.float32(offset)
    if scale is not None:
        out *= np.float32(scale)       # a power of two: exact
    return out


def _graph(fmt: str, rate: int, layout: str, options: str) -> av.filter.Graph:
    graph = av.filter.Graph()
    graph.threads = 1       # aresample has no threads; FFmpeg's pool would cost ~3 ms a clip
    src = graph.add_abuffer(format=fmt, sample_rate=rate, layout=layout, time_base=Fraction(1, rate))
    node = graph.add("aresample", options)
    sink = graph.add("abuffersink")
    src.link_to(node)
    node.link_to(sink)
    graph.configure()
    return graph


def _through_graph(planes: np.ndarray, rate: int, layout: str, options: str) -> np.ndarray:
    """float32 ``planes`` (channels x samples) through one ``aresample`` filter, mono float32 out."""
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes, np.float32), format="fltp", layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    graph = _graph("fltp", rate, layout, options)
    graph.push(frame)
    graph.push(None)
    out = []
    while True:
        try:
            out.append(graph.pull().to_ndarray().reshape(-1))
        except (av.BlockingIOError, av.EOFError):
            break
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def downmix(planes, layout: str) -> np.ndarray:
    """Mono float32 of ``planes`` (one float32 array per channel): the channel itself, the mean of two (as
    librosa.load), and FFmpeg's matrix normalised not to clip for more (5.1: centre, fronts and
    surrounds at -3 dB, no LFE, like ``ffmpeg -ac 1``; without the normalisation a 5.1 mix
    peaks at 1.7x the input)."""
    if len(planes) == 1:
        return planes[0]
    if len(planes) == 2:
        return (planes[0] + planes[1]) * np.float32(0.5)
    rate = 48000                # any: only the matrix is applied
    return _through_graph(np.stack(planes), rate, layout, "ochl=mono:osf=flt:rematrix_maxval=1.0")


def resample(wave: np.ndarray, rate: int, target: int, resampler: str = "soxr") -> np.ndarray:
    """Mono float32 ``wave`` from ``rate`` to ``target`` Hz, once for the whole clip.

    "soxr": soxr's HQ mode, then cut or zero-padded to ceil(n * target / rate) samples, which
    is what ``librosa.load(sr=target)`` (res_type soxr_hq) returns; "ffmpeg": swresample's
    default filter, as the ffmpeg CLI."""
    if rate == target:
        return wave
    if resampler == "soxr":
        import soxr
        out = soxr.resample(wave, rate, target, quality="HQ").astype(np.float32, copy=False)
        n = math.ceil(wave.size * target / rate)
        return out[:n] if out.size >= n else np.pad(out, (0, n - out.size))
    if resampler == "ffmpeg":
        return _through_graph(wave[None], rate, "mono", f"osr={target}:osf=flt")
    raise ValueError(f"unknown resampler {resampler!r}")


class _AudioCollector:
    """Collects decoded audio as views of the frames' planes (no copy, no conversion per
    frame: the views keep the decoder's buffers alive), then per clip one join per plane, one
    conversion to float32, one downmix and one resampling.

    A stream that changes format, rate or layout mid-way is handled in segments, each
    converted on its own."""

    def __init__(self, sample_rate: int, path, resampler: str = "soxr"):
        self.sample_rate, self.path, self.resampler = sample_rate, path, resampler
        self.segments: list[tuple[tuple, list[list[memoryview]]]] = []
        self.key: tuple | None = None
        self.seen = 0

    def feed(self, frame) -> None:
        fmt = frame.format
        channels = len(frame.layout.channels)
        key = (fmt.name, frame.sample_rate, frame.layout.name, channels)
        if fmt.name.rstrip("p") not in _FORMATS:
            raise ClipError("audio", f"{self.path}: unsupported sample format {fmt.name}")
        if key != self.key:              # first frame, or the stream changed format mid-way
            self.key = key
            self.segments.append((key, [[] for _ in range(channels if fmt.is_planar else 1)]))
        planes = self.segments[-1][1]
        size = frame.samples * fmt.bytes * (1 if fmt.is_planar else channels)
        for store, plane in zip(planes, frame.planes):
            store.append(memoryview(plane)[:size])
        self.seen += 1

    def _segment(self, key, planes: list[list[memoryview]]) -> np.ndarray:
        fmt, rate, layout, channels = key
        if layout.endswith(" channels"):     # unordered (e.g. WAV without a mask): FFmpeg's default
            layout = _DEFAULT_LAYOUTS.get(channels, layout)
        arr = [_to_float(b"".join(p), fmt) for p in planes]
        if len(arr) < channels:             # packed: interleaved channels in one plane
            arr = list(arr[0].reshape(-1, channels).T)
        try:
            return resample(downmix(arr, layout), rate, self.sample_rate, self.resampler)
        except (av.error.FFmpegError, ValueError) as e:
            raise ClipError("audio", f"{self.path}: cannot resample {key}: {_one_line(e)}") from None

    def finish(self) -> np.ndarray:
        waves = [self._segment(k, p) for k, p in self.segments if any(p[0])]
        if not waves or not sum(w.size for w in waves):
            raise ClipError("audio", f"{self.path}: audio stream has no decodable samples")
        return np.concatenate(waves).astype(np.float32, copy=False)


# WAVE format tags read natively: PCM integers and IEEE floats (the subformat of an
# extensible header); bits per sample -> FFmpeg's sample format name
_WAV_PCM = {(1, 8): "u8", (1, 16): "s16", (1, 32): "s32", (3, 32): "flt", (3, 64): "dbl"}


def read_pcm_wav(path) -> tuple[np.ndarray, int] | None:
    """(float32 samples of each of at most two channels, rate) of a plain PCM/float WAV, read
    with numpy, or None for anything else: other codecs, 24-bit, more channels (whose layout
    matters for the downmix), RF64, a damaged header, no samples. FFmpeg then decodes the file
    as any other, with its error messages.

    Opening a WAV through FFmpeg costs ~0.7 ms, ten times reading it: on CREMA-D that is a
    tenth of a clip's work. The samples are exactly what FFmpeg gives (integers divided by
    their full scale, u8 centred; tested against it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    fmt, pos = None, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if cid == b"fmt " and size >= 16:
            tag, channels, rate = (int.from_bytes(data[body + a:body + b], "little")
                                   for a, b in ((0, 2), (2, 4), (4, 8)))
            align, bits = (int.from_bytes(data[body + a:body + b], "little") for a, b in ((12, 14), (14, 16)))
            if tag == 0xFFFE and size >= 40:         # WAVE_FORMAT_EXTENSIBLE: the subformat's tag
                tag = int.from_bytes(data[body + 24:body + 26], "little")
            fmt = (_WAV_PCM.get((tag, bits)), channels, rate, align)
        elif cid == b"data":
            if fmt is None or fmt[0] is None or fmt[1] not in (1, 2) or fmt[2] <= 0 \
                    or fmt[3] != fmt[1] * np.dtype(_FORMATS[fmt[0]][0]).itemsize:
                return None
            name, channels, rate, align = fmt
            end = len(data) if size in (0, 0xFFFFFFFF) else min(len(data), body + size)
            end -= (end - body) % align             # whole sample frames only
            if end <= body:
                return None
            samples = _to_float(data[body:end], name)
            return samples.reshape(-1, channels).T if channels > 1 else samples[None], rate
        pos = body + size + (size & 1)               # chunks are word-aligned
    return None


def decode_audio(path, sample_rate: int, resampler: str = "soxr") -> np.ndarray:
    """The first audio stream of ``path`` as float32 mono at ``sample_rate`` (any layout/rate).

    Downmix: see ``downmix`` (stereo: the mean). Resampling (``resample``): ``resampler``
    "soxr" (as librosa.load) or "ffmpeg". Mono audio already at ``sample_rate`` is only
    converted to float (integer PCM divided by its full scale, as FFmpeg does). Plain PCM
    WAVs are read without FFmpeg (``read_pcm_wav``).
    """
    pcm = read_pcm_wav(path)
    if pcm is not None:
        planes, rate = pcm
        try:
            return resample(downmix(list(planes), "stereo" if len(planes) == 2 else "mono"),
                            rate, sample_rate, resampler)
        except (av.error.FFmpegError, ValueError) as e:
            raise ClipError("audio", f"{path}: cannot resample: {_one_line(e)}") from None
    container = open_media(path)
    with container:
        collector = _AudioCollector(sample_rate, path, resampler)
        _read(container, path, None, None, _audio_stream(container, path), collector)
        return collector.finish()


def fit_duration(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Exactly ``num_samples`` long: the whole wave tiled (``np.tile``) then cut; clipped to [-1, 1].

    An empty wave becomes silence (tiling nothing gives nothing)."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        return np.zeros(num_samples, np.float32)
    reps = -(-num_samples // wave.size)
    return np.clip(np.tile(wave, reps)[:num_samples], -1.0, 1.0).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- clip

def decode_clip(video, audio=None, *, sample_rate: int | None = None, fps: float = 1,
                frame_size: int = 256, jpeg_quality: int = 90, threads: int = 0,
                resampler: str = "soxr", frame_rule: str = "middle") -> DecodedClip:
    """Frames of ``video`` and, when ``sample_rate`` is given, the audio of ``audio`` (or of
    ``video`` itself when ``audio`` is None), reading a shared file in one demux pass.

    Video is handled first: a clip with no video fails at stage "video" even if its audio is
    fine. Only what the kept frames need is decoded: a GOP that ends before the next kept
    frame is skipped undecoded (at 1 fps from 30-fps video with a keyframe every 12 frames,
    ~1/4 of the frames are decoded; a clip that is one GOP is decoded up to its last kept
    frame). Streams with open GOPs, whose pictures may refer across a keyframe, are decoded
    whole up to the last kept frame (found at the first such picture; that part is read twice).
    ``threads`` is the video decoder's thread count: 0 lets FFmpeg use one per core, 1 suits
    one worker process per core. Frame selection is as in ``decode_frames``.
    """
    picker_args = dict(fps=fps, frame_size=frame_size, jpeg_quality=jpeg_quality, rule=frame_rule)
    picker, wave = _decode(video, sample_rate if audio is None else None, threads, picker_args,
                           resampler=resampler)
    if sample_rate is not None and audio is not None:
        wave = decode_audio(audio, sample_rate, resampler)
    return DecodedClip(picker.frames, [float(picker.target(i)) for i in range(len(picker.frames))],
                       picker.size or (0, 0), float(picker.duration), wave)


def _decode(video, sample_rate, threads, picker_args, picker_class=None, collector_class=None,
            resampler: str = "soxr"):
    """(finished picker, wave or None) of ``video``: one demux pass skipping GOPs, or, for a
    stream with open GOPs, a second pass that does not."""
    for skip_gops in (True, False):
        container = open_media(video)
        with container:
            vstream = video_stream(container, video, threads)
            astream = _audio_stream(container, video) if sample_rate is not None else None
            picker = (picker_class or _FramePicker)(
                video, duration=_declared_duration(container, vstream), start=vstream.start_time,
                time_base=vstream.time_base, rate=vstream.guessed_rate,
                sar=vstream.codec_context.sample_aspect_ratio, **picker_args)
            collector = None if astream is None else \
                (collector_class or _AudioCollector)(sample_rate, video, resampler)
            try:
                _read(container, video, vstream, picker, astream, collector, skip_gops)
            except _OpenGop:
                continue
            picker.finish()
            return picker, collector.finish() if collector is not None else None
    raise AssertionError("unreachable: the pass without skipping never raises _OpenGop")


# Codecs where decoding can restart at any packet flagged as a keyframe: later pictures never
# refer to pictures before it, except leading pictures of an open GOP, caught by their times.
_KEYFRAME_RESTARTS = {"flv1", "h263", "mpeg4", "mpeg1video", "mpeg2video", "mjpeg", "vp8",
                      "vp9", "av1", "hevc"}
_ANNEX_B_NAL = re.compile(b"\x00\x00\x01(.)", re.S)


def _restart_test(stream):
    """A test telling the packets decoding can restart at, or None when the codec is not known
    to have them. H.264 restarts only at IDR pictures: containers also flag its other I-frames
    as keyframes, whose successors may still refer to pictures before them."""
    name = stream.codec_context.codec.canonical_name     # the codec, whichever decoder
    if name in _KEYFRAME_RESTARTS:
        return lambda packet: packet.is_keyframe
    if name != "h264":
        return None
    extra = stream.codec_context.extradata or b""
    if extra[:1] == b"\x01":       # avcC: NAL units prefixed by their big-endian length
        width = (extra[4] & 3) + 1 if len(extra) > 4 else 4

        def idr(data: bytes) -> bool:
            i = 0
            while i + width < len(data):
                if data[i + width] & 0x1F == 5:
                    return True
                i += width + int.from_bytes(data[i:i + width], "big")
            return False
    else:                           # Annex B: NAL units after 00 00 01 start codes
        def idr(data: bytes) -> bool:
            return any(m.group(1)[0] & 0x1F == 5 for m in _ANNEX_B_NAL.finditer(data))
    return lambda packet: packet.is_keyframe and idr(bytes(packet))


# How far ahead (in packets, decode order) evidence for skipping a non-reference frame is
# looked for: more than any encoder's B-frame run, so evidence is found when it exists.
_LOOKAHEAD = 16


class _NonRefSkipper:
    """Tells the video decoder to skip a packet's picture when it is not a reference picture
    (``skip_frame = NONREF``: no later picture needs it) and not a kept frame: a picture shown
    at ticks t is skippable when a picture shown in (t, T] is among the next packets, T being
    the first target at or after t (so that later picture, not this one, is shown at T).
    Streams with B-frames only (x264 ``medium`` makes ~2/3 of them non-reference), decoded
    single-threaded, with a known duration (the targets are fixed)."""

    def __init__(self, stream, picker):
        self.cc, self.picker = stream.codec_context, picker
        self.last = [picker._last_tick(i) for i in range(picker.n_targets)]
        self.state = "DEFAULT"

    @classmethod
    def make(cls, stream, picker):
        cc = stream.codec_context
        if (cc.codec.canonical_name in ("h264", "hevc") and cc.has_b_frames and cc.thread_count == 1
                and picker.n_targets is not None):
            return cls(stream, picker)
        return None

    def _skippable(self, packet, later) -> bool:
        if not packet.size or packet.is_keyframe:
            return False
        t = self.picker.ticks_of(packet.pts)
        if t is None:
            return False
        i = bisect.bisect_left(self.last, t)
        if i == len(self.last):          # after the last target: decoding stops there anyway
            return False
        target = self.last[i]
        for q in itertools.islice(later, _LOOKAHEAD):
            tq = self.picker.ticks_of(q.pts) if q.size and q.stream.type == "video" else None
            if tq is not None and t < tq <= target:
                return True
        return False

    def before(self, packet, later) -> None:
        state = "NONREF" if self._skippable(packet, later) else "DEFAULT"
        if state != self.state:
            self.cc.skip_frame = self.state = state


class _OpenGop(Exception):
    """A picture after a keyframe (in decode order) is shown before it, so it may refer to
    pictures before that keyframe: skipping GOPs in this stream is unsafe."""


def _read(container, path, vstream, picker, astream=None, collector=None, skip_gops=False) -> None:
    """Demux once, feeding video frames to ``picker`` until it is done and audio to ``collector``.

    With ``skip_gops``, video packets are held back, not decoded, while they are shown at or
    before the pending target; when a keyframe arrives that is still at or before it, the
    held packets are dropped undecoded (none of them can be the frame shown there, and
    decoding restarts at the keyframe). A picture shown before the keyframe that precedes it
    in decode order (an open GOP) raises ``_OpenGop`` once something was dropped, and stops
    the skipping otherwise.

    Non-reference pictures that no kept frame is (``_NonRefSkipper``) are not decoded either;
    evidence for that comes from the next packets, read ahead of decoding.

    Like the ffmpeg CLI, a packet that fails to decode is skipped (real datasets have a few);
    the consequences surface later: no frames, a truncated video, or no audio samples. Only a
    demuxer failure before anything was decoded is an error by itself.
    """
    streams = [s for s in (vstream, astream) if s is not None]
    video_index = vstream.index if vstream is not None else -1
    errors: dict[str, BaseException | None] = {"video": None, "audio": None}
    held: list = []         # video packets not yet known to be needed, in decode order
    dropped = False
    restart = _restart_test(vstream) if skip_gops else None
    skip_gops = restart is not None
    restart_pts = None      # of the last restart point, in decode order
    skipper = _NonRefSkipper.make(vstream, picker) if vstream is not None else None
    ahead: collections.deque = collections.deque()     # demuxed, not yet looked at
    source = container.demux(*streams)

    def next_packet():
        while len(ahead) <= (_LOOKAHEAD if skipper is not None else 0):
            packet = next(source, None)
            if packet is None:
                break
            ahead.append(packet)
        return ahead.popleft() if ahead else None

    def decode(packet, stage: str, later=()) -> None:
        if skipper is not None and stage == "video":
            skipper.before(packet, itertools.chain(later, ahead))
        try:
            frames = packet.decode()
        except av.error.FFmpegError as e:
            errors[stage] = errors[stage] or e
            return
        for frame in frames:
            (picker if stage == "video" else collector).feed(frame)

    def decode_held(current=None) -> None:
        for i, p in enumerate(held):
            decode(p, "video", itertools.chain(held[i + 1:], [current] if current is not None else []))
        held.clear()

    try:
        while (packet := next_packet()) is not None:
            if packet.stream.index != video_index:   # (a flush packet has no stream_index)
                decode(packet, "audio")
                continue
            pts = packet.pts
            ticks = picker.ticks_of(pts) if skip_gops and packet.size else None
            is_restart = ticks is not None and restart is not None and restart(packet)
            if is_restart:
                restart_pts = pts
            elif ticks is not None and restart_pts is not None and pts < restart_pts:
                if dropped:
                    raise _OpenGop
                skip_gops, ticks = False, None
                decode_held(packet)
            if ticks is not None and ticks > picker.limit:
                decode_held(packet)     # the frame shown at the pending target is in there
            if picker.done:
                held.clear()
                if astream is None:
                    break           # nothing left to read
                continue            # skip video packets undecoded
            if ticks is not None and ticks <= picker.limit:
                if is_restart and held:
                    held.clear()
                    dropped = True
                held.append(packet)
                continue
            decode_held(packet)
            decode(packet, "video")
    except av.error.FFmpegError as e:     # a read error ends the file early: keep what we have
        errors = {k: v or e for k, v in errors.items()}
    decode_held()
    for stage, consumer in (("video", picker), ("audio", collector)):
        error = errors[stage]
        if consumer is not None and not consumer.seen and error is not None:
            raise ClipError(stage, f"{path}: {stage} decode error: {_one_line(error)}")


def decode_frames(path, *, fps: float = 1, frame_size: int = 256, jpeg_quality: int = 90,
                  threads: int = 0, frame_rule: str = "middle") -> tuple[list[bytes], float]:
    """JPEG frames shown at t = (i + 0.5) / fps, i = 0..floor(duration * fps) - 1, and the duration.

    "Shown at t" is the last frame whose timestamp (relative to the stream start) is <= t;
    clips shorter than one frame interval give their middle frame. Frames are resized so the
    short side is ``frame_size`` (0 keeps it; non-square pixels are made square first) and
    the container's rotation is applied. The duration is the video stream's, from the headers
    (decoding to the end when they say nothing); a video that stops more than 1 s early is
    reported as truncated. ``frame_rule="start"`` keeps the frames shown at t = i / fps for
    i = 0..ceil(duration * fps) - 1 instead (the released OGM-GE CREMA-D script's choice).
    """
    clip = decode_clip(path, fps=fps, frame_size=frame_size, jpeg_quality=jpeg_quality, threads=threads,
                       frame_rule=frame_rule)
    return clip.frames, clip.duration
