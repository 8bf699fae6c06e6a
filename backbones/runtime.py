"""Running a backbone fast on the CPU: the allocator setting and the one call that applies every measured lever.

Two levers that are not part of the model itself, both measured by ``benchmarks/backbone.py`` (numbers in
``BENCHMARKS.md``):

* **Keeping freed memory** (:func:`keep_freed_memory`). glibc's ``malloc`` serves blocks above its mmap threshold
  (128 KiB, raised on the fly up to 32 MiB) with fresh pages and hands them back to the kernel when they are freed.
  A UniRepLKNet-T forward at batch 16 allocates tens of such blocks (the expanded ``4C`` map of a 56x56 stage is
  64 MiB), and every page of every one of them is faulted in and zeroed again on each call: on a 2-core machine a
  GELU over a fresh 64 MiB buffer took 35 ms, over a reused one 7 ms. Raising the mmap and trim thresholds makes
  ``malloc`` keep freed blocks for reuse. The price is that the process's resident memory stays at its peak instead
  of shrinking after it; the setting is process-wide, so it is never applied on import, only when asked. Other ways
  to the same end: ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...`` in the
  environment, or a caching allocator such as jemalloc or tcmalloc through ``LD_PRELOAD``.
* **Channels-last** weights and input, so the block's ``(B, C, H, W) -> (B, H, W, C)`` permutes before and after its
  Linears are views rather than copies.

:func:`optimize_for_inference` applies them together with the deploy form (and optionally ``torch.compile``)::

    import backbones, timm, torch
    model = backbones.optimize_for_inference(timm.create_model("unireplknet_t"))
    with torch.inference_mode():
        logits = model(images)          # images in any memory format: handed over channels-last
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import logging
import sys
from typing import Iterator, Optional

import torch
from torch import nn

from .errors import ConfigurationError

__all__ = [
    "INFERENCE_DTYPES",
    "fast_ops_enabled",
    "keep_freed_memory",
    "keeping_freed_memory",
    "native_bfloat16",
    "optimize_for_inference",
    "reference_ops",
]

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the thresholds used while freed memory is kept
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap and are reused after free
_KEEP_TRIM_THRESHOLD = (1 << 31) - 1  # never give the heap's free top back to the kernel
_DEFAULT_THRESHOLD = 128 * 1024  # glibc's documented default for both

_state = {"keeping": False}
_FAST_OPS: contextvars.ContextVar[bool] = contextvars.ContextVar("backbones_fast_ops", default=True)


@torch.compiler.assume_constant_result
def fast_ops_enabled() -> bool:
    """False inside :func:`reference_ops`, else True.

    Under ``torch.compile`` it is read once, when the graph is traced (reading a context variable inside a traced
    function would split the graph at every call); both answers compute the same outputs, and a traced graph takes
    the module path either way."""
    return _FAST_OPS.get()


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Run UniRepLKNet blocks with their straightforward ops inside this context.

    Outside it (the default) a block at inference (no autograd, no tracing, on the CPU in float32, or in bfloat16
    where the CPU has it natively, bfloat16 autocast included) runs ``Linear1`` fused with GELU (oneDNN), then
    either folds GRN's per-sample factor into ``Linear2``'s weights (bfloat16 deploy form, maps of at least ``4C``
    pixels) or applies GRN in place; SE, GELU and GRN write over the block's own temporaries, and GRN's norm is a sum
    of squares (that part in training too). Inside it every block runs
    ``SE -> Linear -> GELU -> GRN -> Linear`` as separate out-of-place ops with ``torch.linalg.vector_norm``: the
    reference the fast paths are tested against and the "plain" form the benchmark measures them against. Per
    thread / async context (a ``ContextVar``). Depthwise convolutions inside it run PyTorch's own
    ``F.conv2d`` (``use_backend("torch")``) unless a layer names its backend itself.
    """
    from .ops.depthwise import use_backend

    token = _FAST_OPS.set(False)
    try:
        with use_backend("torch"):
            yield
    finally:
        _FAST_OPS.reset(token)


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # only glibc has it (musl does not)


def keeping_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process."""
    return _state["keeping"]


def keep_freed_memory(enable: bool = True) -> bool:
    """Make this process's ``malloc`` keep freed large blocks for reuse (``enable=True``) or return them (``False``).

    See the module documentation for why this speeds up CPU inference and training. Process-wide; returns whether the
    setting could be applied (glibc on Linux only; elsewhere nothing changes and ``False`` is returned).
    ``enable=False`` sets both thresholds back to glibc's 128 KiB default and trims the heap (its free pages go back
    to the kernel); free blocks already in the heap may still serve later requests, and glibc's automatic raising
    of the mmap threshold stays off until the process ends.
    """
    libc = _glibc()
    if libc is None:
        log.info("keep_freed_memory: not a glibc system; the allocator is left as it is")
        return False
    mmap_threshold, trim_threshold = (
        (_KEEP_MMAP_THRESHOLD, _KEEP_TRIM_THRESHOLD) if enable else (_DEFAULT_THRESHOLD, _DEFAULT_THRESHOLD)
    )
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
    if not enable:
        libc.malloc_trim(0)
    _state["keeping"] = enable and applied
    return applied


def _prepared_input(module: nn.Module, args):
    """Forward pre-hook of :func:`optimize_for_inference`: hand a leading tensor argument over as the model runs it,
    channels-last (a 4-D one, where asked) and in the model's floating dtype (where one was chosen)."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    dtype = getattr(module, "_inference_dtype", None)
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)
    if getattr(module, "_channels_last_input", False) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return None if x is args[0] else (x,) + tuple(args[1:])


#: dtypes :func:`optimize_for_inference` converts a model to
INFERENCE_DTYPES = (torch.float32, torch.bfloat16)


def native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively in oneDNN (AVX-512 BF16 or AMX). Elsewhere bfloat16 convolutions
    and matrix multiplies are emulated and run several times slower than float32."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and supported is not None and supported())


def optimize_for_inference(
    model: nn.Module,
    *,
    channels_last: bool = True,
    keep_memory: bool = True,
    compile: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Turn ``model`` into its fastest measured inference form on the CPU and return what to call.

    In order: ``eval()``; the deploy form (``model.reparameterize()`` where the model has it: UniRepLKNet,
    ``UniPerceiver``); the weights in ``dtype`` (``torch.bfloat16`` or ``torch.float32``; ``None`` keeps them as
    they are); channels-last weights (``channels_last``); a forward pre-hook that hands the leading tensor input of
    ``model(x)`` over in that dtype and, when 4-D, channels-last (other methods take the input as it comes);
    :func:`keep_freed_memory` for the whole process (``keep_memory``); and ``torch.compile`` (``compile``; off by
    default: the model traces as one graph, but a traced graph runs PyTorch's ops, not our CPU kernels, and on the
    CPU it measured 1.09-2.1x slower than eager for UniRepLKNet-T, float32 and bfloat16, batch 1 and 16; compiling
    takes a minute). The model is changed in place and returned (wrapped by ``torch.compile`` if asked).

    Outputs match the plain eval-mode model within float32 rounding (tested). With ``dtype=torch.bfloat16`` the
    outputs are bfloat16 and the whole network computes in bfloat16 (oneDNN accumulates its matrix multiplies and
    convolutions in float32): on CPUs with native bfloat16 (:func:`native_bfloat16`) this is the fastest way
    measured, with logits within 3% of float32 (max |difference| over max |logit|, tested) and the top-1 agreement
    on trained models reported in ``BENCHMARKS.md``. On other CPUs bfloat16 is emulated, several times slower than
    float32, and a warning says so.
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"optimize_for_inference needs an nn.Module, got {type(model).__name__}")
    if dtype is not None and dtype not in INFERENCE_DTYPES:
        raise ConfigurationError(
            f"optimize_for_inference: dtype must be one of {', '.join(map(str, INFERENCE_DTYPES))} or None, got {dtype}"
        )
    model.eval()
    if callable(getattr(model, "reparameterize", None)):
        model.reparameterize()
    if dtype is not None:
        if dtype == torch.bfloat16 and not native_bfloat16():
            log.warning("optimize_for_inference: this CPU has no native bfloat16 (AVX-512 BF16 or AMX); bfloat16 "
                        "runs emulated, slower than float32")
        model.to(dtype)
        model._inference_dtype = dtype
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model._channels_last_input = True
    if (dtype is not None or channels_last) and not getattr(model, "_prepared_input_hook", False):
        model.register_forward_pre_hook(_prepared_input)
        model._prepared_input_hook = True
    if keep_memory:
        keep_freed_memory(True)
    return torch.compile(model, dynamic=False) if compile else model
