"""Extraction settings: spectrogram presets (SPEC §3) and the per-run extraction config.

Both are frozen dataclasses; ``to_dict`` is what goes into dataset.json, and a resumed
extraction compares it to the stored one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass(frozen=True)
class SpecConfig:
    """How audio becomes a 2-D array. ``kind`` is "stft" (freq × time) or "fbank" (time × mel)."""

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
    # fbank only
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    num_frames: int = 1024

    @property
    def num_samples(self) -> int:
        return int(round(self.sample_rate * self.duration))

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the array this config yields for every clip."""
        if self.kind == "fbank":
            return (self.num_frames, self.num_mel_bins)
        n = self.num_samples
        if self.center:
            frames = 1 + n // self.hop_length
        else:
            frames = 1 + (n - self.n_fft) // self.hop_length
        return (self.n_fft // 2 + 1, frames)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESET_NAMES = ("paper", "ogmge-code", "fbank")
# Datasets whose clips are 3 s in the paper (others are 10 s).
_SHORT_DATASETS = {"cremad"}


def spec_preset(name: str, dataset: str = "", **overrides) -> SpecConfig:
    """The preset ``name`` for ``dataset``, with per-field ``overrides`` (None values ignored)."""
    if name == "paper":
        duration = 3.0 if dataset in _SHORT_DATASETS else 10.0
        cfg = SpecConfig("paper", "stft", 16000, duration, 512, 512, 159, False)
    elif name == "ogmge-code":
        cfg = SpecConfig("ogmge-code", "stft", 22050, 3.0, 512, 512, 353, True)
    elif name == "fbank":
        cfg = SpecConfig("fbank", "fbank", 16000, 10.0)
    else:
        raise ConfigError(f"unknown spectrogram preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SpecConfig)}
    if unknown:
        raise ConfigError(f"unknown spectrogram setting(s): {', '.join(sorted(unknown))}")
    cfg = dataclasses.replace(cfg, **overrides)
    if cfg.kind == "stft" and (cfg.win_length > cfg.n_fft or cfg.hop_length <= 0):
        raise ConfigError(f"invalid STFT settings: n_fft={cfg.n_fft} win_length={cfg.win_length} hop={cfg.hop_length}")
    if cfg.sample_rate <= 0 or cfg.duration <= 0:
        raise ConfigError("sample rate and duration must be positive")
    if min(cfg.shape) < 1:       # e.g. a non-centred STFT of fewer than n_fft samples
        raise ConfigError(f"spectrogram settings give an empty array (shape {cfg.shape[0]}x{cfg.shape[1]}): "
                          f"duration {cfg.duration} s at {cfg.sample_rate} Hz is too short, or a size is 0")
    return cfg


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines the bytes of the output (so: recorded in dataset.json)."""

    spec: SpecConfig
    fps: int = 1
    frame_size: int = 256          # short side in pixels; 0 keeps the original size
    jpeg_quality: int = 90
    spec_dtype: str = "float16"
    shard_size: int = 1000
    shard_max_bytes: int | None = None
    extra: dict = field(default_factory=dict)  # dataset-specific options (split files, split_by, seed)

    def __post_init__(self):
        if self.spec_dtype not in ("float16", "float32"):
            raise ConfigError(f"--spec-dtype must be float16 or float32, not {self.spec_dtype!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("--jpeg-quality must be in 1..100")
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
