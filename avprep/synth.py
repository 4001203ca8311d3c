"""Synthetic raw datasets in each real layout (README: Datasets), with real encoded media.

Every clip carries two class cues whose strength is set separately, so tests and demos can
make one modality dominant (the imbalance OGM-GE is about):

- audio: a class-specific tone (plus its octave at half amplitude) mixed with white noise at
  ``audio_snr`` dB;
- visual: a class-specific colour in the centre of the frame mixed with pixel noise at
  ``visual_snr`` dB.

``audio_cue_fraction`` < 1 leaves the audio of the other clips pure noise (no tone), so audio
decides most clips but not all: the shape of the imbalance the OGM-GE demo needs (a dominant
modality that is learnt first, and a weaker one that still matters for the rest).

Each frame also carries a noise-free time marker in its top-left corner: the left block's grey
level encodes ``floor(t)`` and the right block's the fraction of the second, so a decoded
frame tells which presentation time it was (``read_marker``). Media is written with PyAV
(libx264 + AAC in MP4/MKV, Sorenson H.263 + MP3 in FLV, PCM WAV) with bit-exact muxing and
one encoder thread, so the same seed gives byte-identical files.
"""
from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from pathlib import Path
from typing import cast

import av
import numpy as np

from .datasets import ADAPTERS
from .errors import ConfigError

__all__ = ["write_clip", "write_wav", "make_dataset", "read_marker", "tone_frequency", "class_colour",
           "check_options", "audio_cue_clips", "DATASETS", "MARKER_BLOCK"]

DATASETS = tuple(ADAPTERS)

MARKER_BLOCK = 8                 # marker block side in pixels (two blocks, top-left corner)
_SECOND_STEP = 20                # grey levels per second in the left marker block
_SECOND_BASE = 15
_AUDIO_RMS = 0.1                 # mixed waveform RMS: far from clipping
_PIXEL_SCALE = 60.0              # pixel deviation from mid-grey of a unit-power image

# (video codec, pixel format, audio codec, audio rate override) by file suffix.
_CODECS = {
    ".mp4": ("libx264", "yuv420p", "aac", None),
    ".mkv": ("libx264", "yuv420p", "aac", None),
    ".mov": ("libx264", "yuv420p", "aac", None),
    ".flv": ("flv", "yuv420p", "libmp3lame", 22050),
    ".avi": ("mjpeg", "yuvj420p", "pcm_s16le", None),
}


# ----------------------------------------------------------------------------- cues

def tone_frequency(label_index: int, num_classes: int) -> float:
    """The class tone in Hz: log-spaced over 250..3500 Hz (its octave stays below 8 kHz)."""
    if not 0 <= label_index < max(num_classes, 1):
        raise ValueError(f"label_index {label_index} out of range for {num_classes} classes")
    lo, hi = 250.0, 3500.0
    if num_classes <= 1:
        return lo
    return float(lo * (hi / lo) ** (label_index / (num_classes - 1)))


def class_colour(label_index: int, num_classes: int) -> np.ndarray:
    """The class colour as float RGB in [-1, 1] around mid-grey: hues spread over the wheel."""
    hue = label_index / max(num_classes, 1)
    rgb = colorsys.hsv_to_rgb(hue, 1.0, 1.0)
    return np.asarray(rgb, np.float64) * 2.0 - 1.0


def _mix_weights(snr_db: float) -> tuple[float, float]:
    """Amplitudes (signal, noise) of unit-power sources so that power ratio = snr_db, total power 1."""
    if snr_db == math.inf:
        return 1.0, 0.0
    if snr_db == -math.inf:
        return 0.0, 1.0
    p = 1.0 / (1.0 + 10.0 ** (-min(max(snr_db, -300.0), 300.0) / 10.0))
    return math.sqrt(p), math.sqrt(1.0 - p)


def _audio_wave(n: int, sample_rate: int, label_index: int, num_classes: int, snr_db: float,
                rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sample_rate
    f = tone_frequency(label_index, num_classes)
    phase = rng.uniform(0, 2 * np.pi, 2)
    tone = np.sin(2 * np.pi * f * t + phase[0]) + 0.5 * np.sin(2 * np.pi * 2 * f * t + phase[1])
    tone /= math.sqrt(0.5 + 0.125)                        # unit power
    noise = rng.standard_normal(n)
    ws, wn = _mix_weights(snr_db)
    return (_AUDIO_RMS * (ws * tone + wn * noise)).astype(np.float32)


def _cue_image(w: int, h: int, colour: np.ndarray, snr_db: float) -> tuple[np.ndarray, float]:
    """The noise-free part of every frame (class colour in the centre half) and the noise scale."""
    signal = np.zeros((h, w, 3), np.float32)
    # unit power inside the cue region
    signal[h // 4:h - h // 4, w // 4:w - w // 4] = colour / max(np.sqrt(np.mean(colour ** 2)), 1e-9)
    ws, wn = _mix_weights(snr_db)
    return 128.0 + _PIXEL_SCALE * ws * signal, _PIXEL_SCALE * wn


def _frame_image(i: int, fps: float, cue: np.ndarray, noise_scale: float,
                 rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 frame i: the cue image plus fresh noise, and the time marker."""
    img = cue + noise_scale * rng.standard_normal(cue.shape, dtype=np.float32)
    t = i / fps
    sec = int(math.floor(t + 1e-9))
    b = MARKER_BLOCK
    img[:b, :b] = _SECOND_BASE + _SECOND_STEP * (sec % 12)
    img[:b, b:2 * b] = round(250 * max(t - sec, 0.0))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def read_marker(rgb: np.ndarray, scale: float = 1.0) -> tuple[int, float]:
    """(floor(t) modulo 12, fraction of the second) from a decoded frame's time marker.

    ``scale`` is the decoded frame's size relative to the encoded one (e.g. 0.5 after resizing
    a 160x120 clip to a short side of 60). Only the inner half of each block is read, so
    compression and resampling at the block edges do not matter."""
    rgb = np.asarray(rgb, np.float64)
    block = MARKER_BLOCK * scale
    lo, hi = int(block * 0.25), max(int(block * 0.75), 1)
    left = rgb[lo:hi, lo:hi].mean()
    right = rgb[lo:hi, int(block) + lo:int(block) + hi].mean()
    return int(round((left - _SECOND_BASE) / _SECOND_STEP)), right / 250.0


# ----------------------------------------------------------------------------- encoding

def _encode_audio(container, stream, wave: np.ndarray, sample_rate: int, layout: str) -> None:
    """Encode ``wave`` (channels, n) into ``stream`` of ``container``, then flush the encoder."""
    for frame in _audio_frames(wave, stream, sample_rate, layout):
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _audio_frames(wave: np.ndarray, stream, sample_rate: int, layout: str):
    """Chunks of ``wave`` (channels, n) as frames of the encoder's frame size."""
    cc = stream.codec_context
    size = cc.frame_size or 1024
    planar = cc.format.is_planar
    fmt = cc.format.name
    for start in range(0, wave.shape[1], size):
        chunk = wave[:, start:start + size]
        if fmt.startswith("s16"):
            chunk = np.clip(np.rint(chunk * 32767), -32768, 32767).astype(np.int16)
        else:
            chunk = chunk.astype(np.float32)
        arr = chunk if planar else chunk.T.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=fmt, layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = start
        yield frame


def _open_output(path: Path):
    container = av.open(str(path), "w")
    container.flags |= cast(int, av.container.Flags.bitexact.value)    # an int (PyAV's stubs say Flags)
    return container


def _add_video_stream(container, codec: str, pix_fmt: str, fps: int, size: tuple[int, int], rotation):
    w, h = size
    if codec == "libx264" and (w % 2 or h % 2):
        pix_fmt = "yuv444p"                          # 4:2:0 needs even sizes
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
    stream.codec_context.flags |= av.codec.context.Flags.bitexact.value
    if codec == "libx264":
        stream.options = {"preset": "ultrafast", "crf": "18", "threads": "1"}
    elif codec == "flv":
        stream.codec_context.bit_rate = 800_000
        stream.codec_context.thread_count = 1
    else:
        stream.codec_context.thread_count = 1
    if rotation:
        stream.set_display_rotation(rotation)
    return stream


def _add_audio_stream(container, codec: str, sample_rate: int, layout: str):
    stream = container.add_stream(codec, rate=sample_rate, layout=layout)
    stream.codec_context.flags |= av.codec.context.Flags.bitexact.value
    if codec == "libmp3lame":
        stream.codec_context.format = "fltp"
        stream.options = {"compression_level": "9"}     # fastest LAME mode: noise needs no finesse
    elif codec == "aac":
        stream.options = {"aac_coder": "fast"}
    return stream


def write_wav(path, wave: np.ndarray, sample_rate: int, layout: str = "mono") -> Path:
    """Write ``wave`` ((n,) or (channels, n) floats in [-1, 1]) as 16-bit PCM WAV; returns ``path``."""
    path = Path(path)
    wave = np.atleast_2d(np.asarray(wave, np.float32))
    container = _open_output(path)
    try:
        stream = _add_audio_stream(container, "pcm_s16le", sample_rate, layout)
        _encode_audio(container, stream, wave, sample_rate, layout)
    finally:
        container.close()
    return path


_LAYOUT_CHANNELS = {"mono": 1, "stereo": 2, "5.1": 6}


def write_clip(path, *, duration: float, label_index: int, num_classes: int,
               audio_snr: float = 20.0, visual_snr: float = 20.0, fps: int = 10,
               size: tuple[int, int] = (160, 120), sample_rate: int = 16000, seed: int = 0,
               audio: bool = True, audio_layout: str = "mono", audio_path=None,
               rotation: int | None = None, video_codec: str | None = None) -> Path:
    """Write one real encoded clip with class cues; returns ``path``.

    The container and codecs follow the suffix: ``.mp4``/``.mkv``/``.mov`` H.264 + AAC,
    ``.flv`` Sorenson H.263 + MP3 (at 22.05 kHz, as FLV only signals 5.5/11/22/44 kHz),
    ``.avi`` MJPEG + PCM; ``video_codec`` overrides the video codec. ``audio=False`` writes no
    audio stream. ``audio_path`` also writes the waveform as 16-bit PCM WAV at ``sample_rate``
    (CREMA-D's AudioWAV; the clip's own track has the same samples unless FLV changed the
    rate). ``audio_layout`` ("mono", "stereo", "5.1") repeats the waveform on every channel.
    ``rotation`` stores a display matrix (degrees CCW). Odd sizes are encoded as H.264 4:4:4.
    Frame ``i`` has pts ``i/fps``; the video has ``max(1, round(duration*fps))`` frames and the
    audio ``round(duration*rate)`` samples.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CODECS:
        raise ValueError(f"{path}: unsupported suffix {suffix!r}; use one of {', '.join(_CODECS)}")
    vcodec, pix_fmt, acodec, arate = _CODECS[suffix]
    vcodec = video_codec or vcodec
    path.parent.mkdir(parents=True, exist_ok=True)

    def audio_at(rate: int) -> np.ndarray:     # same tone phases at any rate
        return _audio_wave(int(round(duration * rate)), rate, label_index, num_classes, audio_snr,
                           np.random.default_rng([seed, label_index, 1]))

    wave = audio_at(sample_rate)
    if audio_path is not None:
        audio_path = Path(audio_path)
        audio_path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(audio_path, wave, sample_rate)

    cue, noise_scale = _cue_image(size[0], size[1], class_colour(label_index, num_classes), visual_snr)
    rng = np.random.default_rng([seed, label_index, 2])
    container = _open_output(path)
    try:
        vstream = _add_video_stream(container, vcodec, pix_fmt, fps, size, rotation)
        astream = None
        rate = arate or sample_rate
        if audio:
            astream = _add_audio_stream(container, acodec, rate, audio_layout)
        for i in range(max(1, int(round(duration * fps)))):
            img = _frame_image(i, fps, cue, noise_scale, rng)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode(None))
        if astream is not None:
            stream_wave = wave if rate == sample_rate else audio_at(rate)
            chans = np.repeat(stream_wave[None], _LAYOUT_CHANNELS.get(audio_layout, 1), axis=0)
            _encode_audio(container, astream, chans, rate, audio_layout)
    finally:
        container.close()
    return path


# ----------------------------------------------------------------------------- datasets

def check_options(name: str, clips: int, num_classes: int | None = None,
                  audio_cue_fraction: float = 1.0) -> int:
    """Raise ConfigError for options ``make_dataset`` cannot honour; returns the class count used."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if clips < 1:
        raise ConfigError("clips must be >= 1")
    if not 0.0 <= audio_cue_fraction <= 1.0:
        raise ConfigError(f"audio cue fraction must be in [0, 1], not {audio_cue_fraction}")
    layout = ADAPTERS[name].synth
    k = num_classes or layout.default_classes
    if not 1 <= k <= layout.max_classes:
        raise ConfigError(f"{name}: number of classes must be in 1..{layout.max_classes}, not {k}")
    if layout.max_clips_per_class is not None and clips > layout.max_clips_per_class * k:
        raise ConfigError(f"{name}: at most {layout.max_clips_per_class * k} distinct clip names "
                          f"for {k} classes, not {clips}")
    return min(k, clips)     # every class gets a clip, so derived class lists match ours


def audio_cue_clips(clips: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Which clips (by plan order) carry the audio tone: exactly ``round(fraction * clips)`` of
    them, drawn by ``seed`` independently of labels and names (bool array)."""
    chosen = np.zeros(clips, bool)
    order = np.random.default_rng([seed, 0xA0D10]).permutation(clips)
    chosen[order[:int(round(fraction * clips))]] = True
    return chosen


def make_dataset(name: str, out, clips: int, *, seed: int = 0, audio_snr: float = 20.0,
                 visual_snr: float = 20.0, audio_cue_fraction: float = 1.0, num_classes: int | None = None,
                 duration: float | None = None, fps: int = 10, size: tuple[int, int] = (96, 72),
                 missing: int = 0, split_folders: bool = False,
                 on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a raw dataset ``name`` (README: Datasets layout) of ``clips`` clips under ``out``; returns ``out``.

    Labels are balanced over the first ``num_classes`` classes of the dataset's class list
    (default: all of CREMA-D / KS / AVE, 10 VGGSound labels, 5 folder classes); the cue of a
    clip is that of its label's index in the class order the adapter derives (so cue and
    label agree). Durations are as in the real data (CREMA-D 2-4 s, others 10 s) unless
    ``duration`` is given. ``audio_cue_fraction``: the share of clips whose audio carries the
    tone (``audio_cue_clips``); the others' audio is noise only. ``missing`` adds VGGSound CSV rows without a video;
    ``split_folders`` makes the folder layout ``<split>/<class>/<file>``. Small frames
    (96x72) at 10 fps by default: 200 CREMA-D clips take seconds, not minutes.
    ``on_progress(done, total)`` is called after each clip. Same arguments, same bytes.
    """
    k = check_options(name, clips, num_classes, audio_cue_fraction)
    out = Path(out)
    rng = np.random.default_rng(seed)
    # the layout (paths, text files, classes) is the dataset module's; the media is ours
    classes, plans = ADAPTERS[name].synth.plan(out, clips, k, rng, duration, missing=missing,
                                               split_folders=split_folders)
    tone = audio_cue_clips(len(plans), audio_cue_fraction, seed)
    for n, plan in enumerate(plans):
        write_clip(plan.video, duration=plan.duration, label_index=plan.label_index,
                   num_classes=len(classes), audio_snr=audio_snr if tone[n] else -math.inf,
                   visual_snr=visual_snr,
                   fps=fps, size=size, seed=seed * 1_000_003 + n, audio_path=plan.audio_path)
        if on_progress is not None:
            on_progress(n + 1, len(plans))
    return out
