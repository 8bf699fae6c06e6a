"""Weights kept in oneDNN's own layout between inference calls on the CPU.

oneDNN computes a matrix multiply or a convolution on weights reordered into a blocked layout that suits the shape of
the call. Handed a plain PyTorch weight, it reorders it on every call; at batch 1 that costs as much as a tenth of the
arithmetic (measured on 2 cores, AVX-512, float32: a 320 -> 1280 Linear on 196 rows took 843 us on a kept weight
against 937 us; the 3x3 stride-2 convolution of 320 -> 640 channels on a 14x14 map 1052 us against 1594 us). Here a
reordered copy is made on the first call and kept until the weight changes (its version counter or its storage). It
is made for the rows (or the input shape) of that call, which is what oneDNN chooses its layout for; a few shapes are
kept per weight. Weights made in inference mode (which have no version counter) are not kept. The copies live beside
the model, not in it: ``state_dict``, ``deepcopy`` and pickling never see them, and they go when the weight goes.
They cost one more copy of the weights per kept shape.

Used only where no autograd graph is recorded (a kept weight would not see the gradient), and only for float32, or
bfloat16 where the CPU has it natively. :func:`keep_weights` turns it off for the process (or
``UNIPERCEPTION_KEEP_WEIGHTS=0`` in the environment), to save the copies' memory.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Hashable, Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..runtime import fast_ops_enabled, native_bfloat16
from .depthwise import _tracing

__all__ = ["KEEP_WEIGHTS_ENV", "KEPT_SHAPES", "PrepackedConv2d", "clear", "conv2d", "keep_weights", "keeping_weights",
           "kept_copy", "linear_weight"]

#: how many call shapes a weight keeps a reordered copy for (least recently used go first)
KEPT_SHAPES = 2
#: ``0`` here turns keeping reordered weights off from the start
KEEP_WEIGHTS_ENV = "UNIPERCEPTION_KEEP_WEIGHTS"
_ENABLED = os.environ.get(KEEP_WEIGHTS_ENV, "1").strip() != "0"

_KEPT = WeakIdKeyDictionary()  # weight -> OrderedDict(shape key -> (stamp, reordered copy))
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# float32, and bfloat16 where oneDNN computes it natively (elsewhere it is emulated and the module path runs)
_DTYPES = (torch.float32, torch.bfloat16) if native_bfloat16() else (torch.float32,)


def clear() -> None:
    """Forget every kept copy (they are rebuilt on the next call)."""
    _KEPT.clear()


def keeping_weights() -> bool:
    """Whether inference keeps reordered weights between calls (on unless turned off)."""
    return _ENABLED


def keep_weights(enable: bool = True) -> bool:
    """Turn keeping reordered weights between inference calls on or off for the whole process, and return the
    previous setting. Off, every call hands oneDNN the plain weight (slower at small batches, no copies kept);
    turning it off forgets the copies kept so far."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enable)
    if not _ENABLED:
        clear()
    return previous


def _stamp(weight: torch.Tensor):
    return weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape)


def kept_copy(weight: torch.Tensor, key: Hashable, make: Callable[[], torch.Tensor],
              table: WeakIdKeyDictionary = _KEPT) -> torch.Tensor:
    """``make()``'s copy of ``weight`` for ``key`` (a call shape), kept in ``table`` (weight -> ``OrderedDict`` of
    key -> (stamp, copy)) and made again when the weight changed since (version counter, storage, dtype, shape); at
    most :data:`KEPT_SHAPES` keys per weight, the least recently used dropped. Callers leave out weights made in
    inference mode (no version counter) and weights being trained."""
    copies = table.get(weight)
    if copies is None:
        copies = table[weight] = OrderedDict()
    stamp = _stamp(weight)
    entry = copies.get(key)
    if entry is not None and entry[0] == stamp:
        copies.move_to_end(key)
        return entry[1]
    if any(kept_stamp != stamp for kept_stamp, _ in copies.values()):
        copies.clear()  # the weight changed: every copy is stale
    with torch.inference_mode(False), torch.no_grad():
        copy = make()
    copies[key] = (stamp, copy)
    while len(copies) > KEPT_SHAPES:
        copies.popitem(last=False)
    return copy


def linear_weight(weight: torch.Tensor, rows: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``weight`` (out, in) in ``dtype`` (default its own), reordered by oneDNN for a multiply of ``rows`` rows, for
    ``torch.ops.mkldnn._linear_pointwise``; the plain weight where oneDNN's reordering is not in this build."""
    dtype = weight.dtype if dtype is None else dtype
    if not (_AVAILABLE and _ENABLED) or weight.is_inference():  # (inference mode: no version counter to watch)
        return weight.to(dtype)
    return kept_copy(weight, ("linear", dtype, int(rows)),
                     lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), int(rows)))


def _conv_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    if _tracing():  # first: a traced graph takes the module's own forward (is_inference() would split the graph)
        return False
    if not (_AVAILABLE and _ENABLED and x.device.type == "cpu" and x.dim() == 4 and not torch.is_grad_enabled()):
        return False
    if x.dtype not in _DTYPES or conv.weight.dtype != x.dtype or conv.weight.is_inference():
        return False
    if torch.is_autocast_enabled("cpu") or not fast_ops_enabled():
        return False
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    return conv.bias is None or conv.bias.dtype == x.dtype


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with the weight kept in oneDNN's layout for ``x``'s shape where that applies (CPU, no autograd
    graph, float32 or native bfloat16, zero padding, no autocast), else ``conv``'s own forward."""
    if not _conv_applies(conv, x):
        return nn.Conv2d.forward(conv, x)
    padding, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
    shape = list(x.shape)

    def make() -> torch.Tensor:
        weight = conv.weight.detach().contiguous().to_mkldnn()
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight, padding, stride, dilation, conv.groups, shape)

    weight = kept_copy(conv.weight, ("conv", tuple(shape), x.is_contiguous(memory_format=torch.channels_last)), make)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, conv.bias, padding, stride, dilation, conv.groups,
                                                   "none", [], "")


class PrepackedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (the same parameters and state-dict keys) whose inference calls on the CPU use a weight kept in
    oneDNN's layout (:func:`conv2d`); training and every other case run ``nn.Conv2d``'s forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(self, x)
