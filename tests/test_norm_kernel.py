"""The stem's and downsampling layers' LayerNorm (and the stem's GELU after it) as one call of our CPU kernels: the
same values as PyTorch's ``layer_norm`` and ``gelu``, and used only where it is allowed to be (inference, no hooks,
channels-last float32 or bfloat16 maps)."""

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomise_statistics, relative_error

from backbones import unireplknet
from backbones.ops import cpu_depthwise
from backbones.runtime import optimize_for_inference, reference_ops
from backbones.unireplknet import DownsampleLayer, LayerNorm2d

FLOAT32_TOLERANCE = 1e-5
needs_kernels = pytest.mark.skipif(cpu_depthwise.unavailable_reason() is not None,
                                   reason=str(cpu_depthwise.unavailable_reason()))


@pytest.fixture
def kernel_calls(monkeypatch):
    """The ``gelu`` argument of every call the model code makes to the norm kernel, in order."""
    calls = []
    monkeypatch.setattr(unireplknet, "_MAP_KERNELS", True)  # as on AVX-512, where the kernel is used
    monkeypatch.setattr(unireplknet, "layer_norm_channels_last",
                        lambda *args, **kwargs: calls.append(kwargs.get("gelu", False))
                        or cpu_depthwise.layer_norm_channels_last(*args, **kwargs))
    return calls


def _reference(x, weight, bias, eps, gelu):
    """PyTorch's LayerNorm over channels (then exact GELU) in float64."""
    y = F.layer_norm(x.double().permute(0, 2, 3, 1), (x.shape[1],), weight.double(), bias.double(), eps)
    y = y.permute(0, 3, 1, 2)
    return F.gelu(y) if gelu else y


# channel counts that fill whole vectors (16, 48, 80, 128, 320), straddle them (3, 7, 17, 20, 24, 40, 100, 129) and a
# single one (on AVX-512 17 to 128 channels take the per-pixel moments); pixel counts that leave a tail past the last
# group of 16 pixels
@needs_kernels
@pytest.mark.parametrize("gelu", [False, True], ids=["norm", "norm+gelu"])
@pytest.mark.parametrize("shape", [(2, 20, 9, 7), (1, 40, 16, 16), (3, 3, 5, 11), (2, 7, 4, 4), (1, 1, 3, 5),
                                   (2, 16, 6, 6), (1, 24, 5, 5), (2, 48, 3, 9), (1, 80, 7, 7), (2, 320, 3, 3),
                                   (1, 17, 4, 5), (1, 100, 5, 5), (2, 128, 3, 5), (1, 129, 2, 9)],
                         ids=str)
def test_norm_kernel_matches_layer_norm_and_gelu(shape, gelu):
    channels = shape[1]
    x = (torch.randn(shape) * 3 + 2).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(channels), torch.randn(channels)
    ours = cpu_depthwise.layer_norm_channels_last(x, weight, bias, 1e-6, gelu)
    expected = _reference(x, weight, bias, 1e-6, gelu)
    assert ours.shape == x.shape and ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(ours.double(), expected) < FLOAT32_TOLERANCE
    # an NCHW map is read through a copy: the same values
    assert torch.equal(cpu_depthwise.layer_norm_channels_last(x.contiguous(), weight, bias, 1e-6, gelu), ours)


@needs_kernels
@pytest.mark.parametrize("gelu", [False, True], ids=["norm", "norm+gelu"])
def test_norm_kernel_of_bfloat16_maps_is_float32_arithmetic_rounded_once(gelu):
    x = torch.randn(2, 40, 9, 9).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(40).to(torch.bfloat16), torch.randn(40).to(torch.bfloat16)
    ours = cpu_depthwise.layer_norm_channels_last(x, weight, bias, 1e-6, gelu)
    expected = _reference(x, weight, bias, 1e-6, gelu)
    assert ours.dtype == torch.bfloat16
    # one rounding to bfloat16 (8 significant bits) of values near the float64 result
    assert ((ours.double() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-6).all()


@needs_kernels
def test_norm_kernel_is_accurate_far_from_zero_and_on_constant_pixels():
    x = (1000 + torch.randn(2, 20, 8, 8)).contiguous(memory_format=torch.channels_last)  # mean >> spread
    x[0, :, 0, 0] = 5.0  # a constant pixel: variance 0, output = bias
    weight, bias = torch.randn(20), torch.randn(20)
    ours = cpu_depthwise.layer_norm_channels_last(x, weight, bias, 1e-6, False)
    expected = _reference(x, weight, bias, 1e-6, False)
    assert relative_error(ours.double(), expected) < 1e-4  # float32 keeps ~7 digits of 1000 + noise
    assert torch.allclose(ours[0, :, 0, 0], bias)


@needs_kernels
def test_norm_kernel_keeps_a_non_finite_pixel_to_itself():
    x = torch.randn(1, 20, 5, 5).contiguous(memory_format=torch.channels_last)
    x[0, 3, 2, 2] = float("nan")
    x[0, 5, 4, 1] = float("inf")
    weight, bias = torch.randn(20), torch.randn(20)
    for gelu in (False, True):
        ours = cpu_depthwise.layer_norm_channels_last(x, weight, bias, 1e-6, gelu)
        expected = _reference(x, weight, bias, 1e-6, gelu)
        bad = ~torch.isfinite(expected)
        assert torch.equal(~torch.isfinite(ours), bad) and bad[0, :, 2, 2].all() and bad[0, :, 4, 1].all()
        assert relative_error(ours[~bad].double(), expected[~bad]) < FLOAT32_TOLERANCE


@needs_kernels
def test_norm_kernel_of_an_empty_batch_and_what_it_refuses():
    weight, bias = torch.ones(8), torch.zeros(8)
    empty = cpu_depthwise.layer_norm_channels_last(torch.randn(0, 8, 4, 4), weight, bias, 1e-6, True)
    assert empty.shape == (0, 8, 4, 4)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU map"):
        cpu_depthwise.layer_norm_channels_last(torch.randn(1, 8, 4, 4, dtype=torch.float64), weight, bias, 1e-6, False)
    with pytest.raises(RuntimeError, match="one value per channel"):
        cpu_depthwise.layer_norm_channels_last(torch.randn(1, 9, 4, 4), weight, bias, 1e-6, False)


@needs_kernels
def test_layer_norm_module_takes_the_kernel_only_at_inference_on_channels_last_maps(kernel_calls):
    norm = LayerNorm2d(20, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 20, 6, 6).contiguous(memory_format=torch.channels_last)
    expected = _reference(x, norm.weight, norm.bias, 1e-6, False)
    with torch.no_grad():
        assert relative_error(norm(x).double(), expected) < FLOAT32_TOLERANCE
        assert kernel_calls == [False]
        norm(x.contiguous())  # NCHW: PyTorch's op
        with reference_ops():
            norm(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norm(x)
        assert kernel_calls == [False]
        wide = LayerNorm2d(unireplknet._NORM_KERNEL_MAX_CHANNELS + 16)
        wide(torch.randn(1, wide.weight.numel(), 3, 3).contiguous(memory_format=torch.channels_last))
        assert kernel_calls == [False], "LayerNorm alone on wide maps runs PyTorch's op"
    out = norm(x)  # a graph to record: PyTorch's op, with gradients
    assert kernel_calls == [False] and out.requires_grad
    out.sum().backward()
    assert norm.weight.grad is not None


def _channels_last_atto():
    """UniRepLKNet-A (eval, random statistics) and a 32 px input, both channels-last."""
    model = randomise_statistics(timm.create_model("unireplknet_a", num_classes=0).eval())
    return model.to(memory_format=torch.channels_last), torch.randn(2, 3, 32, 32).contiguous(
        memory_format=torch.channels_last)


@needs_kernels
def test_the_kernel_runs_only_where_a_vector_is_one_register(monkeypatch):
    from backbones.ops.policy import cpu_isa

    assert unireplknet._MAP_KERNELS == (cpu_isa() == "AVX512"), "measured faster than PyTorch's op only there"
    kernel_calls = []
    monkeypatch.setattr(unireplknet, "layer_norm_channels_last", lambda *args, **kwargs: kernel_calls.append(1))
    monkeypatch.setattr(unireplknet, "_MAP_KERNELS", False)  # as on AVX2
    model, x = _channels_last_atto()
    with torch.no_grad():
        with reference_ops():
            expected = model(x)
        assert relative_error(model(x), expected) < FLOAT32_TOLERANCE
    assert kernel_calls == [], "PyTorch's layer_norm and gelu"


@needs_kernels
def test_stem_runs_norm_and_gelu_in_one_call_unless_hooked(kernel_calls, monkeypatch):
    # A's second convolution would take its LayerNorm into its own call (tests/test_narrow_kernels.py): not here
    monkeypatch.setattr(unireplknet, "_NARROW_LINEAR", False)
    model, x = _channels_last_atto()
    stem = model.downsample_layers[0]
    assert isinstance(stem, DownsampleLayer) and isinstance(stem[1], LayerNorm2d)
    with torch.no_grad():
        with reference_ops():
            expected = stem(x)
        assert relative_error(stem(x), expected) < FLOAT32_TOLERANCE
        assert kernel_calls == [True, False]  # LayerNorm+GELU, then the second LayerNorm
        seen = []
        handle = stem[2].register_forward_hook(lambda module, args, out: seen.append(out.shape))
        hooked = stem(x)
        handle.remove()
    assert seen == [torch.Size([2, 20, 16, 16])], "a hooked GELU runs as a module"
    assert kernel_calls == [True, False, False, False]
    assert relative_error(hooked, expected) < FLOAT32_TOLERANCE


@needs_kernels
def test_optimized_model_with_the_norm_kernel_matches_the_reference():
    torch.manual_seed(0)
    model = randomise_statistics(timm.create_model("unireplknet_a", num_classes=10).eval())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), reference_ops():
        expected = model(x)
    fast = optimize_for_inference(model, keep_memory=False)
    with torch.no_grad():
        assert relative_error(fast(x), expected) < FLOAT32_TOLERANCE
