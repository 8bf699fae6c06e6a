"""Depthwise convolution ops used by the backbone's large-kernel layers."""

from .depthwise import DepthwiseConv2d, available_backends, depthwise_conv2d, register_backend

__all__ = ["DepthwiseConv2d", "available_backends", "depthwise_conv2d", "register_backend"]
