"""What extraction asks of a clip (README: What is extracted): its frames and its audio, read
in one demux pass (``decode_clip``), or either alone (``decode_frames``, ``decode_audio``)."""
from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

from ..errors import ClipError
from . import demux
from .audio import RESAMPLE_MARGIN_S, _AudioCollector, downmix, read_pcm_wav, resample
from .demux import _audio_stream, _declared_duration, _one_line, _OpenGop, open_media, video_stream
from .video import _FramePicker


@dataclass
class DecodedClip:
    frames: list[bytes]          # JPEG bytes, in time order
    frame_times: list[float]     # the sampled times t = (i + 0.5) / fps, seconds
    frame_size: tuple[int, int]  # (width, height) of the JPEGs
    duration: float              # seconds, of the video stream
    wave: np.ndarray | None      # float32 mono at the requested rate (None when not asked)


def decode_clip(video, audio=None, *, sample_rate: int | None = None, fps: float = 1,
                frame_size: int = 256, jpeg_quality: int = 90, threads: int = 0,
                resampler: str = "soxr", frame_rule: str = "middle",
                audio_seconds: float | None = None) -> DecodedClip:
    """Frames of ``video`` and, when ``sample_rate`` is given, the audio of ``audio`` (or of
    ``video`` itself when ``audio`` is None), reading a shared file in one demux pass.

    Video is handled first: a clip with no video fails at stage "video" even if its audio is
    fine. Only what the kept frames need is decoded: a GOP that ends before the next kept
    frame is skipped undecoded (at 1 fps from 30-fps video with a keyframe every 12 frames,
    ~1/4 of the frames are decoded; a clip that is one GOP is decoded up to its last kept
    frame). Streams with open GOPs, whose pictures may refer across a keyframe, are decoded
    whole up to the last kept frame (found at the first such picture; that part is read twice).
    ``threads`` is the video decoder's thread count: 0 lets FFmpeg use one per core, 1 suits
    one worker process per core. Frame selection is as in ``decode_frames``. ``audio_seconds``
    (the spectrogram's clip length) caps the audio kept (see ``decode_audio``).
    """
    picker_args = dict(fps=fps, frame_size=frame_size, jpeg_quality=jpeg_quality, rule=frame_rule)
    picker, wave = _decode(video, sample_rate if audio is None else None, threads, picker_args,
                           resampler=resampler, audio_seconds=audio_seconds)
    if sample_rate is not None and audio is not None:
        wave = decode_audio(audio, sample_rate, resampler, seconds=audio_seconds)
    return DecodedClip(picker.frames, [float(picker.target(i)) for i in range(len(picker.frames))],
                       picker.size or (0, 0), float(picker.duration), wave)


def _decode(video, sample_rate, threads, picker_args, picker_class=None, collector_class=None,
            resampler: str = "soxr", audio_seconds: float | None = None):
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
                (collector_class or _AudioCollector)(sample_rate, video, resampler, audio_seconds)
            try:
                demux._read(container, video, vstream, picker, astream, collector, skip_gops)
            except _OpenGop:
                continue
            picker.finish()
            return picker, collector.finish() if collector is not None else None
    raise AssertionError("unreachable: the pass without skipping never raises _OpenGop")


def decode_audio(path, sample_rate: int, resampler: str = "soxr", *, seconds: float | None = None) -> np.ndarray:
    """The first audio stream of ``path`` as float32 mono at ``sample_rate`` (any layout/rate).

    Downmix: see ``downmix`` (stereo: the mean). Resampling (``resample``): ``resampler``
    "soxr" (as librosa.load) or "ffmpeg". Mono audio already at ``sample_rate`` is only
    converted to float (integer PCM divided by its full scale, as FFmpeg does). Plain PCM
    WAVs are read without FFmpeg (``read_pcm_wav``). With ``seconds``, only about the first
    ``seconds`` + ``RESAMPLE_MARGIN_S`` are decoded and returned (their first ``seconds`` are
    those of the whole file's result): memory is bounded whatever the file's length.
    """
    pcm = read_pcm_wav(path, seconds=None if seconds is None else seconds + RESAMPLE_MARGIN_S)
    if pcm is not None:
        planes, rate = pcm
        try:
            return resample(downmix(list(planes), "stereo" if len(planes) == 2 else "mono"),
                            rate, sample_rate, resampler)
        except (av.error.FFmpegError, ValueError) as e:
            raise ClipError("audio", f"{path}: cannot resample: {_one_line(e)}") from None
    container = open_media(path)
    with container:
        collector = _AudioCollector(sample_rate, path, resampler, seconds)
        demux._read(container, path, None, None, _audio_stream(container, path), collector)
        return collector.finish()


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
