"""Depthwise convolution ops used by the backbone's large-kernel layers (see :mod:`backbones.ops.depthwise`)."""

from .depthwise import (
    BACKEND_ENV,
    DepthwiseConv2d,
    available_backends,
    central_taps,
    depthwise_conv2d,
    register_backend,
    select_backend,
    use_backend,
)
from .policy import POLICY_ENV, current_policy, load_policy, reload_policy

__all__ = [
    "BACKEND_ENV",
    "POLICY_ENV",
    "DepthwiseConv2d",
    "available_backends",
    "central_taps",
    "depthwise_conv2d",
    "current_policy",
    "load_policy",
    "reload_policy",
    "register_backend",
    "select_backend",
    "use_backend",
]
