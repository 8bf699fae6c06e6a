"""Architecture facts of every variant: parameter counts, kernel plans, drop-path schedule, initialisation."""

import pytest
import timm
import torch

from backbones import ConfigurationError, UniRepLKNet, default_kernel_sizes
from backbones.unireplknet import DilatedReparamBlock, UniRepLKNetBlock

# (deploy form, train form) parameter counts with a 1000-class head, in millions (paper / official code)
PARAMETERS = {
    "a": (4.44, 4.65), "f": (6.24, 6.49), "p": (10.74, 11.08), "n": (18.32, 18.82), "t": (31.04, 31.69),
    "s": (55.65, 56.46), "b": (98.01, 99.09), "l": (218.45, 220.08), "xl": (386.53, 388.69),
}


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", list(PARAMETERS))
def test_parameter_counts_match_the_reference_in_both_forms(variant):
    with torch.device("meta"):
        train = timm.create_model(f"unireplknet_{variant}")
        deploy = timm.create_model(f"unireplknet_{variant}", deploy=True)
    deploy_m, train_m = PARAMETERS[variant]
    assert round(count(train) / 1e6, 2) == train_m
    assert round(count(deploy) / 1e6, 2) == deploy_m


def test_every_variant_is_registered_with_timm():
    names = set(timm.list_models("unireplknet_*"))
    assert names == {f"unireplknet_{v}" for v in PARAMETERS}
    assert "unireplknet_s.in22k_ft_in1k_384" in timm.list_models("unireplknet_s", pretrained=True)


def kernels(model):
    return [tuple(block.kernel_size for block in stage) for stage in model.stages]


def test_official_kernel_plans():
    with torch.device("meta"):
        a = timm.create_model("unireplknet_a")
        n = timm.create_model("unireplknet_n")
        t = timm.create_model("unireplknet_t")
        s = timm.create_model("unireplknet_s")
    assert kernels(a) == [(3, 3), (13, 13), (13,) * 6, (13, 13)]
    assert kernels(n)[2] == (13,) * 8
    assert kernels(t) == [(3,) * 3, (13,) * 3, (13, 3) * 9, (13,) * 3]
    assert kernels(s) == [(3,) * 3, (13,) * 3, (13, 3, 3) * 9, (13,) * 3]
    # large kernels are Dilated Reparam Blocks with the official branches, small ones plain depthwise convs
    block = s.stages[2][0]
    assert isinstance(block.dwconv, DilatedReparamBlock)
    assert (block.dwconv.kernel_sizes, block.dwconv.dilates) == ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5))
    assert not isinstance(s.stages[2][1].dwconv, DilatedReparamBlock)


def test_kernel_plan_override_per_stage_and_per_block():
    with torch.device("meta"):
        m = timm.create_model("unireplknet_a", kernel_sizes=(3, 13, 13, 11))
        blocks = timm.create_model("unireplknet_a", kernel_sizes=((3, 5), (7, 9), (11, 13, 15, 17, 13, 13), (3, 3)))
    assert kernels(m)[3] == (11, 11)
    assert m.stages[3][0].dwconv.dilates == (1, 2, 3, 4, 5)
    assert kernels(blocks)[2] == (11, 13, 15, 17, 13, 13)


@pytest.mark.parametrize(
    "plan, message",
    [
        ((3, 13, 13), "one entry per stage"),
        ((3, 13, 19, 13), "unsupported kernel sizes [19]"),
        ((3, 13, 4, 13), "unsupported kernel sizes [4]"),
        (((3,), (13, 13), (13,) * 6, (13, 13)), "stage 1 has 2 blocks"),
    ],
)
def test_bad_kernel_plans_raise_a_clear_error(plan, message):
    with pytest.raises(ConfigurationError) as info:
        UniRepLKNet(depths=(2, 2, 6, 2), dims=(8, 16, 32, 64), kernel_sizes=plan)
    assert message in str(info.value)


def test_unusual_depths_need_an_explicit_plan():
    with pytest.raises(ConfigurationError, match="no default kernel plan"):
        default_kernel_sizes((2, 2, 5, 2))
    m = UniRepLKNet(depths=(1, 1, 5, 1), dims=(8, 16, 32, 64), kernel_sizes=(3, 7, 7, 7), num_classes=3)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_unknown_arguments_are_rejected():
    with pytest.raises(ConfigurationError, match="unknown arguments"):
        UniRepLKNet(dims=(8, 16, 32, 64), depths=(2, 2, 6, 2), kernel_size=13)


def test_drop_path_rates_rise_linearly_over_all_blocks():
    with torch.device("meta"):
        m = timm.create_model("unireplknet_t", drop_path_rate=0.2)
    rates = [
        block.drop_path.drop_prob if hasattr(block.drop_path, "drop_prob") else 0.0
        for stage in m.stages
        for block in stage
    ]
    assert len(rates) == 27
    expected = torch.linspace(0, 0.2, 27).tolist()
    assert rates == pytest.approx(expected)


def test_initialisation_follows_the_recipe():
    m = timm.create_model("unireplknet_a", head_init_scale=0.001)
    block = m.stages[2][0]
    assert isinstance(block, UniRepLKNetBlock)
    # trunc-normal std 0.02 on conv and linear weights, zero biases
    w = block.pwconv1[1].weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.count_nonzero(block.pwconv1[1].bias) == 0
    assert torch.count_nonzero(m.downsample_layers[0][0].bias) == 0
    # layer scale 1e-6, GRN zeros, BN/LN identity
    assert torch.all(block.gamma == 1e-6)
    assert torch.count_nonzero(block.act[1].gamma) == 0 and torch.count_nonzero(block.act[1].beta) == 0
    assert torch.all(block.norm.weight == 1) and torch.all(block.norm.bias == 0)
    assert torch.all(m.downsample_layers[0][1].weight == 1)
    # head scaled by head_init_scale
    assert m.head.weight.std().item() < 0.02 * 0.001 * 1.2


@pytest.mark.parametrize("depths", [(3, 3, 6, 3), (1, 1, 8, 1), (2, 2, 27, 2)])
def test_only_the_official_depth_tuples_have_a_default_plan(depths):
    with pytest.raises(ConfigurationError, match="no default kernel plan"):
        UniRepLKNet(depths=depths, dims=(8, 16, 32, 64))


@pytest.mark.parametrize("plan", [13, "3,13,13,13", (3, 13, 13, 11.5), (3, 13, (13, 3.0) * 3, 13)])
def test_malformed_kernel_plans_are_configuration_errors(plan):
    with pytest.raises(ConfigurationError):
        UniRepLKNet(depths=(2, 2, 6, 2), dims=(8, 16, 32, 64), kernel_sizes=plan)


def test_kernel_plan_accepts_lists_and_numpy_integers():
    import numpy as np

    m = UniRepLKNet(depths=(2, 2, 6, 2), dims=(8, 16, 32, 64), kernel_sizes=[3, [13, 13], list(np.full(6, 11)), 13])
    assert kernels(m)[2] == (11,) * 6 and m.config["kernel_sizes"][2] == (11,) * 6


def test_classifier_dropout_and_pooling_arguments():
    model = timm.create_model("unireplknet_a", drop_rate=0.0, num_classes=3)  # what timm's train.py passes
    assert model.head_drop.p == 0.0
    with pytest.raises(ConfigurationError, match="needs num_classes=0"):
        timm.create_model("unireplknet_a", global_pool="", num_classes=10)
    with pytest.raises(ConfigurationError, match="needs num_classes=0"):
        model.reset_classifier(5, global_pool="")


def test_config_rebuilds_the_model_in_its_current_state():
    from timm.utils import reparameterize_model

    model = timm.create_model("unireplknet_a", in_chans=2, num_classes=7, kernel_sizes=(3, 13, 13, 11))
    assert model.config["deploy"] is False
    deployed = reparameterize_model(model)
    assert deployed.config["deploy"] is True
    twin = UniRepLKNet(**deployed.config)
    assert [(k, v.shape) for k, v in twin.state_dict().items()] == [
        (k, v.shape) for k, v in deployed.state_dict().items()
    ]
    model.reset_classifier(4)
    assert model.config["num_classes"] == 4
