"""Modality adapters: raw files and arrays in, ``(B, C', H, W)`` embedding maps out.

This package owns data loading, fixed preprocessing and the learnable embeddings of each modality. It never imports
:mod:`backbones` or :mod:`uniperception`. See :mod:`modalities.base` for the adapter contract::

    from modalities import create_adapter
    images = create_adapter("image", image_size=224)
    batch = images.collate([images.prepare("cat.jpg"), images.prepare("dog.png")])   # (2, 3, 224, 224)
"""

from .audio import AudioAdapter, compute_normalization_stats
from .base import ENTRY_POINT_GROUP, ModalityAdapter, create_adapter, list_modalities, register_modality
from .errors import InvalidInputError, ModalityError
from .image import ImageAdapter
from .point_cloud import PointCloudAdapter
from .time_series import TimeSeries, TimeSeriesAdapter, denormalize
from .video import VideoAdapter

__all__ = [
    "AudioAdapter",
    "ENTRY_POINT_GROUP",
    "ImageAdapter",
    "InvalidInputError",
    "ModalityAdapter",
    "ModalityError",
    "PointCloudAdapter",
    "TimeSeries",
    "TimeSeriesAdapter",
    "VideoAdapter",
    "compute_normalization_stats",
    "create_adapter",
    "denormalize",
    "list_modalities",
    "register_modality",
]
