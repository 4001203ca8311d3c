"""Frames (README: What is extracted): which decoded frame is shown at each sampled time
(``_FramePicker``), and its JPEG, resized in one swscale call and encoded straight from its
Y'CbCr 4:2:0 planes (``simplejpeg``), as the ffmpeg CLI does."""
from __future__ import annotations

import math
import threading
from fractions import Fraction

import av
import numpy as np
import simplejpeg
from av.video.reformatter import Interpolation, VideoReformatter

from ..errors import ClipError
from .demux import _one_line

# a video may end this much before its declared duration before we call it truncated
_TRUNCATION_SLACK_S = 1.0


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
