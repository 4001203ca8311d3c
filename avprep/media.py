"""Decoding with PyAV (SPEC §3): 1-fps JPEG frames, mono resampled audio, duration fitting.

Speed: video is decoded sequentially (seeking per frame costs a GOP each time), decoding
stops after the last needed frame, and only the kept frames are converted: one swscale call
per frame (YUV->RGB and the resize in one pass, into planar RGB when resizing, which swscale
scales ~3x faster than packed RGB and more accurately) with one scaler context reused per
thread (building one costs more than the conversion). ``decode_clip`` reads video and audio of one
file in a single demux pass. Audio that is already mono at the target rate is converted to
float32 with numpy (no filter graph); WAV files are opened without FFmpeg's stream probing
(their header says everything, and probing decodes up to 5 MB of PCM).

Every failure is a ``ClipError`` whose stage is "open" (missing, empty or not a media file),
"video" or "audio", with a one-line message that names the file.
"""
from __future__ import annotations

import io
import math
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from .errors import ClipError

__all__ = ["decode_frames", "decode_audio", "decode_clip", "fit_duration", "DecodedClip",
           "open_media", "video_stream"]

# frame.rotation (counter-clockwise degrees) -> the PIL transpose that displays it
_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_270}
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
            raise ClipError("open", f"{path}: empty file (0 bytes)")
        options = {"probesize": "32"} if _is_wav(path) else {}
        return av.open(str(path), metadata_errors="ignore", options=options)
    except ClipError:
        raise
    except FileNotFoundError:
        raise ClipError("open", f"{path}: no such file") from None
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
    """Consumes decoded frames in order; keeps the frame shown at each (i + 0.5) / fps.

    Times are compared as integers in the stream's time base (ticks since the stream start), so
    a frame exactly at a target counts as shown there. With a known duration the targets are
    fixed up front and ``done`` turns true once the last one is settled; without one, targets
    are open-ended and cut when the stream ends.
    """

    def __init__(self, path, *, fps, frame_size, jpeg_quality, duration, start, time_base, rate,
                 sar=None):
        self.path, self.fps = path, Fraction(fps)
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
        return max(1, int(math.floor(duration * self.fps + 1e-6)))

    def target(self, i: int) -> Fraction:
        """Target time of frame i in seconds since the stream start."""
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
            img = _to_image(frame, w, h)
        except (av.error.FFmpegError, ValueError) as e:
            raise ClipError("video", f"{self.path}: cannot convert frame: {_one_line(e)}") from None
        transpose = _ROTATIONS.get(round(frame.rotation or 0) % 360)
        if transpose is not None:
            img = img.transpose(transpose)
        self.size = img.size
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=self.jpeg_quality)
        return buf.getvalue()


_local = threading.local()     # one scaler context per thread: an SwsContext is not thread-safe


def _to_image(frame, width: int, height: int) -> Image.Image:
    """``frame`` as an RGB image of ``width`` x ``height`` (bicubic), in one swscale call.

    Resized frames go through planar RGB (gbrp): swscale scales into it ~3x faster than into
    packed rgb24, with the same pixels where rgb24 is exact and better chroma where it is not
    (its packed scaled path takes shortcuts at some sizes); PIL interleaves the planes.
    Unresized frames take the plain rgb24 converter: swscale's unscaled YUV -> gbrp path
    writes garbage, different on every call, into the last columns when the width is not a
    multiple of 8. The context is reused: building one (~3 ms) costs more than a frame."""
    reformatter = getattr(_local, "reformatter", None)
    if reformatter is None:
        reformatter = _local.reformatter = VideoReformatter()
    if (width, height) == (frame.width, frame.height):
        rgb = reformatter.reformat(frame, format="rgb24", threads=1)
        return Image.fromarray(rgb.to_ndarray(), "RGB")
    rgb = reformatter.reformat(frame, width=width, height=height, format="gbrp",
                               interpolation="BICUBIC", threads=1)
    g, b, r = (Image.frombuffer("L", (width, height), p, "raw", "L", p.line_size, 1)
               for p in rgb.planes)
    return Image.merge("RGB", (r, g, b))


# ----------------------------------------------------------------------------- audio

# av_channel_layout_default: what FFmpeg assumes for an unordered layout of n channels
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


# mono sample formats that numpy turns into float32 exactly as swresample does (x / 2^15,
# x / 2^31, a cast): (dtype, scale). No filter graph needed when the rate already matches.
_DIRECT = {"s16": ("=i2", 1 / (1 << 15)), "s32": ("=i4", 1 / (1 << 31)), "flt": ("=f4", None),
           "dbl": ("=f8", None)}
_DIRECT.update({f"{k}p": v for k, v in _DIRECT.items()})     # planar mono: the same bytes


def _direct_float(data: bytes, sample_format: str) -> np.ndarray:
    dtype, scale = _DIRECT[sample_format]
    out = np.frombuffer(data, dtype).astype(np.float32)
    if scale is not None:
        out *= np.float32(scale)
    return out


class _AudioCollector:
    """Downmix + resample in one swresample pass (an ``aresample`` filter), float32 mono out;
    mono audio already at the target rate skips the filter (numpy, same values, ~free).

    ``rematrix_maxval=1`` normalises FFmpeg's downmix matrix so it cannot clip: stereo becomes
    the channel mean (what librosa.load does), 5.1 FFmpeg's standard mix (centre + fronts,
    surrounds -3 dB, no LFE) scaled like ``ffmpeg -ac 1`` to 16-bit WAV. av.AudioResampler
    cannot take that option, and without it a 5.1 mix peaks at 1.7x the input.
    """

    def __init__(self, sample_rate: int, path):
        self.sample_rate, self.path = sample_rate, path
        self.graph, self.key, self.direct = None, None, False
        self.chunks: list[np.ndarray] = []
        self.raw: list[bytes] = []           # direct samples not yet converted
        self.seen = 0

    def _build(self, frame) -> None:
        graph = av.filter.Graph()
        graph.threads = 1       # aresample has no threads; FFmpeg's pool would cost ~3 ms a clip
        layout = frame.layout.name
        if layout.endswith(" channels"):     # unordered (e.g. WAV without a mask): FFmpeg's default
            layout = _DEFAULT_LAYOUTS.get(len(frame.layout.channels), layout)
        src = graph.add_abuffer(format=frame.format.name, sample_rate=frame.sample_rate,
                                layout=layout, time_base=frame.time_base)
        resample = graph.add("aresample", f"osr={self.sample_rate}:ochl=mono:osf=flt:rematrix_maxval=1.0")
        sink = graph.add("abuffersink")
        src.link_to(resample)
        resample.link_to(sink)
        graph.configure()
        self.graph = graph

    def _drain(self) -> None:
        while True:
            try:
                self.chunks.append(self.graph.pull().to_ndarray().reshape(-1))
            except (av.BlockingIOError, av.EOFError):
                return

    def feed(self, frame) -> None:
        key = (frame.format.name, frame.sample_rate, frame.layout.name)
        try:
            if key != self.key:              # first frame, or the stream changed format mid-way
                self._flush()
                self.key = key
                self.direct = (frame.sample_rate == self.sample_rate and frame.format.name in _DIRECT
                               and len(frame.layout.channels) == 1)
                if not self.direct:
                    self._build(frame)
            if self.direct:     # raw bytes now, one conversion at the end (~20 us a frame less)
                self.raw.append(bytes(memoryview(frame.planes[0])[:frame.samples * frame.format.bytes]))
            else:
                self.graph.push(frame)
                self._drain()
        except (av.error.FFmpegError, ValueError) as e:
            raise ClipError("audio", f"{self.path}: cannot resample {key}: {_one_line(e)}") from None
        self.seen += 1

    def _flush(self) -> None:
        data, self.raw = b"".join(self.raw), []
        if data:
            self.chunks.append(_direct_float(data, self.key[0]))
        if self.graph is not None:
            self.graph.push(None)
            self._drain()
            self.graph = None

    def finish(self) -> np.ndarray:
        self._flush()
        if not self.chunks:
            raise ClipError("audio", f"{self.path}: audio stream has no decodable samples")
        return np.concatenate(self.chunks).astype(np.float32, copy=False)


def decode_audio(path, sample_rate: int) -> np.ndarray:
    """The first audio stream of ``path`` as float32 mono at ``sample_rate`` (any layout/rate).

    Downmix: FFmpeg's matrix normalised not to clip (stereo: the mean; 5.1: centre, fronts and
    surrounds at -3 dB, no LFE), see ``_AudioCollector``. Mono audio already at ``sample_rate``
    is only converted to float (integer PCM divided by its full scale, as FFmpeg does).
    """
    container = open_media(path)
    with container:
        collector = _AudioCollector(sample_rate, path)
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
                frame_size: int = 256, jpeg_quality: int = 90, threads: int = 0) -> DecodedClip:
    """Frames of ``video`` and, when ``sample_rate`` is given, the audio of ``audio`` (or of
    ``video`` itself when ``audio`` is None), reading a shared file in one demux pass.

    Video is handled first: a clip with no video fails at stage "video" even if its audio is
    fine. After the last needed frame, video packets are skipped without decoding.
    ``threads`` is the video decoder's thread count: 0 lets FFmpeg use one per core, 1 suits
    one worker process per core. Frame selection is as in ``decode_frames``.
    """
    container = open_media(video)
    with container:
        vstream = video_stream(container, video, threads)
        astream = None
        if sample_rate is not None and audio is None:
            astream = _audio_stream(container, video)
        picker = _FramePicker(video, fps=fps, frame_size=frame_size, jpeg_quality=jpeg_quality,
                              duration=_declared_duration(container, vstream),
                              start=vstream.start_time, time_base=vstream.time_base,
                              rate=vstream.guessed_rate,
                              sar=vstream.codec_context.sample_aspect_ratio)
        collector = _AudioCollector(sample_rate, video) if astream is not None else None
        _read(container, video, vstream, picker, astream, collector)
        frames = picker.finish()
        wave = collector.finish() if collector is not None else None
    if sample_rate is not None and audio is not None:
        wave = decode_audio(audio, sample_rate)
    return DecodedClip(frames, [float(picker.target(i)) for i in range(len(frames))],
                       picker.size or (0, 0), float(picker.duration), wave)


def _read(container, path, vstream, picker, astream=None, collector=None) -> None:
    """Demux once, feeding video frames to ``picker`` until it is done and audio to ``collector``.

    Like the ffmpeg CLI, a packet that fails to decode is skipped (real datasets have a few);
    the consequences surface later: no frames, a truncated video, or no audio samples. Only a
    demuxer failure before anything was decoded is an error by itself.
    """
    streams = [s for s in (vstream, astream) if s is not None]
    video_index = vstream.index if vstream is not None else -1
    errors = {"video": None, "audio": None}
    try:
        for packet in container.demux(*streams):
            stage = "video" if packet.stream.index == video_index else "audio"
            if stage == "video" and picker.done:
                if astream is None:
                    break           # nothing left to read
                continue            # skip video packets undecoded
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                errors[stage] = errors[stage] or e
                continue
            for frame in frames:
                (picker if stage == "video" else collector).feed(frame)
    except av.error.FFmpegError as e:     # a read error ends the file early: keep what we have
        errors = {k: v or e for k, v in errors.items()}
    for stage, consumer in (("video", picker), ("audio", collector)):
        if consumer is not None and not consumer.seen and errors[stage] is not None:
            raise ClipError(stage, f"{path}: {stage} decode error: {_one_line(errors[stage])}")


def decode_frames(path, *, fps: float = 1, frame_size: int = 256, jpeg_quality: int = 90,
                  threads: int = 0) -> tuple[list[bytes], float]:
    """JPEG frames shown at t = (i + 0.5) / fps, i = 0..floor(duration * fps) - 1, and the duration.

    "Shown at t" is the last frame whose timestamp (relative to the stream start) is <= t;
    clips shorter than one frame interval give their middle frame. Frames are resized so the
    short side is ``frame_size`` (0 keeps it; non-square pixels are made square first) and
    the container's rotation is applied. The duration is the video stream's, from the headers
    (decoding to the end when they say nothing); a video that stops more than 1 s early is
    reported as truncated.
    """
    clip = decode_clip(path, fps=fps, frame_size=frame_size, jpeg_quality=jpeg_quality, threads=threads)
    return clip.frames, clip.duration
