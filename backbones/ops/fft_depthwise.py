"""Depthwise convolution through the FFT, and a weight gradient through the FFT.

A depthwise ``K x K`` correlation costs ``K^2`` multiply-adds per output pixel directly, but about ``log(HW)`` through
the FFT, so the FFT wins for large kernels. On CPUs, PyTorch's own weight gradient of a depthwise convolution is the
slowest part of a training step with large kernels (tens of times slower than its forward pass at K >= 17), while its
forward pass on channels-last input is fast. Two backends follow from that:

* :func:`fft_depthwise_conv2d`: forward and both gradients through ``torch.fft`` (autograd does the backward);
* :func:`direct_forward_fft_weight_grad`: PyTorch's direct convolution (channels-last) for the forward pass and the
  input gradient (which is the same correlation with the kernel rotated by 180 degrees), and the FFT for the weight
  gradient only.

Both compute in float32 (float64 for float64 input) and return the input's dtype.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["fft_depthwise_conv2d", "direct_forward_fft_weight_grad", "fft_weight_grad", "smooth_size"]


@functools.lru_cache(maxsize=None)
def smooth_size(n: int) -> int:
    """The smallest integer >= ``n`` whose only prime factors are 2, 3 and 5 (fast FFT lengths)."""
    best = 1 << max(0, (n - 1).bit_length())
    two = 1
    while two < best:
        three = two
        while three < best:
            five = three
            while five < n:
                five *= 5
            best = min(best, five)
            three *= 3
        two *= 2
    return best


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fft_shape(height: int, width: int, kernel_size: int) -> Tuple[int, int]:
    # linear (not circular) correlation needs at least H + K - 1 samples per axis
    return smooth_size(height + kernel_size - 1), smooth_size(width + kernel_size - 1)


def fft_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Depthwise correlation, stride 1, padding ``K // 2``, through the FFT: ``(B, C, H, W) -> (B, C, H, W)``."""
    _, _, height, width = x.shape
    kernel_size = weight.shape[-1]
    pad = kernel_size // 2
    dtype = _compute_dtype(x.dtype)
    size = _fft_shape(height, width, kernel_size)
    spectrum = torch.fft.rfft2(x.to(dtype), s=size)
    # correlation = convolution with the kernel rotated by 180 degrees
    kernel_spectrum = torch.fft.rfft2(weight[:, 0].flip(-1, -2).to(dtype), s=size)
    y = torch.fft.irfft2(spectrum * kernel_spectrum, s=size)[..., pad : pad + height, pad : pad + width]
    if bias is not None:
        y = y + bias.to(dtype).view(1, -1, 1, 1)
    return y.to(x.dtype)


def fft_weight_grad(x: torch.Tensor, grad_output: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``dL/dW`` of a depthwise correlation: ``(C, 1, K, K)`` in float32 (float64 for float64 input).

    ``dW[c, ky, kx] = sum_{b,h,w} dy[b, c, h, w] * x[b, c, h + ky - K//2, w + kx - K//2]``: a cross-correlation of
    ``x`` with ``dy`` summed over the batch, read at lags ``-K//2 .. K//2``.
    """
    _, _, height, width = x.shape
    pad = kernel_size // 2
    dtype = _compute_dtype(x.dtype)
    size = _fft_shape(height, width, kernel_size)
    spectrum_x = torch.fft.rfft2(x.to(dtype), s=size)
    spectrum_dy = torch.fft.rfft2(grad_output.to(dtype), s=size)
    cross = torch.einsum("bchw,bchw->chw", spectrum_x, spectrum_dy.conj())
    lags = torch.fft.irfft2(cross, s=size)  # lags[c, u, v], circular; u < 0 wraps to the end
    rows = torch.arange(-pad, pad + 1, device=x.device) % size[0]
    cols = torch.arange(-pad, pad + 1, device=x.device) % size[1]
    return lags[:, rows][:, :, cols].unsqueeze(1)


class _DirectForwardFFTWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
        kernel_size = weight.shape[-1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad_output, weight.flip(-1, -2), None, padding=kernel_size // 2, groups=weight.shape[0])
        if ctx.needs_input_grad[1]:
            grad_w = fft_weight_grad(x, grad_output, kernel_size).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_output.sum(dim=(0, 2, 3)).to(weight.dtype)
        return grad_x, grad_w, grad_b


def direct_forward_fft_weight_grad(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Direct channels-last forward and input gradient, FFT weight gradient (see the module docstring)."""
    return _DirectForwardFFTWeightGrad.apply(x, weight, bias)
