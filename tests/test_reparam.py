"""Structural re-parameterisation: the deploy form computes what the train form computes, for every variant."""

import copy

import pytest
import timm
import torch
from timm.utils import reparameterize_model

from backbones import UniRepLKNet
from backbones.unireplknet import DilatedReparamBlock, UniRepLKNetBlock, dilated_to_dense
from conftest import randomise_statistics, relative_error

FAST = ["a", "f", "p", "n", "t", "s"]
LARGE = ["b", "l", "xl"]


def check_variant(variant, shape):
    model = randomise_statistics(timm.create_model(f"unireplknet_{variant}")).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        features, logits = model.forward_features(x), model(x)
        model.reparameterize()
        assert model.deploy
        assert relative_error(model.forward_features(x), features) <= 1e-5
        assert relative_error(model(x), logits) <= 1e-5
        # idempotent: a second conversion changes nothing
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.reparameterize()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        # a model built directly in deploy form loads the converted weights strictly and agrees bit for bit
        direct = timm.create_model(f"unireplknet_{variant}", deploy=True).eval()
        direct.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(direct(x), model(x))


@pytest.mark.parametrize("variant", FAST)
def test_deploy_form_matches_train_form(variant):
    check_variant(variant, (2, 3, 64, 96))


@pytest.mark.slow
@pytest.mark.parametrize("variant", LARGE)
def test_deploy_form_matches_train_form_large_variants(variant):
    check_variant(variant, (1, 3, 64, 64))


@pytest.mark.parametrize("kernel_size", [3, 5, 7, 9, 11, 13, 15, 17])
def test_every_block_kernel_size_reparameterises_exactly(kernel_size):
    torch.manual_seed(kernel_size)
    block = UniRepLKNetBlock(24, kernel_size, layer_scale_init_value=1e-6)
    randomise_statistics(block).eval()
    with torch.no_grad():
        for p in block.parameters():  # weights far from their init so every branch matters
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 24, 29, 37)  # odd, non-square
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        actual = block(x)
    assert block.deploy and block.gamma is None and not hasattr(block.act[1], "beta")
    assert relative_error(actual, expected) <= 1e-5
    keys = set(block.state_dict())
    assert not any("bn" in k or "norm" in k for k in keys)


def test_dilated_kernel_becomes_the_equivalent_dense_kernel():
    kernel = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    dense = dilated_to_dense(kernel, 3)
    assert dense.shape == (4, 1, 7, 7)
    assert torch.equal(dense[:, :, ::3, ::3], kernel)
    assert torch.count_nonzero(dense) == torch.count_nonzero(kernel)
    x = torch.randn(1, 4, 20, 20, dtype=torch.float64)
    dilated = torch.nn.functional.conv2d(x, kernel, padding=3, dilation=3, groups=4)
    assert torch.allclose(torch.nn.functional.conv2d(x, dense, padding=3, groups=4), dilated)


def test_dilated_reparam_block_alone():
    block = DilatedReparamBlock(16, 17)
    randomise_statistics(block).eval()
    x = torch.randn(1, 16, 40, 33)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        block.reparameterize()
        actual = block(x)
    assert block.deploy and list(block.state_dict()) == ["lk_origin.weight", "lk_origin.bias"]
    assert relative_error(actual, expected) <= 1e-5


def test_timm_reparameterize_model_works():
    model = randomise_statistics(timm.create_model("unireplknet_a")).eval()
    x = torch.randn(2, 3, 64, 64)
    deployed = reparameterize_model(model)  # a converted copy
    assert deployed.deploy and not model.deploy
    with torch.no_grad():
        assert relative_error(deployed(x), model(x)) <= 1e-5
    assert [(k, v.shape) for k, v in deployed.state_dict().items()] == [
        (k, v.shape) for k, v in timm.create_model("unireplknet_a", deploy=True).state_dict().items()
    ]


def test_reparameterise_with_other_channels_and_kernel_plan_in_float64():
    model = UniRepLKNet(in_chans=1, num_classes=5, depths=(2, 2, 6, 2), dims=(16, 32, 64, 128),
                        kernel_sizes=(3, 13, 13, 11)).double()
    randomise_statistics(model).eval()
    x = torch.randn(3, 1, 128, 48, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        converted = copy.deepcopy(model).reparameterize()
        assert relative_error(converted(x), expected) <= 1e-12
