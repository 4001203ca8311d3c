"""Audio -> 2-D array for each spectrogram preset (README: What is extracted).

STFT presets (``kind == "stft"``): numpy's real FFT over frames with a periodic Hann window
of ``win_length`` (zero-padded to ``n_fft`` in the middle, as librosa does), ``center``
padding with ``pad_mode``, magnitude, then ``log(|S| + 1e-7)``; shape (n_fft // 2 + 1,
frames). The FFT runs in float64 and the log in float32, so it agrees with ``librosa.stft``
to float32 rounding. No torch: extraction workers never import it.

paper-scipy (``kind == "scipy-psd"``): what the paper-time script computed with
``scipy.signal.spectrogram(x, fs, nperseg=n_fft, noverlap=n_fft - hop)``: frames of ``n_fft``
every ``hop`` (no padding), each with its mean removed (detrend "constant"), a periodic
Tukey(0.25) window, one-sided power spectral density (|X|^2 / (fs * sum(w^2)), doubled except
at DC and Nyquist); then ``log(S + 1e-7)`` and a z-score over the whole clip (mean 0, std 1,
population std). Computed in float64.

fbank preset (``kind == "fbank"``): the AST / GeWu-lab front-end, i.e. what
``torchaudio.compliance.kaldi.fbank(w - w.mean(), htk_compat=True, use_energy=False,
window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)`` computes, ported to
numpy (torchaudio cannot be installed here, and kaldi-native-fbank refuses 128 mel bins on a
512-point FFT because some low filters hold no FFT bin; the tests check this port against
kaldi-native-fbank at 80 bins, where it accepts): 25 ms frames every 10 ms, snip_edges,
pre-emphasis 0.97, DC removal per frame, Hann ("hanning", symmetric) window, FFT size rounded to
a power of two, power spectrum, 128 HTK-mel triangles over 20 Hz .. Nyquist without area
normalisation, log with a float32-epsilon floor. The waveform stays in [-1, 1] (as torchaudio
loads it; Kaldi's own tools use the int16 scale, which would only add the constant
2*ln(32768) to every value) and has its mean removed first. Frames are zero-padded or cut to
``num_frames`` (AST pads 998 -> 1024 for 10 s); shape (num_frames, num_mel_bins). No
normalisation by dataset statistics: that belongs to the loader.

Cropping presets (``crop_from`` > 0, ``ogmge-code-vggsound``): the released VGGSound loader tiles
the audio to 10 s and cuts a 5 s window at ``random.randint(0, 5 * sr)`` each time a sample is
read. Shards hold one array per clip, so ``crop_start`` draws that offset once per clip, uniform
over the same 0..(crop_from - duration) * sr (inclusive), from a generator seeded by the clip's
key: reruns, engines and worker counts give the same window. The per-read re-draw (an augmentation
of train and, in the reference, also of test) is not reproduced.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

from .config import SpecConfig

__all__ = ["compute", "crop_start", "mel_banks", "LOG_EPS"]

LOG_EPS = 1e-7


def compute(wave: np.ndarray, spec: SpecConfig) -> np.ndarray:
    """The float32 array of ``spec.shape`` for ``wave`` (mono, already ``spec.num_samples`` long)."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size != spec.num_samples:
        raise ValueError(f"expected {spec.num_samples} samples ({spec.duration} s at "
                         f"{spec.sample_rate} Hz), got {wave.size}; call media.fit_duration first")
    if spec.kind == "stft":
        out = _stft(wave, spec)
    elif spec.kind == "scipy-psd":
        out = _scipy_psd(wave, spec)
    elif spec.kind == "fbank":
        out = _fbank(wave, spec)
    else:
        raise ValueError(f"unknown spectrogram kind {spec.kind!r}")
    assert out.shape == spec.shape, (out.shape, spec.shape)
    return out


def crop_start(key: str, spec: SpecConfig) -> int:
    """The first sample of a cropping preset's window for clip ``key`` (0 without a crop)."""
    last = spec.fit_samples - spec.num_samples
    if last <= 0:
        return 0
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return int(np.random.default_rng(seed).integers(0, last, endpoint=True))


def _stft(wave: np.ndarray, spec: SpecConfig) -> np.ndarray:
    x = wave.astype(np.float64)
    if spec.center:
        # numpy's stubs take only literal mode names; SpecConfig keeps dataset.json's string
        x = np.pad(x, spec.n_fft // 2, mode=spec.pad_mode)  # type: ignore[call-overload]
    frames = np.lib.stride_tricks.sliding_window_view(x, spec.n_fft)[::spec.hop_length]
    spectrum = np.fft.rfft(frames * _window(spec.win_length, spec.n_fft), axis=1).T
    # the log in float32: |S| already holds float32's precision, and it is ~5x faster
    return np.log(np.abs(spectrum).astype(np.float32) + np.float32(LOG_EPS))


@functools.lru_cache(maxsize=8)
def _window(win_length: int, n_fft: int) -> np.ndarray:
    """Periodic Hann window of ``win_length``, zero-padded in the middle of ``n_fft`` (cached,
    read-only: a clip's STFT is short enough that building it showed in profiles)."""
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)
    left = (n_fft - win_length) // 2
    window = np.pad(hann, (left, n_fft - win_length - left))
    window.flags.writeable = False
    return window


def tukey(n: int, alpha: float = 0.25) -> np.ndarray:
    """Periodic Tukey window of ``n`` points: a cosine taper over ``alpha / 2`` of each end
    (the symmetric window of n + 1 points without its last one, as for FFT frames)."""
    m = n                       # the symmetric window has m + 1 points, 0..m
    k = np.arange(n, dtype=np.float64)
    edge = alpha * m / 2
    w = np.ones(n)
    rise = k < edge
    w[rise] = 0.5 * (1 - np.cos(np.pi * k[rise] / edge))
    fall = k > m - edge
    w[fall] = 0.5 * (1 - np.cos(np.pi * (m - k[fall]) / edge))
    return w


@functools.lru_cache(maxsize=8)
def _tukey_cached(n: int) -> np.ndarray:
    window = tukey(n, 0.25)
    window.flags.writeable = False
    return window


def _scipy_psd(wave: np.ndarray, spec: SpecConfig) -> np.ndarray:
    x = wave.astype(np.float64)
    frames = np.lib.stride_tricks.sliding_window_view(x, spec.n_fft)[::spec.hop_length]
    frames = frames - frames.mean(axis=1, keepdims=True)
    window = _tukey_cached(spec.n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2 / (spec.sample_rate * (window ** 2).sum())
    power[:, 1:(-1 if spec.n_fft % 2 == 0 else None)] *= 2      # one-sided: the negative half
    log = np.log(power.T + LOG_EPS)
    std = log.std()
    return ((log - log.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def _mel(f):
    return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_banks(num_bins: int, n_fft: int, sample_rate: int, low_freq: float = 20.0,
              high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters, (num_bins, n_fft // 2 + 1), unnormalised, HTK mel scale.

    Like torchaudio (and unlike Kaldi, which refuses), a filter too narrow to contain an FFT
    bin stays all zero: its log energy is the floor. 128 bins on a 512-point FFT at 16 kHz
    leave a few of the lowest filters empty; AST-style features have them too.
    """
    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    lo, hi = _mel(low_freq), _mel(high)
    delta = (hi - lo) / (num_bins + 1)
    left = lo + delta * np.arange(num_bins)[:, None]
    centre, right = left + delta, left + 2 * delta
    fft_mel = _mel(sample_rate / n_fft * np.arange(n_fft // 2))[None, :]
    up = (fft_mel - left) / (centre - left)
    down = (right - fft_mel) / (right - centre)
    banks = np.maximum(0.0, np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1)))        # the Nyquist bin gets no weight


def _fbank(wave: np.ndarray, spec: SpecConfig) -> np.ndarray:
    sr = spec.sample_rate
    length = int(round(sr * spec.frame_length_ms / 1000))
    shift = int(round(sr * spec.frame_shift_ms / 1000))
    n_fft = 1 << (length - 1).bit_length()            # round_to_power_of_two
    x = wave.astype(np.float64)
    x = x - x.mean()
    feats = np.zeros(spec.shape, np.float32)
    n = 1 + (x.size - length) // shift if x.size >= length else 0   # snip_edges
    n = min(n, spec.num_frames)                        # frames past num_frames are cut anyway
    if n == 0:
        return feats
    frames = np.lib.stride_tricks.sliding_window_view(x, length)[::shift][:n]
    frames = frames - frames.mean(axis=1, keepdims=True)             # remove_dc_offset
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)   # replicate-padded
    frames = frames - 0.97 * previous                                   # pre-emphasis
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))   # "hanning"
    power = np.abs(np.fft.rfft(frames * window, n=n_fft, axis=1)) ** 2
    energies = power @ mel_banks(spec.num_mel_bins, n_fft, sr).T
    feats[:n] = np.log(np.maximum(energies, np.finfo(np.float32).eps))
    return feats
