"""Datasets from disk: class folders, CSV manifests and time-ordered forecasting windows, bad files included."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from modalities import InvalidInputError, create_adapter
from uniperception.data import FolderDataset, ForecastingDataset, ManifestDataset, collate_skipping
from uniperception.errors import UniPerceptionError


def write_images(root, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    paths = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            path = root / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
            paths.setdefault(name, []).append(path)
    return paths


def test_folder_dataset_labels_sorted_class_folders(tmp_path):
    write_images(tmp_path, classes=("zebra", "ant"))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "ant" / ".hidden.png").write_bytes(b"")
    adapter = create_adapter("image", image_size=32)
    data = FolderDataset(tmp_path, adapter)
    assert data.class_names == ["ant", "zebra"] and len(data) == 6
    assert data.counts() == {"ant": 3, "zebra": 3}
    sample, label = data[4]
    assert sample.shape == (3, 32, 32) and label == 1
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate_skipping(adapter))
    batch, labels = next(iter(loader))
    assert batch.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 0, 1]


def test_corrupt_samples_are_skipped_and_counted_or_raised(tmp_path):
    write_images(tmp_path)
    broken = tmp_path / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    adapter = create_adapter("image", image_size=32)
    data = FolderDataset(tmp_path, adapter)
    index = [str(path) for path, _ in data.items].index(str(broken))
    with pytest.warns(RuntimeWarning, match="broken.png"):
        assert data[index] is None
    assert data.skipped == [str(broken)]
    batch, labels = collate_skipping(adapter)([data[0], None, data[1]])
    assert batch.shape[0] == 2 and labels.tolist() == [0, 0]
    assert collate_skipping(adapter)([None, None]) is None
    with pytest.raises(InvalidInputError, match="broken.png"):
        FolderDataset(tmp_path, adapter, strict=True)[index]


def test_manifest_with_splits_and_relative_paths(tmp_path):
    paths = write_images(tmp_path / "files")
    rows = [(p.relative_to(tmp_path), name, "train" if i < 2 else "test")
            for name, group in paths.items() for i, p in enumerate(group)]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(manifest, index=False)
    adapter = create_adapter("image", image_size=32)
    train = ManifestDataset(manifest, adapter, split="train", train=True)
    test = ManifestDataset(manifest, adapter, split="test")
    assert len(train) == 4 and len(test) == 2 and train.class_names == test.class_names == ["cat", "dog"]
    assert [label for _, label in test.items] == [0, 1]
    assert train[0][0].shape == (3, 32, 32)
    assert len(ManifestDataset(manifest, adapter)) == 6


@pytest.mark.parametrize("content, split, message", [
    ("file,label\na.png,cat\n", None, "needs columns path and label"),
    ("path,label\nmissing.png,cat\n", None, "1 listed file\\(s\\) do not exist, e.g. .*missing.png"),
    ("path,label,split\nx.png,cat,train\n", "val", "no rows of split 'val'; splits: \\['train'\\]"),
    ("path,label\nx.png,cat\n", "train", "no split column"),
    ("", None, "not a readable CSV manifest"),
])
def test_bad_manifests(tmp_path, content, split, message):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    with pytest.raises(UniPerceptionError, match=message):
        ManifestDataset(manifest, create_adapter("image"), split=split)


def test_bad_folders(tmp_path):
    adapter = create_adapter("audio")
    with pytest.raises(UniPerceptionError, match="no such folder"):
        FolderDataset(tmp_path / "absent", adapter)
    with pytest.raises(UniPerceptionError, match="holds no class folders"):
        FolderDataset(tmp_path, adapter)
    (tmp_path / "yes").mkdir()
    (tmp_path / "yes" / "photo.png").write_bytes(b"png")
    with pytest.raises(UniPerceptionError, match="no files with suffixes .wav"):
        FolderDataset(tmp_path, adapter)
    with pytest.raises(UniPerceptionError, match="not among class_names"):
        FolderDataset(tmp_path, adapter, class_names=["no"])


def test_forecasting_splits_are_time_ordered_and_targets_do_not_overlap(tmp_path):
    steps = 200
    frame = pd.DataFrame({"time": pd.date_range("2024-01-01", periods=steps, freq="h"),
                          "value": np.arange(steps, dtype=float)})
    path = tmp_path / "series.parquet"
    frame.to_parquet(path)
    adapter = create_adapter("time_series", task="forecasting", length=32, horizon=4, min_d_model=32)
    parts = {split: ForecastingDataset(path, adapter, split=split) for split in ("train", "val", "test")}
    targets = {split: set() for split in parts}
    for split, data in parts.items():
        for i in range(len(data)):
            window, target = data[i]
            first = int(data.first_steps[i])
            assert torch.equal(window[:, 0], torch.arange(first - 32, first, dtype=torch.float32))
            assert torch.equal(target[:, 0], torch.arange(first, first + 4, dtype=torch.float32))
            targets[split].update(range(first, first + 4))
    assert max(targets["train"]) < min(targets["val"]) and max(targets["val"]) < min(targets["test"])
    assert max(targets["train"]) < 140 <= min(targets["val"]) and max(targets["val"]) < 160 <= min(targets["test"])
    assert len(ForecastingDataset(path, adapter, split="train", stride=8)) == -(-len(parts["train"]) // 8)
    jittered = ForecastingDataset(path, adapter, split="train", train=True)[0]
    assert jittered[0].shape == (32, 7) and jittered[1].shape == (4, 1)


def test_forecasting_dataset_errors(tmp_path):
    frame = pd.DataFrame({"value": np.arange(40, dtype=float)})
    forecaster = create_adapter("time_series", task="forecasting", length=32, horizon=4, min_d_model=32)
    with pytest.raises(UniPerceptionError, match="the val part .* too short"):
        ForecastingDataset(frame, forecaster, split="val")
    with pytest.raises(UniPerceptionError, match="task='forecasting'"):
        ForecastingDataset(frame, create_adapter("time_series", length=32, min_d_model=32))
    with pytest.raises(UniPerceptionError, match="split must be one of"):
        ForecastingDataset(frame, forecaster, split="holdout")
    with pytest.raises(UniPerceptionError, match="fractions"):
        ForecastingDataset(frame, forecaster, fractions=(0.5, 0.5, 0.5))
