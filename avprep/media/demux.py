"""Opening media and the one demux pass (README: What is extracted).

``open_media`` opens a file (WAV headers are trusted, FFmpeg's probing skipped), ``video_stream``
sets up the video decoder, ``_declared_duration`` reads what the headers say. ``_read`` demuxes
a file once, handing decoded video frames to a picker (``video._FramePicker``) and audio frames
to a collector (``audio._AudioCollector``), and decides which video packets are decoded at all:
GOPs that end before the next kept frame are dropped undecoded (``_restart_test`` tells where
decoding may restart), and non-reference pictures no kept frame needs are skipped
(``_NonRefSkipper``).
"""
from __future__ import annotations

import bisect
import collections
import itertools
import re
from pathlib import Path

import av

from ..errors import ClipError


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
    _Pass(container, path, vstream, picker, astream, collector, skip_gops).run()


class _Pass:
    """The state of one ``_read``: packets read ahead, video packets held back, the last restart
    point, and the first decode error of each stream."""

    def __init__(self, container, path, vstream, picker, astream, collector, skip_gops: bool):
        self.path, self.picker, self.collector, self.astream = path, picker, collector, astream
        self.video_index = vstream.index if vstream is not None else -1
        self.errors: dict[str, BaseException | None] = {"video": None, "audio": None}
        self.held: list = []            # video packets not yet known to be needed, in decode order
        self.dropped = False
        self.restart = _restart_test(vstream) if skip_gops else None
        self.skip_gops = self.restart is not None
        self.restart_pts = None         # of the last restart point, in decode order
        self.skipper = _NonRefSkipper.make(vstream, picker) if vstream is not None else None
        self.ahead: collections.deque = collections.deque()     # demuxed, not yet looked at
        self.source = container.demux(*(s for s in (vstream, astream) if s is not None))

    def run(self) -> None:
        try:
            while (packet := self.next_packet()) is not None:
                if packet.stream.index != self.video_index:   # (a flush packet has no stream_index)
                    if not self.collector.full:
                        self.decode(packet, "audio")
                    elif self.picker is None:      # audio alone, and enough of it
                        break
                elif self.video_packet(packet):
                    break
        except av.error.FFmpegError as e:     # a read error ends the file early: keep what we have
            self.errors = {k: v or e for k, v in self.errors.items()}
        self.decode_held()
        for stage, consumer in (("video", self.picker), ("audio", self.collector)):
            error = self.errors[stage]
            if consumer is not None and not consumer.seen and error is not None:
                raise ClipError(stage, f"{self.path}: {stage} decode error: {_one_line(error)}")

    def next_packet(self):
        while len(self.ahead) <= (_LOOKAHEAD if self.skipper is not None else 0):
            packet = next(self.source, None)
            if packet is None:
                break
            self.ahead.append(packet)
        return self.ahead.popleft() if self.ahead else None

    def video_packet(self, packet) -> bool:
        """Hold, drop or decode one video packet; True when nothing is left to read."""
        picker, pts = self.picker, packet.pts
        ticks = picker.ticks_of(pts) if self.skip_gops and packet.size else None
        is_restart = ticks is not None and self.restart is not None and self.restart(packet)
        if is_restart:
            self.restart_pts = pts
        elif ticks is not None and self.restart_pts is not None and pts < self.restart_pts:
            if self.dropped:
                raise _OpenGop
            self.skip_gops, ticks = False, None
            self.decode_held(packet)
        if ticks is not None and ticks > picker.limit:
            self.decode_held(packet)     # the frame shown at the pending target is in there
        if picker.done:
            self.held.clear()
            return self.astream is None     # else skip video packets undecoded
        if ticks is not None and ticks <= picker.limit:
            if is_restart and self.held:
                self.held.clear()
                self.dropped = True
            self.held.append(packet)
            return False
        self.decode_held(packet)
        self.decode(packet, "video")
        return False

    def decode(self, packet, stage: str, later=()) -> None:
        if self.skipper is not None and stage == "video":
            self.skipper.before(packet, itertools.chain(later, self.ahead))
        try:
            frames = packet.decode()
        except av.error.FFmpegError as e:
            self.errors[stage] = self.errors[stage] or e
            return
        consumer = self.picker if stage == "video" else self.collector
        for frame in frames:
            consumer.feed(frame)

    def decode_held(self, current=None) -> None:
        held = self.held
        for i, p in enumerate(held):
            self.decode(p, "video", itertools.chain(held[i + 1:], [current] if current is not None else []))
        held.clear()
