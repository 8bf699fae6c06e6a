"""Sharing our own models in the Hugging Face Hub layout: ``save_pretrained`` writes config, weights and a model card;
``from_pretrained`` takes a folder or a Hub repository id (through huggingface_hub's cache, offline from it);
``push_to_hub`` uploads exactly the folder ``save_pretrained`` writes.

No Hub is reachable here, so the repository is put into a local Hugging Face cache in its real layout
(``models--org--name/{blobs,refs,snapshots}``) and huggingface_hub runs offline against it.
"""

import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import constants

from conftest import add_to_hub_cache
from uniperception import UniPerceiver
from uniperception.errors import CheckpointError

IMAGE = dict(image_size=32)


def put_into_hub_cache(cache, repo_id, folder):
    """Every file of ``folder`` into the cached repository ``repo_id``."""
    for path in sorted(folder.iterdir()):
        add_to_hub_cache(cache, repo_id, path.name, path.read_bytes())


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def trained_model():
    torch.manual_seed(0)
    model = UniPerceiver("image", class_names=["cat", "dog"], **IMAGE)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model.mark_trained().eval()


def test_a_saved_folder_is_a_hub_repository_with_a_model_card(tmp_path):
    folder = trained_model().save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = huggingface_hub.ModelCard.load(folder / "README.md")
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "uniperception" and "unireplknet" in metadata["tags"]
    # a card the user wrote is kept on the next save
    (folder / "README.md").write_text("# my own card\n")
    trained_model().save_pretrained(folder)
    assert (folder / "README.md").read_text() == "# my own card\n"


def test_from_a_repository_id_through_the_offline_cache(tmp_path, offline_cache):
    model = trained_model()
    put_into_hub_cache(offline_cache, "lab/digits-model", model.save_pretrained(tmp_path / "saved"))
    loaded = UniPerceiver.from_pretrained("lab/digits-model")
    batch = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=0)
    assert loaded.class_names == model.class_names and loaded.untrained is None


def test_a_repository_missing_from_the_offline_cache_says_what_to_do(offline_cache):
    with pytest.raises(CheckpointError, match=r"lab/absent.*not in the local cache.*" + str(offline_cache)):
        UniPerceiver.from_pretrained("lab/absent")
    with pytest.raises(CheckpointError, match="not a valid Hub repository id"):
        UniPerceiver.from_pretrained("not a repo/na me")


def test_a_repository_with_mismatched_weights_is_refused(tmp_path, offline_cache):
    first = trained_model().save_pretrained(tmp_path / "first")
    other = UniPerceiver("image", class_names=["a", "b", "c"], **IMAGE).mark_trained()
    second = other.save_pretrained(tmp_path / "second")
    shutil.copyfile(second / "model.safetensors", first / "model.safetensors")  # weights of another model
    put_into_hub_cache(offline_cache, "lab/mixed", first)
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        UniPerceiver.from_pretrained("lab/mixed")


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    """The upload itself is huggingface_hub's (no Hub is reachable here): what it is handed must be a folder that
    ``from_pretrained`` loads into the same model."""
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        copy = tmp_path / f"uploaded{len(uploads)}"
        shutil.copytree(folder_path, copy)
        uploads.append((repo_id, copy, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = trained_model()
    assert model.push_to_hub("lab/pushed", commit_message="first") == "https://huggingface.co/lab/pushed/commit/1"
    repo_id, folder, kwargs = uploads[0]
    assert repo_id == "lab/pushed" and kwargs["commit_message"] == "first"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    batch = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(UniPerceiver.from_pretrained(folder)(batch), model(batch), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="lab/again")
    assert uploads[1][0] == "lab/again" and (tmp_path / "local" / "config.json").is_file()


def test_untrained_state_survives_saving(tmp_path):
    fresh = UniPerceiver("image", num_classes=2, **IMAGE)
    assert fresh.untrained is not None
    assert UniPerceiver.from_pretrained(fresh.save_pretrained(tmp_path / "fresh")).untrained is not None
    loaded = UniPerceiver.from_pretrained(trained_model().save_pretrained(tmp_path / "trained"))
    assert loaded.untrained is None and "trained or loaded" in repr(loaded)
    other = UniPerceiver("image", num_classes=2, **IMAGE)
    other.load_state_dict(loaded.state_dict())
    assert other.untrained is None
    assert np.isfinite(other.embed(np.zeros((32, 32, 3), dtype=np.uint8)).numpy()).all()
