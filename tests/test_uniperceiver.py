"""UniPerceiver: construction, several modalities on one backbone, weights, saving and the errors around them."""

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from backbones.errors import CheckpointError
from modalities import InvalidInputError
from uniperception import UniPerceiver
from uniperception.errors import UniPerceptionError
from uniperception.model import ModalityStems

from conftest import state_dict_from_reference

AUDIO = {"target_frames": 64}
IMAGE = {"image_size": 64}


def two_modalities(**kwargs):
    return UniPerceiver(["audio", "image"], num_classes={"audio": 3, "image": 4},
                        adapters={"audio": AUDIO, "image": IMAGE}, **kwargs)


def test_single_modality_builds_adapter_backbone_and_head():
    model = UniPerceiver("audio", num_classes=5, **AUDIO)
    assert model.modalities == ["audio"] and model.stems is None
    assert model.backbone.in_chans == 1 and model.backbone.num_classes == 0
    logits = model(torch.randn(2, 1, 128, 64))
    assert logits.shape == (2, 5)
    assert model.class_names == {"audio": ["0", "1", "2", "3", "4"]}
    named = UniPerceiver("image", class_names=["cat", "dog"], **IMAGE)
    assert named.class_names["image"] == ["cat", "dog"] and named(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def test_other_timm_backbones_and_kernel_plans():
    model = UniPerceiver("image", backbone="resnet18", num_classes=3, **IMAGE)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    eleven = UniPerceiver("audio", num_classes=2, kernel_sizes=11, **AUDIO)
    assert {block.kernel_size for block in eleven.backbone.stages[3]} == {11}
    assert eleven.backbone.kernel_sizes[:3] == UniPerceiver("audio", num_classes=2, **AUDIO).backbone.kernel_sizes[:3]
    small = UniPerceiver("audio", num_classes=2, kernel_sizes=3, **AUDIO)  # the paper's ablation: one argument
    assert {block.kernel_size for block in small.backbone.stages[3]} == {3}
    with pytest.raises(UniPerceptionError, match="kernel_sizes applies to UniRepLKNet backbones"):
        UniPerceiver("image", backbone="resnet18", num_classes=3, kernel_sizes=7)


def test_several_modalities_share_every_backbone_tensor_but_the_stem():
    model = two_modalities()
    assert isinstance(model.stems, ModalityStems)
    assert model.stems.convs["audio"].in_channels == 1 and model.stems.convs["image"].in_channels == 3
    used = {}

    def remember(name):
        def hook(module, inputs, output):
            used.setdefault(name, []).append([p.data_ptr() for p in module.parameters()])
        return hook

    handles = [model.backbone.stages[i].register_forward_hook(remember(f"stage{i}")) for i in range(4)]
    outputs = model({"audio": torch.randn(2, 1, 128, 64), "image": torch.randn(2, 3, 64, 64)})
    for handle in handles:
        handle.remove()
    assert outputs["audio"].shape == (2, 3) and outputs["image"].shape == (2, 4)
    for stage, calls in used.items():
        assert len(calls) == 2 and calls[0] == calls[1], stage  # the same tensors ran for both modalities
    stage_names = [n for n, _ in model.named_parameters() if ".stages." in n]
    assert len(stage_names) == len(set(stage_names)) == sum(1 for _ in model.backbone.stages.parameters())
    with pytest.raises(UniPerceptionError, match="several modalities"):
        model(torch.randn(2, 1, 128, 64))
    assert model(torch.randn(2, 3, 64, 64), modality="image").shape == (2, 4)


def test_one_training_step_on_two_modalities_reaches_the_shared_stages_from_both():
    torch.manual_seed(0)
    model = two_modalities().train()
    shared = model.backbone.stages[1][0].gamma  # layer scale: its gradient is not scaled down by itself
    batches = {"audio": torch.randn(2, 1, 128, 64), "image": torch.randn(2, 3, 64, 64)}
    targets = {"audio": torch.tensor([0, 2]), "image": torch.tensor([1, 3])}
    contributions = {}
    for modality in batches:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(batches[modality], modality=modality), targets[modality]).backward()
        contributions[modality] = shared.grad.clone()
        assert model.heads[modality].fc.weight.grad.abs().sum() > 0
        other = "image" if modality == "audio" else "audio"
        assert model.heads[other].fc.weight.grad is None  # the other head is not touched
        assert model.stems.convs[modality].weight.grad.abs().sum() > 0
    assert contributions["audio"].abs().sum() > 0 and contributions["image"].abs().sum() > 0
    # one step on both: the shared gradient is the sum of both modalities' gradients
    model.zero_grad(set_to_none=True)
    outputs = model(batches)
    loss = sum(torch.nn.functional.cross_entropy(outputs[m], targets[m]) for m in outputs)
    loss.backward()
    assert torch.allclose(shared.grad, contributions["audio"] + contributions["image"], rtol=1e-4, atol=1e-7)
    before = shared.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert not torch.equal(before, shared)


def test_official_checkpoint_loads_into_the_backbone(tmp_path):
    official = state_dict_from_reference("a", "train")  # every official key and shape, with 1000-class head
    path = tmp_path / "unireplknet_a_in1k_224_acc77.03.pth"
    torch.save({"model": official}, path)
    model = UniPerceiver("audio", num_classes=3, **AUDIO).load_backbone_weights(path)
    stem = official["downsample_layers.0.0.weight"]
    assert torch.allclose(model.backbone.downsample_layers[0][0].weight, stem.sum(1, keepdim=True))
    assert torch.equal(model.backbone.stages[2][5].pwconv2[0].weight, official["stages.2.5.pwconv2.0.weight"])
    both = two_modalities().load_backbone_weights(path)
    assert torch.equal(both.stems.convs["image"].weight, stem)
    assert torch.allclose(both.stems.convs["audio"].weight, stem.sum(1, keepdim=True))
    assert torch.equal(both.backbone.stages[3][0].norm.weight, official["stages.3.0.norm.weight"])
    deploy = UniPerceiver("image", num_classes=2, **IMAGE).reparameterize().load_backbone_weights(path)
    assert deploy.deploy
    with pytest.raises(CheckpointError, match="unireplknet_t"):
        wrong = tmp_path / "unireplknet_t.pth"
        torch.save(state_dict_from_reference("t", "train"), wrong)
        UniPerceiver("image", num_classes=2, **IMAGE).load_backbone_weights(wrong)


def test_several_modalities_save_and_load(tmp_path):
    model = two_modalities().eval()
    batches = {"audio": torch.randn(2, 1, 128, 64), "image": torch.randn(2, 3, 64, 64)}
    model.save_pretrained(tmp_path / "both")
    config = json.loads((tmp_path / "both" / "config.json").read_text())
    assert config["modalities"] == ["audio", "image"] and config["adapters"]["audio"]["target_frames"] == 64
    assert config["adapters"]["audio"]["mean"] == pytest.approx(-6.845978)  # normalisation statistics kept
    loaded = UniPerceiver.from_pretrained(tmp_path / "both")
    expected, actual = model(batches), loaded(batches)
    for modality in batches:
        assert torch.equal(expected[modality], actual[modality])


# --- errors ---------------------------------------------------------------------------------------------------------

def test_unknown_names_list_the_known_ones():
    # (other tests may register plugin modalities in this process)
    with pytest.raises(UniPerceptionError, match="unknown modality 'smell'; known modalities: audio, .*image, "
                                                 "point_cloud, time_series, video"):
        UniPerceiver("smell", num_classes=2)
    with pytest.raises(UniPerceptionError, match="unknown backbone 'unireplknet_q'; UniRepLKNet variants: "
                                                 "unireplknet_a, .*unireplknet_xl"):
        UniPerceiver("image", backbone="unireplknet_q", num_classes=2)
    with pytest.raises(UniPerceptionError, match="task must be one of"):
        UniPerceiver("image", num_classes=2, task="segmentation")
    with pytest.raises(UniPerceptionError, match="forecasting.*time_series"):
        UniPerceiver("audio", task="forecasting")
    with pytest.raises(UniPerceptionError, match="num_classes or class_names"):
        UniPerceiver("image", task="classification")
    for names in ("cat", ["a", "a"]):
        with pytest.raises(UniPerceptionError, match="class_names must be a list of distinct names"):
            UniPerceiver("image", class_names=names)
    with pytest.raises(UniPerceptionError, match="num_classes=3 but 2 class_names"):
        UniPerceiver("image", num_classes=3, class_names=["a", "b"])
    with pytest.raises(UniPerceptionError, match="adapters="):
        UniPerceiver(["audio", "image"], num_classes={"audio": 2, "image": 2}, image_size=64)
    with pytest.raises(UniPerceptionError, match="unknown modality 'video' for this model"):
        UniPerceiver("image", num_classes=2, **IMAGE)(torch.randn(1, 3, 64, 64), modality="video")


def test_a_file_of_another_modality_names_the_file(tmp_path):
    sound = tmp_path / "speech.wav"
    soundfile.write(sound, np.zeros(16000, np.float32), 16000)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(photo)
    with pytest.raises(InvalidInputError, match="speech.wav: not a readable image"):
        UniPerceiver("image", num_classes=2, **IMAGE).predict(sound)
    with pytest.raises(InvalidInputError, match="photo.png: not a readable audio file"):
        UniPerceiver("audio", num_classes=2, **AUDIO).predict([photo])


def test_weights_of_another_configuration_name_the_mismatch(tmp_path):
    UniPerceiver("image", num_classes=4, **IMAGE).save_pretrained(tmp_path / "four")
    UniPerceiver("image", num_classes=7, **IMAGE).save_pretrained(tmp_path / "seven")
    (tmp_path / "four" / "model.safetensors").replace(tmp_path / "seven" / "model.safetensors")
    with pytest.raises(CheckpointError, match="seven/model.safetensors: does not match"):
        UniPerceiver.from_pretrained(tmp_path / "seven")  # the recorded checksum tells first
    config = json.loads((tmp_path / "seven" / "config.json").read_text())
    del config["weights_sha256"]  # without it, loading names the mismatch
    (tmp_path / "seven" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors: the weights belong to another configuration: "
                                              r"mis-shaped heads.image.fc.weight: file \(4, 320\) vs model \(7, 320\)"):
        UniPerceiver.from_pretrained(tmp_path / "seven")


def test_corrupt_truncated_and_missing_files_are_checkpoint_errors(tmp_path):
    UniPerceiver("image", num_classes=2, **IMAGE).save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        UniPerceiver.from_pretrained(tmp_path / "model")
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        UniPerceiver.from_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not a readable model configuration"):
        UniPerceiver.from_pretrained(tmp_path / "model")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        UniPerceiver.from_pretrained(tmp_path / "nothing_here")


def test_a_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model = UniPerceiver("image", num_classes=2, **IMAGE)
    model.save_pretrained(tmp_path / "kept")
    before = (tmp_path / "kept" / "model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    for target in ("new", "kept"):
        with pytest.raises(OSError, match="No space left"):
            UniPerceiver("image", num_classes=3, **IMAGE).save_pretrained(tmp_path / target)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == before  # the old save is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no staging directory left behind
    monkeypatch.undo()
    assert UniPerceiver.from_pretrained(tmp_path / "kept").heads["image"].fc.out_features == 2


def test_saving_into_an_existing_directory_keeps_other_files_and_detects_a_half_finished_save(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("epoch 1\n")
    UniPerceiver("image", num_classes=2, **IMAGE).save_pretrained(run)
    assert sorted(p.name for p in run.iterdir()) == ["README.md", "config.json", "model.safetensors", "train.log"]
    old_config = (run / "config.json").read_text()
    UniPerceiver("image", num_classes=2, **IMAGE).save_pretrained(run)  # new weights, same shapes
    (run / "config.json").write_text(old_config)  # as if the save stopped between its two renames
    with pytest.raises(CheckpointError, match="model.safetensors: does not match .*config.json"):
        UniPerceiver.from_pretrained(run)


def test_several_modalities_in_deploy_form_take_official_and_one_channel_weights(tmp_path):
    official = tmp_path / "official.pth"
    torch.save(state_dict_from_reference("a", "train"), official)
    both = two_modalities().reparameterize().load_backbone_weights(official)
    assert both.deploy and torch.equal(both.stems.convs["image"].weight,
                                       torch.load(official)["downsample_layers.0.0.weight"])
    audio = UniPerceiver("audio", num_classes=2, **AUDIO)
    one_channel = tmp_path / "audio_backbone.pth"
    torch.save(audio.backbone.state_dict(), one_channel)
    loaded = two_modalities().load_backbone_weights(one_channel)
    stem = audio.backbone.downsample_layers[0][0].weight
    assert torch.allclose(loaded.stems.convs["audio"].weight, stem, atol=1e-6)
    assert torch.allclose(loaded.stems.convs["image"].weight, stem.expand(-1, 3, -1, -1) / 3, atol=1e-6)
    with pytest.raises(CheckpointError, match="audio_backbone.pth: does not fit resnet18"):
        UniPerceiver("image", backbone="resnet18", num_classes=2, **IMAGE).load_backbone_weights(one_channel)


def test_predict_on_nothing_in_low_precision_and_modes_restored(tmp_path):
    model = UniPerceiver("image", num_classes=2, **IMAGE)
    assert model.predict([]) == [] and model.embed([]).shape == (0, 320)
    photo = np.zeros((40, 40, 3), np.uint8)
    assert model.to(torch.bfloat16).predict(photo)["probabilities"].dtype == torch.float32
    model = model.float().train()
    model.export_onnx(tmp_path / "m.onnx", batch=torch.randn(1, 3, 64, 64))
    assert model.training  # export leaves the mode as it found it
    model.predict(photo)
    assert model.training


def test_concurrent_calls_on_two_modalities_use_their_own_stems():
    from concurrent.futures import ThreadPoolExecutor

    model = two_modalities().eval()
    batches = {"audio": torch.randn(1, 1, 128, 64), "image": torch.randn(1, 3, 64, 64)}
    with torch.no_grad():
        expected = {m: model(b, modality=m) for m, b in batches.items()}
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda m: (m, model(batches[m], modality=m)), ["audio", "image"] * 10))
    for modality, output in results:
        assert torch.allclose(output, expected[modality], atol=1e-6)
