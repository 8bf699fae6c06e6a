"""Pretrained weights through the Hugging Face Hub cache, and foreign or toolkit-written files through every path.

Every test builds its own Hugging Face cache (the real layout: ``models--org--name/{blobs,refs/main,snapshots}``) and
runs offline, except one that points the Hub endpoint at a local socket that never answers.
"""

import io
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import adapt_input_conv

import backbones
from backbones import CheckpointError, load_checkpoint
from conftest import add_to_hub_cache, relative_error, state_dict_from_reference

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_REPO = "DingXiaoH/UniRepLKNet"
OFFICIAL_A = "unireplknet_a_in1k_224_acc77.03.pth"
STEM = "downsample_layers.0.0.weight"


def torch_bytes(state_dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache and an empty weights folder; ``calls`` records every successful
    ``hf_hub_download`` call as ``(args, kwargs, path)``."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UNIPERCEPTION_WEIGHTS", str(weights))
    # huggingface_hub reads its environment once, when it is imported
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    calls = []
    real_download = huggingface_hub.hf_hub_download

    def recording_download(*args, **kwargs):
        result = real_download(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording_download)
    return SimpleNamespace(cache=cache, weights=weights, calls=calls)


@pytest.fixture(scope="module")
def official_a():
    """A train-form state dict with exactly the keys and shapes of the official A file."""
    return state_dict_from_reference("a", "train", seed=3)


def assert_loaded(model, state_dict, skip=()):
    own = model.state_dict()
    for key, tensor in state_dict.items():
        if key in skip or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(own[key], tensor), key


def test_official_tag_is_read_from_the_hub_cache(hub, official_a):
    snapshot = add_to_hub_cache(hub.cache, OFFICIAL_REPO, OFFICIAL_A, torch_bytes(official_a))

    for name in ("unireplknet_a.in1k", "unireplknet_a"):  # the bare name takes the default tag
        model = timm.create_model(name, pretrained=True)
        assert set(model.state_dict()) == set(official_a)
        assert_loaded(model, official_a)
        expected_cfg = timm.models.resolve_pretrained_cfg("unireplknet_a", "in1k").to_dict()
        assert model.pretrained_cfg == expected_cfg
        assert model.pretrained_cfg["hf_hub_filename"] == OFFICIAL_A and model.pretrained_cfg["tag"] == "in1k"

    assert len(hub.calls) == 2
    args, _, path = hub.calls[0]
    assert args[:2] == (OFFICIAL_REPO, OFFICIAL_A)
    assert Path(path).resolve() == snapshot.resolve()


def test_stem_adaptation_new_head_and_deploy_form(hub, official_a):
    add_to_hub_cache(hub.cache, OFFICIAL_REPO, OFFICIAL_A, torch_bytes(official_a))

    torch.manual_seed(7)
    fresh = timm.create_model("unireplknet_a", in_chans=1, num_classes=10)
    torch.manual_seed(7)
    model = timm.create_model("unireplknet_a.in1k", pretrained=True, in_chans=1, num_classes=10)
    assert_loaded(model, official_a, skip={STEM, "head.weight", "head.bias"})
    expected_stem = adapt_input_conv(1, official_a[STEM].clone(), base_chans=3)
    assert torch.equal(model.state_dict()[STEM], expected_stem)
    assert model.head.weight.shape == (10, 320)
    assert torch.equal(model.head.weight, fresh.head.weight) and torch.equal(model.head.bias, fresh.head.bias)

    train = timm.create_model("unireplknet_a.in1k", pretrained=True).eval()
    deploy = timm.create_model("unireplknet_a.in1k", pretrained=True, deploy=True).eval()
    assert deploy.deploy and not any(k.endswith("running_mean") for k in deploy.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(deploy(x), train(x)) <= 1e-5


def test_sources_in_order_explicit_file_then_weights_folder_then_hub(hub, official_a, tmp_path):
    other = state_dict_from_reference("a", "train", seed=11)
    explicit = tmp_path / "mine.pth"
    torch.save(other, explicit)
    add_to_hub_cache(hub.cache, OFFICIAL_REPO, OFFICIAL_A, torch_bytes(official_a))

    model = timm.create_model("unireplknet_a.in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(explicit)))
    assert_loaded(model, other)
    torch.save(other, hub.weights / OFFICIAL_A)
    model = timm.create_model("unireplknet_a.in1k", pretrained=True)
    assert_loaded(model, other)
    assert hub.calls == []  # the Hub cache was never consulted


def test_missing_file_names_repository_file_url_and_folders(hub):
    with pytest.raises(CheckpointError) as info:
        timm.create_model("unireplknet_t.in1k", pretrained=True)
    message = str(info.value)
    file = "unireplknet_t_in1k_224_acc83.21.pth"
    assert message.startswith("unireplknet_t.in1k: ")
    assert OFFICIAL_REPO in message and file in message
    assert f"https://huggingface.co/{OFFICIAL_REPO}/resolve/main/{file}" in message
    assert str(hub.cache / "models--DingXiaoH--UniRepLKNet") in message  # the cache folder
    assert str(hub.weights) in message and "UNIPERCEPTION_WEIGHTS" in message
    assert "HF_HUB_OFFLINE" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chain from huggingface_hub


def test_unreachable_hub_fails_within_the_metadata_timeout(tmp_path, official_a):
    """A Hub that accepts connections and never answers: one request limited to HF_HUB_ETAG_TIMEOUT seconds and no
    retries, then the error (a file not cached) or the cached copy. (huggingface_hub's own retries would keep
    hf_hub_download waiting for minutes.)"""
    add_to_hub_cache(tmp_path / "hub", OFFICIAL_REPO, OFFICIAL_A, torch_bytes(official_a))
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    script = textwrap.dedent(
        """
        import timm, torch, backbones
        try:
            timm.create_model("unireplknet_t.in1k", pretrained=True)
        except backbones.CheckpointError as exc:
            print("MESSAGE", exc)
        model = timm.create_model("unireplknet_a.in1k", pretrained=True)
        print("CACHED", float(model.head.bias.sum()))
        """
    )
    env = dict(
        os.environ,
        HF_ENDPOINT=f"http://127.0.0.1:{port}",
        HF_HUB_ETAG_TIMEOUT="1",
        HF_HUB_CACHE=str(tmp_path / "hub"),
        UNIPERCEPTION_WEIGHTS=str(tmp_path / "weights"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.pop("HF_HUB_OFFLINE", None)
    try:
        # a client that retried would still be waiting when this bound runs out (60 s a try)
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        silent.setblocking(False)
        connections = 0
        while True:  # the connections the two loads opened, waiting in the backlog
            try:
                silent.accept()[0].close()
            except BlockingIOError:
                break
            connections += 1
    finally:
        silent.close()
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ")[0].isupper())
    assert "MESSAGE" in lines and "CACHED" in lines, result.stdout + result.stderr
    # no metadata request is retried: with huggingface_hub's backoff (5 retries) the first load alone would open 6
    assert 1 <= connections < 6
    file = "unireplknet_t_in1k_224_acc83.21.pth"
    assert file in lines["MESSAGE"] and f"127.0.0.1:{port}/{OFFICIAL_REPO}/resolve/main/{file}" in lines["MESSAGE"]
    assert "time limit 1 s" in lines["MESSAGE"]
    assert float(lines["CACHED"]) == pytest.approx(float(official_a["head.bias"].sum()), abs=1e-4)
    assert "using the cached copy" in result.stderr


def uniperceiver_file(path: Path, backbone_state: dict, stems: dict = None) -> dict:
    """A ``model.safetensors`` as ``UniPerceiver.save_pretrained`` writes it; ``stems`` replaces the plain stem by
    one convolution per modality (``{modality: (weight, bias)}``). Returns the tensors written."""
    tensors = {f"backbone.{k}": v.clone().contiguous() for k, v in backbone_state.items()}
    if stems:
        del tensors[f"backbone.{STEM}"], tensors["backbone.downsample_layers.0.0.bias"]
        for modality, (weight, bias) in stems.items():
            tensors[f"backbone.downsample_layers.0.0.convs.{modality}.weight"] = weight
            tensors[f"backbone.downsample_layers.0.0.convs.{modality}.bias"] = bias
    g = torch.Generator().manual_seed(5)
    tensors["heads.image.weight"] = torch.randn(3, 320, generator=g)
    tensors["heads.image.bias"] = torch.randn(3, generator=g)
    tensors["adapters.image.normalise.mean"] = torch.randn(3, generator=g)
    save_file(tensors, str(path))
    return tensors


def without_head(state_dict):
    return {k: v for k, v in state_dict.items() if not k.startswith("head.")}


def test_uniperceiver_file_loads_every_backbone_weight(hub, official_a, tmp_path):
    path = tmp_path / "model.safetensors"
    backbone_state = without_head(official_a)  # a UniPerceiver backbone has no classifier of its own
    uniperceiver_file(path, backbone_state)

    model = timm.create_model("unireplknet_a", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert_loaded(model, backbone_state)
    report = load_checkpoint(timm.create_model("unireplknet_a", num_classes=0), path)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert any("3 tensors outside the backbone (adapters.*, heads.*)" in d for d in report.dropped)
    assert report.loaded == len(backbone_state)

    # the same file published in a Hub repository of its own
    add_to_hub_cache(hub.cache, "someone/uniperceiver-image", "model.safetensors", path.read_bytes())
    overlay = dict(hf_hub_id="someone/uniperceiver-image", hf_hub_filename="model.safetensors")
    model = timm.create_model("unireplknet_a", pretrained=True, pretrained_cfg_overlay=overlay, deploy=True)
    assert model.deploy


def test_per_modality_stems_choose_by_channels_or_fail_naming_them(hub, official_a, tmp_path):
    g = torch.Generator().manual_seed(9)
    audio = (torch.randn(20, 1, 3, 3, generator=g), torch.randn(20, generator=g))
    image = (torch.randn(20, 3, 3, 3, generator=g), torch.randn(20, generator=g))
    video = (torch.randn(20, 3, 3, 3, generator=g), torch.randn(20, generator=g))
    backbone_state = without_head(official_a)
    two = tmp_path / "audio_image.safetensors"
    uniperceiver_file(two, backbone_state, stems=dict(audio=audio, image=image))

    for in_chans, (weight, bias) in ((1, audio), (3, image)):
        model = timm.create_model(
            "unireplknet_a", pretrained=True, in_chans=in_chans, pretrained_cfg_overlay=dict(file=str(two))
        )
        assert_loaded(model, backbone_state, skip={STEM, "downsample_layers.0.0.bias"})
        assert torch.equal(model.downsample_layers[0][0].weight, weight)
        assert torch.equal(model.downsample_layers[0][0].bias, bias)
    report = load_checkpoint(timm.create_model("unireplknet_a", in_chans=1), two)
    assert any("the audio stem (1 channel)" in a for a in report.adapted)
    assert any("stems of the other modalities: image" in d for d in report.dropped)

    # no stem takes 2 channels: the error names the stems; stem= picks one, adapted like any stem
    with pytest.raises(CheckpointError, match=r"audio \(1 channel\), image \(3 channels\).*none of them.*stem="):
        timm.create_model("unireplknet_a", pretrained=True, in_chans=2, pretrained_cfg_overlay=dict(file=str(two)))
    model = timm.create_model("unireplknet_a", in_chans=2)
    report = load_checkpoint(model, two, stem="image")
    assert torch.equal(model.downsample_layers[0][0].weight, adapt_input_conv(2, image[0].clone(), base_chans=3))
    assert any("3 -> 2 input channels" in a for a in report.adapted)
    with pytest.raises(CheckpointError, match=r"no stem for 'depth'; its stems: audio \(1 channel\), image"):
        load_checkpoint(model, two, stem="depth")

    # two stems of 3 channels with different weights are ambiguous
    three = tmp_path / "audio_image_video.safetensors"
    uniperceiver_file(three, backbone_state, stems=dict(audio=audio, image=image, video=video))
    with pytest.raises(CheckpointError, match=r"several of them take the model's 3 channels"):
        timm.create_model("unireplknet_a", pretrained=True, pretrained_cfg_overlay=dict(file=str(three)))
    model = timm.create_model("unireplknet_a", deploy=True)
    load_checkpoint(model, three, stem="video")  # through the train-to-deploy conversion
    assert torch.equal(model.downsample_layers[0][0].weight, video[0])


def test_foreign_files_fail_loudly_through_every_path(hub, tmp_path):
    resnet = timm.create_model("resnet18", num_classes=10).state_dict()
    pth = tmp_path / "resnet18.pth"
    torch.save(resnet, pth)
    with pytest.raises(CheckpointError, match=r"resnet18\.pth: .*not a UniRepLKNet checkpoint"):
        timm.create_model("unireplknet_a", pretrained=True, pretrained_cfg_overlay=dict(file=str(pth)))

    # a UniPerceiver file whose backbone is another architecture
    other_backbone = tmp_path / "model.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in resnet.items()}, str(other_backbone))
    with pytest.raises(CheckpointError, match="not a UniRepLKNet checkpoint"):
        timm.create_model("unireplknet_a", pretrained=True, pretrained_cfg_overlay=dict(file=str(other_backbone)))

    # the official name in the Hub cache, holding another variant's weights
    add_to_hub_cache(hub.cache, OFFICIAL_REPO, OFFICIAL_A, torch_bytes(state_dict_from_reference("t", "train")))
    with pytest.raises(CheckpointError, match="mis-shaped") as info:
        timm.create_model("unireplknet_a.in1k", pretrained=True)
    assert OFFICIAL_A in str(info.value)

    # the weights folder, and an in-memory state dict
    torch.save(resnet, hub.weights / OFFICIAL_A)
    with pytest.raises(CheckpointError, match="not a UniRepLKNet checkpoint"):
        timm.create_model("unireplknet_a.in1k", pretrained=True)
    with pytest.raises(CheckpointError, match="not a UniRepLKNet checkpoint"):
        timm.create_model("unireplknet_a", pretrained=True, pretrained_cfg_overlay=dict(state_dict=resnet))


def test_download_from_hub_is_exported():
    assert backbones.download_from_hub is backbones.checkpoint.download_from_hub


# ---------------------------------------------------------------------------------------------------------------------
# UniPerceiver(pretrained=...): the same files, each modality's stem adapted from the RGB one


def test_uniperceiver_starts_from_published_weights(hub, official_a):
    from uniperception import UniPerceiver
    from uniperception.errors import UniPerceptionError

    add_to_hub_cache(hub.cache, OFFICIAL_REPO, OFFICIAL_A, torch_bytes(official_a))
    audio = UniPerceiver("audio", pretrained="in1k", target_frames=32)
    assert_loaded(audio.backbone, official_a, skip={STEM, "head.weight", "head.bias"})
    torch.testing.assert_close(audio.backbone.state_dict()[STEM], adapt_input_conv(1, official_a[STEM]))
    assert audio.untrained is None and "published weights (in1k)" in repr(audio)
    labelled = UniPerceiver("audio", num_classes=3, pretrained=True, target_frames=32)
    assert "head was never trained" in labelled.untrained and "published weights" in labelled.untrained

    both = UniPerceiver(["image", "audio"], num_classes={"image": 2, "audio": 3}, pretrained="in1k",
                        adapters={"image": dict(image_size=32), "audio": dict(target_frames=32)})
    stems = both.stems.convs
    torch.testing.assert_close(stems["image"].weight, official_a[STEM])
    torch.testing.assert_close(stems["audio"].weight, adapt_input_conv(1, official_a[STEM]))
    assert_loaded(both.backbone, official_a, skip={STEM, "downsample_layers.0.0.bias", "head.weight", "head.bias"})
    with pytest.raises(UniPerceptionError, match="no published weights 'unireplknet_a.in22k'.*in1k"):
        UniPerceiver("image", pretrained="in22k")


def test_a_saved_model_of_several_modalities_gives_each_its_own_stem(tmp_path):
    from uniperception import UniPerceiver

    torch.manual_seed(0)
    settings = dict(adapters={"image": dict(image_size=32), "audio": dict(target_frames=32)})
    source = UniPerceiver(["image", "audio"], **settings)
    source.save_pretrained(tmp_path / "saved")
    target = UniPerceiver(["audio", "image"], **settings)
    target.load_backbone_weights(tmp_path / "saved" / "model.safetensors")
    for key, tensor in source.backbone.state_dict().items():
        torch.testing.assert_close(target.backbone.state_dict()[key], tensor, rtol=0, atol=0)
