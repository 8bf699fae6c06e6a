"""The audio adapter on real files written by soundfile: formats, rates, channels, the fbank recipe, bad input."""

import io

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from modalities import AudioAdapter, InvalidInputError, compute_normalization_stats, create_adapter


def tone(seconds=1.0, rate=16000, frequency=440.0, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * frequency * t)
    return np.stack([wave * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)  # (samples, ch)


@pytest.mark.parametrize("fmt, suffix, subtype, rate, channels", [
    ("WAV", "wav", "PCM_16", 16000, 1),
    ("WAV", "wav", "FLOAT", 44100, 2),
    ("FLAC", "flac", "PCM_24", 22050, 1),
    ("OGG", "ogg", "VORBIS", 48000, 2),
    ("MP3", "mp3", "MPEG_LAYER_III", 32000, 1),
])
def test_formats_rates_and_channels(tmp_path, fmt, suffix, subtype, rate, channels):
    path = tmp_path / f"tone.{suffix}"
    soundfile.write(path, tone(1.0, rate, channels=channels), rate, format=fmt, subtype=subtype)
    adapter = AudioAdapter()
    waveform, loaded_rate = adapter.load(path)
    assert loaded_rate == rate and waveform.shape[0] == channels
    assert abs(waveform.shape[1] - rate) <= rate * 0.1  # lossy codecs add a little padding
    sample = adapter.preprocess((waveform, loaded_rate))
    assert sample.shape == (1, 128, 128) and torch.isfinite(sample).all()
    # a 440 Hz tone: the loudest mel bin is the same at every sample rate
    banks = adapter.filter_banks((waveform, loaded_rate))
    assert abs(banks[10:90].mean(0).argmax().item() - 22) <= 2
    assert torch.equal(adapter.prepare(path.read_bytes()), sample)


def test_filter_banks_equal_torchaudios_own_kaldi_call(tmp_path):
    rate = 16000
    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((rate, 2)) * 0.1).astype(np.float32)
    path = tmp_path / "noise.wav"
    soundfile.write(path, stereo, rate, subtype="FLOAT")
    adapter = AudioAdapter(target_frames=128)
    ours = adapter.preprocess(adapter.load(path))

    data, sr = soundfile.read(path, dtype="float32", always_2d=True)
    mono = torch.from_numpy(data.T.copy()).mean(0, keepdim=True)
    mono = mono - mono.mean()
    expected = torchaudio.compliance.kaldi.fbank(
        mono, htk_compat=True, sample_frequency=sr, use_energy=False, window_type="hanning", num_mel_bins=128,
        dither=0.0, frame_shift=10)
    expected = torch.nn.functional.pad(expected, (0, 0, 0, 128 - expected.shape[0]))
    expected = ((expected + 6.845978) / (2 * 5.5654526)).t().unsqueeze(0)
    assert torch.allclose(ours, expected, atol=1e-5)
    # padding frames are zeros before normalisation
    assert torch.allclose(ours[0, :, -1], torch.full((128,), 6.845978 / (2 * 5.5654526)))


def test_resampling_matches_torchaudio():
    adapter = AudioAdapter()
    wave = torch.from_numpy(tone(0.5, 44100).T.copy())
    banks = adapter.filter_banks((wave, 44100))
    resampled = torchaudio.functional.resample(wave, 44100, 16000)
    assert torch.allclose(banks, adapter.filter_banks((resampled, 16000)), atol=1e-4)


def test_layouts_and_crop_pad():
    wave = torch.from_numpy(tone(2.5).T.copy())
    freq_time = AudioAdapter(target_frames=64).preprocess((wave, 16000))
    time_freq = AudioAdapter(target_frames=64, layout="time_freq").preprocess((wave, 16000))
    assert freq_time.shape == (1, 128, 64) and time_freq.shape == (1, 64, 128)
    assert torch.equal(freq_time[0].t(), time_freq[0])
    assert AudioAdapter(target_frames=1024).preprocess((wave, 16000)).shape == (1, 128, 1024)


def test_arrays_tensors_and_integer_pcm():
    adapter = AudioAdapter()
    wave = tone(1.0)[:, 0]
    from_array = adapter.prepare(wave)                       # taken at 16 kHz
    from_tuple = adapter.prepare((wave, 16000))
    from_tensor = adapter.prepare(torch.from_numpy(wave))
    from_pcm16 = adapter.prepare(((wave * 32767).astype(np.int16), 16000))
    assert torch.equal(from_array, from_tuple) and torch.equal(from_array, from_tensor)
    # 16-bit quantisation only disturbs the near-silent high bins; the tone's bins agree
    assert torch.allclose(from_pcm16[0, 18:27], from_array[0, 18:27], atol=1e-2)


def test_long_clips_split_into_windows():
    adapter = AudioAdapter(target_frames=100, window_hop=50)
    windows = adapter.windows((torch.from_numpy(tone(3.0).T.copy()), 16000))  # 298 frames
    assert len(windows) == 5 and all(w.shape == (1, 128, 100) for w in windows)
    # preprocess reads only the first window's samples (its waveform mean is theirs, hence not bit-equal)
    assert torch.allclose(windows[0], adapter.preprocess((torch.from_numpy(tone(3.0).T.copy()), 16000)), atol=1e-3)
    assert len(AudioAdapter().windows((torch.zeros(1, 8000), 16000))) == 1


def test_augmentation_masks_rolls_and_adds_noise():
    adapter = AudioAdapter(freq_mask=48, time_mask=48, time_roll=10, noise=0.1)
    sample = adapter.preprocess((torch.from_numpy(tone(1.0).T.copy()), 16000))
    torch.manual_seed(3)
    augmented = [adapter.augment(sample) for _ in range(8)]
    assert all(a.shape == sample.shape for a in augmented)
    assert any(not torch.allclose(a, sample) for a in augmented)
    quiet = AudioAdapter(freq_mask=0, time_mask=0, time_roll=0, noise=0)
    assert torch.equal(quiet.augment(sample), sample)
    batch = adapter.collate(augmented)
    assert batch.shape == (8, 1, 128, 128) and torch.equal(adapter(batch), batch)


def test_normalisation_statistics_from_a_dataset(tmp_path):
    paths = []
    for i, frequency in enumerate((220, 440, 880)):
        paths.append(tmp_path / f"{i}.wav")
        soundfile.write(paths[-1], tone(1.0, frequency=frequency), 16000)
    adapter = AudioAdapter()
    mean, std = compute_normalization_stats(adapter, paths)
    normalised = AudioAdapter(mean=mean, std=std)
    maps = torch.cat([normalised.preprocess(normalised.load(p))[0, :, :98].flatten() for p in paths])
    assert abs(maps.mean().item()) < 1e-4 and abs(maps.std().item() - 0.5) < 1e-3
    rebuilt = create_adapter("audio", **normalised.config)
    assert rebuilt.mean == mean and rebuilt.std == std


def test_truncated_and_zero_length_files(tmp_path):
    buffer = io.BytesIO()
    soundfile.write(buffer, tone(1.0), 16000, format="FLAC")
    truncated = tmp_path / "cut.flac"
    truncated.write_bytes(buffer.getvalue()[:40])
    with pytest.raises(InvalidInputError, match="cut.flac"):
        AudioAdapter().prepare(truncated)
    silent = tmp_path / "nothing.wav"
    soundfile.write(silent, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(InvalidInputError, match="nothing.wav: the clip has no samples"):
        AudioAdapter().load(silent)


@pytest.mark.parametrize("data, message", [
    (np.array([0.1, np.nan, 0.2] * 200, np.float32), "NaN"),
    (np.full(1000, np.inf, np.float32), "NaN or infinite"),
    (np.zeros((2, 2, 100), np.float32), "expected a waveform"),
    (np.zeros(0, np.float32), "no samples"),
    (np.zeros((16000, 2), np.float32), "give \\(channels, samples\\)"),
])
def test_bad_arrays(data, message):
    with pytest.raises(InvalidInputError, match=message):
        AudioAdapter().load((data, 16000))


def test_bad_sample_rate_and_configuration():
    with pytest.raises(InvalidInputError, match="sample rate must be a positive integer"):
        AudioAdapter().load((np.zeros(100, np.float32), 0))
    with pytest.raises(InvalidInputError, match="layout"):
        AudioAdapter(layout="spectrum")
    with pytest.raises(InvalidInputError, match="at least 32"):
        AudioAdapter(target_frames=16)


def test_very_short_clips_still_give_a_map():
    sample = AudioAdapter().preprocess((torch.randn(1, 100) * 0.1, 16000))  # 6 ms, less than one frame
    assert sample.shape == (1, 128, 128) and torch.isfinite(sample).all()


def test_an_hour_of_audio_costs_what_a_second_does():
    adapter = AudioAdapter()
    hour = torch.randn(1, 16000 * 3600) * 0.1
    sample = adapter.preprocess((hour, 16000))
    assert sample.shape == (1, 128, 128)
    assert torch.allclose(sample, adapter.preprocess((hour[:, :16000 * 2], 16000)))


def test_masked_cells_hold_the_normalised_zero_of_the_recipe():
    adapter = AudioAdapter(freq_mask=127, time_mask=0, time_roll=0, noise=0)
    sample = adapter.preprocess((torch.from_numpy(tone(1.0).T.copy()), 16000))
    torch.manual_seed(0)
    masked = adapter.augment(sample)
    changed = masked != sample
    assert changed.any()
    assert torch.allclose(masked[changed], torch.tensor(6.845978 / (2 * 5.5654526)))
