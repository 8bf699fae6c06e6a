"""Official checkpoints load: exact keys and shapes, every wrapping, adapted heads and stems, clear errors."""

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from backbones import CheckpointError, UniRepLKNet, load_checkpoint, read_state_dict
from conftest import randomise_statistics, reference_keys, relative_error, state_dict_from_reference


@pytest.mark.parametrize("variant", ["a", "t", "s"])
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_state_dict_keys_and_shapes_equal_the_official_lists(variant, form):
    with torch.device("meta"):
        model = timm.create_model(f"unireplknet_{variant}", deploy=form == "deploy")
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_keys(variant, form)


@pytest.mark.parametrize("variant", ["a", "t", "s"])
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_official_state_dict_loads_strictly(variant, form, tmp_path):
    sd = state_dict_from_reference(variant, form)
    path = tmp_path / f"unireplknet_{variant}.pth"
    torch.save(sd, path)
    model = timm.create_model(f"unireplknet_{variant}", deploy=form == "deploy")
    report = load_checkpoint(model, path)
    assert report.loaded == len(sd) and not report.dropped and not report.kept_initialised
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # plain torch strict loading agrees
    model.load_state_dict(sd, strict=True)


def small_file(tmp_path, wrap, name="ckpt.pth"):
    sd = state_dict_from_reference("a", "train")
    path = tmp_path / name
    torch.save(wrap(sd), path)
    return sd, path


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "epoch": 300},
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["raw", "model", "state_dict", "ddp"],
)
def test_wrapped_files_load(wrap, tmp_path):
    sd, path = small_file(tmp_path, wrap)
    model = timm.create_model("unireplknet_a")
    load_checkpoint(model, path)
    assert torch.equal(model.stages[2][0].dwconv.lk_origin.weight, sd["stages.2.0.dwconv.lk_origin.weight"])


def test_detection_file_with_backbone_prefix_loads_into_a_features_model(tmp_path):
    sd = state_dict_from_reference("a", "train")
    for k in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
        del sd[k]
    for i, c in enumerate((40, 80, 160, 320)):
        sd[f"norm{i}.weight"] = torch.rand(c) + 0.5
        sd[f"norm{i}.bias"] = torch.randn(c)
    wrapped = {"state_dict": {**{f"backbone.{k}": v for k, v in sd.items()},
                              "neck.lateral.weight": torch.zeros(1), "decode_head.conv.weight": torch.zeros(1)},
               "meta": {"epoch": 12}}
    path = tmp_path / "upernet.pth"
    torch.save(wrapped, path)

    features = timm.create_model("unireplknet_a", features_only=True)
    load_checkpoint(features.model, path)
    assert torch.equal(features.model.norm2.weight, sd["norm2.weight"])
    maps = features(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(40, 16, 16), (80, 8, 8), (160, 4, 4), (320, 2, 2)]
    # the stage outputs are normalised by norm0..norm3, as in the official features mode
    expected = features.model.norm0(features.model.stages[0](features.model.downsample_layers[0](
        torch.zeros(1, 3, 64, 64))))
    assert torch.allclose(features(torch.zeros(1, 3, 64, 64))[0], expected)

    # into a classifier: the features-mode norms are dropped, the head norm and head keep their initialisation
    classifier = timm.create_model("unireplknet_a", num_classes=7)
    report = load_checkpoint(classifier, path)
    assert any("norm0.weight" in d for d in report.dropped)
    assert set(report.kept_initialised) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_head_is_dropped_when_the_class_count_differs(tmp_path):
    sd = state_dict_from_reference("s", "train")
    sd["head.weight"] = torch.randn(21841, 768) * 0.01
    sd["head.bias"] = torch.zeros(21841)
    path = tmp_path / "unireplknet_s_in22k_pretrain.pth"
    torch.save(sd, path)
    model = timm.create_model("unireplknet_s", num_classes=10)
    head_before = model.head.weight.clone()
    report = load_checkpoint(model, path)
    assert any(d.startswith("head.weight (21841, 768)") for d in report.dropped)
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.norm.weight, sd["norm.weight"])

    pooled = timm.create_model("unireplknet_s", num_classes=0)
    load_checkpoint(pooled, path)
    assert pooled(torch.randn(2, 3, 32, 32)).shape == (2, 768)


@pytest.mark.parametrize("in_chans", [1, 2, 5])
def test_stem_adapts_to_other_channel_counts_like_timm(in_chans, tmp_path):
    sd, path = small_file(tmp_path, lambda sd: sd)
    model = timm.create_model("unireplknet_a", in_chans=in_chans)
    report = load_checkpoint(model, path)
    assert any("3 -> %d input channels" % in_chans in a for a in report.adapted)
    stem = model.downsample_layers[0][0].weight
    assert stem.shape == (20, in_chans, 3, 3)
    if in_chans == 1:  # timm sums the RGB filters for a single channel
        assert torch.allclose(stem[:, 0], sd["downsample_layers.0.0.weight"].sum(dim=1))
    assert model(torch.randn(2, in_chans, 32, 32)).shape == (2, 1000)


def test_train_form_file_loads_into_a_deploy_model(tmp_path):
    train = randomise_statistics(timm.create_model("unireplknet_a")).eval()
    path = tmp_path / "train.pth"
    torch.save(train.state_dict(), path)
    deploy = timm.create_model("unireplknet_a", deploy=True).eval()
    report = load_checkpoint(deploy, path)
    assert any("re-parameterised" in a for a in report.adapted)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(deploy(x), train(x)) < 1e-5


def test_deploy_file_into_a_train_model_says_what_to_do(tmp_path):
    path = tmp_path / "deploy.pth"
    torch.save(state_dict_from_reference("a", "deploy"), path)
    with pytest.raises(CheckpointError, match="deploy=True"):
        load_checkpoint(timm.create_model("unireplknet_a"), path)


def test_a_file_of_another_variant_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    path = tmp_path / "unireplknet_t.pth"
    torch.save(state_dict_from_reference("t", "train"), path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(timm.create_model("unireplknet_a"), path)
    message = str(info.value)
    assert str(path) in message
    assert "unexpected" in message and "stages.0.2.gamma" in message  # T has 3 blocks in stage 1, A has 2
    assert "mis-shaped" in message and "file (80,) vs model (40,)" in message
    assert "depths=(2, 2, 6, 2)" in message


def test_missing_backbone_tensors_are_reported(tmp_path):
    sd = state_dict_from_reference("a", "train")
    del sd["stages.1.0.dwconv.dil_conv_k7_2.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1: stages\.1\.0\.dwconv\.dil_conv_k7_2\.weight"):
        load_checkpoint(timm.create_model("unireplknet_a"), sd)
    # non-strict loading fills what fits and reports the rest
    model = timm.create_model("unireplknet_a")
    report = load_checkpoint(model, sd, strict=False)
    assert report.missing == ["stages.1.0.dwconv.dil_conv_k7_2.weight"]
    assert torch.equal(model.stages[1][0].dwconv.lk_origin.weight, sd["stages.1.0.dwconv.lk_origin.weight"])


def test_safetensors_files_load(tmp_path):
    sd = state_dict_from_reference("a", "train")
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    model = timm.create_model("unireplknet_a")
    load_checkpoint(model, path)
    assert torch.equal(model.head.weight, sd["head.weight"])


def test_unreadable_files_raise_a_checkpoint_error_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(missing)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth: checkpoint file is empty"):
        read_state_dict(empty)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth: cannot read checkpoint"):
        read_state_dict(garbage)
    # a real checkpoint cut in half
    _, whole = small_file(tmp_path, lambda sd: sd, "whole.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: cannot read checkpoint"):
        read_state_dict(truncated)
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="bad.safetensors: cannot read"):
        read_state_dict(bad_safetensors)
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)


def test_files_without_tensors_or_with_foreign_objects_are_refused(tmp_path):
    no_tensors = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "model": {"note": "empty"}}, no_tensors)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read_state_dict(no_tensors)
    # arbitrary pickled objects are not executed (weights_only loading)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump(UniRepLKNet, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        read_state_dict(evil)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        read_state_dict(listing)


def test_official_file_into_a_pruned_features_model(tmp_path):
    sd, path = small_file(tmp_path, lambda sd: {"model": sd})
    features = timm.create_model("unireplknet_a", features_only=True, out_indices=(0, 1))
    report = load_checkpoint(features, path)  # the timm wrapper itself is accepted
    assert any("pruned" in d for d in report.dropped)
    assert any(d.startswith("norm.weight") for d in report.dropped)
    assert torch.equal(features.model.stages[1][0].dwconv.lk_origin.weight, sd["stages.1.0.dwconv.lk_origin.weight"])
    assert [m.shape[1] for m in features(torch.randn(1, 3, 64, 64))] == [40, 80]

    deploy_features = timm.create_model("unireplknet_a", features_only=True, out_indices=(0, 1, 2), deploy=True)
    report = load_checkpoint(deploy_features, path)
    assert any("re-parameterised" in a for a in report.adapted)
    assert len(deploy_features.model.stages) == 3


def test_train_file_into_a_deploy_model_reports_like_a_train_model(tmp_path):
    sd, path = small_file(tmp_path, lambda sd: sd)
    deploy = timm.create_model("unireplknet_a", deploy=True, num_classes=10)
    head_before = deploy.head.weight.clone()
    report = load_checkpoint(deploy, path)
    assert any(d.startswith("head.weight (1000, 320)") for d in report.dropped)
    assert torch.equal(deploy.head.weight, head_before)  # the model keeps its own head
    assert torch.equal(deploy.norm.weight, sd["norm.weight"])

    # strictness passes through to the conversion
    del sd["stages.2.3.dwconv.dil_conv_k3_4.weight"]
    with pytest.raises(CheckpointError, match="missing 1: stages.2.3.dwconv.dil_conv_k3_4.weight"):
        load_checkpoint(timm.create_model("unireplknet_a", deploy=True), sd)
    partial = timm.create_model("unireplknet_a", deploy=True)
    block_before = partial.stages[2][3].dwconv.lk_origin.weight.clone()
    report = load_checkpoint(partial, sd, strict=False)
    assert torch.equal(partial.stages[2][3].dwconv.lk_origin.weight, block_before)  # incomplete block left alone
    assert torch.equal(partial.stages[2][2].pwconv1[1].weight, sd["stages.2.2.pwconv1.1.weight"])


def test_training_checkpoints_with_python_objects_need_trust(tmp_path):
    import argparse

    sd = state_dict_from_reference("a", "train")
    path = tmp_path / "training_run.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=4e-3, epochs=300)}, path)
    with pytest.raises(CheckpointError, match="argparse.Namespace.*trusted=True"):
        load_checkpoint(timm.create_model("unireplknet_a"), path)
    model = timm.create_model("unireplknet_a")
    load_checkpoint(model, path, trusted=True)
    assert torch.equal(model.head.bias, sd["head.bias"])


def test_full_paths_are_never_redirected_to_the_weights_folder(tmp_path, monkeypatch):
    from backbones.unireplknet import resolve_weights_path

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "checkpoint.pth").write_bytes(b"x")
    monkeypatch.setenv("UNIPERCEPTION_WEIGHTS", str(weights))
    assert resolve_weights_path("checkpoint.pth") == weights / "checkpoint.pth"
    with pytest.raises(CheckpointError, match="not found"):
        resolve_weights_path(str(tmp_path / "my_run" / "checkpoint.pth"))
