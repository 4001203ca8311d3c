"""One clip → the members of one WebDataset sample (README: What is extracted, Output, ARCHITECTURE "Sample schema")."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from . import media, shardformat, spectrogram
from .config import ExtractConfig
from .datasets._base import Clip, safe_text
from .datasets._base import rel as relative_source
from .errors import ClipError

# Keys the extractor owns; a clip's meta cannot override them.
_CORE_KEYS = ("key", "label", "label_index", "split", "source", "audio_source", "duration",
              "sample_rate", "fps", "n_frames", "frame_times", "frame_size", "spec_shape",
              "spec_preset", "audio_crop_start", shardformat.SEGMENTS)


def npy_bytes(array: np.ndarray, dtype: str) -> bytes:
    """``array`` as a little-endian .npy (format 1.0, no pickle): same values → same bytes."""
    buf = io.BytesIO()
    arr = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def extract_clip(clip: Clip, label_index: int, split: str, cfg: ExtractConfig,
                 src_root: Path) -> dict[str, bytes]:
    """Decode ``clip`` and return its sample members without the key prefix, in tar order:
    ``cls``, ``json``, ``spec.npy``, ``f000.jpg``, ...

    Raises ``ClipError(stage, message)``: stages ``open``/``video``/``audio`` from decoding,
    ``spectrogram`` when the audio cannot be turned into the preset's array. Video and audio
    of one file are read in a single demux pass (``media.decode_clip``), with a single-threaded
    decoder: extraction runs one process per core, where decoder threads only add overhead.
    """
    audio_path = clip.audio or clip.video
    decoded = media.decode_clip(clip.video, clip.audio, sample_rate=cfg.spec.sample_rate, fps=cfg.fps,
                                frame_size=cfg.frame_size, jpeg_quality=cfg.jpeg_quality, threads=1,
                                resampler=cfg.spec.resampler, frame_rule=cfg.frame_rule,
                                audio_seconds=cfg.spec.num_samples / cfg.spec.sample_rate)
    frames, wave = decoded.frames, decoded.wave
    if not frames:
        raise ClipError("video", f"{clip.video}: no video frames decoded")
    if wave is None or wave.size == 0:
        raise ClipError("audio", f"{audio_path}: no audio samples decoded")
    wave = media.fit_duration(wave, cfg.spec.fit_samples)
    crop = spectrogram.crop_start(clip.key, cfg.spec) if cfg.spec.crop_from else None
    if crop is not None:
        wave = wave[crop:crop + cfg.spec.num_samples]
    try:
        spec = spectrogram.compute(wave, cfg.spec)
    except ClipError:
        raise
    except Exception as e:  # numerical failures are the clip's, not the run's
        raise ClipError("spectrogram", f"{audio_path}: {type(e).__name__}: {e}") from e
    if tuple(spec.shape) != tuple(cfg.spec.shape) or not np.isfinite(spec).all():
        raise ClipError("spectrogram", f"{audio_path}: bad spectrogram (shape {tuple(spec.shape)}, "
                                       f"expected {tuple(cfg.spec.shape)}, or non-finite values)")

    meta = {k: v for k, v in clip.meta.items() if k not in _CORE_KEYS}
    meta.update(
        key=clip.key, label=clip.label, label_index=int(label_index), split=split,
        source=safe_text(relative_source(clip.video, src_root)),
        audio_source=safe_text(relative_source(audio_path, src_root)),
        duration=round(decoded.duration, 6), sample_rate=cfg.spec.sample_rate, fps=cfg.fps,
        n_frames=len(frames), frame_times=[round(t, 6) for t in decoded.frame_times],
        frame_size=list(decoded.frame_size), spec_shape=list(cfg.spec.shape), spec_preset=cfg.spec.preset,
    )
    if crop is not None:
        meta["audio_crop_start"] = crop      # the window's first sample, at sample_rate
    if "event" in clip.meta:                 # AVE: a label per 1 s segment of the extracted clip
        meta[shardformat.SEGMENTS] = shardformat.segment_labels(
            clip.meta["event"], label_index, shardformat.count_segments(cfg.spec.duration))
    return shardformat.ordered_members(
        str(int(label_index)).encode("ascii"),
        json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                   default=_json_default).encode("ascii"),
        npy_bytes(spec, cfg.spec_dtype), frames)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"cannot store {type(value).__name__} in sample metadata")


def warm_up() -> None:
    """Pay the one-time costs of a process's first clip (the FFT's plans, the resampler's and
    the JPEG encoder's setup, ~20 ms) once: the local engine's forkserver calls this before it
    forks workers, which then start warm instead of each paying it on their first clip."""
    from .config import spec_preset
    spec = spec_preset("paper", "kinetics-sounds")
    spectrogram.compute(np.zeros(spec.num_samples, np.float32), spec)
    media.resample(np.zeros(4410, np.float32), 44100, spec.sample_rate)
    media.resample(np.zeros(4410, np.float32), 44100, 22050)
    media.video._encode_jpeg([np.zeros((16, 16), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)], 90)

