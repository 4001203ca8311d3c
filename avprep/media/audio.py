"""Audio (README: What is extracted): decoded frames collected as views of their planes
(``_AudioCollector``), then per clip one conversion to float32, one downmix (``downmix``) and one
resampling (``resample``); plain PCM WAVs read with numpy (``read_pcm_wav``); ``fit_duration``."""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import av
import numpy as np

from ..errors import ClipError
from .demux import _one_line

# Audio kept beyond what the spectrogram uses, so the resampler's first samples never depend on
# where the input was cut (soxr HQ and swresample need well under 0.1 s of context).
RESAMPLE_MARGIN_S = 1.0
_LFE = frozenset({"LFE", "LFE2", "LFE3"})


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


def _through_graph(wave: np.ndarray, rate: int, layout, options: str) -> np.ndarray:
    """float32 ``wave`` (samples x channels, interleaved) through one ``aresample`` filter, mono
    float32 out. Packed on purpose: PyAV 18 builds planar frames of 8 or more channels with a
    bad plane count (an IndexError, or heap corruption: ``double free``)."""
    channels = wave.shape[1] if wave.ndim == 2 else 1
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, np.float32).reshape(1, -1), format="flt",
                                       layout=layout)
    frame.sample_rate, frame.pts = rate, 0
    assert frame.samples * channels == wave.size
    graph = _graph("flt", rate, layout, options)
    graph.push(frame)
    graph.push(None)
    out = []
    while True:
        try:
            out.append(graph.pull().to_ndarray().reshape(-1))
        except (av.BlockingIOError, av.EOFError):
            break
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@functools.lru_cache(maxsize=64)
def mono_weights(layout: str) -> tuple[float, ...]:
    """The weight of each channel of ``layout`` (a PyAV layout name) in its mono downmix.

    FFmpeg's matrix normalised not to clip (``ochl=mono``, ``rematrix_maxval=1``: as ``ffmpeg
    -ac 1``; 5.1: centre 1, fronts and surrounds at -3 dB, no LFE, over their sum), read once
    per layout as the mono response to an impulse on each channel. FFmpeg has no matrix for
    some layouts (custom orders such as ``FL+FR+FC+LFE+BL+BR+SL+SR+TFL``, ambisonics, an
    unordered 9, 11, 13 or 15 channels): there every channel but the LFEs weighs the same."""
    names = [c.name for c in av.AudioLayout(layout).channels]
    n = len(names)
    try:
        weights = _through_graph(np.eye(n, dtype=np.float32), 48000, layout, "ochl=mono:osf=flt:rematrix_maxval=1.0")
        if weights.size == n and np.isfinite(weights).all() and weights.any():
            return tuple(float(w) for w in weights)
    except (av.error.FFmpegError, ValueError):
        pass
    kept = [name not in _LFE for name in names]
    if not any(kept):
        kept = [True] * n
    return tuple(1.0 / sum(kept) if k else 0.0 for k in kept)


def downmix(planes, layout: str) -> np.ndarray:
    """Mono float32 of ``planes`` (one float32 array per channel, in ``layout``'s order): the channel
    itself, the mean of two (as librosa.load), and for more ``mono_weights`` summed channel by
    channel in float32 (what swresample's float rematrix computes, bit for bit), any count."""
    if len(planes) == 1:
        return planes[0]
    if len(planes) == 2:
        return (planes[0] + planes[1]) * np.float32(0.5)
    weights = mono_weights(layout)
    if len(weights) != len(planes):
        raise ValueError(f"{len(planes)} channels in a {layout} layout of {len(weights)}")
    out = np.zeros(len(planes[0]), np.float32)
    for w, plane in zip(weights, planes):
        if w:
            out += plane * np.float32(w)
    return out


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
        return _through_graph(wave, rate, "mono", f"osr={target}:osf=flt")
    raise ValueError(f"unknown resampler {resampler!r}")


class _AudioCollector:
    """Collects decoded audio as views of the frames' planes (no copy, no conversion per
    frame: the views keep the decoder's buffers alive), then per clip one join per plane, one
    conversion to float32, one downmix and one resampling. Planar frames of more than two
    channels are first made packed by FFmpeg (PyAV 18 miscounts the planes of frames with 8 or
    more: reading them crashes).

    ``seconds``, when given, is how much audio is needed (the spectrogram's clip length):
    frames stop being kept once ``seconds`` + ``RESAMPLE_MARGIN_S`` are in (``full``), so
    memory does not grow with the clip's length. A stream that changes format, rate or layout
    mid-way is handled in segments, each converted on its own."""

    def __init__(self, sample_rate: int, path, resampler: str = "soxr", seconds: float | None = None):
        self.sample_rate, self.path, self.resampler = sample_rate, path, resampler
        self.segments: list[tuple[tuple, list[list[memoryview]]]] = []
        self.key: tuple | None = None
        self.packer: av.AudioResampler | None = None
        self.seen = 0
        self.limit = None if seconds is None else seconds + RESAMPLE_MARGIN_S
        self.kept_s = 0.0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.kept_s >= self.limit

    def feed(self, frame) -> None:
        if self.full:
            return
        fmt = frame.format
        channels = len(frame.layout.channels)
        key = (fmt.packed.name if channels > 2 else fmt.name, frame.sample_rate, frame.layout.name, channels)
        if fmt.name.rstrip("p") not in _FORMATS:
            raise ClipError("audio", f"{self.path}: unsupported sample format {fmt.name}")
        if key != self.key:              # first frame, or the stream changed format mid-way
            self._flush()
            self.key = key
            self.segments.append((key, [[] for _ in range(channels if fmt.is_planar and channels <= 2 else 1)]))
            self.packer = av.AudioResampler(format=fmt.packed, layout=frame.layout, rate=frame.sample_rate) \
                if fmt.is_planar and channels > 2 else None
        self.seen += 1
        self.kept_s += frame.samples / frame.sample_rate
        if self.packer is None:
            self._keep(frame)
            return
        for packed in self.packer.resample(frame):
            self._keep(packed)

    def _keep(self, frame) -> None:
        planes = self.segments[-1][1]
        channels = len(frame.layout.channels)
        size = frame.samples * frame.format.bytes * (channels if len(planes) == 1 else 1)
        for store, plane in zip(planes, frame.planes):
            store.append(memoryview(plane)[:size])

    def _segment(self, key, planes: list[list[memoryview]]) -> np.ndarray:
        fmt, rate, layout, channels = key
        arr = [_to_float(b"".join(p), fmt) for p in planes]
        if len(arr) < channels:             # packed: interleaved channels in one plane
            arr = list(arr[0].reshape(-1, channels).T)
        try:
            return resample(downmix(arr, layout), rate, self.sample_rate, self.resampler)
        except (av.error.FFmpegError, ValueError) as e:
            raise ClipError("audio", f"{self.path}: cannot resample {key}: {_one_line(e)}") from None

    def _flush(self) -> None:
        if self.packer is not None:      # what the converter still holds
            for packed in self.packer.resample(None):
                self._keep(packed)
            self.packer = None

    def finish(self) -> np.ndarray:
        self._flush()
        waves = [self._segment(k, p) for k, p in self.segments if any(p[0])]
        if not waves or not sum(w.size for w in waves):
            raise ClipError("audio", f"{self.path}: audio stream has no decodable samples")
        return np.concatenate(waves).astype(np.float32, copy=False)


# WAVE format tags read natively: PCM integers and IEEE floats (the subformat of an
# extensible header); bits per sample -> FFmpeg's sample format name
_WAV_PCM = {(1, 8): "u8", (1, 16): "s16", (1, 32): "s32", (3, 32): "flt", (3, 64): "dbl"}


def read_pcm_wav(path, *, seconds: float | None = None) -> tuple[np.ndarray, int] | None:
    """(float32 samples of each of at most two channels, rate) of a plain PCM/float WAV, read
    with numpy, or None for anything else: other codecs, 24-bit, more channels (whose layout
    matters for the downmix), RF64, a damaged header, no samples. FFmpeg then decodes the file
    as any other, with its error messages. With ``seconds``, only the first ``seconds`` of
    samples are read (the chunk headers are walked with seeks: the file is never read whole).

    Opening a WAV through FFmpeg costs ~0.7 ms, ten times reading it: on CREMA-D that is a
    tenth of a clip's work. The samples are exactly what FFmpeg gives (integers divided by
    their full scale, u8 centred; tested against it)."""
    try:
        with open(path, "rb") as f:
            return _read_pcm_wav(f, seconds)
    except OSError:
        return None


def _read_pcm_wav(f, seconds: float | None) -> tuple[np.ndarray, int] | None:
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    fmt, pos = None, 12
    while len(chunk := f.read(8)) == 8:
        cid, size = chunk[:4], int.from_bytes(chunk[4:], "little")
        body = pos + 8
        if cid == b"fmt " and size >= 16:
            data = f.read(min(size, 64))
            tag, channels, rate = (int.from_bytes(data[a:b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
            align, bits = (int.from_bytes(data[a:b], "little") for a, b in ((12, 14), (14, 16)))
            if tag == 0xFFFE and size >= 40:         # WAVE_FORMAT_EXTENSIBLE: the subformat's tag
                tag = int.from_bytes(data[24:26], "little")
            fmt = (_WAV_PCM.get((tag, bits)), channels, rate, align)
        elif cid == b"data":
            if fmt is None or fmt[0] is None or fmt[1] not in (1, 2) or fmt[2] <= 0 \
                    or fmt[3] != fmt[1] * np.dtype(_FORMATS[fmt[0]][0]).itemsize:
                return None
            name, channels, rate, align = fmt
            assert name is not None         # checked above (mypy cannot narrow a tuple's item)
            want = -1 if size in (0, 0xFFFFFFFF) else size       # 0 / all ones: to the end of the file
            if seconds is not None:
                most = math.ceil(seconds * rate) * align
                want = most if want < 0 else min(want, most)
            data = f.read(want) if want >= 0 else f.read()
            data = data[:len(data) - len(data) % align]          # whole sample frames only
            if not data:
                return None
            samples = _to_float(data, name)
            return samples.reshape(-1, channels).T if channels > 1 else samples[None], rate
        pos = body + size + (size & 1)               # chunks are word-aligned
        f.seek(pos)
    return None


def fit_duration(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Exactly ``num_samples`` long: the whole wave tiled (``np.tile``) then cut; clipped to [-1, 1].

    An empty wave becomes silence (tiling nothing gives nothing)."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        return np.zeros(num_samples, np.float32)
    reps = -(-num_samples // wave.size)
    return np.clip(np.tile(wave, reps)[:num_samples], -1.0, 1.0).astype(np.float32, copy=False)
