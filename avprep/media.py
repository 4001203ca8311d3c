"""Decoding with PyAV (SPEC §3): 1-fps JPEG frames, mono resampled audio, duration fitting.

Speed: video is decoded sequentially (seeking per frame costs a GOP each time) with FFmpeg's
frame/slice threading, only the kept frames are converted (swscale does YUV->RGB and the
resize in one pass) and decoding stops after the last needed frame. ``decode_clip`` reads
video and audio of one file in a single demux pass.

Every failure is a ``ClipError`` whose stage is "open" (missing, empty or not a media file),
"video" or "audio", with a one-line message that names the file.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from .errors import ClipError

__all__ = ["decode_frames", "decode_audio", "decode_clip", "fit_duration", "DecodedClip"]

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


def _open(path) -> av.container.InputContainer:
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ClipError("open", f"{path}: empty file (0 bytes)")
        return av.open(str(path), metadata_errors="ignore")
    except ClipError:
        raise
    except FileNotFoundError:
        raise ClipError("open", f"{path}: no such file") from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        raise ClipError("open", f"{path}: cannot open as media: {_one_line(e)}") from None


def _video_stream(container, path, threads: int = 0):
    if not container.streams.video:
        raise ClipError("video", f"{path}: no video stream")
    stream = container.streams.video[0]
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
        self._threshold = None             # (target index, last tick shown at that target)

    def _count(self, duration: float) -> int:
        return max(1, int(math.floor(duration * self.fps + 1e-6)))

    def target(self, i: int) -> Fraction:
        """Target time of frame i in seconds since the stream start."""
        if self.duration is not None and self.duration * self.fps < 1:
            return Fraction(self.duration).limit_denominator(1_000_000) / 2   # the middle frame
        return (2 * i + 1) / (2 * self.fps)

    def _last_tick(self, i: int) -> int:
        if self._threshold is None or self._threshold[0] != i:
            self._threshold = (i, math.floor(self.target(i) / self.time_base))
        return self._threshold[1]

    @property
    def done(self) -> bool:
        return self.n_targets is not None and len(self.frames) >= self.n_targets

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

    def feed(self, frame) -> None:
        ticks = self._ticks(frame)
        self.seen += 1
        # ``frame`` comes after target i: the previous frame is the one shown at target i
        while not self.done and ticks > self._last_tick(len(self.frames)):
            if self.prev is None:       # the stream starts after the target: nothing earlier
                self.prev, self.prev_jpeg = frame, None
            self._emit(self.prev)
        if frame.duration:
            step = frame.duration
        else:
            step = round(1 / (self.rate * self.time_base)) if self.rate else 0
        self.end_ticks = max(self.end_ticks, ticks + step)
        self.prev, self.prev_jpeg = frame, None

    def finish(self) -> list[bytes]:
        if self.prev is None:
            raise ClipError("video", f"{self.path}: no decodable video frames")
        if self.n_targets is None:
            self.duration = self.end_time
            self.n_targets = self._count(self.end_time)
            del self.frames[self.n_targets:]
        elif not self.done and self.end_time < self.duration - _TRUNCATION_SLACK_S:
            raise ClipError("video", f"{self.path}: video decode error: frames stop at "
                                     f"{self.end_time:.2f} s of {self.duration:.2f} s (truncated file?)")
        while not self.done:                # targets after the last frame see the last frame
            self._emit(self.prev)
        return self.frames

    def _jpeg(self, frame) -> bytes:
        w, h = _target_size(frame.width, frame.height, self.frame_size, self.sar)
        try:
            rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="BICUBIC")
            img = Image.fromarray(rgb.to_ndarray(), "RGB")
        except (av.error.FFmpegError, ValueError) as e:
            raise ClipError("video", f"{self.path}: cannot convert frame: {_one_line(e)}") from None
        transpose = _ROTATIONS.get(round(frame.rotation or 0) % 360)
        if transpose is not None:
            img = img.transpose(transpose)
        self.size = img.size
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=self.jpeg_quality)
        return buf.getvalue()


# ----------------------------------------------------------------------------- audio

# av_channel_layout_default: what FFmpeg assumes for an unordered layout of n channels
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


class _AudioCollector:
    """Downmix + resample in one swresample pass (an ``aresample`` filter), float32 mono out.

    ``rematrix_maxval=1`` normalises FFmpeg's downmix matrix so it cannot clip: stereo becomes
    the channel mean (what librosa.load does), 5.1 FFmpeg's standard mix (centre + fronts,
    surrounds -3 dB, no LFE) scaled like ``ffmpeg -ac 1`` to 16-bit WAV. av.AudioResampler
    cannot take that option, and without it a 5.1 mix peaks at 1.7x the input.
    """

    def __init__(self, sample_rate: int, path):
        self.sample_rate, self.path = sample_rate, path
        self.graph, self.key = None, None
        self.chunks: list[np.ndarray] = []
        self.seen = 0

    def _build(self, frame) -> None:
        graph = av.filter.Graph()
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
                self._build(frame)
                self.key = key
            self.graph.push(frame)
        except (av.error.FFmpegError, ValueError) as e:
            raise ClipError("audio", f"{self.path}: cannot resample {key}: {_one_line(e)}") from None
        self.seen += 1
        self._drain()

    def _flush(self) -> None:
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
    surrounds at -3 dB, no LFE), see ``_AudioCollector``.
    """
    container = _open(path)
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
    container = _open(video)
    with container:
        vstream = _video_stream(container, video, threads)
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
