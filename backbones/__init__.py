"""UniRepLKNet backbones.

Importing this package registers ``unireplknet_{a,f,p,n,t,s,b,l,xl}`` with timm, so ``timm.create_model`` builds
them::

    import backbones, timm
    model = timm.create_model("unireplknet_t", in_chans=1, num_classes=0)
"""

from .checkpoint import LoadReport, download_from_hub, load_checkpoint, read_state_dict
from .errors import BackboneError, CheckpointError, ConfigurationError, InputShapeError
from .ops import DepthwiseConv2d, depthwise_conv2d
from .runtime import keep_freed_memory, native_bfloat16, optimize_for_inference
from .unireplknet import (
    VARIANTS,
    DilatedReparamBlock,
    UniRepLKNet,
    UniRepLKNetBlock,
    default_kernel_sizes,
    weights_dir,
)

__all__ = [
    "VARIANTS",
    "BackboneError",
    "CheckpointError",
    "ConfigurationError",
    "DepthwiseConv2d",
    "DilatedReparamBlock",
    "InputShapeError",
    "LoadReport",
    "UniRepLKNet",
    "UniRepLKNetBlock",
    "default_kernel_sizes",
    "depthwise_conv2d",
    "download_from_hub",
    "keep_freed_memory",
    "load_checkpoint",
    "native_bfloat16",
    "optimize_for_inference",
    "read_state_dict",
    "weights_dir",
]
