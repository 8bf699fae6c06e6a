"""Depthwise convolution with stride 1 and "same" padding: one op, several backends.

UniRepLKNet spends most of its time in depthwise convolutions with large odd kernels (13x13 by default, up to 17x17
in the Dilated Reparam Block). :class:`DepthwiseConv2d` is the single module the backbone uses for them. It is an
``nn.Conv2d`` subclass, so its parameters keep the official names (``weight`` of shape ``(C, 1, K, K)`` and an
optional ``bias`` of shape ``(C,)``) and official checkpoints load unchanged, while the arithmetic goes through
:func:`depthwise_conv2d`, which hands the call to a registered backend. A faster backend is added with
:func:`register_backend` without touching the model.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigurationError, InputShapeError

__all__ = ["DepthwiseConv2d", "depthwise_conv2d", "register_backend", "available_backends"]

# A backend takes (x (B, C, H, W), weight (C, 1, K, K), bias (C,) or None) and returns (B, C, H, W).
BackendFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def _torch_backend(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """PyTorch's own convolution (cuDNN on CUDA, oneDNN or the native kernel on the CPU)."""
    return F.conv2d(x, weight, bias, stride=1, padding=weight.shape[-1] // 2, groups=weight.shape[0])


_BACKENDS: Dict[str, BackendFn] = {"torch": _torch_backend}
_DEFAULT_BACKEND = "torch"


def register_backend(name: str, fn: BackendFn) -> None:
    """Make ``fn`` available as backend ``name`` for :func:`depthwise_conv2d`.

    ``fn(x, weight, bias)`` must compute exactly what ``torch.nn.functional.conv2d`` computes for a depthwise
    convolution with stride 1 and padding ``K // 2``, and support autograd.
    """
    if not callable(fn):
        raise ConfigurationError(f"depthwise backend {name!r} must be callable, got {type(fn).__name__}")
    _BACKENDS[name] = fn


def available_backends() -> list:
    """Names of the registered depthwise-convolution backends."""
    return sorted(_BACKENDS)


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """Depthwise convolution, stride 1, padding ``K // 2``.

    Args:
        x: input ``(B, C, H, W)``.
        weight: kernel ``(C, 1, K, K)`` with odd ``K``.
        bias: optional ``(C,)``.
        backend: a name from :func:`available_backends`; the default backend when ``None``.

    Returns:
        ``(B, C, H, W)``, the same spatial size as the input.
    """
    name = _DEFAULT_BACKEND if backend is None else backend
    try:
        fn = _BACKENDS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown depthwise backend {name!r}; registered backends: {', '.join(available_backends())}"
        ) from None
    return fn(x, weight, bias)


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise ``K x K`` convolution with stride 1 and "same" padding, dispatched to a pluggable backend.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Parameters: ``weight (C, 1, K, K)``, ``bias (C,)`` when ``bias=True``.

    Args:
        channels: number of channels ``C`` (input and output).
        kernel_size: odd kernel size ``K``.
        bias: whether the layer has a bias.
        backend: force one backend for this layer; ``None`` uses the default.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, backend: Optional[str] = None):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigurationError(f"depthwise kernel size must be a positive odd number, got {kernel_size}")
        super().__init__(
            channels, channels, kernel_size, stride=1, padding=kernel_size // 2, dilation=1, groups=channels, bias=bias
        )
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputShapeError(
                f"DepthwiseConv2d expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return depthwise_conv2d(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, kernel_size={self.kernel_size[0]}, bias={self.bias is not None}"
        return text if self.backend is None else f"{text}, backend={self.backend!r}"
