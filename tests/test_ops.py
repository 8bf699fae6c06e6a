"""The pluggable depthwise-convolution op keeps the official parameter names and dispatches to backends."""

import pytest
import torch

from backbones import ConfigurationError, DepthwiseConv2d, InputShapeError
from backbones.ops import available_backends, depthwise_conv2d, register_backend


@pytest.mark.parametrize("kernel_size", [3, 7, 13, 31])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_a_float64_depthwise_convolution(kernel_size, bias):
    layer = DepthwiseConv2d(6, kernel_size, bias=bias)
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    x = torch.randn(2, 6, 19, 23)
    expected = torch.nn.functional.conv2d(
        x.double(), layer.weight.double(), None if not bias else layer.bias.double(),
        padding=kernel_size // 2, groups=6,
    )
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)
    assert list(dict(layer.named_parameters())) == (["weight", "bias"] if bias else ["weight"])
    assert layer.weight.shape == (6, 1, kernel_size, kernel_size)


def test_gradients_flow():
    layer = DepthwiseConv2d(3, 7, bias=True)
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and layer.bias.grad is not None


def test_a_registered_backend_is_used(monkeypatch):
    calls = []

    def recording_backend(x, weight, bias):
        calls.append(tuple(x.shape))
        return torch.nn.functional.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    register_backend("recording", recording_backend)
    assert "recording" in available_backends()
    layer = DepthwiseConv2d(4, 5, backend="recording")
    x = torch.randn(1, 4, 9, 9)
    assert torch.equal(layer(x), depthwise_conv2d(x, layer.weight, None, backend="torch"))
    assert calls == [(1, 4, 9, 9)]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigurationError, match="positive odd"):
        DepthwiseConv2d(4, 4)
    with pytest.raises(ConfigurationError, match="unknown depthwise backend 'nope'"):
        depthwise_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), backend="nope")
    with pytest.raises(ConfigurationError, match="callable"):
        register_backend("broken", 42)
    with pytest.raises(InputShapeError, match=r"\(B, 4, H, W\)"):
        DepthwiseConv2d(4, 3)(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("size, kernel_size, backend", [
    ((1, 1), 13, "auto"), ((2, 2), 13, "auto"), ((2, 3), 31, "fft"), ((4, 1), 7, "torch_channels_last"),
    ((3, 5), 17, "direct_fft_weight_grad"), ((8, 8), 13, "auto"), ((1, 2), 3, "torch"),
])
def test_kernels_wider_than_the_input_give_the_whole_kernels_output_and_gradients(size, kernel_size, backend):
    # taps that only ever meet padding are cut off (a 1x1 map keeps a per-channel scale): nothing may change
    from backbones.ops import central_taps

    torch.manual_seed(0)
    x = torch.randn(3, 5, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 1, kernel_size, kernel_size, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    reference = torch.nn.functional.conv2d(x, weight, bias, padding=kernel_size // 2, groups=5)
    expected = torch.autograd.grad(reference.square().sum(), (x, weight, bias))
    out = depthwise_conv2d(x, weight, bias, backend=backend)
    got = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    assert torch.allclose(out, reference, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    reach = 2 * max(size) - 1
    assert central_taps(weight, *size).shape[-1] == min(kernel_size, reach)
    assert central_taps(weight, 64, 64) is weight
    assert central_taps(weight, *size, dilation=3).shape[-1] == min(kernel_size, 2 * ((max(size) - 1) // 3) + 1)


def test_a_small_input_through_the_dilated_reparam_block_matches_every_branch_in_full():
    from backbones.unireplknet import DilatedReparamBlock

    torch.manual_seed(0)
    block = DilatedReparamBlock(6, 13).double().train()
    for size in [(1, 1), (2, 2), (3, 2), (5, 5)]:
        x = torch.randn(4, 6, *size, dtype=torch.float64, requires_grad=True)
        out = block(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
        # the same sum with every convolution at its full size
        full = block.origin_bn(torch.nn.functional.conv2d(x, block.lk_origin.weight, padding=6, groups=6))
        for k, r in zip(block.kernel_sizes, block.dilates, strict=True):
            conv = getattr(block, f"dil_conv_k{k}_{r}")
            full = full + getattr(block, f"dil_bn_k{k}_{r}")(conv(x))
        expected = torch.autograd.grad(full.square().sum(), [x, *block.parameters()])
        assert torch.allclose(out, full, rtol=1e-10, atol=1e-10)
        for a, b in zip(grads, expected, strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)
