"""Audio: WAV, FLAC, OGG/Vorbis and MP3 to log-mel spectrogram maps ``(1, F, T)`` (or ``(1, T, F)``).

The recipe of the released UniRepLKNet audio code (itself AST's): mix to mono, resample to 16 kHz, remove the
waveform mean, Kaldi-compatible filter banks (128 mel bins, 25 ms Hanning frames every 10 ms, HTK-compatible mel
scale, no dither, no energy), pad with zeros or crop to ``target_frames`` frames (128 = one second; 1024 for
ten-second AudioSet clips), normalise as ``(x - mean) / (2 * std)`` with the official Speech Commands statistics
(mean -6.845978, std 5.5654526) unless others are given, and lay the map out frequency-major, ``(1, F, T)``, as the
released code feeds the backbone.

Raw form: ``(waveform (channels, samples) float32, sample_rate)``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, List, Optional, Tuple

import numpy as np
import soundfile
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF
import torchaudio.transforms as AT

from .base import ModalityAdapter, register_modality
from .errors import InvalidInputError
from .sources import describe_source, open_file_source

__all__ = ["AudioAdapter", "compute_normalization_stats", "SPEECH_COMMANDS_MEAN", "SPEECH_COMMANDS_STD"]

SPEECH_COMMANDS_MEAN = -6.845978
SPEECH_COMMANDS_STD = 5.5654526
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0

Raw = Tuple[torch.Tensor, int]


@register_modality("audio")
class AudioAdapter(ModalityAdapter):
    """Sound to ``(1, num_mel_bins, target_frames)`` normalised log-mel maps.

    Args:
        sample_rate: rate the filter banks are computed at (16 kHz in every recipe); other rates are resampled.
        num_mel_bins: mel filters ``F``.
        target_frames: frames ``T`` after padding or cropping (10 ms each).
        mean, std: normalisation statistics; see :func:`compute_normalization_stats` for your own data.
        layout: ``"freq_time"`` for ``(1, F, T)`` (the released code) or ``"time_freq"`` for ``(1, T, F)``.
        freq_mask, time_mask: SpecAugment mask widths for training (0 disables).
        time_roll: maximum circular shift in frames for training (0 disables).
        noise: scale of the additive uniform noise for training (0 disables).
        window_hop: hop between windows in frames when a long clip is split (default: ``target_frames``).
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        num_mel_bins: int = 128,
        target_frames: int = 128,
        mean: float = SPEECH_COMMANDS_MEAN,
        std: float = SPEECH_COMMANDS_STD,
        layout: str = "freq_time",
        freq_mask: int = 48,
        time_mask: int = 48,
        time_roll: int = 10,
        noise: float = 0.1,
        window_hop: Optional[int] = None,
    ):
        if layout not in ("freq_time", "time_freq"):
            raise InvalidInputError(f"layout must be 'freq_time' or 'time_freq', got {layout!r}")
        if target_frames < 32 or num_mel_bins < 32:
            raise InvalidInputError(
                f"target_frames and num_mel_bins must be at least 32 (the backbone's smallest input), got "
                f"{target_frames} and {num_mel_bins}"
            )
        if not std > 0:
            raise InvalidInputError(f"std must be positive, got {std}")
        super().__init__(
            sample_rate=sample_rate, num_mel_bins=num_mel_bins, target_frames=target_frames, mean=float(mean),
            std=float(std), layout=layout, freq_mask=freq_mask, time_mask=time_mask, time_roll=time_roll,
            noise=noise, window_hop=window_hop,
        )
        self.sample_rate, self.num_mel_bins, self.target_frames = sample_rate, num_mel_bins, target_frames
        self.mean, self.std, self.layout = float(mean), float(std), layout
        self.time_roll, self.noise = time_roll, noise
        self.window_hop = window_hop or target_frames
        self.freq_masking = AT.FrequencyMasking(freq_mask) if freq_mask > 0 else None
        self.time_masking = AT.TimeMasking(time_mask) if time_mask > 0 else None

    @property
    def out_channels(self) -> int:
        return 1

    # ---------------------------------------------------------------------------------------------------------------
    # loading

    def load(self, source: Any) -> Raw:
        """A path, bytes or file object (WAV, FLAC, OGG/Vorbis, MP3), ``(array, sample_rate)``, or an array/tensor
        ``(samples,)`` or ``(channels, samples)`` taken to be at ``sample_rate`` -> ``(waveform, rate)``."""
        name = describe_source(source)
        if isinstance(source, tuple) and len(source) == 2:
            data, rate = source
            name = describe_source(data)
            if not isinstance(rate, (int, np.integer)) or rate <= 0:
                raise InvalidInputError(f"{name}: the sample rate must be a positive integer, got {rate!r}")
            return self._checked(self._as_tensor(data, name), int(rate), name)
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return self._checked(self._as_tensor(source, name), self.sample_rate, name)
        target = open_file_source(source, "audio", f"(array, sample_rate) or an array at {self.sample_rate} Hz")
        try:
            data, rate = soundfile.read(target, dtype="float32", always_2d=True)  # (samples, channels)
        except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"{name}: not a readable audio file ({exc}); expected WAV, FLAC, OGG/Vorbis or MP3"
            ) from exc
        return self._checked(torch.from_numpy(np.ascontiguousarray(data.T)), int(rate), name)

    @staticmethod
    def _as_tensor(data: Any, name: str) -> torch.Tensor:
        tensor = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
        if tensor.ndim == 1:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 2:
            raise InvalidInputError(
                f"{name}: expected a waveform (samples,) or (channels, samples), got shape {tuple(tensor.shape)}"
            )
        if not (tensor.is_floating_point() or tensor.dtype in (torch.int16, torch.int32)):
            raise InvalidInputError(f"{name}: unsupported waveform dtype {tensor.dtype}")
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.int16:
            return tensor.float() / 32768.0
        if tensor.dtype == torch.int32:
            return tensor.float() / 2147483648.0
        return tensor.float()

    @staticmethod
    def _checked(waveform: torch.Tensor, rate: int, name: str) -> Raw:
        if waveform.shape[0] > 64 and waveform.shape[1] <= 64:
            raise InvalidInputError(
                f"{name}: got {waveform.shape[0]} channels of {waveform.shape[1]} samples; give (channels, samples)"
            )
        if waveform.numel() == 0 or waveform.shape[1] == 0:
            raise InvalidInputError(f"{name}: the clip has no samples")
        if not torch.isfinite(waveform).all():
            raise InvalidInputError(f"{name}: the waveform holds NaN or infinite values")
        return waveform, rate

    # ---------------------------------------------------------------------------------------------------------------
    # preprocessing

    def filter_banks(self, raw: Raw) -> torch.Tensor:
        """Mono, resampled, mean-removed waveform -> Kaldi log-mel filter banks ``(frames, num_mel_bins)``."""
        waveform, rate = raw
        mono = waveform.mean(dim=0, keepdim=True)
        if rate != self.sample_rate:
            mono = AF.resample(mono, rate, self.sample_rate)
        mono = mono - mono.mean()
        frame = int(self.sample_rate * FRAME_LENGTH_MS / 1000)
        if mono.shape[1] < frame:  # shorter than one frame: pad with silence to one frame
            mono = torch.nn.functional.pad(mono, (0, frame - mono.shape[1]))
        return kaldi.fbank(
            mono, htk_compat=True, sample_frequency=self.sample_rate, use_energy=False, window_type="hanning",
            num_mel_bins=self.num_mel_bins, dither=0.0, frame_length=FRAME_LENGTH_MS, frame_shift=FRAME_SHIFT_MS,
        )

    def _to_map(self, banks: torch.Tensor) -> torch.Tensor:
        """``(frames, F)`` -> pad/crop to ``target_frames``, normalise, lay out as ``(1, F, T)`` or ``(1, T, F)``."""
        frames = banks.shape[0]
        if frames < self.target_frames:
            banks = torch.nn.functional.pad(banks, (0, 0, 0, self.target_frames - frames))
        else:
            banks = banks[: self.target_frames]
        banks = (banks - self.mean) / (2 * self.std)
        return (banks.t() if self.layout == "freq_time" else banks).unsqueeze(0).contiguous()

    def example(self, seed: int = 0) -> tuple:
        """``(wave, sample_rate)``: quiet noise lasting exactly ``target_frames`` frames (10 ms hop, 25 ms window)."""
        samples = round((self.target_frames * 0.010 + 0.015) * self.sample_rate)
        wave = 0.1 * np.random.default_rng(seed).standard_normal(samples).astype(np.float32)
        return wave, self.sample_rate

    def preprocess(self, raw: Raw) -> torch.Tensor:
        """``(waveform, rate)`` -> ``(1, F, T)`` (or ``(1, T, F)``) float32 map of the first ``target_frames``.

        Only the samples those frames need are processed, so an hour-long file costs what a short one does (the
        waveform mean is then taken over those samples); use :meth:`windows` to cover a whole long clip.
        """
        waveform, rate = raw
        needed = ((self.target_frames - 1) * FRAME_SHIFT_MS + FRAME_LENGTH_MS) / 1000  # seconds
        keep = math.ceil(needed * rate) + 64  # a little margin for the resampling filter
        if waveform.shape[1] > keep:
            waveform = waveform[:, :keep]
        return self._to_map(self.filter_banks((waveform, rate)))

    def windows(self, raw: Raw) -> List[torch.Tensor]:
        """A long clip as consecutive maps of ``target_frames`` frames every ``window_hop`` frames (the last one
        padded); one map for a clip no longer than the window. Predictions over the windows are aggregated by the
        caller (for example by averaging probabilities)."""
        banks = self.filter_banks(raw)
        count = 1 + max(0, math.ceil((banks.shape[0] - self.target_frames) / self.window_hop))
        return [self._to_map(banks[i * self.window_hop:]) for i in range(count)]

    def augment(self, sample: torch.Tensor) -> torch.Tensor:
        """SpecAugment frequency and time masks (filled with the normalised value of 0, as masking before
        normalisation does in the released recipe), a random circular time shift and additive noise."""
        freq_time = sample if self.layout == "freq_time" else sample.transpose(1, 2)
        # the released recipe masks the filter banks before normalising: a masked cell holds normalised zero
        masked = (0.0 - self.mean) / (2 * self.std)
        if self.freq_masking is not None:
            freq_time = self.freq_masking(freq_time, mask_value=masked)
        if self.time_masking is not None:
            freq_time = self.time_masking(freq_time, mask_value=masked)
        if self.time_roll > 0:
            shift = int(torch.randint(-self.time_roll, self.time_roll + 1, ()))
            freq_time = torch.roll(freq_time, shift, dims=2)
        if self.noise > 0:
            freq_time = freq_time + torch.rand_like(freq_time) * float(torch.rand(())) * self.noise
        return freq_time if self.layout == "freq_time" else freq_time.transpose(1, 2).contiguous()


def compute_normalization_stats(adapter: AudioAdapter, sources: Iterable[Any]) -> Tuple[float, float]:
    """Mean and standard deviation of the log-mel filter banks over ``sources`` (before normalisation), to pass as
    ``AudioAdapter(mean=..., std=...)``. Frames added by padding are not counted."""
    total, total_sq, count = 0.0, 0.0, 0
    for source in sources:
        banks = adapter.filter_banks(adapter.load(source))[: adapter.target_frames].double()
        total += banks.sum().item()
        total_sq += banks.square().sum().item()
        count += banks.numel()
    if count == 0:
        raise InvalidInputError("compute_normalization_stats: no sources given")
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 1e-12))
