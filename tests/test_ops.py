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
