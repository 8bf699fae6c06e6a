"""Triton kernels for depthwise convolution, stride 1, "same" padding, odd K (3..31): forward, input gradient and
weight gradient, for float32, float16 and bfloat16 with float32 accumulation and a fused bias.

Layout: NCHW contiguous. The input gradient of a "same" depthwise correlation is the same correlation of the output
gradient with the kernel rotated by 180 degrees, so it reuses the forward kernel. The weight gradient reduces over
batch and space for every tap; the batch is split across programs and the partial sums added in float32.

On a machine without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the
test suite checks them.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["triton_depthwise_conv2d", "depthwise_forward", "depthwise_weight_grad", "weight_grad_splits"]

MAX_KERNEL_SIZE = 31


@triton.jit
def _depthwise_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C, H, W,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program: one (batch, channel) plane, one BLOCK_H x BLOCK_W output tile."""
    plane = tl.program_id(0)
    tile = tl.program_id(1)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tile_h = tile // tiles_w
    tile_w = tile % tiles_w
    channel = plane % C
    base = plane.to(tl.int64) * H * W
    rows = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tile_w * BLOCK_W + tl.arange(0, BLOCK_W)
    pad: tl.constexpr = K // 2
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for ky in range(K):
        in_rows = rows + (ky - pad)
        row_ok = (in_rows >= 0) & (in_rows < H)
        for kx in range(K):
            in_cols = cols + (kx - pad)
            col_ok = (in_cols >= 0) & (in_cols < W)
            tap = tl.load(w_ptr + channel * K * K + ky * K + kx).to(tl.float32)
            values = tl.load(
                x_ptr + base + in_rows[:, None] * W + in_cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += values.to(tl.float32) * tap
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel).to(tl.float32)
    out_mask = (rows < H)[:, None] & (cols < W)[None, :]
    tl.store(y_ptr + base + rows[:, None] * W + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _depthwise_weight_grad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    B, C,
    H: tl.constexpr, W: tl.constexpr, BATCHES_PER_PROGRAM: tl.constexpr,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program: one (channel, kernel row ky) pair and one slice of the batch; all K taps of that row at once.

    ``dw[split, c, ky, kx] = sum_{b in slice, h, w} dy[b, c, h, w] * x[b, c, h + ky - K//2, w + kx - K//2]``.
    """
    pair = tl.program_id(0)
    split = tl.program_id(1)
    channel = pair // K
    ky = pair % K
    pad: tl.constexpr = K // 2
    taps = tl.arange(0, BLOCK_K)
    tap_ok = taps < K
    acc = tl.zeros((BLOCK_K, BLOCK_W), dtype=tl.float32)
    for i in range(BATCHES_PER_PROGRAM):
        batch = split * BATCHES_PER_PROGRAM + i
        batch_ok = batch < B
        base = (batch.to(tl.int64) * C + channel) * H * W
        for h in range(H):
            in_row = h + ky - pad
            row_ok = batch_ok & (in_row >= 0) & (in_row < H)
            for w0 in range(0, W, BLOCK_W):
                cols = w0 + tl.arange(0, BLOCK_W)
                col_ok = cols < W
                grad = tl.load(dy_ptr + base + h * W + cols, mask=col_ok & row_ok, other=0.0).to(tl.float32)
                in_cols = cols[None, :] + taps[:, None] - pad
                ok = tap_ok[:, None] & col_ok[None, :] & (in_cols >= 0) & (in_cols < W) & row_ok
                values = tl.load(x_ptr + base + in_row * W + in_cols, mask=ok, other=0.0).to(tl.float32)
                acc += values * grad[None, :]
    total = tl.sum(acc, axis=1)
    tl.store(dw_ptr + (split * C + channel) * K * K + ky * K + taps, total, mask=tap_ok)


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    kernel_size = weight.shape[-1]
    if x.ndim != 4 or weight.shape != (x.shape[1], 1, kernel_size, kernel_size) or kernel_size % 2 == 0:
        raise ValueError(f"depthwise conv expects x (B, C, H, W) and weight (C, 1, K, K) with odd K, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if kernel_size > MAX_KERNEL_SIZE:
        raise ValueError(f"the Triton depthwise kernels support K <= {MAX_KERNEL_SIZE}, got {kernel_size}")
    return kernel_size


def _tile(size: int) -> int:
    return 16 if size <= 16 else 32


def depthwise_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C, H, W)`` in ``x``'s dtype; weight and bias may have another dtype.

    ``out`` (contiguous, ``x``'s shape and dtype) receives the result when given; every element is written.
    """
    kernel_size = _check(x, weight)
    x = x.contiguous()
    weight = weight.contiguous()
    batch, channels, height, width = x.shape
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)}")
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    if y.numel() == 0:
        return y
    block_h, block_w = _tile(height), _tile(width)
    grid = (batch * channels, triton.cdiv(height, block_h) * triton.cdiv(width, block_w))
    _depthwise_forward_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        channels, height, width,
        K=kernel_size, HAS_BIAS=bias is not None, BLOCK_H=block_h, BLOCK_W=block_w,
    )
    return y


def weight_grad_splits(batch: int, channels: int, kernel_size: int):
    """How the weight gradient splits the batch: ``(number of slices, batches per slice)``.

    Enough programs to fill a large GPU even when ``C * K`` is small, without splitting the batch needlessly.
    """
    wanted = max(1, 1024 // max(1, channels * kernel_size))
    splits = min(batch, wanted)
    per_program = triton.cdiv(batch, splits)
    return triton.cdiv(batch, per_program), per_program


def depthwise_weight_grad(
    x: torch.Tensor, grad_output: torch.Tensor, kernel_size: int, partial: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Gradient of the loss with respect to the depthwise kernel: ``(C, 1, K, K)`` in float32.

    ``partial`` optionally provides the float32 buffer for the per-program partial sums, shape
    ``(splits, C, K, K)`` as :func:`weight_grad_splits` gives; every element is written.
    """
    x = x.contiguous()
    grad_output = grad_output.contiguous()
    batch, channels, height, width = x.shape
    splits, per_program = weight_grad_splits(batch, channels, kernel_size)
    if partial is None:
        partial = torch.empty(splits, channels, kernel_size, kernel_size, device=x.device, dtype=torch.float32)
    grid = (channels * kernel_size, splits)
    _depthwise_weight_grad_kernel[grid](
        x, grad_output, partial,
        batch, channels,
        H=height, W=width, BATCHES_PER_PROGRAM=per_program, K=kernel_size,
        BLOCK_K=triton.next_power_of_2(kernel_size), BLOCK_W=min(64, triton.next_power_of_2(width)),
    )
    return partial.sum(dim=0).unsqueeze(1)


class _TritonDepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return depthwise_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = depthwise_forward(grad_output, weight.flip(-1, -2), None).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, grad_output, weight.shape[-1]).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_output.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b


def triton_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
    """Autograd-aware depthwise convolution through the Triton kernels (stride 1, padding ``K // 2``)."""
    return _TritonDepthwiseConv2d.apply(x, weight, bias)
