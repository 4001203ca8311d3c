"""Extraction settings: spectrogram presets (README: What is extracted) and the per-run extraction config.

Both are frozen dataclasses; ``to_dict`` is what goes into dataset.json, and a resumed
extraction compares it to the stored one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class SpecConfig:
    """How audio becomes a 2-D array. ``kind`` is "stft" (log-magnitude STFT, freq × time),
    "scipy-psd" (the paper-time script: ``scipy.signal.spectrogram`` PSD with a Tukey(0.25)
    window and constant detrend, ``log(S + 1e-7)``, per-clip z-score; freq × time) or "fbank"
    (Kaldi fbank, time × mel). ``resampler``: "soxr" (librosa's default, soxr_hq) or "ffmpeg"
    (swresample), used when the source rate differs. ``crop_from`` > 0: the audio is first fitted
    to that many seconds, then one ``duration``-second window is cut from it at an offset drawn per
    clip (``spectrogram.crop_start``); 0: no crop."""

    preset: str
    kind: str
    sample_rate: int
    duration: float
    n_fft: int = 512
    win_length: int = 512
    hop_length: int = 159
    center: bool = False
    # librosa < 0.10 (what the OGM-GE code ran on) padded centred frames by reflection
    pad_mode: str = "reflect"
    resampler: str = "soxr"
    # fbank only
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    num_frames: int = 1024
    crop_from: float = 0.0

    @property
    def num_samples(self) -> int:
        """Samples of the audio the array is computed from."""
        return int(round(self.sample_rate * self.duration))

    @property
    def fit_samples(self) -> int:
        """Samples the decoded audio is tiled or cut to before any crop."""
        return int(round(self.sample_rate * self.crop_from)) if self.crop_from else self.num_samples

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the array this config yields for every clip."""
        if self.kind == "fbank":
            return (self.num_frames, self.num_mel_bins)
        if self.kind == "scipy-psd":       # scipy pads nothing: frames of n_fft every hop
            return (self.n_fft // 2 + 1, 1 + (self.num_samples - self.n_fft) // self.hop_length)
        n = self.num_samples
        if self.center:
            frames = 1 + n // self.hop_length
        else:
            frames = 1 + (n - self.n_fft) // self.hop_length
        return (self.n_fft // 2 + 1, frames)

    def to_dict(self) -> dict:
        """The fields this kind uses (what dataset.json records); ``crop_from`` only when set."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k in _FIELDS[self.kind]}
        if self.crop_from:
            d["crop_from"] = self.crop_from
        return d


_COMMON = {"preset", "kind", "sample_rate", "duration", "resampler"}
_FIELDS = {"stft": _COMMON | {"n_fft", "win_length", "hop_length", "center", "pad_mode"},
           "scipy-psd": _COMMON | {"n_fft", "win_length", "hop_length"},
           "fbank": _COMMON | {"num_mel_bins", "frame_length_ms", "frame_shift_ms", "num_frames"}}
PRESET_NAMES = ("paper", "paper-scipy", "ogmge-code", "ogmge-code-vggsound", "fbank")
RESAMPLERS = ("soxr", "ffmpeg")
FRAME_RULES = ("middle", "start")


def _dataset_duration(dataset: str) -> float:
    """The clip length of the paper's presets for ``dataset`` (its adapter says; 10 s when none)."""
    if not dataset:
        return 10.0
    from .datasets import get
    return get(dataset).default_duration


def spec_preset(name: str, dataset: str = "", **overrides) -> SpecConfig:
    """The preset ``name`` for ``dataset``, with per-field ``overrides`` (None values ignored).

    Each preset resamples as its reference pipeline did: librosa.load (soxr_hq) for the
    paper-time script and the released OGM-GE loader, FFmpeg for the fbank (AST) front-end."""
    if name == "paper":
        cfg = SpecConfig("paper", "stft", 16000, _dataset_duration(dataset), 512, 512, 159, False)
    elif name == "paper-scipy":
        # scipy.signal.spectrogram(nperseg=512, noverlap=353): hop 159, no padding
        cfg = SpecConfig("paper-scipy", "scipy-psd", 16000, _dataset_duration(dataset), 512, 512, 159)
    elif name == "ogmge-code":
        cfg = SpecConfig("ogmge-code", "stft", 22050, 3.0, 512, 512, 353, True)
    elif name == "ogmge-code-vggsound":
        # the released VGGSound loader: 16 kHz, tiled to 10 s, a random 5 s window, n_fft 256, hop 128
        cfg = SpecConfig("ogmge-code-vggsound", "stft", 16000, 5.0, 256, 256, 128, True, crop_from=10.0)
    elif name == "fbank":
        cfg = SpecConfig("fbank", "fbank", 16000, 10.0, resampler="ffmpeg")
    else:
        raise ConfigError(f"unknown spectrogram preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SpecConfig)}
    if unknown:
        raise ConfigError(f"unknown spectrogram setting(s): {', '.join(sorted(unknown))}")
    cfg = dataclasses.replace(cfg, **overrides)
    if cfg.resampler not in RESAMPLERS:
        raise ConfigError(f"unknown resampler {cfg.resampler!r}; choose one of {', '.join(RESAMPLERS)}")
    if cfg.kind == "scipy-psd" and cfg.win_length != cfg.n_fft:
        raise ConfigError("paper-scipy: the window is n_fft long (scipy's nperseg); set --n-fft only")
    if cfg.kind in ("stft", "scipy-psd") and (cfg.win_length > cfg.n_fft or cfg.hop_length <= 0):
        raise ConfigError(f"invalid STFT settings: n_fft={cfg.n_fft} win_length={cfg.win_length} hop={cfg.hop_length}")
    if cfg.sample_rate <= 0 or cfg.duration <= 0:
        raise ConfigError("sample rate and duration must be positive")
    if cfg.crop_from and cfg.crop_from < cfg.duration:
        raise ConfigError(f"crop_from ({cfg.crop_from} s) must be 0 or at least the duration ({cfg.duration} s)")
    if min(cfg.shape) < 1:       # e.g. a non-centred STFT of fewer than n_fft samples
        raise ConfigError(f"spectrogram settings give an empty array (shape {cfg.shape[0]}x{cfg.shape[1]}): "
                          f"duration {cfg.duration} s at {cfg.sample_rate} Hz is too short, or a size is 0")
    return cfg


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines the bytes of the output (so: recorded in dataset.json, beside the
    split options ``extract`` takes, its ``extra``)."""

    spec: SpecConfig
    fps: int = 1
    frame_size: int = 256          # short side in pixels; 0 keeps the original size
    jpeg_quality: int = 90
    # "middle": the frame shown at t = (i + 0.5) / fps (README: What is extracted); "start": at t = i / fps,
    # partial last interval included (the released OGM-GE CREMA-D frame script)
    frame_rule: str = "middle"
    spec_dtype: str = "float16"
    shard_size: int = 1000
    shard_max_bytes: int | None = None

    def __post_init__(self):
        if self.spec_dtype not in ("float16", "float32"):
            raise ConfigError(f"--spec-dtype must be float16 or float32, not {self.spec_dtype!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("--jpeg-quality must be in 1..100")
        if self.frame_rule not in FRAME_RULES:
            raise ConfigError(f"--frame-rule must be one of {', '.join(FRAME_RULES)}, not {self.frame_rule!r}")
        if self.fps < 1:
            raise ConfigError("--fps must be >= 1")
        if self.frame_size < 0:
            raise ConfigError("--frame-size must be >= 0")
        if self.shard_size < 1:
            raise ConfigError("--shard-size must be >= 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_dict()
        return d
