"""UniRepLKNet (Ding et al., CVPR 2024): a universal large-kernel ConvNet.

The architecture, parameter names and initialisation follow the published models exactly, so the released
checkpoints load strictly:

* stem (stride 4): ``conv3x3 s2 -> LayerNorm -> GELU -> conv3x3 s2 -> LayerNorm`` (``downsample_layers.0``);
* a stride-2 ``conv3x3 -> LayerNorm`` before each of stages 2..4 (``downsample_layers.1..3``);
* four stages of :class:`UniRepLKNetBlock`;
* head: global mean -> LayerNorm -> Linear (``norm``, ``head``).

Every block has a *train form* (Dilated Reparam Block, BatchNorms, GRN bias, layer scale) and a *deploy form* (one
depthwise conv with bias, one Linear with bias) that computes the same function in eval mode.
:meth:`UniRepLKNet.reparameterize` converts in place; ``UniRepLKNet(..., deploy=True)`` builds the deploy form
directly.

Shapes use ``(B, C, H, W)``; the pointwise part of each block runs channels-last ``(B, H, W, C)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath, trunc_normal_
from timm.layers import LayerNorm2d as _TimmLayerNorm2d
from timm.models._features import feature_take_indices
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import register_model

from .errors import CheckpointError, ConfigurationError, InputShapeError

_logger = logging.getLogger(__name__)
from .ops import DepthwiseConv2d, central_taps, depthwise_conv2d, prepacked, select_backend
from .ops.cpu_depthwise import channel_scale_, cpu_direct_depthwise_conv2d, grn_scale, layer_norm_channels_last
from .ops.cpu_depthwise import NARROW_MAX_OUTPUTS, narrow_conv3x3_s2, narrow_linear, narrow_linear_available
from .ops.cpu_depthwise import se_scale, spatial_square_sum
from .ops.cpu_depthwise import unavailable_reason as cpu_kernels_unavailable
from .ops.depthwise import _effective_dtype, _tracing
from .ops.policy import cpu_isa
from .ops.prepacked import PrepackedConv2d
from .runtime import fast_ops_enabled, native_bfloat16

__all__ = [
    "UniRepLKNet",
    "UniRepLKNetBlock",
    "DilatedReparamBlock",
    "DownsampleLayer",
    "GRNwithNHWC",
    "LayerNorm2d",
    "SEBlock",
    "VARIANTS",
    "default_kernel_sizes",
    "dilated_branches",
    "weights_dir",
]

# ----------------------------------------------------------------------------------------------------------------------
# Variants and kernel plans (paper Table / official code)

#: name -> (depths, dims)
VARIANTS: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    "a": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "f": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "p": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "n": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "t": ((3, 3, 18, 3), (80, 160, 320, 640)),
    "s": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "b": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "l": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xl": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}

#: Kernel size K of the Dilated Reparam Block -> (branch kernel sizes k, dilations r).
_DILATED_BRANCHES: Dict[int, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}

#: Kernel sizes a block accepts: plain depthwise conv for 3 and 5, Dilated Reparam Block for 7..17.
SUPPORTED_KERNEL_SIZES = (3, 5, 7, 9, 11, 13, 15, 17)

# The network's total stride. Smaller inputs would reach the last stages as maps made mostly of padding; the
# supported range starts where the last stage sees one real pixel.
MIN_INPUT_SIZE = 32


def dilated_branches(kernel_size: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Branch kernel sizes and dilations of the Dilated Reparam Block for a large kernel ``kernel_size``."""
    try:
        return _DILATED_BRANCHES[kernel_size]
    except KeyError:
        raise ConfigurationError(
            f"the Dilated Reparam Block is defined for kernel sizes {sorted(_DILATED_BRANCHES)}, got {kernel_size}"
        ) from None


def default_kernel_sizes(depths: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    """The official kernel plan for one of the official depth tuples.

    Stage 1 is all 3 and stages 2 and 4 all 13; stage 3 is all 13 for A/F/P (2,2,6,2) and N (2,2,8,2), alternates
    13,3 for T (3,3,18,3) and repeats 13,3,3 for S/B/L/XL (3,3,27,3). Other depth tuples need an explicit plan.
    """
    depths = tuple(int(d) for d in depths)
    plans = {
        (2, 2, 6, 2): (13,) * 6,
        (2, 2, 8, 2): (13,) * 8,
        (3, 3, 18, 3): (13, 3) * 9,
        (3, 3, 27, 3): (13, 3, 3) * 9,
    }
    if depths not in plans:
        raise ConfigurationError(
            f"no default kernel plan for depths {depths} (official depths: {', '.join(map(str, plans))}); pass "
            f"kernel_sizes with one size per stage, e.g. (3, 13, 13, 13), or one tuple of sizes per stage"
        )
    d1, d2, _, d4 = depths
    return ((3,) * d1, (13,) * d2, plans[depths], (13,) * d4)


def _resolve_kernel_sizes(depths: Sequence[int], kernel_sizes) -> Tuple[Tuple[int, ...], ...]:
    """Accept ``None`` (official plan), one int per stage, or one tuple of ints per stage."""
    if kernel_sizes is None:
        return default_kernel_sizes(depths)
    if isinstance(kernel_sizes, (str, bytes)) or not isinstance(kernel_sizes, Sequence):
        raise ConfigurationError(
            f"kernel_sizes must be a sequence with one entry per stage, e.g. (3, 13, 13, 11); got {kernel_sizes!r}"
        )
    if len(kernel_sizes) != len(depths):
        raise ConfigurationError(f"kernel_sizes needs one entry per stage ({len(depths)}), got {kernel_sizes!r}")
    plan = []
    for stage, (depth, ks) in enumerate(zip(depths, kernel_sizes)):
        entries = (ks,) * depth if not isinstance(ks, Sequence) else tuple(ks)
        if not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in entries):
            raise ConfigurationError(f"stage {stage + 1}: kernel sizes must be integers, got {ks!r}")
        entries = tuple(int(k) for k in entries)
        if len(entries) != depth:
            raise ConfigurationError(
                f"stage {stage + 1} has {depth} blocks but kernel_sizes gives {len(entries)}: {entries}"
            )
        bad = sorted({k for k in entries if k not in SUPPORTED_KERNEL_SIZES})
        if bad:
            raise ConfigurationError(
                f"stage {stage + 1}: unsupported kernel sizes {bad}; supported: {SUPPORTED_KERNEL_SIZES}"
            )
        plan.append(entries)
    return tuple(plan)


# ----------------------------------------------------------------------------------------------------------------------
# Re-parameterisation arithmetic


def fuse_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d):
    """Fold an eval-mode BatchNorm that follows a conv into the conv: returns ``(weight', bias')``.

    ``W' = W * g / s`` and ``b' = beta + (b - mean) * g / s`` with ``s = sqrt(var + eps)``.
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv_bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias + (conv_bias - bn.running_mean) * scale


def dilated_to_dense(kernel: torch.Tensor, dilation: int) -> torch.Tensor:
    """Turn a depthwise kernel ``(C, 1, k, k)`` applied at ``dilation`` into the equivalent dense kernel.

    The result is ``(C, 1, (k-1)*dilation+1, (k-1)*dilation+1)`` with ``dilation-1`` zeros between taps; a transposed
    convolution with a 1x1 unit kernel at stride ``dilation`` inserts them.
    """
    if dilation == 1:
        return kernel
    unit = torch.ones(1, 1, 1, 1, dtype=kernel.dtype, device=kernel.device)
    return F.conv_transpose2d(kernel, unit, stride=dilation)


def pad_kernel_to(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a square kernel ``(..., k, k)`` centred to ``(..., size, size)``."""
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4) if pad else kernel


@torch.no_grad()
def _depthwise_with(weight: torch.Tensor, bias: torch.Tensor, backend: Optional[str]) -> DepthwiseConv2d:
    """A depthwise conv with bias holding the given (fused) ``weight (C, 1, K, K)`` and ``bias (C,)``."""
    conv = DepthwiseConv2d(weight.shape[0], weight.shape[-1], bias=True, backend=backend)
    conv.to(device=weight.device, dtype=weight.dtype)
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)
    return conv


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks


def _may_overwrite() -> bool:
    """True when an ``inplace`` layer may write its result over its input: no autograd graph, no tracing, and not
    inside :func:`backbones.runtime.reference_ops`."""
    return not torch.is_grad_enabled() and fast_ops_enabled() and not _tracing()


# oneDNN's Linear with a fused GELU epilogue (the op torch.compile's CPU backend uses); absent from builds without it
_MKLDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _fused_dtypes() -> Tuple[torch.dtype, ...]:
    """The dtypes the fused FFN runs in: float32, and bfloat16 where oneDNN computes it natively (AVX-512 BF16 or
    AMX; elsewhere oneDNN would emulate it slowly and the module path is used)."""
    if not _MKLDNN_LINEAR:
        return ()
    return (torch.float32, torch.bfloat16) if native_bfloat16() else (torch.float32,)


_FUSED_DTYPES = _fused_dtypes()


# The deploy form folds GRN's factor into Linear2's weights (one batched matmul) in these dtypes, on maps of at least
# _GRN_FOLD_RATIO pixels per channel; elsewhere GRN scales the map in place before one oneDNN Linear2 call
_GRN_FOLD_DTYPES = (torch.bfloat16,)
_GRN_FOLD_RATIO = 4


# map dtypes of the one-call GRN and SE factors of our CPU kernels (float32 arithmetic either way)
_ONE_CALL_DTYPES = (torch.float32, torch.bfloat16)


class GELU(nn.GELU):
    """``nn.GELU`` with ``inplace`` like ``nn.ReLU``'s, applied only when no autograd graph is being recorded.

    The blocks use ``inplace=True`` on their own ``Linear1`` output: at inference a fresh buffer of the expanded
    ``4C`` map is saved (on the CPU a fresh large buffer can cost more than the arithmetic).
    """

    def __init__(self, approximate: str = "none", inplace: bool = False):
        super().__init__(approximate=approximate)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "inplace", False) and _may_overwrite():
            return torch.ops.aten.gelu_(x, approximate=self.approximate)
        return super().forward(x)


# GRN's sum of squares runs over batch chunks of about this many elements, so its temporary stays small
_SQUARE_SUM_CHUNK = 4 << 20


def _spatial_l2_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||_2`` over (H, W) of ``(B, H, W, C)``, as ``(B, 1, 1, C)`` in at least float32.

    ``torch.linalg.vector_norm`` (used inside :func:`backbones.runtime.reference_ops`) reduces over the two outer dims
    of a channels-last map slowly: measured on 2 cores at batch 16, 5.4 ms against 0.3 ms for a sum of squares at
    7x7x2560 and 15.4 against 6.2 ms at 56x56x320. The sum of squares runs over chunks of the batch so its temporary
    stays near 16 MB (one 64 MB temporary cost 29 ms, page faults included); traced graphs get it unchunked, for the
    compiler to fuse. Float32 CPU maps go through our CPU kernels where they are built: one pass over the map with no
    temporary (about 2x the square-and-sum ops at T's 4C maps).
    """
    accumulate = torch.promote_types(x.dtype, torch.float32)
    if not fast_ops_enabled():
        return torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True, dtype=accumulate)

    def square_sum(part: torch.Tensor) -> torch.Tensor:
        if part.dtype == torch.bfloat16:
            # bfloat16 has float32's exponent range, so its squares cannot overflow, and PyTorch's CPU sum of
            # bfloat16 accumulates in float32 (only the result is rounded): no float32 copy of the map is made
            # (``sum(dtype=float32)`` would make one)
            return part.square().sum(dim=(1, 2), keepdim=True).to(accumulate)
        return part.to(accumulate).square().sum(dim=(1, 2), keepdim=True)

    if _tracing():
        squares = square_sum(x)
    elif x.dtype == torch.float32 and x.device.type == "cpu" and cpu_kernels_unavailable() is None:
        squares = spatial_square_sum(x)  # one pass, no temporary (our CPU kernels)
    else:
        per_chunk = max(1, _SQUARE_SUM_CHUNK // max(1, x.shape[1] * x.shape[2] * x.shape[3]))
        parts = [square_sum(part) for part in x.split(per_chunk)]
        squares = parts[0] if len(parts) == 1 else torch.cat(parts)
    # sqrt has an infinite slope at 0 (an all-zero channel): give it the zero gradient vector_norm gives there
    nonzero = squares > 0
    return torch.where(nonzero, torch.where(nonzero, squares, torch.ones_like(squares)).sqrt(), 0.0)


_CHANNEL_SCALE_KERNEL = True
# Our per-pixel map kernels (the channel factors' multiply, the LayerNorm) hold 16 floats a vector: one register with
# AVX-512, where they were measured faster than PyTorch's ops. Elsewhere (AVX2, 2 cores, AMD EPYC, batch 16) the
# LayerNorm ran 2-4x slower than PyTorch's (56x56x80: 7.3 against 2.4 ms, with GELU 13.9 against 5.0) and the
# multiply at PyTorch's speed, so there PyTorch's ops run.
_MAP_KERNELS = cpu_isa() == "AVX512"


def _scale_channels(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``rows.mul_(scale)`` in place for a ``(B, H, W, C)`` map (a permuted view of a channels-last ``(B, C, H, W)``
    one, say) and a per-sample channel factor of ``B * C`` values (GRN's ``(B, 1, 1, C)``, SE's ``(B, C, 1, 1)``),
    rounded to the map's dtype: one call of our CPU kernels where the map is a contiguous float32 or bfloat16 CPU
    tensor, PyTorch's multiply otherwise (the same products). Measured on 2 cores (Intel Xeon, AVX-512), batch 16, in
    alternation: a bfloat16 56x56x320 map 1.9 against 2.6 ms for PyTorch's multiply, float32 the same; end to end in
    bfloat16 T 1.04x and A 1.02x, in float32 within 1%."""
    if (_CHANNEL_SCALE_KERNEL and _MAP_KERNELS and rows.dtype in _ONE_CALL_DTYPES and rows.device.type == "cpu"
            and rows.dim() == 4 and rows.is_contiguous() and scale.numel() == rows.shape[0] * rows.shape[-1]
            and not _tracing() and cpu_kernels_unavailable() is None):
        return channel_scale_(rows, scale)
    return rows.mul_(scale.reshape(rows.shape[0], 1, 1, rows.shape[-1]).to(rows.dtype))


# Linear2 runs as one call of our CPU kernels (narrow_linear) for this many outputs; oneDNN's Linear elsewhere.
# Measured on 2 cores (AMD EPYC, AVX-512), float32, 16 x 56 x 56 rows, residual added, in alternation with oneDNN's
# call: 160 -> 40 (UniRepLKNet-A's first stage) 3.9 against 5.9 ms, 192 -> 48 (F's) 4.7 against 5.8; but 128 -> 32
# 3.2 against 2.6 and 64 -> 16 1.5 against 0.6 (oneDNN fills whole vectors there, the kernel always three).
_NARROW_OUTPUTS = range(33, NARROW_MAX_OUTPUTS + 1)
_NARROW_LINEAR = None  # whether our kernels have narrow_linear here (asked once, when first needed)
# narrow_linear takes GRN's per-sample factor into per-sample copies of its packed weight (30 KiB each for A) instead
# of GRN scaling the expanded map in place: one read and write of that map fewer. Measured on 2 cores (AMD EPYC,
# AVX-512), UniRepLKNet-A at batch 16, float32, in alternation with the in-place scale: 0.998-1.045x end to end in
# four runs of 12-14 rounds, median 1.013x.
_NARROW_FOLDS_GRN = True


def _narrow_kernels() -> bool:
    """Whether our CPU kernels are built here with :func:`narrow_linear` and :func:`narrow_conv3x3_s2` (AVX-512)."""
    global _NARROW_LINEAR
    if _NARROW_LINEAR is None:
        _NARROW_LINEAR = narrow_linear_available()
    return _NARROW_LINEAR


@contextlib.contextmanager
def _without_narrow_kernels():
    """Inside this block the narrow layers run oneDNN's ops, as where the kernels are not built (the lever check of
    ``benchmarks/levers.py``); the previous state comes back after it."""
    global _NARROW_LINEAR
    previous, _NARROW_LINEAR = _narrow_kernels(), False
    try:
        yield
    finally:
        _NARROW_LINEAR = previous


def _no_graph(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether no autograd graph would be recorded for an op on ``tensors``."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _narrow_linear_applies(linear: nn.Linear, x: torch.Tensor) -> bool:
    """Whether ``linear`` on the contiguous float32 CPU map ``x`` runs as :func:`narrow_linear` (inference only)."""
    return (linear.out_features in _NARROW_OUTPUTS and x.dtype == torch.float32 and linear.weight.dtype == x.dtype
            and x.device.type == "cpu" and x.is_contiguous() and not _tracing()
            and (linear.bias is None or linear.bias.dtype == x.dtype)
            and _no_graph(x, linear.weight, linear.bias) and _narrow_kernels())


class GRNwithNHWC(nn.Module):
    """Global Response Normalisation (ConvNeXt V2) on channels-last input ``(B, H, W, C)``.

    ``G = ||x||_2 over (H, W)``, ``N = G / (mean_C G + 1e-6)``, ``out = (gamma * N + 1) * x + beta``.
    ``gamma`` and ``beta`` have shape ``(1, 1, 1, C)`` and start at zero. The deploy form has no ``beta`` (it is
    folded into the following Linear). The norm is accumulated in at least float32 so fp16/bf16 inputs do not overflow.
    ``inplace=True`` (as the blocks use it) writes the result over the input when no autograd graph is recorded.
    """

    def __init__(self, dim: int, use_bias: bool = True, inplace: bool = False):
        super().__init__()
        self.use_bias = use_bias
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """``gamma * N + 1``, the per-sample, per-channel factor ``(B, 1, 1, C)`` that :meth:`forward` applies.

        At inference on a float32 or bfloat16 CPU map it is one call of our CPU kernels (``grn_scale``, float32
        arithmetic, in the dtype PyTorch's promotion gives) where they are built: the dozen small ops it replaces
        cost about 0.1 ms per block at batch 1, in dispatch more than arithmetic."""
        if (x.dtype in _ONE_CALL_DTYPES and self.gamma.dtype in _ONE_CALL_DTYPES and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.gamma.requires_grad))
                and fast_ops_enabled() and not _tracing() and cpu_kernels_unavailable() is None):
            return grn_scale(x, self.gamma)
        g = _spatial_l2_norm(x)
        n = (g / (g.mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.gamma * n + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale(x)
        inplace = getattr(self, "inplace", False)  # modules pickled before the attribute existed
        if inplace and _may_overwrite() and torch.promote_types(x.dtype, scale.dtype) == x.dtype:
            out = _scale_channels(x, scale)
            return out.add_(self.beta) if self.use_bias else out
        out = scale * x
        return out + self.beta if self.use_bias else out


# LayerNorm alone runs through our CPU kernels on maps of up to this many channels; with the GELU after it, on any.
# Measured on 2 cores (AMD EPYC, AVX-512), batch 16, against PyTorch's layer_norm, in alternation: 2.3x at 20
# channels (112x112), 1.2-1.6x from 40 to 160 channels, 1.0x at 320 (14x14), 0.92x at 320 (7x7) and 0.77x at 640
# (7x7); LayerNorm and GELU together against PyTorch's two ops 1.3-2.1x at every width from 20 to 640.
_NORM_KERNEL_MAX_CHANNELS = 256


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook (of these modules, or a global one) would see the modules' calls."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class LayerNorm2d(_TimmLayerNorm2d):
    """LayerNorm over the channels of ``(B, C, H, W)``: timm's ``LayerNorm2d`` (the same parameters and state-dict
    keys), which at inference on a channels-last float32 or bfloat16 CPU map runs as one call of our CPU kernels
    (:func:`backbones.ops.cpu_depthwise.layer_norm_channels_last`, float32 arithmetic) where that measured faster
    than PyTorch's ``layer_norm``: up to :data:`_NORM_KERNEL_MAX_CHANNELS` channels, or with the GELU after it
    (:meth:`forward_gelu`, which :class:`DownsampleLayer` calls for the stem's LayerNorm and GELU). PyTorch's own op
    runs inside :func:`backbones.runtime.reference_ops`, under autocast, when tracing, when a gradient is recorded,
    and on CPUs without AVX-512 (where the kernel measured slower)."""

    def one_call(self, x: torch.Tensor, gelu: bool = False) -> bool:
        """Whether ``x`` is normalised (and passed through GELU, with ``gelu``) by one call of our CPU kernels."""
        weight, bias = self.weight, self.bias
        return (_MAP_KERNELS and x.device.type == "cpu" and x.dim() == 4 and x.dtype in _ONE_CALL_DTYPES
                and weight is not None
                and bias is not None and weight.dtype == x.dtype and bias.dtype == x.dtype
                and (gelu or x.shape[1] <= _NORM_KERNEL_MAX_CHANNELS)
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))
                and x.is_contiguous(memory_format=torch.channels_last) and not torch.is_autocast_enabled("cpu")
                and fast_ops_enabled() and not _tracing() and cpu_kernels_unavailable() is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_call(x):
            return layer_norm_channels_last(x, self.weight, self.bias, self.eps)
        return super().forward(x)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu(self(x))`` with the exact GELU, in one call of our CPU kernels where :meth:`one_call` allows."""
        if self.one_call(x, gelu=True):
            return layer_norm_channels_last(x, self.weight, self.bias, self.eps, gelu=True)
        return F.gelu(super().forward(x))


def _narrow_conv_applies(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` runs as :func:`narrow_conv3x3_s2`: a 3x3, stride-2, padding-1 convolution of
    :data:`_NARROW_OUTPUTS` outputs on a channels-last float32 CPU map, at inference with the fast ops on and no hook
    on ``conv``. Measured on 2 cores (AMD EPYC, AVX-512), UniRepLKNet-A's second stem convolution (20 -> 40
    channels, 112x112, batch 16) took 4.3-4.6 against 5.3-5.6 ms for oneDNN's, and with the LayerNorm after it in
    the same pass 4.7-5.0 against 6.1-6.4 ms for oneDNN's convolution and our LayerNorm kernel."""
    if not (isinstance(conv, nn.Conv2d) and conv.out_channels in _NARROW_OUTPUTS and conv.kernel_size == (3, 3)
            and conv.stride == (2, 2) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and type(conv).forward in (nn.Conv2d.forward, PrepackedConv2d.forward)):
        return False
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and min(x.shape[2:]) > 0
            and conv.weight.dtype == x.dtype
            and (conv.bias is None or conv.bias.dtype == x.dtype) and x.is_contiguous(memory_format=torch.channels_last)
            and _no_graph(x, conv.weight, conv.bias) and not torch.is_autocast_enabled("cpu") and fast_ops_enabled()
            and not _tracing() and not _hooked(conv)):
        return False
    return _narrow_kernels()


class DownsampleLayer(nn.Sequential):
    """The stem (``conv3x3 s2 -> LayerNorm -> GELU -> conv3x3 s2 -> LayerNorm``) or a downsampling layer
    (``conv3x3 s2 -> LayerNorm``): an ``nn.Sequential`` (the same indices and state-dict keys) that runs a
    :class:`LayerNorm2d` followed by the exact ``nn.GELU`` as one call (:meth:`LayerNorm2d.forward_gelu`) when
    neither has a hook, and a convolution of few outputs (UniRepLKNet-A's and -F's second stem convolution) with the
    LayerNorm after it as one call of our CPU kernels (:func:`_narrow_conv_applies`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            module = modules[i]
            after = modules[i + 1] if i + 1 < len(modules) else None
            if (type(module) is LayerNorm2d and type(after) in (nn.GELU, GELU) and after.approximate == "none"
                    and not _hooked(module, after)):
                x = module.forward_gelu(x)
                i += 2
            elif _narrow_conv_applies(module, x):
                following = modules[i + 2] if i + 2 < len(modules) else None
                # the LayerNorm after it in the same call, unless a GELU follows (then the LayerNorm+GELU call)
                norm = (type(after) is LayerNorm2d and after.weight is not None and after.bias is not None
                        and after.weight.dtype == x.dtype and after.bias.dtype == x.dtype and not _hooked(after)
                        and _no_graph(after.weight, after.bias) and type(following) not in (nn.GELU, GELU))
                x = narrow_conv3x3_s2(x, module.weight, module.bias, after.weight if norm else None,
                                      after.bias if norm else None, after.eps if norm else 0.0)
                i += 2 if norm else 1
            else:
                x = module(x)
                i += 1
        return x


class NCHWtoNHWC(nn.Module):
    """``(B, C, H, W) -> (B, H, W, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class NHWCtoNCHW(nn.Module):
    """``(B, H, W, C) -> (B, C, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(up(relu(down(mean_HW x))))`` with ``C -> C/4 -> C`` 1x1 convs.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, internal_channels: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal_channels, kernel_size=1, bias=True)
        self.up = nn.Conv2d(internal_channels, channels, kernel_size=1, bias=True)
        self.nonlinear = nn.ReLU(inplace=True)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample, per-channel factor ``(B, C, 1, 1)`` that :meth:`forward` multiplies ``x`` by.

        With no autograd graph recorded and no hooks on the 1x1 convs, they run as matrix multiplies of the pooled
        ``(B, C)`` vector (the same products; a 1x1 convolution of a 1x1 map takes PyTorch's slow generic path), the
        mean's division riding on the first one (``addmm``'s ``alpha``): four small ops in place of eight. A CPU
        batch of up to 4, float32 or bfloat16 with weights of its dtype and no autocast, takes one call of our CPU
        kernels instead (float32 arithmetic, rounded once; at T's third stage, float32, batch 1: 32 against 52 us;
        at batch 16 the matrix multiplies are faster)."""
        down, up = self.down, self.up
        if (_may_overwrite() and type(self.nonlinear) is nn.ReLU and down.bias is not None and up.bias is not None
                and not any(m._forward_hooks or m._forward_pre_hooks for m in (down, up, self.nonlinear))):
            if (x.dtype in _ONE_CALL_DTYPES and x.device.type == "cpu" and 0 < x.shape[0] <= 4 and x.numel() > 0
                    and down.out_channels > 0 and not torch.is_autocast_enabled("cpu")
                    and cpu_kernels_unavailable() is None
                    and all(p.dtype == x.dtype for p in (down.weight, down.bias, up.weight, up.bias))):
                return se_scale(x, down.weight, down.bias, up.weight, up.bias)  # one call of our CPU kernels
            batch, channels = x.shape[:2]
            sums = x.sum(dim=(2, 3))
            h = torch.addmm(down.bias, sums, down.weight.view(-1, channels).t(), alpha=1.0 / (x.shape[2] * x.shape[3]))
            scale = torch.addmm(up.bias, h.relu_(), up.weight.view(channels, -1).t()).sigmoid_()
            return scale.view(batch, channels, 1, 1)
        return torch.sigmoid(up(self.nonlinear(down(x.mean(dim=(2, 3), keepdim=True)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x)


class DilatedReparamBlock(nn.Module):
    """A large depthwise kernel plus parallel dilated small depthwise kernels, each followed by BatchNorm.

    Train form: ``origin_bn(lk_origin(x)) + sum_k,r dil_bn_k{k}_{r}(dil_conv_k{k}_{r}(x))``. Deploy form (after
    :meth:`reparameterize`, or built with ``deploy=True``): a single ``lk_origin`` depthwise ``K x K`` conv with bias.
    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.kernel_sizes, self.dilates = dilated_branches(kernel_size)
        self.lk_origin = DepthwiseConv2d(channels, kernel_size, bias=deploy)
        if not deploy:
            self.origin_bn = nn.BatchNorm2d(channels)
            for k, r in zip(self.kernel_sizes, self.dilates):
                conv = nn.Conv2d(
                    channels, channels, k, stride=1, padding=(r * (k - 1) + 1) // 2, dilation=r,
                    groups=channels, bias=False,
                )
                self.add_module(f"dil_conv_k{k}_{r}", conv)
                self.add_module(f"dil_bn_k{k}_{r}", nn.BatchNorm2d(channels))

    @property
    def deploy(self) -> bool:
        return not hasattr(self, "origin_bn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        # the dilated branches follow the large kernel's backend where that is our CPU kernels (no policy entry
        # measures dilated shapes; the kernels compute any dilation, and their weight gradient is what wins)
        ours = not _tracing() and select_backend(x, self.lk_origin.weight, self.lk_origin.backend) == "cpu_direct"
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = getattr(self, f"dil_conv_k{k}_{r}")
            bn = getattr(self, f"dil_bn_k{k}_{r}")
            out = out + bn(self._dilated(conv, r, x, ours))
        return out

    @staticmethod
    def _dilated(conv: nn.Conv2d, dilation: int, x: torch.Tensor, ours: bool = False) -> torch.Tensor:
        """``conv(x)``, with the taps that only meet padding on a small input left out (see ``central_taps``), through
        our CPU kernels when ``ours``."""
        if _tracing():
            return conv(x)
        weight = central_taps(conv.weight, x.shape[-2], x.shape[-1], dilation)
        if weight.shape[-1] == 1:
            return depthwise_conv2d(x, weight, conv.bias)
        if ours:  # in the dtype F.conv2d would compute in (autocast's, where it is on), as depthwise_conv2d does
            dtype = _effective_dtype(x)
            bias = None if conv.bias is None else conv.bias.to(dtype)
            return cpu_direct_depthwise_conv2d(x.to(dtype), weight.to(dtype), bias, dilation)
        if weight is conv.weight:
            return conv(x)
        return F.conv2d(x, weight, conv.bias, padding=dilation * (weight.shape[-1] // 2), dilation=dilation,
                        groups=conv.groups)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge every branch into ``lk_origin`` (idempotent)."""
        if self.deploy:
            return
        weight, bias = fuse_conv_bn(self.lk_origin.weight, self.lk_origin.bias, self.origin_bn)
        for k, r in zip(self.kernel_sizes, self.dilates):
            conv = getattr(self, f"dil_conv_k{k}_{r}")
            bn = getattr(self, f"dil_bn_k{k}_{r}")
            branch_weight, branch_bias = fuse_conv_bn(conv.weight, None, bn)
            weight = weight + pad_kernel_to(dilated_to_dense(branch_weight, r), self.kernel_size)
            bias = bias + branch_bias
            delattr(self, f"dil_conv_k{k}_{r}")
            delattr(self, f"dil_bn_k{k}_{r}")
        del self.origin_bn
        self.lk_origin = _depthwise_with(weight, bias, self.lk_origin.backend)


class UniRepLKNetBlock(nn.Module):
    """One UniRepLKNet block.

    ``x + drop_path(gamma * BN2(Linear2(GRN(GELU(Linear1(SE(BN1(dwconv(x)))))))))`` where ``dwconv`` is a
    :class:`DilatedReparamBlock` for ``kernel_size >= 7`` and a plain depthwise conv for 3 and 5; ``Linear1`` maps
    ``C -> 4C`` and ``Linear2`` ``4C -> C``, both channels-last. Shapes: ``(B, C, H, W) -> (B, C, H, W)``.

    The deploy form folds BN1 into ``dwconv`` and GRN's ``beta``, BN2 and ``gamma`` into ``Linear2``.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        drop_path: float = 0.0,
        layer_scale_init_value: Optional[float] = 1e-6,
        deploy: bool = False,
        ffn_factor: int = 4,
    ):
        super().__init__()
        if kernel_size not in SUPPORTED_KERNEL_SIZES:
            raise ConfigurationError(
                f"unsupported block kernel size {kernel_size}; supported: {SUPPORTED_KERNEL_SIZES}"
            )
        self.kernel_size = kernel_size
        if kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy=deploy)
        else:
            self.dwconv = DepthwiseConv2d(dim, kernel_size, bias=deploy)
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(dim)
        self.se = SEBlock(dim, dim // 4)
        ffn_dim = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(NCHWtoNHWC(), nn.Linear(dim, ffn_dim))
        self.act = nn.Sequential(GELU(inplace=True), GRNwithNHWC(ffn_dim, use_bias=not deploy, inplace=True))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim), NHWCtoNCHW())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=False), NHWCtoNCHW(), nn.BatchNorm2d(dim))
        if not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0:
            self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))
        else:
            self.gamma = None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def deploy(self) -> bool:
        return isinstance(self.norm, nn.Identity) and len(self.pwconv2) == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x))
        if self._fuse_linears(y):
            # the residual add can ride on Linear2 where nothing comes between them (deploy form, no drop path)
            may_add = self.gamma is None and (isinstance(self.drop_path, nn.Identity) or not self.training)
            # the map is the block's own temporary unless a hook on the depthwise conv or BN1 could have kept it
            own = not any(m._forward_hooks for part in (self.dwconv, self.norm) for m in part.modules())
            y, added = self._fused_ffn(y, x if may_add else None, own_input=own and y is not x)
            if added:
                return y
        else:
            y = self.pwconv2(self.act(self.pwconv1(self.se(y))))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)

    def _fuse_linears(self, y: torch.Tensor) -> bool:
        """Whether the FFN may run as oneDNN ``Linear1+GELU`` and ``Linear2``: CPU inference, fast ops on, the
        standard erf GELU, no hooks on the FFN's modules (the fused path does not call them), and either the map and
        the Linears' weights in one of :data:`_FUSED_DTYPES` (float32, and bfloat16 where the CPU has it natively)
        or, under bfloat16 autocast, a bfloat16 map (the Linears then run in bfloat16, as autocast would run them)."""
        if not (y.device.type == "cpu" and _may_overwrite()):
            return False
        gelu = self.act[0]
        if type(gelu) not in (GELU, nn.GELU) or gelu.approximate != "none":
            return False
        if type(self.pwconv1[1]) is not nn.Linear or type(self.pwconv2[0]) is not nn.Linear:
            return False  # e.g. a wrapped or quantised Linear: run it as it is
        weight_dtypes = {self.pwconv1[1].weight.dtype, self.pwconv2[0].weight.dtype}
        if torch.is_autocast_enabled("cpu"):
            if not (torch.get_autocast_dtype("cpu") == torch.bfloat16 and y.dtype == torch.bfloat16
                    and torch.bfloat16 in _FUSED_DTYPES and weight_dtypes <= {torch.float32, torch.bfloat16}):
                return False
        elif y.dtype not in _FUSED_DTYPES or weight_dtypes != {y.dtype}:
            return False  # mixed precisions: the modules' own type promotion (or error) applies
        if type(self.act[1]) is not GRNwithNHWC or type(self.se) is not SEBlock:
            return False
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        modules = (self.se, self.pwconv1, self.act, self.pwconv2, *self.se.children(), *self.pwconv1, *self.act,
                   *self.pwconv2)
        return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)

    def _fused_ffn(self, y: torch.Tensor, residual: Optional[torch.Tensor] = None,
                   own_input: bool = False) -> Tuple[torch.Tensor, bool]:
        """``pwconv2(act(pwconv1(se(y))))`` without separate passes where they can be saved, in ``y``'s dtype, and
        whether ``residual`` (if given) was added to it: where ``Linear2`` runs as a oneDNN call on a channels-last
        ``residual`` of ``y``'s dtype, the add is its binary post-op (no separate pass over the map).

        SE scales the ``C``-channel map (in place when ``own_input`` says nothing else holds ``y``), ``Linear1+GELU``
        runs as one oneDNN call, and then, in bfloat16 in the deploy form on maps with at least ``4C`` pixels (the
        first two stages at 224 px), GRN's per-sample channel factor scales ``Linear2``'s weights instead of the
        activations (one batched matmul with weights of ``B x C x 4C``), so no multiply touches the ``(B, H, W, 4C)``
        map; otherwise GRN runs in place and ``Linear2`` as one oneDNN call. The in-place multiplies by SE's and GRN's
        factors are one call of our CPU kernels each (:func:`_scale_channels`). The Linears' weights are kept in
        oneDNN's layout between calls (:mod:`backbones.ops.prepacked`).

        Measured on 2 cores, batch 16, GRN and ``Linear2`` at T's first stage: on an Intel Xeon (AVX-512, AMX) the
        fold took the same time as GRN in place in float32 and 4-5% less in bfloat16; on an AMD EPYC (AVX-512, where
        the float32 batched matmul runs MKL's kernels, there at 0.72x oneDNN's rate on a square matmul) 39-41 against
        24-25 ms in float32 (20-25 against 16-18 ms at the second stage), and the same in bfloat16. So float32 never
        folds. Folding SE's factor into ``Linear1``'s weights as well (a batched matmul, then GELU apart) took 31
        against 22 ms for SE on the map and the fused ``Linear1+GELU`` (Intel, float32), so SE is not folded; running
        the whole FFN one image at a time (so one image's expanded map stays in the caches) measured the same as the
        batched calls, end to end (0.99x at batch 16). Under bfloat16 autocast the weights are cast to bfloat16 here
        (autocast would cast them for its Linears too) and GRN's factor as well, so the expanded map stays in bfloat16
        (the module path promotes it to float32 against GRN's float32 gamma)."""
        linear1, linear2, grn = self.pwconv1[1], self.pwconv2[0], self.act[1]
        batch, channels, height, width = y.shape
        dtype = y.dtype
        se_scale = self.se.scale(y).to(dtype)  # SE's 1x1 convs run as autocast (if on) casts them
        rows = batch * height * width
        with torch.autocast("cpu", enabled=False):
            bias1 = linear1.bias.to(dtype)
            bias2 = None if linear2.bias is None else linear2.bias.to(dtype)
            if own_input:
                _scale_channels(y.permute(0, 2, 3, 1), se_scale)
            else:
                y = y * se_scale
            h = torch.ops.mkldnn._linear_pointwise(y.permute(0, 2, 3, 1), prepacked.linear_weight(
                linear1.weight, rows, dtype), bias1, "gelu", [], "none")
            if (dtype in _GRN_FOLD_DTYPES and height * width >= _GRN_FOLD_RATIO * channels and len(self.pwconv2) == 2
                    and not grn.use_bias and bias2 is not None):
                scaled2 = linear2.weight.to(dtype).unsqueeze(0) * grn.scale(h).to(dtype).view(batch, 1, -1)
                out = torch.baddbmm(bias2.view(1, 1, channels), h.view(batch, height * width, -1),
                                    scaled2.transpose(1, 2))
                return out.view(batch, height, width, channels).permute(0, 3, 1, 2), False
            narrow = _narrow_linear_applies(linear2, h)
            grn_factor = grn.scale(h)
            if narrow and _NARROW_FOLDS_GRN and not grn.use_bias:  # GRN's factor into narrow_linear's weights
                grn_factor = grn_factor.reshape(batch, -1)
            else:
                h = _scale_channels(h, grn_factor)  # GRN in place
                grn_factor = None
                if grn.use_bias:
                    h = h.add_(grn.beta.to(dtype))
            other = None
            if residual is not None and len(self.pwconv2) == 2 and residual.dtype == dtype:
                other = residual.permute(0, 2, 3, 1)
                if not other.is_contiguous():  # only a channels-last residual is (B, H, W, C) in memory order
                    other = None
            if narrow:  # few outputs: one call of our CPU kernels, residual included
                out = narrow_linear(h, linear2.weight, bias2, other, grn_factor)
            elif other is not None:  # the residual add as oneDNN's binary post-op
                out = torch.ops.mkldnn._linear_pointwise.binary(
                    h, other, prepacked.linear_weight(linear2.weight, rows, dtype), bias2, "add")
            else:
                out = torch.ops.mkldnn._linear_pointwise(
                    h, prepacked.linear_weight(linear2.weight, rows, dtype), bias2, "none", [], "")
            out = out.permute(0, 3, 1, 2)
            if other is not None:
                return out, True
        return (self.pwconv2[2](out) if len(self.pwconv2) == 3 else out), False

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Convert this block to its deploy form in place (idempotent; exact in eval mode up to rounding)."""
        # 1. merge the dilated branches into one large kernel with bias
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.reparameterize()
        # 2. fold BN1 into the depthwise conv
        if isinstance(self.norm, nn.BatchNorm2d):
            conv = self.dwconv.lk_origin if isinstance(self.dwconv, DilatedReparamBlock) else self.dwconv
            weight, bias = fuse_conv_bn(conv.weight, conv.bias, self.norm)
            fused = _depthwise_with(weight, bias, conv.backend)
            if isinstance(self.dwconv, DilatedReparamBlock):
                self.dwconv.lk_origin = fused
            else:
                self.dwconv = fused
            self.norm = nn.Identity()
        # 3. fold GRN beta, Linear2, BN2 and layer scale into one Linear with bias
        if len(self.pwconv2) == 3:
            grn = self.act[1]
            linear, bn = self.pwconv2[0], self.pwconv2[2]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            if self.gamma is not None:
                layer_scale = self.gamma.detach()
            else:
                layer_scale = torch.ones_like(scale)
            bias = torch.zeros_like(scale) if linear.bias is None else linear.bias.detach().clone()
            if grn.use_bias:
                bias = bias + linear.weight @ grn.beta.reshape(-1)
                del grn.beta
                grn.use_bias = False
            fused = nn.Linear(linear.in_features, linear.out_features, bias=True)
            fused.to(device=linear.weight.device, dtype=linear.weight.dtype)
            fused.weight.copy_(linear.weight * (scale * layer_scale).reshape(-1, 1))
            fused.bias.copy_((bn.bias + (bias - bn.running_mean) * scale) * layer_scale)
            self.pwconv2 = nn.Sequential(fused, self.pwconv2[1])
            self.gamma = None


# ----------------------------------------------------------------------------------------------------------------------
# The network


@contextlib.contextmanager
def _batchnorm_statistics_frozen(module: nn.Module):
    """Keep BatchNorm running statistics unchanged while ``module`` is recomputed for gradient checkpointing.

    The recomputation runs every BatchNorm a second time on the same batch; without this the running statistics
    would be updated twice per step.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _check_pooling(global_pool: str, num_classes: int) -> None:
    if global_pool not in ("avg", ""):
        raise ConfigurationError(f"global_pool must be 'avg' or '', got {global_pool!r}")
    if global_pool == "" and num_classes > 0:
        raise ConfigurationError(
            "global_pool='' keeps the (B, C, H, W) map and needs num_classes=0; the classifier works on pooled features"
        )


class UniRepLKNet(nn.Module):
    """UniRepLKNet for any number of input channels.

    Args:
        in_chans: input channels of the stem (3 for images, 1 for spectrograms, ...).
        num_classes: classes of the linear head; 0 gives pooled, normalised features from :meth:`forward`.
        depths: blocks per stage.
        dims: channels per stage.
        kernel_sizes: per-stage kernel plan; ``None`` for the official plan, one int per stage (e.g. the modality
            recipes' ``(3, 13, 13, 11)``) or one tuple of ints per stage.
        drop_path_rate: stochastic-depth rate; per-block rates rise linearly from 0 over all blocks.
        layer_scale_init_value: initial layer scale ``gamma`` of each block (``None`` or 0 disables it).
        head_init_scale: multiplies the head's initial weight and bias (0.001 for fine-tuning recipes).
        deploy: build the deploy form directly (no BatchNorm, merged kernels).
        output_norms: add the LayerNorms ``norm0..norm3`` of the official features mode; applied to the stage
            outputs returned by :meth:`forward_intermediates` (used for detection and segmentation checkpoints).
        global_pool: ``"avg"`` (mean over H, W) or ``""`` to keep the map (only with ``num_classes=0``).
        drop_rate: dropout on the pooled features before the classifier (0 in every official recipe).
        depthwise_backend: force a backend of :func:`backbones.ops.depthwise_conv2d` for every depthwise layer;
            ``None`` lets the dispatcher choose per call.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 27, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        kernel_sizes=None,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: Optional[float] = 1e-6,
        head_init_scale: float = 1.0,
        deploy: bool = False,
        output_norms: bool = False,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        depthwise_backend: Optional[str] = None,
        **kwargs: Any,
    ):
        super().__init__()
        if kwargs:
            raise ConfigurationError(f"UniRepLKNet got unknown arguments: {sorted(kwargs)}")
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        if len(depths) != 4 or len(dims) != 4:
            raise ConfigurationError(f"UniRepLKNet needs 4 depths and 4 dims, got depths={depths}, dims={dims}")
        if in_chans < 1:
            raise ConfigurationError(f"in_chans must be at least 1, got {in_chans}")
        _check_pooling(global_pool, num_classes)
        self.kernel_sizes = _resolve_kernel_sizes(depths, kernel_sizes)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.depths, self.dims = depths, dims
        self.global_pool = global_pool
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = dims[-1]
        self._arguments = dict(
            in_chans=in_chans, depths=depths, dims=dims, kernel_sizes=self.kernel_sizes,
            drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale_init_value,
            head_init_scale=head_init_scale, output_norms=output_norms, drop_rate=drop_rate,
        )

        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(
            DownsampleLayer(
                PrepackedConv2d(in_chans, dims[0] // 2, kernel_size=3, stride=2, padding=1),
                LayerNorm2d(dims[0] // 2, eps=1e-6),
                nn.GELU(),
                PrepackedConv2d(dims[0] // 2, dims[0], kernel_size=3, stride=2, padding=1),
                LayerNorm2d(dims[0], eps=1e-6),
            )
        )
        for i in range(3):
            self.downsample_layers.append(
                DownsampleLayer(
                    PrepackedConv2d(dims[i], dims[i + 1], kernel_size=3, stride=2, padding=1),
                    LayerNorm2d(dims[i + 1], eps=1e-6),
                )
            )

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        cursor = 0
        for i in range(4):
            blocks = [
                UniRepLKNetBlock(
                    dims[i], self.kernel_sizes[i][j], drop_path=rates[cursor + j],
                    layer_scale_init_value=layer_scale_init_value, deploy=deploy,
                )
                for j in range(depths[i])
            ]
            self.stages.append(nn.Sequential(*blocks))
            cursor += depths[i]

        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)
        ]
        self.output_norms = output_norms
        if output_norms:
            for i in range(4):
                self.add_module(f"norm{i}", LayerNorm2d(dims[i], eps=1e-6))

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if depthwise_backend is not None:
            self.set_depthwise_backend(depthwise_backend)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------------------------------------------------------
    # timm model interface

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^downsample_layers\.0",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(\d+)", None),
                (r"^downsample_layers\.(\d+)", (0,)),
                (r"^norm(\d+)", (99999,)),
                (r"^norm\.", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Names of parameters that AdamW should not decay: layer scale and GRN parameters."""
        return {n for n, _ in self.named_parameters() if n.endswith((".gamma", ".beta"))}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a freshly initialised ``Linear(C4, num_classes)`` (``Identity`` for 0)."""
        global_pool = self.global_pool if global_pool is None else global_pool
        _check_pooling(global_pool, num_classes)
        self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.downsample_layers[0][0].weight
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes).to(device=ref.device, dtype=ref.dtype)
            self._init_weights(self.head)
        else:
            self.head = nn.Identity()

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputShapeError` unless ``x`` is ``(B, in_chans, H, W)`` with ``H, W >= 32``."""
        if not isinstance(x, torch.Tensor):
            raise InputShapeError(f"UniRepLKNet expects a torch.Tensor (B, {self.in_chans}, H, W), got {type(x)}")
        if x.ndim != 4:
            raise InputShapeError(
                f"UniRepLKNet expects a 4-D input (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise InputShapeError(
                f"UniRepLKNet expects a floating-point input, got {x.dtype}; convert it (e.g. x.float() / 255) and "
                f"normalise it first"
            )
        if self.in_chans is not None and x.shape[1] != self.in_chans:  # None: the stem is chosen per call
            raise InputShapeError(
                f"UniRepLKNet was built for {self.in_chans} input channel(s) but got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}); build it with in_chans={x.shape[1]} or fix the input"
            )
        if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
            raise InputShapeError(
                f"UniRepLKNet needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels (its total stride), "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        if self.training and not self.deploy:
            # BatchNorm in training mode needs more than one value per channel in the last stage
            last_stage_values = x.shape[0] * math.ceil(x.shape[2] / 32) * math.ceil(x.shape[3] / 32)
            if last_stage_values < 2:
                raise InputShapeError(
                    f"training needs more than one value per channel in the last stage's BatchNorms: batch "
                    f"{x.shape[0]} at {x.shape[2]}x{x.shape[3]} gives a 1x1 map; use a batch of at least 2 or "
                    f"inputs larger than 32 pixels"
                )

    def _run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            # the stem and downsampling layers too: the stem's 1/2-resolution maps are the largest activations
            # (no BatchNorm in them: LayerNorm only)
            x = checkpoint(self.downsample_layers[index], x, use_reentrant=False)
            for block in self.stages[index]:
                x = checkpoint(
                    block, x, use_reentrant=False,
                    context_fn=lambda block=block: (contextlib.nullcontext(), _batchnorm_statistics_frozen(block)),
                )
            return x
        return self.stages[index](self.downsample_layers[index](x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, C4, ceil(H/32), ceil(W/32))``: stem and all four stages, before pooling."""
        self.check_input(x)
        for i in range(len(self.stages)):
            x = self._run_stage(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean over (H, W), LayerNorm, then the classifier; ``pre_logits=True`` stops before the classifier."""
        if self.global_pool == "avg":
            x = self.norm(x.mean(dim=(-2, -1)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W) -> (B, num_classes)``, or ``(B, C4)`` pooled features when ``num_classes == 0``."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs as a list of ``(B, C_i, H/2^(i+2), W/2^(i+2))`` maps.

        Args:
            indices: the last ``n`` stages if an int, all if ``None``, those listed if a sequence.
            norm: kept for timm's interface; stage outputs pass through ``norm0..norm3`` whenever the model was
                built with ``output_norms=True`` (the official features mode).
            stop_early: stop after the last requested stage.
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list, not ``(final map, list)``.
        """
        if output_fmt != "NCHW":
            raise ConfigurationError(f"UniRepLKNet intermediates are NCHW only, got output_fmt={output_fmt!r}")
        self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        last = max_index if stop_early else len(self.stages) - 1
        for i in range(last + 1):
            x = self._run_stage(i, x)
            if i in take_indices:
                intermediates.append(getattr(self, f"norm{i}")(x) if self.output_norms else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last requested one (and the head) so feature extraction does no extra work."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self.downsample_layers = self.downsample_layers[: max_index + 1]
        if self.output_norms:
            for i in range(max_index + 1, 4):
                delattr(self, f"norm{i}")
        if prune_head:
            self.norm = nn.Identity()
            self.reset_classifier(0)
        return take_indices

    # ---------------------------------------------------------------------------------------------------------------
    # Re-parameterisation and checkpoints

    @property
    def deploy(self) -> bool:
        """True when every block is in its deploy form."""
        return all(block.deploy for stage in self.stages for block in stage)

    def reparameterize(self) -> "UniRepLKNet":
        """Convert every block to its deploy form in place (idempotent) and return ``self``.

        In eval mode the converted model computes the same outputs up to float rounding.
        """
        for module in self.modules():
            if isinstance(module, UniRepLKNetBlock):
                module.reparameterize()
        return self

    @property
    def config(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this model's architecture in its current state."""
        return dict(
            self._arguments, num_classes=self.num_classes, global_pool=self.global_pool, deploy=self.deploy,
        )

    def set_depthwise_backend(self, backend: Optional[str]) -> "UniRepLKNet":
        """Force ``backend`` (``"auto"`` or a name from :func:`backbones.ops.available_backends`) for every
        depthwise layer, or follow the context, environment and policy again with ``None``."""
        from .ops.depthwise import _check_name

        if backend is not None:
            _check_name(backend, "set_depthwise_backend")
        for module in self.modules():
            if isinstance(module, DepthwiseConv2d):
                module.backend = backend
        return self

    def load_pretrained(self, path: Union[str, os.PathLike], strict: bool = True):
        """Load an official or own checkpoint file; see :func:`backbones.checkpoint.load_checkpoint`.

        A bare file name that does not exist is looked up in :func:`weights_dir`.
        """
        from .checkpoint import load_checkpoint

        report = load_checkpoint(self, resolve_weights_path(path), strict=strict)
        _logger.info("%s", report)
        return report


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained configurations
#
# Each pretrained tag names its official file on the Hugging Face Hub (``hf_hub_id``, ``hf_hub_filename``).
# ``timm.create_model(name, pretrained=True)`` builds the model without weights (timm sets ``pretrained_cfg`` as for
# any model), then takes the first of these sources and loads it with ``backbones.checkpoint.load_checkpoint``, so
# every rule of that function applies (strict; stem adapted to ``in_chans``; a different class count keeps the
# model's own head; a train-form file into a deploy-form model):
#   1. ``pretrained_cfg_overlay=dict(state_dict=...)``: an in-memory state dict;
#   2. ``pretrained_cfg_overlay=dict(file=...)``: a file path (a bare name that does not exist is looked up in
#      ``weights_dir()``);
#   3. for the official repository, a file of the official name in ``weights_dir()`` (``$UNIPERCEPTION_WEIGHTS``);
#   4. ``hf_hub_download`` through the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``, ``cache_dir=`` of
#      ``timm.create_model``), with the network rules and time limits of ``backbones.checkpoint.download_from_hub``:
#      offline (``HF_HUB_OFFLINE=1``) the cache alone, online one metadata request limited to ``HF_HUB_ETAG_TIMEOUT``
#      seconds before any download.
# No source, or one that fails, raises CheckpointError naming the file and where it was looked for.

_OFFICIAL_REPO = "DingXiaoH/UniRepLKNet"


def weights_dir() -> Path:
    """Where bare official checkpoint file names are looked up: ``$UNIPERCEPTION_WEIGHTS`` or
    ``~/.cache/uniperception/weights``."""
    return Path(os.environ.get("UNIPERCEPTION_WEIGHTS", Path.home() / ".cache" / "uniperception" / "weights"))


def resolve_weights_path(path: Union[str, os.PathLike]) -> Path:
    """Return ``path`` if it exists, else ``weights_dir() / path``; raise :class:`CheckpointError` if neither does."""
    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    in_dir = weights_dir() / candidate.name
    if str(path) == candidate.name and in_dir.exists():  # only bare file names are looked up in the folder
        return in_dir
    raise CheckpointError(
        f"checkpoint file {str(path)!r} not found (also looked in {str(weights_dir())!r}, set "
        f"UNIPERCEPTION_WEIGHTS to change it). The official files are published in the Hugging Face repository "
        f"{_OFFICIAL_REPO}; download one there and place it in that folder, or pass "
        f"pretrained_cfg_overlay=dict(file='/path/to/file.pth')"
    )


def _cfg(file: str, input_size: int = 224, num_classes: int = 1000, **kwargs) -> Dict[str, Any]:
    return {
        "hf_hub_id": _OFFICIAL_REPO,
        "hf_hub_filename": file,
        "num_classes": num_classes,
        "input_size": (3, input_size, input_size),
        "pool_size": (math.ceil(input_size / 32),) * 2,
        "crop_pct": 0.875 if input_size < 384 else 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "downsample_layers.0.0",
        "classifier": "head",
        "paper_ids": "arXiv:2311.15599",
        "license": "apache-2.0",
        "origin_url": f"https://huggingface.co/{_OFFICIAL_REPO}",
        **kwargs,
    }


_IN1K_TOP1 = {"a": "77.03", "f": "78.58", "p": "80.23", "n": "81.64", "t": "83.21", "s": "83.91"}
_IN22K_TO_IN1K_384_TOP1 = {"s": "86.44", "b": "87.40", "l": "87.88", "xl": "87.96"}

default_cfgs = generate_default_cfgs(
    {
        **{
            f"unireplknet_{v}.in1k": _cfg(f"unireplknet_{v}_in1k_224_acc{acc}.pth")
            for v, acc in _IN1K_TOP1.items()
        },
        **{
            f"unireplknet_{v}.in22k_ft_in1k_384": _cfg(f"unireplknet_{v}_in22k_to_in1k_384_acc{acc}.pth", 384)
            for v, acc in _IN22K_TO_IN1K_384_TOP1.items()
        },
        **{
            f"unireplknet_{v}.in22k": _cfg(
                f"unireplknet_{v}_in22k_pretrain.pth", 192 if v in ("l", "xl") else 224, num_classes=21841
            )
            for v in ("s", "b", "l", "xl")
        },
    }
)


def _pretrained_source(
    cfg: Dict[str, Any], cache_dir: Union[str, os.PathLike, None] = None
) -> Union[Path, Dict[str, torch.Tensor]]:
    """The weights a resolved ``pretrained_cfg`` points to (the order is listed at the top of this section)."""
    from .checkpoint import download_from_hub

    name = ".".join(part for part in (cfg.get("architecture"), cfg.get("tag")) if part) or "model"
    if cfg.get("state_dict") is not None:
        return cfg["state_dict"]
    if cfg.get("file"):
        return resolve_weights_path(cfg["file"])
    if cfg.get("hf_hub_id"):
        repo_id, _, revision = str(cfg["hf_hub_id"]).partition("@")
        filename = cfg.get("hf_hub_filename") or "model.safetensors"
        official = repo_id == _OFFICIAL_REPO
        if official and (weights_dir() / filename).is_file():
            return weights_dir() / filename
        try:
            return download_from_hub(
                repo_id, filename, revision=revision or None, cache_dir=cache_dir,
                fallback_dir=weights_dir() if official else None,
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{name}: pretrained weights: {exc}") from None
    if cfg.get("url"):
        raise CheckpointError(
            f"{name}: weights from a URL ({cfg['url']}) are not supported; download the file and pass "
            f"pretrained_cfg_overlay=dict(file='/path/to/file')"
        )
    raise CheckpointError(
        f"{name}: no pretrained weights are configured; use a tag that has them "
        f"(unireplknet_{{a,f,p,n,t,s}}.in1k, unireplknet_{{s,b,l,xl}}.in22k_ft_in1k_384, "
        f"unireplknet_{{s,b,l,xl}}.in22k) or pass pretrained_cfg_overlay=dict(file='/path/to/file')"
    )


def _create_unireplknet(variant: str, pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """Build ``variant`` through timm's builder; with ``pretrained=True`` load the weights of its resolved
    ``pretrained_cfg`` with :func:`backbones.checkpoint.load_checkpoint` (``pretrained_strict=False`` loads what
    fits and reports the rest)."""
    from .checkpoint import load_checkpoint

    size = variant.split("_", 1)[1]
    depths, dims = VARIANTS[size]
    kwargs.setdefault("depths", depths)
    kwargs.setdefault("dims", dims)
    if kwargs.get("features_only"):
        # the official features mode normalises every stage output (norm0..norm3)
        kwargs.setdefault("output_norms", True)
    strict = kwargs.pop("pretrained_strict", True)
    feature_cfg = dict(feature_cls="getter", out_indices=(0, 1, 2, 3))
    model = build_model_with_cfg(UniRepLKNet, variant, False, feature_cfg=feature_cfg, **kwargs)
    if pretrained:
        source = _pretrained_source(model.pretrained_cfg, cache_dir=kwargs.get("cache_dir"))
        report = load_checkpoint(model, source, strict=strict)
        _logger.info("%s", report)
    return model


@register_model
def unireplknet_a(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-A: depths (2, 2, 6, 2), dims (40, 80, 160, 320); 4.65M parameters (train form, 1000 classes)."""
    return _create_unireplknet("unireplknet_a", pretrained, **kwargs)


@register_model
def unireplknet_f(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-F: depths (2, 2, 6, 2), dims (48, 96, 192, 384); 6.49M parameters."""
    return _create_unireplknet("unireplknet_f", pretrained, **kwargs)


@register_model
def unireplknet_p(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-P: depths (2, 2, 6, 2), dims (64, 128, 256, 512); 11.08M parameters."""
    return _create_unireplknet("unireplknet_p", pretrained, **kwargs)


@register_model
def unireplknet_n(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-N: depths (2, 2, 8, 2), dims (80, 160, 320, 640); 18.82M parameters."""
    return _create_unireplknet("unireplknet_n", pretrained, **kwargs)


@register_model
def unireplknet_t(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-T: depths (3, 3, 18, 3), dims (80, 160, 320, 640); 31.69M parameters."""
    return _create_unireplknet("unireplknet_t", pretrained, **kwargs)


@register_model
def unireplknet_s(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-S: depths (3, 3, 27, 3), dims (96, 192, 384, 768); 56.46M parameters."""
    return _create_unireplknet("unireplknet_s", pretrained, **kwargs)


@register_model
def unireplknet_b(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-B: depths (3, 3, 27, 3), dims (128, 256, 512, 1024); 99.09M parameters."""
    return _create_unireplknet("unireplknet_b", pretrained, **kwargs)


@register_model
def unireplknet_l(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-L: depths (3, 3, 27, 3), dims (192, 384, 768, 1536); 220.08M parameters."""
    return _create_unireplknet("unireplknet_l", pretrained, **kwargs)


@register_model
def unireplknet_xl(pretrained: bool = False, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-XL: depths (3, 3, 27, 3), dims (256, 512, 1024, 2048); 388.69M parameters."""
    return _create_unireplknet("unireplknet_xl", pretrained, **kwargs)
