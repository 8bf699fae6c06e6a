"""Linears and 3x3 stride-2 convolutions with few outputs (33 to 48: UniRepLKNet-A's first-stage ``Linear2`` and its
second stem convolution) as one call of our CPU kernels: the same values as PyTorch's ops, the LayerNorm and the
residual add in the same pass, refusals of what they cannot take, and used only where they are allowed to be
(inference, float32, channels-last, no hooks, AVX-512 builds)."""

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import relative_error

from backbones import unireplknet
from backbones.ops import cpu_depthwise
from backbones.runtime import optimize_for_inference, reference_ops

FLOAT32_TOLERANCE = 1e-5
needs_narrow = pytest.mark.skipif(cpu_depthwise.unavailable_reason() is not None
                                  or not cpu_depthwise.narrow_linear_available(),
                                  reason="our CPU kernels have no narrow Linear here (built without AVX-512)")


@pytest.fixture
def narrow_calls(monkeypatch):
    """The kernel name of every narrow call the model code makes, in order (``narrow_linear+grn`` where GRN's factor
    was handed to the kernel instead of scaling the map)."""
    calls = []

    def spy(name):
        kernel = getattr(cpu_depthwise, name)

        def call(*args, **kwargs):
            folded = name == "narrow_linear" and len(args) > 4 and args[4] is not None
            calls.append(name + ("+grn" if folded else ""))
            return kernel(*args, **kwargs)
        return call

    for name in ("narrow_linear", "narrow_conv3x3_s2"):
        monkeypatch.setattr(unireplknet, name, spy(name))
    return calls


@needs_narrow
@pytest.mark.parametrize("outputs", [33, 40, 48])
@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 50])  # whole blocks of 6 rows, a tail, a tail alone, none
@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (True, False), (False, True)],
                         ids=["bias+residual", "bias", "residual"])
def test_narrow_linear_matches_linear(outputs, rows, with_bias, with_residual):
    inputs = 160
    x = torch.randn(2, rows, inputs) * 2
    weight = torch.randn(outputs, inputs) * inputs**-0.5
    bias = torch.randn(outputs) if with_bias else None
    residual = torch.randn(2, rows, outputs) if with_residual else None
    ours = cpu_depthwise.narrow_linear(x, weight, bias, residual)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    if residual is not None:
        expected = expected + residual.double()
    assert ours.shape == (2, rows, outputs) and ours.dtype == torch.float32
    if rows:
        assert relative_error(ours.double(), expected) < FLOAT32_TOLERANCE


@needs_narrow
@pytest.mark.parametrize("pixels", [1, 6, 13, 36])  # per sample: a tail alone, whole blocks, both
def test_narrow_linear_with_a_per_sample_input_scale_matches_scaling_the_input(pixels):
    batch, inputs, outputs = 3, 64, 40
    x = torch.randn(batch, pixels, inputs)
    weight, bias = torch.randn(outputs, inputs) * inputs**-0.5, torch.randn(outputs)
    residual = torch.randn(batch, pixels, outputs)
    scale = torch.rand(batch, inputs) * 2
    ours = cpu_depthwise.narrow_linear(x, weight, bias, residual, scale)
    expected = F.linear(x.double() * scale.double()[:, None, :], weight.double(), bias.double()) + residual.double()
    assert relative_error(ours.double(), expected) < FLOAT32_TOLERANCE
    with pytest.raises(RuntimeError, match="split the rows evenly"):
        cpu_depthwise.narrow_linear(x, weight, bias, None, torch.rand(5, inputs))  # rows 3 x pixels
    with pytest.raises(RuntimeError, match="split the rows evenly"):
        cpu_depthwise.narrow_linear(x, weight, bias, None, torch.rand(batch, inputs + 1))


@needs_narrow
def test_narrow_linear_of_few_inputs_no_inputs_and_non_finite_values():
    weight, bias = torch.randn(40, 3), torch.randn(40)
    x = torch.randn(13, 3)
    assert relative_error(cpu_depthwise.narrow_linear(x, weight, bias).double(),
                          F.linear(x.double(), weight.double(), bias.double())) < FLOAT32_TOLERANCE
    # no inputs: every row is the bias
    assert torch.equal(cpu_depthwise.narrow_linear(torch.empty(4, 0), torch.empty(40, 0), bias), bias.expand(4, 40))
    # a NaN or inf stays in its own row
    x[2, 1], x[7, 0] = float("nan"), float("inf")
    ours = cpu_depthwise.narrow_linear(x, weight, bias)
    assert ours[2].isnan().all() and not ours[7].isfinite().any()
    finite = [i for i in range(13) if i not in (2, 7)]
    assert torch.isfinite(ours[finite]).all()


@needs_narrow
def test_narrow_linear_refuses_what_it_cannot_take():
    x, weight = torch.randn(5, 16), torch.randn(40, 16)
    with pytest.raises(RuntimeError, match="1 <= N <= 48"):
        cpu_depthwise.narrow_linear(x, torch.randn(49, 16))
    with pytest.raises(RuntimeError, match="contiguous float32"):
        cpu_depthwise.narrow_linear(x.t().contiguous().t(), weight)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        cpu_depthwise.narrow_linear(x.double(), weight)
    with pytest.raises(RuntimeError, match="packed"):
        cpu_depthwise.narrow_linear(torch.randn(5, 17), weight)
    with pytest.raises(RuntimeError, match="residual"):
        cpu_depthwise.narrow_linear(x, weight, None, torch.randn(5, 39))
    with pytest.raises(RuntimeError, match="bias"):
        cpu_depthwise.narrow_linear(x, weight, torch.randn(41))


def _conv_reference(x, weight, bias, norm_weight=None, norm_bias=None, eps=1e-6):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride=2, padding=1)
    if norm_weight is not None:
        y = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), norm_weight.double(), norm_bias.double(), eps)
        y = y.permute(0, 3, 1, 2)
    return y


# even and odd sides (the right edge then has all three taps or only two), single rows and columns, one pixel
@needs_narrow
@pytest.mark.parametrize("shape", [(2, 20, 16, 16), (1, 20, 11, 13), (3, 5, 2, 9), (1, 3, 1, 1), (2, 7, 10, 1),
                                   (1, 24, 14, 30), (0, 20, 8, 8)], ids=str)
@pytest.mark.parametrize("outputs", [33, 40, 48])
@pytest.mark.parametrize("norm", [False, True], ids=["conv", "conv+norm"])
def test_narrow_convolution_matches_conv2d_and_layer_norm(shape, outputs, norm):
    channels = shape[1]
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(outputs, channels, 3, 3) * (9 * channels) ** -0.5, torch.randn(outputs)
    norm_weight, norm_bias = (torch.rand(outputs) + 0.5, torch.randn(outputs)) if norm else (None, None)
    ours = cpu_depthwise.narrow_conv3x3_s2(x, weight, bias, norm_weight, norm_bias, 1e-6)
    expected = _conv_reference(x, weight, bias, norm_weight, norm_bias)
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    assert ours.is_contiguous(memory_format=torch.channels_last)
    if ours.numel():
        assert relative_error(ours.double(), expected) < FLOAT32_TOLERANCE


@needs_narrow
def test_narrow_convolution_without_bias_and_with_a_non_finite_pixel():
    x = torch.randn(1, 20, 12, 12).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(40, 20, 3, 3) * 0.1
    x[0, 3, 5, 6] = float("nan")  # read by output pixels (2, 3) and (3, 3) only
    ours = cpu_depthwise.narrow_conv3x3_s2(x, weight, None, torch.ones(40), torch.zeros(40), 1e-6)
    bad = ours.isnan().any(dim=1)[0]
    assert bad.nonzero().tolist() == [[2, 3], [3, 3]]
    expected = _conv_reference(x, weight, None, torch.ones(40), torch.zeros(40))
    assert relative_error(ours.double().nan_to_num(), expected.nan_to_num()) < FLOAT32_TOLERANCE


@needs_narrow
def test_narrow_convolution_refuses_what_it_cannot_take():
    x = torch.randn(1, 20, 8, 8).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(40, 20, 3, 3)
    with pytest.raises(RuntimeError, match="channels-last float32"):
        cpu_depthwise.narrow_conv3x3_s2(x.contiguous(), weight)
    with pytest.raises(RuntimeError, match="channels-last float32"):
        cpu_depthwise.narrow_conv3x3_s2(x.double(), weight)
    with pytest.raises(RuntimeError, match="1 <= N <= 48"):
        cpu_depthwise.narrow_conv3x3_s2(x, torch.randn(49, 20, 3, 3))
    with pytest.raises(RuntimeError, match="packed"):
        cpu_depthwise.narrow_conv3x3_s2(x, torch.randn(40, 19, 3, 3))
    with pytest.raises(RuntimeError, match="LayerNorm weight and bias"):
        cpu_depthwise.narrow_conv3x3_s2(x, weight, None, torch.ones(40), None)
    with pytest.raises(RuntimeError, match="at least 1x1"):
        cpu_depthwise.narrow_conv3x3_s2(torch.randn(1, 20, 0, 8).contiguous(memory_format=torch.channels_last),
                                        weight)


@needs_narrow
def test_unireplknet_a_runs_its_narrow_layers_in_our_kernels_and_matches_the_reference(narrow_calls, monkeypatch):
    torch.manual_seed(0)
    model = optimize_for_inference(timm.create_model("unireplknet_a", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with reference_ops():
            expected = model(x)
        assert not narrow_calls
        ours = model(x)
    # the second stem convolution with its LayerNorm, then the two first-stage blocks' Linear2 (40 outputs) with
    # their GRN factor
    assert narrow_calls == ["narrow_conv3x3_s2", "narrow_linear+grn", "narrow_linear+grn"]
    assert relative_error(ours, expected) < FLOAT32_TOLERANCE
    narrow_calls.clear()
    monkeypatch.setattr(unireplknet, "_NARROW_FOLDS_GRN", False)  # GRN scales the map in place: the same outputs
    with torch.no_grad():
        assert relative_error(model(x), ours) < FLOAT32_TOLERANCE
    assert narrow_calls == ["narrow_conv3x3_s2", "narrow_linear", "narrow_linear"]


@needs_narrow
def test_the_narrow_kernels_turn_off_for_the_lever_check_and_back_on(narrow_calls):
    """The switch behind benchmarks/levers.py's "no narrow kernels" way: oneDNN's ops inside its block, the same
    outputs, and the kernels again after it."""
    torch.manual_seed(0)
    model = optimize_for_inference(timm.create_model("unireplknet_a", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with unireplknet._without_narrow_kernels():
            without = model(x)
        assert not narrow_calls
        ours = model(x)
    assert narrow_calls == ["narrow_conv3x3_s2", "narrow_linear+grn", "narrow_linear+grn"]
    assert relative_error(ours, without) < FLOAT32_TOLERANCE


@needs_narrow
def test_narrow_kernels_stay_out_of_training_hooks_and_other_dtypes(narrow_calls):
    torch.manual_seed(0)
    model = timm.create_model("unireplknet_a", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model = model.to(memory_format=torch.channels_last)
    model(x).sum().backward()  # a gradient recorded: PyTorch's ops
    assert not narrow_calls
    with torch.no_grad():
        model(x)
    assert narrow_calls.count("narrow_conv3x3_s2") == 1  # the train form in eval mode too
    narrow_calls.clear()
    stem = model.downsample_layers[0]
    seen = []
    handle = stem[4].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(x)
    handle.remove()
    # a hook on the LayerNorm: the convolution alone in our kernel, the LayerNorm as a module the hook sees
    assert seen == [torch.Size([1, 40, 8, 8])] and "narrow_conv3x3_s2" in narrow_calls
    narrow_calls.clear()
    handle = stem[3].register_forward_hook(lambda module, args, out: None)
    with torch.no_grad():
        model(x)
    handle.remove()
    assert "narrow_conv3x3_s2" not in narrow_calls  # a hook on the convolution: PyTorch's
    narrow_calls.clear()
    with torch.no_grad():  # only channels-last maps, and the stem's first convolution (20 outputs) never
        nchw = torch.randn(1, 20, 16, 16)
        assert not unireplknet._narrow_conv_applies(stem[3], nchw)
        assert unireplknet._narrow_conv_applies(stem[3], nchw.contiguous(memory_format=torch.channels_last))
        assert not unireplknet._narrow_conv_applies(stem[0], x)
    with torch.no_grad():
        model.to(torch.float64)(x.double())  # float64: PyTorch's ops throughout
    assert not narrow_calls


def test_narrow_kernels_are_used_only_where_built():
    if cpu_depthwise.unavailable_reason() is not None:
        pytest.skip(str(cpu_depthwise.unavailable_reason()))
    built = cpu_depthwise.narrow_linear_available()
    assert unireplknet._narrow_kernels() == built
    if not built:
        with pytest.raises(RuntimeError, match="no AVX-512"):
            cpu_depthwise.narrow_linear(torch.randn(6, 8), torch.randn(40, 8))
