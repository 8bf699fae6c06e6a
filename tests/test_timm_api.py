"""The timm model interface: create_model, features, intermediates, heads, checkpointing, pretrained files."""

import pytest
import timm
import torch

from backbones import CheckpointError
from conftest import randomise_statistics, relative_error, state_dict_from_reference


def test_pooled_features_with_num_classes_zero():
    model = timm.create_model("unireplknet_a", num_classes=0).eval()
    assert model.num_features == 320
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 320)


def test_forward_features_and_forward_head():
    model = timm.create_model("unireplknet_a", num_classes=10).eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert fmap.shape == (2, 320, 3, 2)
        pre = model.forward_head(fmap, pre_logits=True)
        assert pre.shape == (2, 320)
        # pre-logits are the pooled, normalised features the classifier sees
        assert torch.allclose(model.head(pre), model(x), atol=1e-6)
        assert torch.allclose(pre, model.norm(fmap.mean(dim=(2, 3))))


def test_reset_classifier():
    model = timm.create_model("unireplknet_a")
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 320)
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 320, 2, 2)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (2,)])
def test_features_only(out_indices):
    model = timm.create_model("unireplknet_t", features_only=True, out_indices=out_indices).eval()
    channels = [(80, 160, 320, 640)[i] for i in out_indices]
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == [(4, 8, 16, 32)[i] for i in out_indices]
    maps = model(torch.randn(1, 3, 64, 96))
    assert [m.shape[1] for m in maps] == channels
    assert [tuple(m.shape[2:]) for m in maps] == [(64 // (4 * 2**i), 96 // (4 * 2**i)) for i in out_indices]
    # stages after the last requested one are pruned
    assert len(model.model.stages) == max(out_indices) + 1


def test_forward_intermediates():
    model = timm.create_model("unireplknet_a").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert [m.shape[1] for m in maps] == [40, 80, 160, 320]
        assert torch.equal(final, model.forward_features(x))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape[1] for m in last_two] == [160, 320]
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], maps[0])


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_training_step():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])

    def step(checkpointing):
        torch.manual_seed(1)
        model = randomise_statistics(timm.create_model("unireplknet_a", num_classes=3, drop_path_rate=0.1))
        model.set_grad_checkpointing(checkpointing)
        calls, stem_calls = [], []
        model.stages[2][0].register_forward_pre_hook(lambda *_: calls.append(1))
        model.downsample_layers[0].register_forward_pre_hook(lambda *_: stem_calls.append(1))
        model.train()
        torch.manual_seed(2)  # the same drop-path draws in both runs
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
        return (len(calls), len(stem_calls)), grads, buffers

    plain_calls, plain, plain_buffers = step(False)
    checkpointed_calls, checkpointed, checkpointed_buffers = step(True)
    # the block and the stem really were recomputed in the backward pass
    assert (plain_calls, checkpointed_calls) == ((1, 1), (2, 2))
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-7), name
    # BatchNorm statistics are updated once per step, as without checkpointing
    for name in plain_buffers:
        assert torch.allclose(plain_buffers[name], checkpointed_buffers[name]), name


def test_a_depthwise_backend_can_be_chosen_for_the_whole_model():
    from backbones import ConfigurationError
    from backbones.ops import DepthwiseConv2d, register_backend

    calls = []

    def counting(x, weight, bias):
        calls.append(weight.shape[-1])
        return torch.nn.functional.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    register_backend("counting", counting)
    model = timm.create_model("unireplknet_a", depthwise_backend="counting").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert sorted(set(calls)) == [3, 13] and len(calls) == 12  # 12 blocks: 4 with K=3, 8 with K=13
    calls.clear()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # stages at 16, 8, 4 and 2 px: taps beyond the map are cut off
    assert calls == [3, 3, 13, 13, 7, 7, 7, 7, 7, 7, 3, 3]
    model.set_depthwise_backend(None)
    assert all(m.backend is None for m in model.modules() if isinstance(m, DepthwiseConv2d))
    with pytest.raises(ConfigurationError, match="unknown depthwise backend 'cudnn9'"):
        model.set_depthwise_backend("cudnn9")


def test_no_weight_decay_names_layer_scale_and_grn():
    names = timm.create_model("unireplknet_a").no_weight_decay()
    assert "stages.0.0.gamma" in names and "stages.0.0.act.1.beta" in names and "stages.0.0.act.1.gamma" in names
    assert not any(n.endswith(".weight") for n in names)


def test_pretrained_configs_name_the_official_files():
    cfg = timm.get_pretrained_cfg("unireplknet_a.in1k").to_dict()
    assert cfg["hf_hub_id"] == "DingXiaoH/UniRepLKNet"
    assert cfg["hf_hub_filename"] == "unireplknet_a_in1k_224_acc77.03.pth"
    cfg = timm.get_pretrained_cfg("unireplknet_xl.in22k_ft_in1k_384").to_dict()
    assert cfg["hf_hub_filename"] == "unireplknet_xl_in22k_to_in1k_384_acc87.96.pth"
    assert cfg["input_size"] == (3, 384, 384)
    cfg = timm.get_pretrained_cfg("unireplknet_l.in22k").to_dict()
    assert cfg["num_classes"] == 21841 and cfg["input_size"] == (3, 192, 192)


def test_pretrained_loads_from_a_local_file_only(tmp_path, monkeypatch):
    sd = state_dict_from_reference("a", "train")
    official = tmp_path / "unireplknet_a_in1k_224_acc77.03.pth"
    torch.save(sd, official)

    # an explicit path
    model = timm.create_model("unireplknet_a", pretrained=True, pretrained_cfg_overlay=dict(file=str(official)))
    assert torch.equal(model.head.weight, sd["head.weight"])

    # the weights folder holds the official file name
    monkeypatch.setenv("UNIPERCEPTION_WEIGHTS", str(tmp_path))
    model = timm.create_model("unireplknet_a.in1k", pretrained=True, in_chans=1, num_classes=35)
    assert model.downsample_layers[0][0].weight.shape == (20, 1, 3, 3)
    assert torch.equal(model.stages[3][1].gamma, sd["stages.3.1.gamma"])
    assert model.head.out_features == 35

    # features_only with pretrained weights
    features = timm.create_model("unireplknet_a.in1k", pretrained=True, features_only=True)
    assert torch.equal(features.model.stages[0][0].dwconv.weight, sd["stages.0.0.dwconv.weight"])

    # deploy form built directly from the train-form file
    deploy = timm.create_model("unireplknet_a.in1k", pretrained=True, deploy=True).eval()
    train = timm.create_model("unireplknet_a.in1k", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(deploy(x), train(x)) <= 1e-5


def test_pretrained_without_the_file_explains_where_to_put_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("UNIPERCEPTION_WEIGHTS", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache, and no network
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as info:
        timm.create_model("unireplknet_t.in1k", pretrained=True)
    message = str(info.value)
    assert "unireplknet_t_in1k_224_acc83.21.pth" in message and str(tmp_path) in message
    assert "DingXiaoH/UniRepLKNet" in message
