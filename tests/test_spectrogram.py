"""avprep.spectrogram: preset shapes and parity with independent references."""
from __future__ import annotations

import dataclasses

import librosa
import numpy as np
import pytest

from avprep import spectrogram
from avprep.config import spec_preset
from avprep.errors import ConfigError


def _noisy_tone(n: int, sr: int, f: float = 1000.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("preset,dataset,shape", [
    ("paper", "cremad", (257, 299)),
    ("paper", "kinetics-sounds", (257, 1004)),
    ("ogmge-code", "cremad", (257, 188)),
    ("fbank", "kinetics-sounds", (1024, 128)),
    ("paper-scipy", "cremad", (257, 299)),
    ("paper-scipy", "vggsound", (257, 1004)),
])
def test_preset_shapes(preset, dataset, shape):
    spec = spec_preset(preset, dataset)
    out = spectrogram.compute(_noisy_tone(spec.num_samples, spec.sample_rate), spec)
    assert out.shape == shape == spec.shape
    assert out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("preset,overrides", [
    ("paper", {"duration": 0.01}),       # fewer samples than one non-centred n_fft window
    ("fbank", {"num_frames": 0}),
])
def test_settings_that_give_an_empty_array_are_a_config_error(preset, overrides):
    with pytest.raises(ConfigError, match="too short, or a size is 0"):
        spec_preset(preset, "cremad", **overrides)


@pytest.mark.parametrize("preset,dataset,overrides", [
    ("paper", "cremad", {}),
    ("paper", "vggsound", {}),
    ("ogmge-code", "cremad", {}),                          # centred, reflect padding
    ("ogmge-code", "cremad", {"pad_mode": "constant"}),    # librosa >= 0.10's default
    ("paper", "cremad", {"win_length": 400}),              # window shorter than n_fft
])
def test_stft_matches_librosa(preset, dataset, overrides):
    spec = spec_preset(preset, dataset, **overrides)
    wave = _noisy_tone(spec.num_samples, spec.sample_rate, seed=len(overrides))
    ours = spectrogram.compute(wave, spec)
    ref = librosa.stft(wave, n_fft=spec.n_fft, hop_length=spec.hop_length, win_length=spec.win_length,
                       window="hann", center=spec.center, pad_mode=spec.pad_mode)
    ref = np.log(np.abs(ref) + 1e-7).astype(np.float32)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3


def test_stft_peak_is_the_tone_and_silence_is_the_floor():
    spec = spec_preset("paper", "cremad")
    out = spectrogram.compute(_noisy_tone(spec.num_samples, 16000, f=2000.0), spec)
    assert np.bincount(out.argmax(axis=0)).argmax() == round(2000 / (16000 / 512))
    silent = spectrogram.compute(np.zeros(spec.num_samples, np.float32), spec)
    np.testing.assert_allclose(silent, np.log(1e-7), rtol=1e-6)


def test_fbank_matches_kaldi_native_fbank():
    # kaldi-native-fbank refuses 128 bins on a 512-point FFT (an empty filter), so compare at 80
    import kaldi_native_fbank as knf

    spec = dataclasses.replace(spec_preset("fbank", "kinetics-sounds", duration=3.0), num_mel_bins=80)
    wave = _noisy_tone(spec.num_samples, 16000)
    ours = spectrogram.compute(wave, spec)
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.mel_opts.num_bins = 80
    opts.mel_opts.high_freq = 0.0
    opts.use_energy = False
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000.0, (wave - wave.mean()).tolist())
    fb.input_finished()
    ref = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
    assert ref.shape == (298, 80)
    assert np.abs(ours[:298] - ref).max() <= 1e-3
    assert (ours[298:] == 0).all()                      # zero-padded to num_frames


def test_fbank_tone_lands_in_its_mel_bin():
    spec = spec_preset("fbank", "kinetics-sounds")
    f = 1500.0
    out = spectrogram.compute(_noisy_tone(spec.num_samples, 16000, f=f), spec)
    assert out.shape == (1024, 128) and np.isfinite(out).all()
    assert (out[998:] == 0).all() and (out[:998] != 0).all()   # 998 real frames for 10 s
    mel = lambda x: 1127 * np.log(1 + x / 700)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    centres = lo + (hi - lo) / 129 * np.arange(1, 129)
    expected = int(np.abs(centres - mel(f)).argmin())
    assert abs(int(np.bincount(out[:998].argmax(axis=1)).argmax()) - expected) <= 1


def test_wrong_length_is_refused():
    spec = spec_preset("paper", "cremad")
    with pytest.raises(ValueError, match="48000"):
        spectrogram.compute(np.zeros(47999, np.float32), spec)


def test_presets_record_only_their_fields():
    stft = spec_preset("ogmge-code", "cremad").to_dict()
    assert stft["resampler"] == "soxr" and stft["hop_length"] == 353
    assert not {"num_mel_bins", "num_frames", "frame_length_ms"} & set(stft)
    fbank = spec_preset("fbank", "kinetics-sounds").to_dict()
    assert fbank["resampler"] == "ffmpeg" and not {"n_fft", "hop_length", "center"} & set(fbank)
    scipy_psd = spec_preset("paper-scipy", "cremad").to_dict()
    assert not {"center", "pad_mode", "num_mel_bins"} & set(scipy_psd)
    with pytest.raises(ConfigError, match="resampler"):
        spec_preset("paper", "cremad", resampler="sinc")


@pytest.mark.parametrize("dataset,duration", [("cremad", 3.0), ("ave", 10.0)])
def test_paper_scipy_matches_scipy_spectrogram(dataset, duration):
    """The paper-time script: scipy.signal.spectrogram(nperseg=512, noverlap=353) at 16 kHz
    (Tukey(0.25), constant detrend, PSD), log(S + 1e-7), z-score over the clip."""
    import scipy.signal

    spec = spec_preset("paper-scipy", dataset)
    assert spec.duration == duration and spec.sample_rate == 16000
    wave = _noisy_tone(spec.num_samples, 16000, f=440.0)
    wave[5000:9000] = 0.0                               # a silent stretch: the log floor
    ours = spectrogram.compute(wave, spec)
    _, _, power = scipy.signal.spectrogram(wave.astype(np.float64), 16000, nperseg=512, noverlap=353)
    log = np.log(power + 1e-7)
    ref = (log - log.mean()) / log.std()
    assert ours.shape == ref.shape == spec.shape
    assert np.abs(ours - ref).max() <= 1e-4
    _, _, power32 = scipy.signal.spectrogram(wave, 16000, nperseg=512, noverlap=353)   # as librosa.load gives
    log32 = np.log(power32 + 1e-7)
    assert np.abs(ours - (log32 - log32.mean()) / log32.std()).max() <= 1e-4


@pytest.mark.parametrize("rate,layout", [(16000, "mono"), (44100, "mono"), (44100, "stereo")])
def test_ogmge_code_matches_the_released_loader_on_wavs(tmp_path, rate, layout):
    """Released OGM-GE CREMA-D loader: librosa.load(path, sr=22050) (soxr_hq, channel mean),
    np.tile(x, 3)[:22050 * 3], clip to [-1, 1], librosa.stft(n_fft=512, hop_length=353) (librosa
    < 0.10, so reflect padding), log(|S| + 1e-7). A 2.5 s clip, so the tiling matters."""
    from avprep import media, synth

    n = int(2.5 * rate)
    tone = _noisy_tone(n, rate, f=3000.0, seed=1)
    high = 0.2 * np.sin(2 * np.pi * 9000.0 * np.arange(n) / rate).astype(np.float32)   # above 7 kHz
    wave = np.stack([tone, high + tone * 0.5]) if layout == "stereo" else tone + high
    path = synth.write_wav(tmp_path / "clip.wav", wave, rate, layout)

    spec = spec_preset("ogmge-code", "cremad")
    ours = spectrogram.compute(media.fit_duration(media.decode_audio(path, 22050, spec.resampler),
                                                  spec.num_samples), spec)
    samples, sr = librosa.load(path, sr=22050)
    assert sr == 22050
    samples = np.clip(np.tile(samples, 3)[:22050 * 3], -1.0, 1.0)
    ref = np.log(np.abs(librosa.stft(samples, n_fft=512, hop_length=353, pad_mode="reflect")) + 1e-7)
    assert ours.shape == ref.shape == (257, 188)
    assert np.abs(ours - ref).mean() <= 1e-3
    if rate != 22050:       # FFmpeg's resampler misses that target (what this option is for)
        ffmpeg = spectrogram.compute(media.fit_duration(media.decode_audio(path, 22050, "ffmpeg"),
                                                        spec.num_samples), spec)
        assert np.abs(ffmpeg - ref).mean() > 10 * np.abs(ours - ref).mean()
