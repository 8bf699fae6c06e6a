"""uniperception: one large-kernel ConvNet (UniRepLKNet) that perceives images, audio, video, point clouds and
time series."""

__version__ = "0.1.0"

import backbones  # noqa: F401  (registers the UniRepLKNet variants with timm)

from .model import UniPerceiver  # noqa: E402

__all__ = ["UniPerceiver", "__version__"]
