"""Depthwise convolution with stride 1 and "same" padding: one op, several backends, a measured dispatcher.

UniRepLKNet spends most of its time in depthwise convolutions with large odd kernels (13x13 by default, up to 31x31
in kernel-size studies). :class:`DepthwiseConv2d` is the single module the backbone uses for them. It is an
``nn.Conv2d`` subclass, so its parameters keep the official names (``weight`` of shape ``(C, 1, K, K)`` and an
optional ``bias`` of shape ``(C,)``) and official checkpoints load unchanged, while the arithmetic goes through
:func:`depthwise_conv2d`, which picks a backend for each call.

Backends:

==========================  =====================================================================================
``torch``                   PyTorch's convolution as called (cuDNN on CUDA, oneDNN on the CPU).
``torch_channels_last``     PyTorch's convolution on a channels-last copy of the input (oneDNN's fast layout).
``fft``                     forward and both gradients through ``torch.fft``.
``direct_fft_weight_grad``  channels-last direct forward and input gradient, FFT weight gradient.
``cpu_direct``              our direct kernels (CPU, float32 and bfloat16, compiled on first use; :mod:`.cpu_depthwise`).
``triton``                  Triton kernels (CUDA; on the CPU only under ``TRITON_INTERPRET=1``).
==========================  =====================================================================================

Which backend runs, first match wins:

1. ``backend=`` of the call or of the layer (``DepthwiseConv2d(..., backend=...)``,
   ``UniRepLKNet.set_depthwise_backend``);
2. the innermost :func:`use_backend` context;
3. the environment variable ``UNIPERCEPTION_DWCONV_BACKEND``;
4. ``"auto"``: the measured policy of :mod:`backbones.ops.policy` (the benchmark's winner at the nearest measured
   shape), else ``torch``.

Kernels wider than the input: a tap more than ``max(H, W) - 1`` pixels (times the dilation) from the centre only
ever meets padding, so :func:`central_taps` cuts such a kernel to the taps that can reach the input before any
backend runs: a 13x13 kernel on a 2x2 map becomes 3x3, on a 1x1 map a per-channel scale (computed as one). Outputs
are unchanged and the cut-off taps get the zero gradient they would get anyway; small inputs (32x32 maps end at 1x1
in the last stage) stop paying for 169-tap convolutions. Not under ``torch.compile`` tracing, where shapes may be
symbolic.

A backend that cannot run a call (Triton missing or failing to compile, a CPU tensor for Triton, ...) falls back to
``torch`` with one warning, never an error. Under ``torch.compile`` tracing and ONNX export only PyTorch's own
backends are used, so graphs stay exportable.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigurationError, InputShapeError
from .fft_depthwise import direct_forward_fft_weight_grad, fft_depthwise_conv2d
from .policy import POLICY_ENV, current_policy

__all__ = [
    "BACKEND_ENV",
    "DepthwiseConv2d",
    "central_taps",
    "available_backends",
    "clear_decisions",
    "depthwise_conv2d",
    "register_backend",
    "select_backend",
    "use_backend",
]

BACKEND_ENV = "UNIPERCEPTION_DWCONV_BACKEND"

# A backend takes (x (B, C, H, W), weight (C, 1, K, K), bias (C,) or None) and returns (B, C, H, W).
BackendFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
# ``supports(x, weight)`` returns None when the backend can run the call, else the reason it cannot.
SupportsFn = Callable[[torch.Tensor, torch.Tensor], Optional[str]]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    supports: SupportsFn
    traceable: bool = False  # safe under torch.compile tracing and ONNX export
    # None when the backend can run on this installation at all, else why not (not installed, cannot be built);
    # unlike ``supports``, which judges one call, this is said once even where the policy chose the backend
    unavailable: Optional[Callable[[], Optional[str]]] = None


def _torch_backend(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.conv2d(x, weight, bias, stride=1, padding=weight.shape[-1] // 2, groups=weight.shape[0])


def _torch_channels_last_backend(x, weight, bias):
    return _torch_backend(x.contiguous(memory_format=torch.channels_last), weight, bias)


def _any_call(x, weight) -> Optional[str]:
    return None


def _fft_supports(x, weight) -> Optional[str]:
    return None if x.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else f"dtype {x.dtype}"


def _triton_available() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


def _triton_supports(x, weight) -> Optional[str]:
    missing = _triton_available()
    if missing:
        return missing
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the Triton kernels need a CUDA tensor (got {x.device.type}; TRITON_INTERPRET=1 runs them on the CPU)"
    if weight.shape[-1] > 31:
        return f"the Triton kernels support K <= 31, got {weight.shape[-1]}"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernels support float32, float16 and bfloat16, got {x.dtype}"
    return None


def _cpu_direct_supports(x, weight) -> Optional[str]:
    if x.device.type != "cpu":
        return f"the CPU kernels need a CPU tensor (got {x.device.type})"
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype:
        return f"the CPU kernels take float32 or bfloat16 maps and weights of the same dtype (got {x.dtype})"
    return None


def _cpu_direct_unavailable() -> Optional[str]:
    from .cpu_depthwise import unavailable_reason

    return unavailable_reason()


def _cpu_direct_backend(x, weight, bias):
    from .cpu_depthwise import cpu_direct_depthwise_conv2d

    return cpu_direct_depthwise_conv2d(x, weight, bias)


def _triton_backend(x, weight, bias):
    from .triton_depthwise import triton_depthwise_conv2d

    return triton_depthwise_conv2d(x, weight, bias)


_BACKENDS: Dict[str, Backend] = {
    "torch": Backend("torch", _torch_backend, _any_call, traceable=True),
    "torch_channels_last": Backend("torch_channels_last", _torch_channels_last_backend, _any_call, traceable=True),
    "fft": Backend("fft", fft_depthwise_conv2d, _fft_supports),
    "direct_fft_weight_grad": Backend("direct_fft_weight_grad", direct_forward_fft_weight_grad, _fft_supports),
    "cpu_direct": Backend("cpu_direct", _cpu_direct_backend, _cpu_direct_supports,
                          unavailable=_cpu_direct_unavailable),
    "triton": Backend("triton", _triton_backend, _triton_supports),
}
_FORCED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("uniperception_dwconv_backend", default=None)
_WARNED: set = set()
_BROKEN: Dict[tuple, str] = {}  # (backend, device type, dtype, K) -> why it failed


def register_backend(name: str, fn: BackendFn, supports: Optional[SupportsFn] = None) -> None:
    """Make ``fn`` available as backend ``name``.

    ``fn(x, weight, bias)`` must compute exactly what ``torch.nn.functional.conv2d`` computes for a depthwise
    convolution with stride 1 and padding ``K // 2``, and support autograd. ``supports(x, weight)`` returns ``None``
    when ``fn`` can run the call and otherwise the reason it cannot.
    """
    if not callable(fn):
        raise ConfigurationError(f"depthwise backend {name!r} must be callable, got {type(fn).__name__}")
    if name == "auto":
        raise ConfigurationError("'auto' is reserved for the measured dispatch policy")
    _BACKENDS[name] = Backend(name, fn, supports or _any_call)
    clear_decisions()


def available_backends() -> list:
    """Names of the registered depthwise-convolution backends (``"auto"`` chooses among them)."""
    return sorted(_BACKENDS)


def _check_name(name: str, origin: str) -> str:
    if name != "auto" and name not in _BACKENDS:
        raise ConfigurationError(
            f"unknown depthwise backend {name!r} ({origin}); choose 'auto' or one of: {', '.join(available_backends())}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every depthwise convolution in this context with backend ``name`` (``"auto"`` for the policy).

    Inside ``torch.compile`` the choice is read when the graph is traced, and only PyTorch's own backends run there;
    a compiled model keeps the choice it was traced with."""
    token = _FORCED.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _FORCED.reset(token)


def _warn_once(key, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


_DECISIONS: Dict[tuple, str] = {}  # call signature -> backend; cleared when backends or the policy change


def clear_decisions() -> None:
    """Forget cached choices (after registering a backend or writing a new policy)."""
    _DECISIONS.clear()
    _WARNED.clear()


def _effective_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution computes in: the autocast dtype where autocast would cast (as F.conv2d does)."""
    device_type = x.device.type
    if x.dtype != torch.float64 and x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _decide(name: Optional[str], origin: str, x: torch.Tensor, weight: torch.Tensor, training: bool,
            channels_last: bool, dtype: torch.dtype) -> str:
    if name is None or name == "auto":
        batch, channels, height, width = x.shape
        name = current_policy().choose(
            x.device.type, str(dtype).replace("torch.", ""), "training" if training else "inference",
            "channels_last" if channels_last else "nchw", batch, channels, height, width, weight.shape[-1],
        )
        name, origin = (name if name in _BACKENDS else "torch"), "policy"
    else:
        _check_name(name, origin)
    if (name, x.device.type, dtype, weight.shape[-1]) in _BROKEN:
        return "torch"  # it failed before and said so once
    backend = _BACKENDS[name]
    reason = backend.supports(x, weight)
    if reason is None and backend.unavailable is not None:
        reason = backend.unavailable()
        if reason is not None:  # said once, whoever chose the backend
            _warn_once((name, reason), f"depthwise backend {name!r} is unavailable ({reason}); using 'torch'")
            return "torch"
    if reason is not None:
        if origin != "policy":  # a backend the policy picked for a neighbouring shape may not fit this call
            _warn_once((name, reason), f"depthwise backend {name!r} cannot run this call ({reason}); using 'torch'")
        return "torch"
    return name


@torch.compiler.assume_constant_result
def _forced_backend() -> Optional[str]:
    """:func:`use_backend`'s choice, read once under ``torch.compile`` (a context-variable read splits a graph)."""
    return _FORCED.get()


def select_backend(x: torch.Tensor, weight: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend :func:`depthwise_conv2d` would run for this call (after fallbacks)."""
    name, origin = backend, "argument"
    if name is None:
        name, origin = _forced_backend(), "use_backend"
    if name is None:
        name, origin = os.environ.get(BACKEND_ENV) or None, BACKEND_ENV
    if _tracing():
        # shapes may be symbolic here: no policy lookup, and only PyTorch's own (traceable) backends
        if name not in (None, "auto"):
            _check_name(name, origin)
        return name if name in _BACKENDS and _BACKENDS[name].traceable else "torch"
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    dtype = _effective_dtype(x)
    key = (name, x.device.type, dtype, training, channels_last, x.shape, weight.shape[-1],
           os.environ.get(POLICY_ENV), os.environ.get("TRITON_INTERPRET"))
    chosen = _DECISIONS.get(key)
    if chosen is None:
        chosen = _DECISIONS[key] = _decide(name, origin, x, weight, training, channels_last, dtype)
    return chosen


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if x.ndim != 4 or weight.ndim != 4:
        raise InputShapeError(
            f"depthwise conv expects x (B, C, H, W) and weight (C, 1, K, K), got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    channels, kernel = x.shape[1], weight.shape[-1]
    if tuple(weight.shape) != (channels, 1, kernel, kernel) or kernel % 2 == 0:
        raise InputShapeError(
            f"depthwise conv expects weight ({channels}, 1, K, K) with odd K for input {tuple(x.shape)}, got "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (channels,):
        raise InputShapeError(f"depthwise conv expects bias ({channels},), got {tuple(bias.shape)}")


def central_taps(weight: torch.Tensor, height: int, width: int, dilation: int = 1) -> torch.Tensor:
    """The part of a depthwise kernel ``(C, 1, K, K)`` (odd ``K``, "same" padding, stride 1) that can touch an
    ``H x W`` input: the central ``2 * h + 1`` taps per side with ``h = min(K // 2, (max(H, W) - 1) // dilation)``.
    Convolving with it (padding ``dilation * h``) gives the same output as the whole kernel, and its gradient is the
    whole kernel's gradient on those taps (the others' is zero). The weight itself (not a copy) when nothing is cut."""
    kernel = weight.shape[-1]
    half = min(kernel // 2, (max(height, width) - 1) // dilation)
    cut = kernel // 2 - half
    return weight if cut == 0 else weight[:, :, cut:kernel - cut, cut:kernel - cut]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _scaled(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 depthwise convolution: ``x * weight (+ bias)`` per channel, in the dtype F.conv2d would compute in."""
    dtype = _effective_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        out = x.to(dtype) * weight.to(dtype).view(1, -1, 1, 1)
        return out if bias is None else out + bias.to(dtype).view(1, -1, 1, 1)


def depthwise_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, backend: Optional[str] = None
) -> torch.Tensor:
    """Depthwise convolution, stride 1, padding ``K // 2``, through the chosen backend.

    Args:
        x: input ``(B, C, H, W)``.
        weight: kernel ``(C, 1, K, K)`` with odd ``K``.
        bias: optional ``(C,)``.
        backend: a name from :func:`available_backends` or ``"auto"``; see the module docstring for the order.

    Returns:
        ``(B, C, H, W)``, the same spatial size as the input.
    """
    _check_shapes(x, weight, bias)
    if not _tracing():
        weight = central_taps(weight, x.shape[-2], x.shape[-1])
        if weight.shape[-1] == 1:  # one tap left: a per-channel scale, far cheaper than a convolution
            return _scaled(x, weight, bias)
    name = select_backend(x, weight, backend)
    if name == "torch":
        return _torch_backend(x, weight, bias)
    chosen = _BACKENDS[name]
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = _effective_dtype(x)
    # what F.conv2d does under autocast: compute in the autocast dtype. The input may already be in it (the layer
    # before ran under autocast too) while the weight is float32: cast every operand, not only the input
    x, weight = _as(x, dtype), _as(weight, dtype)
    bias = None if bias is None else _as(bias, dtype)
    try:
        if not autocast:  # (entering a disabled autocast region costs a few microseconds per call)
            return chosen.fn(x, weight, bias)
        with torch.autocast(device_type, enabled=False):
            return chosen.fn(x, weight, bias)
    except Exception as exc:
        if name != "triton":
            raise
        # a Triton compilation or launch failure is not the user's problem: remember it and use PyTorch
        _BROKEN[(name, device_type, dtype, weight.shape[-1])] = f"{type(exc).__name__}: {exc}"
        _DECISIONS.clear()
        _warn_once((name, "failed"), f"Triton depthwise kernel failed ({type(exc).__name__}: {exc}); using 'torch'")
        return _torch_backend(x, weight, bias)


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise ``K x K`` convolution with stride 1 and "same" padding, dispatched to a backend.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. Parameters: ``weight (C, 1, K, K)``, ``bias (C,)`` when ``bias=True``.

    Args:
        channels: number of channels ``C`` (input and output).
        kernel_size: odd kernel size ``K``.
        bias: whether the layer has a bias.
        backend: force one backend for this layer; ``None`` follows the context, the environment and the policy.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, backend: Optional[str] = None):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigurationError(f"depthwise kernel size must be a positive odd number, got {kernel_size}")
        super().__init__(
            channels, channels, kernel_size, stride=1, padding=kernel_size // 2, dilation=1, groups=channels, bias=bias
        )
        self.backend = None if backend is None else _check_name(backend, "DepthwiseConv2d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputShapeError(
                f"DepthwiseConv2d expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return depthwise_conv2d(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, kernel_size={self.kernel_size[0]}, bias={self.bias is not None}"
        return text if self.backend is None else f"{text}, backend={self.backend!r}"
