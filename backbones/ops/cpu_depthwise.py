"""Our direct depthwise-convolution kernels for the CPU (float32 and bfloat16), compiled on first use.

PyTorch runs a CPU depthwise convolution through oneDNN, which on large kernels reaches a fraction of what the
machine's vector units allow and whose weight gradient is many times slower than its forward pass (tens of times at
13x13, see ``benchmarks/dwconv.py``). ``csrc/depthwise_cpu.cpp`` computes the forward pass and the weight gradient
directly on channels-last maps: each task copies a band of the input, for 16 channels at a time, into a zero-padded
contiguous buffer, then keeps up to 14 output pixels (forward) or up to 16 kernel taps (weight gradient) in vector
registers (7 of either with AVX2, whose 16 registers hold half as many 16-float vectors); for the usual kernel sizes
(13, 7, 5, 3 and the 5 and 7 training branches at dilation 2) on AVX-512 it keeps a kernel row's weights (forward)
or 14 output-gradient pixels (weight gradient) in registers too, so each input pixel is loaded once per kernel row,
and it skips the kernel rows that meet only the padding above and below the image. The input gradient is the forward
pass with the kernel rotated by 180 degrees. bfloat16 maps are read into the float32 buffers and the outputs rounded
back to bfloat16 (round to nearest even), so all arithmetic is float32. Results are float32 sums in a different
order than oneDNN's, so they agree with ``F.conv2d`` to float32 rounding, not bit for bit.

The same extension computes GRN's spatial sum of squares (:func:`spatial_square_sum`) in one pass, and at inference
GRN's whole channel factor (:func:`grn_scale`) and squeeze-and-excitation's (:func:`se_scale`) and the multiply of a
map by either (:func:`channel_scale_`), for the blocks' fast path, and the stem's and downsampling layers' LayerNorm
over channels, with the GELU after it where there is one (:func:`layer_norm_channels_last`).

The source is compiled with ``torch.utils.cpp_extension`` the first time a process needs it (about 30 s; g++, the
Python headers and ninja are needed), for the CPU it runs on (``-march=native``), and cached under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in a folder named after the source's and the CPU's
fingerprint, so a changed source or another CPU gets its own build. ``python -m backbones.ops`` builds
it ahead of time (the quick-start script does). Where it cannot be built the backend reports why and the dispatcher
uses PyTorch's convolution instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .prepacked import kept_copy

__all__ = [
    "channel_scale_", "cpu_direct_depthwise_conv2d", "build_source", "extension", "grn_scale",
    "layer_norm_channels_last", "NARROW_MAX_OUTPUTS", "narrow_conv3x3_s2", "narrow_linear", "narrow_linear_available", "se_scale",
    "spatial_square_sum", "unavailable_reason", "SOURCE",
]

SOURCE = Path(__file__).with_name("csrc") / "depthwise_cpu.cpp"
_LOG = logging.getLogger(__name__)
_LOCK = threading.Lock()
_FAILURE: Optional[str] = None
_MODULE = None


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's model name and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(fields) or platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def _flags() -> list:
    """The compiler flags the kernels are built with (for this CPU: ``-march=native``; errno is not set by the math
    functions, so loops over ``sqrt`` vectorise)."""
    native = "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native"
    return ["-O3", "-fno-math-errno", "-fopenmp", native]


def _build_name(source: Path = SOURCE) -> str:
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update(" ".join(_flags()).encode())
    digest.update(_cpu_fingerprint().encode())
    digest.update(torch.__version__.encode())
    return f"uniperception_depthwise_cpu_{digest.hexdigest()[:16]}"


def _missing_tools() -> Optional[str]:
    if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return f"no build flags for {platform.machine()}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return "no C++ compiler found (install g++)"
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").exists():
        return f"the Python headers are missing ({include}/Python.h; install python3-dev)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except (ImportError, RuntimeError):
        return "ninja is not installed (pip install ninja)"
    return None


def extension(verbose: bool = False):
    """The compiled module (building it on first call); raises ``RuntimeError`` saying why it cannot be built."""
    global _MODULE, _FAILURE
    if _MODULE is not None:
        return _MODULE
    with _LOCK:
        if _MODULE is None and _FAILURE is None:
            missing = _missing_tools()
            if missing:
                _FAILURE = f"cannot build the CPU depthwise kernels: {missing}"
            else:
                try:
                    _MODULE = build_source(SOURCE, verbose)
                except Exception as exc:  # a compiler error: said once, PyTorch's convolution is used instead
                    _FAILURE = f"building the CPU depthwise kernels failed ({type(exc).__name__}: {str(exc)[-500:]})"
        if _FAILURE is not None:
            raise RuntimeError(_FAILURE)
        return _MODULE


def build_source(source: Path, verbose: bool = False):
    """Compile (or load the cached build of) a version of ``csrc/depthwise_cpu.cpp`` at ``source`` with the flags the
    kernels are built with, as a module named after its contents (``benchmarks/dwconv_versions.py`` builds an
    earlier version this way to time it beside the current one)."""
    from torch.utils.cpp_extension import load

    name = _build_name(source)
    _LOG.info("compiling the CPU depthwise-convolution kernels (%s, once per machine, about 30 s)", name)
    return load(name=name, sources=[str(source)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"], verbose=verbose)


def unavailable_reason() -> Optional[str]:
    """``None`` when the kernels are built (building them now if needed), else why they cannot be."""
    try:
        extension()
    except RuntimeError as exc:
        return str(exc)
    return None


# a weight -> its blocked copy (under the key "blocked"), for weights that do not change (see prepacked.kept_copy)
_BLOCKED = WeakIdKeyDictionary()


def _blocked(ext, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (C, 1, K, K) as the kernels read it (16-channel blocks of the K x K taps, float32): kept between
    calls for a weight no gradient flows to (inference, a frozen layer), where making it costs about a third of the
    convolution of a small map (93 us against 340 us at 14x14x320, 13x13, batch 1); made afresh for a weight being
    trained or one made in inference mode (which has no version counter to tell when it changes)."""
    return _kept_unless_changing(weight, "blocked", lambda: ext.blocked_weight(weight), _BLOCKED)


def _kept_unless_changing(weight: torch.Tensor, key: str, make, table: WeakIdKeyDictionary) -> torch.Tensor:
    """``make()``'s copy of ``weight``, kept in ``table`` under ``key`` (:func:`prepacked.kept_copy`) for a weight no
    gradient flows to; made afresh for a weight being trained or one made in inference mode (no version counter to
    tell when it changes)."""
    if (weight.requires_grad and torch.is_grad_enabled()) or weight.is_inference():
        return make()
    return kept_copy(weight, key, make, table=table)


class _CPUDirectDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dilation):
        ext = extension()
        ctx.save_for_backward(x, weight)
        ctx.dilation, ctx.bias_dtype = dilation, None if bias is None else bias.dtype
        return ext.forward_blocked(x, _blocked(ext, weight), bias, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        ext = extension()
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the input gradient of a "same" correlation is the correlation with the kernel rotated by 180 degrees
            grad_x = ext.forward(grad_output, weight.flip(-1, -2), None, ctx.dilation)
            if x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
                grad_x = grad_x.contiguous()
        if ctx.needs_input_grad[1]:
            grad_w = ext.weight_grad(x, grad_output, weight.shape[-1], ctx.dilation).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_output.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def cpu_direct_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                                dilation: int = 1) -> torch.Tensor:
    """Depthwise correlation, stride 1, padding ``dilation * (K // 2)``: ``(B, C, H, W) -> (B, C, H, W)``
    (channels-last memory), float32 or bfloat16 CPU tensors (float32 arithmetic; the weight gradient is summed in
    float32, then rounded to the weight's dtype), with the gradients of all three."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _CPUDirectDepthwise.apply(x, weight, bias, int(dilation))
    ext = extension()  # no graph to record: the kernels straight away (an autograd function costs ~13 us a call)
    return ext.forward_blocked(x, _blocked(ext, weight), bias, int(dilation))


class _SpatialSquareSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return extension().spatial_square_sum(x)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return x * (2 * grad_output)


def grn_scale(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """GRN's channel factor ``gamma * G / (mean_C G + 1e-6) + 1`` with ``G = ||x||_2`` over (H, W), ``(B, 1, 1, C)``,
    of a float32 or bfloat16 CPU map ``(B, H, W, C)`` and a ``gamma`` of ``C`` values, in one call (float32
    arithmetic; the result in ``x``'s and ``gamma``'s promoted dtype); not differentiable (inference)."""
    return extension().grn_scale(x, gamma)


def se_scale(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor, up_weight: torch.Tensor,
             up_bias: torch.Tensor) -> torch.Tensor:
    """Squeeze-and-excitation's channel factor ``sigmoid(up(relu(down(mean_HW x))))``, ``(B, C, 1, 1)``, of a
    float32 or bfloat16 CPU map ``(B, C, H, W)`` (channels-last memory avoids a copy) with 1x1-convolution weights
    ``(R, C, 1, 1)`` and ``(C, R, 1, 1)`` (or the same as matrices), in one call (float32 arithmetic, rounded once to
    the map's and weights' promoted dtype); not differentiable (inference)."""
    return extension().se_scale(x, down_weight, down_bias, up_weight, up_bias)


def channel_scale_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x.mul_(scale.to(x.dtype))`` for a contiguous float32 or bfloat16 CPU map ``x`` ``(B, H, W, C)`` and a
    per-sample channel factor of ``B * C`` values (``(B, 1, 1, C)``, GRN's and SE's), in one call of our kernels, the
    same products (float32 arithmetic, one rounding for bfloat16); returns ``x``; not differentiable (inference)."""
    return extension().channel_scale_(x, scale)


def layer_norm_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                             gelu: bool = False) -> torch.Tensor:
    """LayerNorm over the channels of a float32 or bfloat16 CPU map ``(B, C, H, W)`` (channels-last memory avoids a
    copy) with a ``weight`` and ``bias`` of ``C`` values, followed by the exact (erf) GELU where ``gelu``, in one call:
    the same shape, channels-last memory, in ``x``'s dtype (float32 arithmetic, rounded once); not differentiable
    (inference). The GELU's erf is a polynomial approximation with an absolute error of at most 1.5e-7."""
    return extension().layer_norm_channels_last(x, weight, bias, float(eps), bool(gelu))


# a Linear weight -> its packed copy for narrow_linear (see prepacked.kept_copy)
_NARROW = WeakIdKeyDictionary()
#: the most outputs :func:`narrow_linear` takes
NARROW_MAX_OUTPUTS = 48


def narrow_linear_available() -> bool:
    """Whether :func:`narrow_linear` runs here: our kernels built, with AVX-512 (on other builds oneDNN's Linear is
    used)."""
    return unavailable_reason() is None and bool(extension().narrow_linear_supported())


def narrow_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None, input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias) (+ residual)`` for a contiguous float32 CPU input ``(..., K)`` and a weight of at
    most :data:`NARROW_MAX_OUTPUTS` outputs ``(N, K)``, in one call of our kernels (AVX-512 builds only, see
    :func:`narrow_linear_available`): ``(..., N)`` float32, the residual (contiguous, of that shape) added in the same
    pass. With ``input_scale`` ``(S, K)`` the input is ``x`` with its channels multiplied by a factor per sample
    (the rows split evenly into ``S`` samples: GRN's factor for a ``(S, H, W, K)`` map), applied to ``S`` copies of
    the weight instead of the map. The weight's packed copy is kept between calls for a weight that is not being
    trained; not differentiable (inference)."""
    ext = extension()
    packed = _kept_unless_changing(weight, "narrow", lambda: ext.narrow_weight(weight), _NARROW)
    return ext.narrow_linear(x, packed, bias, residual, input_scale, weight.shape[0])


def narrow_conv3x3_s2(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=2, padding=1)`` for a channels-last float32 CPU map ``(B, Cin, H, W)`` and a
    3x3 weight of at most :data:`NARROW_MAX_OUTPUTS` outputs ``(N, Cin, 3, 3)``, followed by a LayerNorm over the
    ``N`` output channels (``norm_weight``, ``norm_bias``, ``eps``) where given, in one call of our kernels (AVX-512
    builds only, see :func:`narrow_linear_available`): ``(B, N, ceil(H / 2), ceil(W / 2))``, channels-last memory.
    The weight's packed copy is kept between calls as :func:`narrow_linear` keeps it; not differentiable
    (inference)."""
    ext = extension()
    packed = _kept_unless_changing(weight, "narrow conv", lambda: ext.narrow_conv_weight(weight), _NARROW)
    return ext.narrow_conv3x3_s2(x, packed, bias, norm_weight, norm_bias, float(eps), weight.shape[0])


def spatial_square_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.square().sum(dim=(1, 2), keepdim=True)`` of a float32 CPU map ``(B, H, W, C)`` in one pass, with no
    temporary the size of the map (GRN's norm); differentiable."""
    return _SpatialSquareSum.apply(x)


def main(argv=None) -> int:
    """Build the kernels now (``python -m backbones.ops``) and check them against ``F.conv2d``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    try:
        extension(verbose=args.verbose)
    except RuntimeError as exc:
        print(f"{exc}; depthwise convolutions will use PyTorch's", file=sys.stderr)
        return 1
    x = torch.randn(2, 24, 9, 11).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(24, 1, 7, 7), torch.randn(24)
    expected = torch.nn.functional.conv2d(x, weight, bias, padding=3, groups=24)
    error = (cpu_direct_depthwise_conv2d(x, weight, bias) - expected).abs().max().item()
    if not error <= 1e-4 * expected.abs().max().item():
        print(f"the CPU depthwise kernels disagree with F.conv2d (max error {error:.3g})", file=sys.stderr)
        return 1
    print(f"CPU depthwise kernels ready ({_build_name()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
