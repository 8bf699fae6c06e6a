"""Weights kept between inference calls (oneDNN's reordered Linear and convolution weights, our depthwise kernels'
blocked weights) and the one-call GRN factor and SE path: the same outputs as the reference path, and kept copies
that follow every change of the weights."""

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomise_statistics, relative_error

from backbones import unireplknet
from backbones.ops import DepthwiseConv2d, cpu_depthwise, prepacked
from backbones.runtime import optimize_for_inference, reference_ops
from backbones.unireplknet import GRNwithNHWC, SEBlock

FLOAT32_TOLERANCE = 1e-5
needs_onednn = pytest.mark.skipif(not prepacked._AVAILABLE, reason="this PyTorch has no oneDNN weight reordering")


@needs_onednn
@pytest.mark.parametrize("shape, channels_last", [((1, 40, 14, 14), True), ((3, 17, 9, 11), False),
                                                  ((2, 3, 31, 33), True)])
def test_kept_convolution_weight_matches_conv2d(shape, channels_last):
    conv = prepacked.PrepackedConv2d(shape[1], 24, kernel_size=3, stride=2, padding=1).eval()
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
        first, again = conv(x), conv(x)
    assert prepacked._KEPT.get(conv.weight), "inference keeps a reordered weight"
    assert first.shape == expected.shape and relative_error(first, expected) < FLOAT32_TOLERANCE
    assert torch.equal(first, again)


@needs_onednn
def test_kept_weights_follow_in_place_changes_and_loaded_state():
    conv = prepacked.PrepackedConv2d(8, 16, kernel_size=3, stride=2, padding=1).eval()
    linear = torch.nn.Linear(8, 32)
    x, rows = torch.randn(2, 8, 10, 10), torch.randn(5, 8)
    with torch.no_grad():
        conv(x)
        kept_linear = prepacked.linear_weight(linear.weight, 5)
        assert prepacked.linear_weight(linear.weight, 5) is kept_linear  # kept, not remade
        conv.weight.mul_(-2.0)  # an in-place change bumps the version counter
        linear.weight.add_(1.0)
        assert relative_error(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)) < FLOAT32_TOLERANCE
        fresh = prepacked.linear_weight(linear.weight, 5)
        out = torch.ops.mkldnn._linear_pointwise(rows, fresh, linear.bias, "none", [], "")
        assert relative_error(out, F.linear(rows, linear.weight, linear.bias)) < FLOAT32_TOLERANCE
        other = prepacked.PrepackedConv2d(8, 16, kernel_size=3, stride=2, padding=1)
        conv.load_state_dict(other.state_dict())
        assert relative_error(conv(x), other(x)) < FLOAT32_TOLERANCE


@needs_onednn
def test_kept_copies_are_bounded_per_weight_and_outside_the_model():
    linear = torch.nn.Linear(8, 16)
    with torch.no_grad():
        for rows in (1, 2, 3, 4):
            prepacked.linear_weight(linear.weight, rows)
    assert len(prepacked._KEPT[linear.weight]) == prepacked.KEPT_SHAPES
    assert set(linear.state_dict()) == {"weight", "bias"}
    pickle.loads(pickle.dumps(copy.deepcopy(linear)))  # a reordered oneDNN tensor could not be pickled
    weight = linear.weight
    del linear
    assert weight in prepacked._KEPT
    del weight
    assert len([w for w in prepacked._KEPT if w.shape == (16, 8)]) == 0  # gone with the weight


def test_convolution_with_autograd_or_autocast_runs_the_module_path():
    conv = prepacked.PrepackedConv2d(4, 8, kernel_size=3, stride=2, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = conv(x)
    out.sum().backward()
    assert conv.weight.grad is not None and x.grad is not None
    assert conv.weight not in prepacked._KEPT
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16  # as nn.Conv2d under autocast
    with torch.no_grad(), reference_ops():
        conv(x)
    assert conv.weight not in prepacked._KEPT


def test_weights_made_in_inference_mode_are_not_kept():
    with torch.inference_mode():
        conv = prepacked.PrepackedConv2d(4, 8, kernel_size=3, stride=2, padding=1)
        layer = DepthwiseConv2d(16, 7, bias=True, backend="cpu_direct")
        x = torch.randn(1, 4, 9, 9)
        y = torch.randn(1, 16, 9, 9).contiguous(memory_format=torch.channels_last)
        assert relative_error(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)) < FLOAT32_TOLERANCE
        assert relative_error(layer(y), F.conv2d(y, layer.weight, layer.bias, padding=3, groups=16)) < FLOAT32_TOLERANCE
    assert conv.weight not in prepacked._KEPT and layer.weight not in cpu_depthwise._BLOCKED


def test_depthwise_blocked_weight_is_kept_at_inference_and_follows_changes():
    layer = DepthwiseConv2d(20, 5, bias=True, backend="cpu_direct").eval()  # 20 channels: a partial 16-block
    x = torch.randn(2, 20, 11, 9).contiguous(memory_format=torch.channels_last)

    def expected():
        return F.conv2d(x, layer.weight, layer.bias, padding=2, groups=20)

    with torch.no_grad():
        assert relative_error(layer(x), expected()) < FLOAT32_TOLERANCE
        kept = cpu_depthwise._BLOCKED[layer.weight]["blocked"][1]
        assert kept.shape == (2, 5, 5, 16) and kept[1, :, :, 4:].abs().max() == 0  # zeros past channel 20
        layer(x)
        assert cpu_depthwise._BLOCKED[layer.weight]["blocked"][1] is kept
        layer.weight[3].fill_(0.5)
        assert relative_error(layer(x), expected()) < FLOAT32_TOLERANCE
    # training computes the blocked weight afresh each call (the weight changes every step)
    out = layer(x)
    out.square().sum().backward()
    assert layer.weight.grad is not None
    assert relative_error(out.detach(), expected().detach()) < FLOAT32_TOLERANCE


@pytest.mark.parametrize("shape", [(2, 7, 7, 80), (2, 64, 64, 520)], ids=str)  # the second: 8.5 MiB, summed by rows
def test_one_call_grn_factor_of_a_bfloat16_map_sums_in_float32(shape):
    gamma = torch.randn(1, 1, 1, shape[-1], generator=torch.Generator().manual_seed(1))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    g = torch.linalg.vector_norm(x.double(), dim=(1, 2), keepdim=True)
    reference = gamma.double() * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)) + 1
    ours = cpu_depthwise.grn_scale(x, gamma)
    assert ours.dtype == torch.float32 and relative_error(ours.double(), reference) < 1e-6


@pytest.mark.parametrize("shape", [(2, 7, 7, 80), (1, 14, 14, 1280), (3, 5, 9, 19), (2, 1, 1, 3), (1, 48, 48, 1000)])
def test_one_call_grn_factor_matches_float64(shape):
    grn = GRNwithNHWC(shape[-1], use_bias=False)
    with torch.no_grad():
        grn.gamma.normal_()
    x = torch.randn(shape)
    x[0, :, :, 1] = 0.0  # a dead channel: its norm is 0
    g = torch.linalg.vector_norm(x.double(), dim=(1, 2), keepdim=True)
    reference = grn.gamma.double() * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)) + 1
    with torch.no_grad():
        ours = grn.scale(x)
        direct = cpu_depthwise.grn_scale(x, grn.gamma)
    assert ours.shape == (shape[0], 1, 1, shape[-1]) and ours.dtype == torch.float32
    assert torch.equal(ours, direct), "inference takes the one-call factor"
    assert relative_error(ours.double(), reference) < 1e-6
    # with a graph to record, the differentiable ops run instead
    grn.gamma.requires_grad_(True)
    grn.scale(x).sum().backward()
    assert grn.gamma.grad is not None


def test_one_call_factors_of_bfloat16_maps_are_float32_sums_rounded_once():
    x = torch.randn(2, 9, 7, 40).to(torch.bfloat16)
    grn = GRNwithNHWC(40, use_bias=False).to(torch.bfloat16)
    with torch.no_grad():
        grn.gamma.normal_()
        ours = grn.scale(x)
    g = torch.linalg.vector_norm(x.double(), dim=(1, 2), keepdim=True)
    reference = grn.gamma.double() * (g / (g.mean(dim=-1, keepdim=True) + 1e-6)) + 1
    assert ours.dtype == torch.bfloat16 and relative_error(ours.double(), reference) < 2 ** -8  # one rounding
    se = SEBlock(40, 10).to(torch.bfloat16)
    nchw = x.permute(0, 3, 1, 2)  # channels-last memory
    with torch.no_grad():
        factor = se.scale(nchw)
    pooled = nchw.double().mean(dim=(2, 3))
    hidden = torch.relu(pooled @ se.down.weight.double().flatten(1).t() + se.down.bias.double())
    expected = torch.sigmoid(hidden @ se.up.weight.double().flatten(1).t() + se.up.bias.double())
    assert factor.dtype == torch.bfloat16 and factor.shape == (2, 40, 1, 1)
    assert relative_error(factor.double().flatten(1), expected) < 2 ** -8


def test_one_call_grn_factor_refuses_what_it_cannot_compute():
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU map"):
        cpu_depthwise.grn_scale(torch.randn(2, 3, 3, 4, dtype=torch.float64), torch.zeros(4))
    with pytest.raises(RuntimeError, match="one value per channel"):
        cpu_depthwise.grn_scale(torch.randn(2, 3, 3, 4), torch.zeros(5))


# channel counts that fill whole vectors (80, 320), leave a tail (19, 24, 40) or are a single one; the (3, 45, 45, 24)
# map is split into tasks that cross from one sample to the next, and ends in a partial run of its repeated factors
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 7, 80), (3, 5, 9, 19), (1, 1, 1, 1), (2, 12, 12, 40), (4, 14, 14, 320),
                                   (3, 45, 45, 24)], ids=str)
def test_channel_scale_kernel_makes_the_same_products_as_pytorch(shape, dtype):
    x = torch.randn(shape).to(dtype)
    scale = (torch.rand(shape[0], 1, 1, shape[-1]) + 0.5).to(dtype)
    expected = x * scale
    ours = x.clone()
    assert cpu_depthwise.channel_scale_(ours, scale) is ours  # in place
    assert torch.equal(ours, expected)
    # SE's (B, C, 1, 1) factor of the same values; a float32 factor of a bfloat16 map is rounded to bfloat16 first
    again = x.clone()
    cpu_depthwise.channel_scale_(again, scale.float().view(shape[0], shape[-1], 1, 1))
    assert torch.equal(again, expected)


def test_channel_scale_kernel_keeps_nan_and_inf_and_refuses_what_it_cannot_compute():
    x = torch.tensor([[[[1.0, float("nan"), float("inf"), -2.0]]]])
    cpu_depthwise.channel_scale_(x, torch.tensor([2.0, 3.0, -1.0, 0.5]))
    assert torch.allclose(x, torch.tensor([[[[2.0, float("nan"), float("-inf"), -1.0]]]]), rtol=0, atol=0,
                          equal_nan=True)
    with pytest.raises(RuntimeError, match="contiguous float32 or bfloat16 CPU map"):
        cpu_depthwise.channel_scale_(torch.randn(2, 3, 3, 4, dtype=torch.float64), torch.ones(8))
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_depthwise.channel_scale_(torch.randn(2, 4, 3, 3).permute(0, 2, 3, 1), torch.ones(8))
    with pytest.raises(RuntimeError, match="B \\* C values expected, got 7 for 8"):
        cpu_depthwise.channel_scale_(torch.randn(2, 3, 3, 4), torch.ones(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_blocks_scale_by_grn_and_se_in_one_call_with_the_same_outputs(dtype, monkeypatch):
    if dtype == torch.bfloat16 and torch.bfloat16 not in unireplknet._FUSED_DTYPES:
        pytest.skip("no native bfloat16 on this CPU: the blocks do not fuse bfloat16 maps")
    model = optimize_for_inference(randomise_statistics(timm.create_model("unireplknet_a", num_classes=10), seed=3),
                                   dtype=None if dtype == torch.float32 else dtype, keep_memory=False)
    x = torch.randn(2, 3, 64, 64)
    calls = []
    monkeypatch.setattr(unireplknet, "_MAP_KERNELS", True)  # as on AVX-512, where the kernel is used
    monkeypatch.setattr(unireplknet, "channel_scale_",
                        lambda rows, scale: calls.append(rows.shape) or cpu_depthwise.channel_scale_(rows, scale))
    with torch.no_grad():
        ours = model(x)
        monkeypatch.setattr(unireplknet, "_CHANNEL_SCALE_KERNEL", False)
        theirs = model(x)
    assert torch.equal(ours, theirs), "the kernel makes PyTorch's products"
    blocks = sum(len(stage) for stage in model.stages)
    # at least SE's factor in every block, and GRN's wherever it is not folded into Linear2's weights
    assert len(calls) > blocks
    assert all(len(shape) == 4 for shape in calls)


@pytest.mark.parametrize("batch, one_call", [(3, True), (8, False)])  # small batches: one call of our kernels
def test_se_at_inference_matches_its_convolutions_and_respects_hooks(batch, one_call, monkeypatch):
    se = SEBlock(24, 6)
    x = torch.randn(batch, 24, 7, 5).contiguous(memory_format=torch.channels_last)
    calls = []
    monkeypatch.setattr(unireplknet, "se_scale", lambda *args: calls.append(1) or cpu_depthwise.se_scale(*args))
    with torch.no_grad():
        expected = torch.sigmoid(se.up(torch.relu(se.down(x.mean(dim=(2, 3), keepdim=True)))))
        assert relative_error(se.scale(x), expected) < FLOAT32_TOLERANCE
        assert calls == ([1] if one_call else [])
        nchw = x.contiguous()  # the kernels take either layout
        assert relative_error(se.scale(nchw), expected) < FLOAT32_TOLERANCE
        seen = []
        handle = se.down.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        hooked = se.scale(x)
        handle.remove()
    assert seen == [torch.Size([batch, 6, 1, 1])], "a hooked SE runs its convolutions"
    assert relative_error(hooked, expected) < FLOAT32_TOLERANCE


def test_one_call_se_factor_refuses_what_it_cannot_compute():
    weights = (torch.zeros(2, 8, 1, 1), torch.zeros(2), torch.zeros(8, 2, 1, 1), torch.zeros(8))
    with pytest.raises(RuntimeError, match="float32 or bfloat16 CPU map"):
        cpu_depthwise.se_scale(torch.randn(1, 8, 3, 3, dtype=torch.float64), *weights)
    with pytest.raises(RuntimeError, match="weights"):
        cpu_depthwise.se_scale(torch.randn(1, 9, 3, 3), *weights)


@pytest.mark.parametrize("name", ["unireplknet_a", "unireplknet_t"])
def test_fast_inference_with_kept_weights_matches_the_reference_and_follows_reloaded_weights(name):
    model = randomise_statistics(timm.create_model(name, num_classes=10).eval(), seed=1)
    other = randomise_statistics(timm.create_model(name, num_classes=10).eval(), seed=2)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad(), reference_ops():
        expected, expected_other = model(x), other(x)
        expected_one = model(x[:1])
    fast = optimize_for_inference(copy.deepcopy(model))
    with torch.inference_mode():
        assert relative_error(fast(x), expected) < FLOAT32_TOLERANCE
        assert relative_error(fast(x[:1]), expected_one) < FLOAT32_TOLERANCE  # another shape: another kept copy
        assert relative_error(fast(x), expected) < FLOAT32_TOLERANCE
    fast.load_state_dict(copy.deepcopy(other).reparameterize().state_dict())
    with torch.inference_mode():
        assert relative_error(fast(x), expected_other) < FLOAT32_TOLERANCE
    pickle.loads(pickle.dumps(fast))  # nothing unpicklable was stored on the model


@needs_onednn
def test_keeping_weights_can_be_turned_off_and_on():
    conv = prepacked.PrepackedConv2d(4, 8, kernel_size=3, stride=2, padding=1).eval()
    linear = torch.nn.Linear(4, 8)
    x = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
        conv(x)
        assert conv.weight in prepacked._KEPT
        assert prepacked.keep_weights(False) is True and not prepacked.keeping_weights()
        try:
            assert conv.weight not in prepacked._KEPT, "turning it off forgets the kept copies"
            assert relative_error(conv(x), expected) < FLOAT32_TOLERANCE
            assert prepacked.linear_weight(linear.weight, 3) is linear.weight  # the plain weight, nothing kept
            assert conv.weight not in prepacked._KEPT and linear.weight not in prepacked._KEPT
        finally:
            assert prepacked.keep_weights(True) is False
        conv(x)
        assert conv.weight in prepacked._KEPT
