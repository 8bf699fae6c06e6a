"""Video: MP4, AVI, MKV, WebM and animated GIF (decoded with PyAV) to frame-stack maps.

Sampling: ``num_frames`` frames ``sampling_rate`` frames apart (the released Kinetics recipe: 16 frames, every 4th),
from the centre of the clip for evaluation and from a random start for training; or ``"uniform"``: the clip cut into
``num_frames`` equal segments, the middle frame of each for evaluation and a random one for training. Clips shorter
than the span loop (``short_clip="loop"``) or repeat their last frame (``"pad"``).

Frames: the short side resized to ``image_size / crop_pct`` and centre-cropped to ``image_size`` (training: one random
resized crop and one flip decision shared by every frame of the clip), ImageNet normalisation.

Layouts of the ``(3, T, S, S)`` frame stack, with ``g = sqrt(T)`` (T must be a square for the first two):

``reshape``
    the released code's memory reshape of the contiguous ``(3, T, S, S)`` tensor to ``(3, g*S, g*S)``. Output row
    ``r`` holds ``g`` consecutive rows of one frame: pixel ``(t, y, x)`` of channel ``c`` lands at row
    ``(t*S + y) // g`` and column ``((t*S + y) % g) * S + x``.
``grid``
    a true ``g x g`` mosaic: frame ``t`` fills the tile at tile-row ``t // g``, tile-column ``t % g``, so pixel
    ``(t, y, x)`` lands at row ``(t // g) * S + y`` and column ``(t % g) * S + x``.
``channels``
    frames on the channel axis: ``(3*T, S, S)`` with pixel ``(t, y, x)`` of channel ``c`` at channel ``3*t + c``.

Raw form: a uint8 array ``(N, H, W, 3)`` of the frames that sampling needs, with their indices in the clip.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import av
import numpy as np
import torch
from torchvision.transforms import v2 as T

from .base import ModalityAdapter, register_modality
from .errors import InvalidInputError
from .image import IMAGENET_MEAN, IMAGENET_STD
from .sources import describe_source, open_file_source

__all__ = ["VideoAdapter", "frame_indices", "VideoClip"]

LAYOUTS = ("reshape", "grid", "channels")


class VideoClip:
    """Decoded frames ``(N, H, W, 3)`` uint8 with the clip length they were taken from, and a name for errors."""

    def __init__(self, frames: np.ndarray, length: int, name: str, fps: Optional[float] = None):
        self.frames, self.length, self.name, self.fps = frames, length, name, fps

    def __len__(self) -> int:
        return self.length


def frame_indices(length: int, num_frames: int, sampling_rate: int, method: str, train: bool,
                  short_clip: str = "loop", generator: Optional[torch.Generator] = None) -> List[int]:
    """Indices into a clip of ``length`` frames.

    ``method="rate"``: ``num_frames`` indices ``sampling_rate`` apart, centred (or at a random start for training).
    ``method="uniform"``: the middle (or a random) frame of each of ``num_frames`` equal segments.
    Spans longer than the clip loop over it (``short_clip="loop"``) or repeat the last frame (``"pad"``).
    """
    if length <= 0:
        raise ValueError("a clip needs at least one frame")
    if method == "uniform":
        edges = np.linspace(0, length, num_frames + 1)
        if train:
            picks = torch.rand(num_frames, generator=generator).numpy()
            indices = [int(lo + p * max(hi - lo, 1e-9)) for lo, hi, p in zip(edges[:-1], edges[1:], picks, strict=True)]
        else:
            indices = [int((lo + hi) / 2) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        return [min(i, length - 1) for i in indices]
    span = (num_frames - 1) * sampling_rate + 1
    if span <= length:
        start = int(torch.randint(0, length - span + 1, (), generator=generator)) if train else (length - span) // 2
        return [start + i * sampling_rate for i in range(num_frames)]
    raw = [i * sampling_rate for i in range(num_frames)]
    if short_clip == "loop":
        return [i % length for i in raw]
    return [min(i, length - 1) for i in raw]


@register_modality("video")
class VideoAdapter(ModalityAdapter):
    """Clips to frame-stack maps (see the module docstring for the sampling and the three layouts).

    Args:
        num_frames: frames ``T`` per clip.
        sampling_rate: distance between sampled frames for ``sampling="rate"``.
        sampling: ``"rate"`` (official) or ``"uniform"`` (segment-based).
        image_size: frame side ``S`` after cropping.
        crop_pct: eval centre-crop fraction of the resized short side.
        layout: ``"reshape"`` (official), ``"grid"`` or ``"channels"``.
        short_clip: ``"loop"`` or ``"pad"`` for clips shorter than the sampling span.
        mean, std: normalisation statistics (ImageNet by default).
        scale: random-resized-crop area range for training.
        hflip: horizontal-flip probability for training.
        max_frames: refuse clips longer than this many frames (every frame is decoded and kept, scaled down to a
            short side of ``2 * image_size``); ``None`` for no limit.
    """

    def __init__(
        self,
        num_frames: int = 16,
        sampling_rate: int = 4,
        sampling: str = "rate",
        image_size: int = 224,
        crop_pct: float = 0.875,
        layout: str = "reshape",
        short_clip: str = "loop",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        scale: Sequence[float] = (0.25, 1.0),
        hflip: float = 0.5,
        max_frames: Optional[int] = 3000,
    ):
        if layout not in LAYOUTS:
            raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout != "channels" and math.isqrt(num_frames) ** 2 != num_frames:
            raise InvalidInputError(
                f"layout {layout!r} arranges frames in a square: num_frames must be a square (4, 9, 16, ...), "
                f"got {num_frames}; use layout='channels' for other counts"
            )
        if sampling not in ("rate", "uniform"):
            raise InvalidInputError(f"sampling must be 'rate' or 'uniform', got {sampling!r}")
        if short_clip not in ("loop", "pad"):
            raise InvalidInputError(f"short_clip must be 'loop' or 'pad', got {short_clip!r}")
        if num_frames < 1 or sampling_rate < 1:
            raise InvalidInputError(f"num_frames and sampling_rate must be positive, got {num_frames}, {sampling_rate}")
        super().__init__(
            num_frames=num_frames, sampling_rate=sampling_rate, sampling=sampling, image_size=image_size,
            crop_pct=crop_pct, layout=layout, short_clip=short_clip, mean=list(mean), std=list(std),
            scale=list(scale), hflip=hflip, max_frames=max_frames,
        )
        self.num_frames, self.sampling_rate, self.sampling = num_frames, sampling_rate, sampling
        self.image_size, self.crop_pct, self.layout, self.short_clip = image_size, crop_pct, layout, short_clip
        self.scale, self.hflip, self.max_frames = tuple(scale), hflip, max_frames
        # plain CPU tensors, not buffers: preprocessing runs on CPU frames in DataLoader workers even when the
        # model (and this adapter with it) lives on a GPU
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1, 1)

    @property
    def out_channels(self) -> int:
        return 3 * self.num_frames if self.layout == "channels" else 3

    # ---------------------------------------------------------------------------------------------------------------
    # loading

    def load(self, source: Any) -> VideoClip:
        """A path, bytes or file object (MP4, AVI, MKV, WebM, GIF), or frames ``(T, H, W, 3)`` as an array or
        tensor (uint8, or float in [0, 1]) -> :class:`VideoClip` with every frame decoded."""
        name = describe_source(source)
        if isinstance(source, (np.ndarray, torch.Tensor)):
            return VideoClip(self._frames_from_array(source, name), len(source), name)
        target = open_file_source(source, "video", "frames (T, H, W, 3)")
        frames, fps = self._decode(target, name)
        return VideoClip(frames, len(frames), name, fps)

    def _decode(self, target: Any, name: str) -> Tuple[np.ndarray, Optional[float]]:
        try:
            with av.open(target) as container:
                if not container.streams.video:
                    raise InvalidInputError(f"{name}: the file has no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                frames = []
                # frames larger than needed are scaled down while decoding (short side 2 x image_size), which
                # bounds the memory a long high-resolution clip takes
                limit = 2 * self.image_size
                for frame in self._frames_until_end(container, stream):
                    short = min(frame.width, frame.height)
                    if short > limit:
                        width, height = round(frame.width * limit / short), round(frame.height * limit / short)
                        frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
                    else:
                        frames.append(frame.to_ndarray(format="rgb24"))
                    if self.max_frames is not None and len(frames) > self.max_frames:
                        raise InvalidInputError(
                            f"{name}: longer than max_frames={self.max_frames} frames; raise max_frames or cut the "
                            f"clip"
                        )
                fps = float(stream.average_rate) if stream.average_rate else None
        except InvalidInputError:
            raise
        except av.error.EOFError as exc:
            raise InvalidInputError(
                f"{name}: the file ends before any frame could be read (a clip with no frames, or a truncated one)"
            ) from exc
        except (av.error.FFmpegError, ValueError, OSError, IndexError) as exc:
            raise InvalidInputError(
                f"{name}: not a readable video ({type(exc).__name__}: {exc}); expected MP4, AVI, MKV, WebM or GIF"
            ) from exc
        if not frames:
            raise InvalidInputError(f"{name}: the clip has no frames")
        return np.stack(frames), fps

    @staticmethod
    def _frames_until_end(container, stream):
        """Decoded frames; an end-of-file raised by the demuxer ends the clip (a stream with no frames ends at
        once, and the caller then says the clip has no frames)."""
        try:
            yield from container.decode(stream)
        except av.error.EOFError:
            return

    @staticmethod
    def _frames_from_array(source: Any, name: str) -> np.ndarray:
        array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise InvalidInputError(f"{name}: expected frames (T, H, W, 3), got shape {array.shape}")
        if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
            raise InvalidInputError(f"{name}: the clip has no frames (shape {array.shape})")
        if array.dtype == np.uint8:
            return array
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise InvalidInputError(f"{name}: the frames hold NaN or infinite values")
            if array.min() < 0 or array.max() > 1:
                raise InvalidInputError(f"{name}: float frames must hold values in [0, 1]")
            return (array * 255).round().astype(np.uint8)
        raise InvalidInputError(f"{name}: unsupported frame dtype {array.dtype}; give uint8 or float in [0, 1]")

    # ---------------------------------------------------------------------------------------------------------------
    # preprocessing

    def sample(self, clip: VideoClip, train: bool = False) -> torch.Tensor:
        """The sampled frames as uint8 ``(T, 3, H, W)``."""
        indices = frame_indices(len(clip), self.num_frames, self.sampling_rate, self.sampling, train,
                                self.short_clip)
        return torch.from_numpy(clip.frames[indices]).permute(0, 3, 1, 2)

    def _spatial(self, frames: torch.Tensor, train: bool) -> torch.Tensor:
        """``(T, 3, H, W)`` uint8 -> ``(T, 3, S, S)`` float in [0, 1]; one crop (and flip) for the whole clip."""
        size = self.image_size
        if train:
            top, left, height, width = T.RandomResizedCrop.get_params(frames, scale=self.scale, ratio=(3 / 4, 4 / 3))
            frames = frames[..., top: top + height, left: left + width]
            out = T.functional.resize(frames, [size, size], antialias=True)
            if float(torch.rand(())) < self.hflip:
                out = out.flip(-1)
        else:
            out = T.functional.resize(frames, int(size / self.crop_pct), antialias=True)
            out = T.functional.center_crop(out, [size, size])
        return out.float() / 255.0

    def _layout(self, clip: torch.Tensor) -> torch.Tensor:
        """``(3, T, S, S)`` normalised -> the configured layout."""
        channels, frames, size, _ = clip.shape
        if self.layout == "channels":
            return clip.transpose(0, 1).reshape(frames * channels, size, size)
        g = math.isqrt(frames)
        if self.layout == "reshape":
            return clip.contiguous().reshape(channels, g * size, g * size)
        # grid: (3, g, g, S, S) -> (3, g*S, g*S) with tiles in raster order
        tiles = clip.reshape(channels, g, g, size, size)
        return tiles.permute(0, 1, 3, 2, 4).reshape(channels, g * size, g * size)

    def example(self, seed: int = 0) -> np.ndarray:
        """Random frames ``(T, H, W, 3)`` uint8, as many as the sampling reads, a little larger than ``image_size``."""
        frames = self.num_frames * (self.sampling_rate if self.sampling == "rate" else 1)
        side = round(self.image_size * 8 / 7)
        return np.random.default_rng(seed).integers(0, 256, (frames, side, side, 3), dtype=np.uint8)

    def preprocess(self, raw: VideoClip) -> torch.Tensor:
        """Evaluation: centred sampling, resize and centre crop, normalise, lay out."""
        return self._finish(self._spatial(self.sample(raw, train=False), train=False))

    def prepare(self, source: Any, train: bool = False) -> torch.Tensor:
        """Load, sample (randomly for training), crop (one random resized crop and flip per clip for training),
        normalise and lay out one clip."""
        clip = self.load(source)
        return self._finish(self._spatial(self.sample(clip, train=train), train=train))

    def _finish(self, frames: torch.Tensor) -> torch.Tensor:
        clip = frames.permute(1, 0, 2, 3)  # (3, T, S, S)
        clip = (clip - self.mean.to(clip.device)) / self.std.to(clip.device)
        return self._layout(clip)

    def windows(self, raw: VideoClip) -> List[torch.Tensor]:
        """A long clip as consecutive evaluation maps, one per span of ``num_frames * sampling_rate`` frames (the
        uniform sampling gives one map)."""
        span = self.num_frames * self.sampling_rate
        if self.sampling == "uniform" or len(raw) <= span:
            return [self.preprocess(raw)]
        maps = []
        for start in range(0, len(raw) - (self.num_frames - 1) * self.sampling_rate, span):
            indices = [start + i * self.sampling_rate for i in range(self.num_frames)]
            frames = torch.from_numpy(raw.frames[indices]).permute(0, 3, 1, 2)
            maps.append(self._finish(self._spatial(frames, train=False)))
        return maps
