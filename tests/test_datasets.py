"""Built-in datasets: real files by real tools, deterministic splits, honest labels, and a cache that never keeps a
half-built set."""

import hashlib
import json
import shutil

import av
import numpy as np
import open3d as o3d
import pandas as pd
import pytest
import soundfile
from PIL import Image

from modalities import create_adapter
from uniperception import datasets
from uniperception.baselines import evaluate_baseline
from uniperception.data import FolderDataset, ForecastingDataset
from uniperception.datasets import DatasetBuildError
from uniperception.errors import UniPerceptionError


@pytest.fixture
def cache(dataset_cache):
    return dataset_cache


def _digest(root):
    hasher = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "info.json"):
        hasher.update(str(path.relative_to(root)).encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


def _decoded(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="gray") for frame in container.decode(video=0)])


def test_every_built_in_set_is_listed_with_its_modality():
    names = datasets.available()
    assert {"digits", "spoken_commands", "moving_digits", "primitives", "gunpoint", "co2"} <= set(names)
    assert names["co2"]["task"] == "forecasting" and names["moving_digits"]["modality"] == "video"
    with pytest.raises(UniPerceptionError, match="unknown built-in dataset 'mnist'.*digits"):
        datasets.load("mnist")


def test_digits_are_the_real_digits_split_per_class_and_deterministic(cache, tmp_path):
    digits = datasets.load("digits", root=cache)
    assert digits.counts == {"train": 1258, "val": 269, "test": 270}  # 1797 in all
    assert digits.class_names == [str(d) for d in range(10)]
    assert "CC BY 4.0" in digits.info["licence"] and "1797" in digits.info["source"]
    files = {split: digits.files(split) for split in ("train", "val", "test")}
    assert sum(len(f) for f in files.values()) == 1797
    names = [{p.name for p in f} for f in files.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    for paths in files.values():  # every class in every split, in proportion
        per_class = pd.Series([p.parent.name for p in paths]).value_counts()
        assert len(per_class) == 10 and per_class.min() >= 0.8 * len(paths) / 10
    from sklearn.datasets import load_digits

    index = int(files["test"][0].stem)
    pixels = np.asarray(Image.open(files["test"][0]))
    np.testing.assert_array_equal(pixels, np.round(load_digits().images[index] * 255 / 16).astype(np.uint8))
    assert files["test"][0].parent.name == str(load_digits().target[index])
    assert _digest(datasets.load("digits", root=tmp_path).root) == _digest(digits.root)  # built again: same bytes
    dataset = digits.dataset("test", create_adapter("image", image_size=32, crop_pct=1.0))
    assert isinstance(dataset, FolderDataset) and len(dataset) == 270 and dataset[0][0].shape == (3, 32, 32)


def test_moving_digits_labels_follow_the_motion_and_test_digits_are_unseen(cache):
    clips = datasets.load("moving_digits", root=cache)
    digits = datasets.load("digits", root=cache)
    assert clips.counts == {"train": 560, "val": 120, "test": 240}
    assert clips.class_names == sorted(["left", "right", "up", "down", "rotate_cw", "rotate_ccw", "zoom_in",
                                        "zoom_out"])
    train_digits = {int(p.stem) for p in digits.files("train")}
    test_digits = {int(p.stem.split("digit")[1]) for p in clips.files("test")}
    assert not (train_digits & test_digits)

    def centroid(frame):
        weights = np.clip(frame.astype(float) - 40, 0, None)
        rows, cols = np.indices(frame.shape)
        return (weights * cols).sum() / weights.sum(), (weights * rows).sum() / weights.sum(), weights.sum()

    for motion, axis, sign in (("right", 0, 1), ("left", 0, -1), ("down", 1, 1), ("up", 1, -1)):
        for path in clips.files("val")[:0] + sorted((clips.folder("val") / motion).iterdir())[:5]:
            frames = _decoded(path)
            assert frames.shape == (16, 32, 32)
            track = [centroid(f)[axis] for f in frames]
            assert sign * (track[-1] - track[0]) > 8, (path, track)  # moves the way its label says
    for path in sorted((clips.folder("val") / "zoom_in").iterdir())[:5]:
        ink = [centroid(f)[2] for f in _decoded(path)]
        assert ink[-1] > 2 * ink[0]
    adapter = create_adapter("video", num_frames=16, sampling="uniform", image_size=24, crop_pct=1.0)
    assert clips.dataset("val", adapter)[0][0].shape == (3, 96, 96)


def test_primitives_are_the_named_shapes(cache):
    shapes = datasets.load("primitives", root=cache)
    assert shapes.counts == {"train": 640, "val": 160, "test": 240} and len(shapes.class_names) == 8
    for name in ("sphere", "box"):
        spreads = []
        for path in sorted((shapes.folder("test") / name).iterdir())[:4]:
            points = np.asarray(o3d.io.read_point_cloud(str(path)).points)
            assert points.shape == (2048, 3)
            radius = np.linalg.norm(points - points.mean(0), axis=1)
            spreads.append(radius.std() / radius.mean())
        # a (stretched) sphere keeps its points near one distance from the centre; a box's corners do not
        assert (max(spreads) < 0.12) if name == "sphere" else (min(spreads) > 0.12), (name, spreads)


@pytest.mark.parametrize("name, counts, classes", [
    ("gunpoint", {"train": 40, "val": 10, "test": 150}, ["1", "2"]),
    ("arrowhead", {"train": 30, "val": 6, "test": 175}, ["0", "1", "2"]),
    ("basic_motions", {"train": 32, "val": 8, "test": 40}, ["badminton", "running", "standing", "walking"]),
    ("japanese_vowels", {"train": 216, "val": 54, "test": 370}, [str(k) for k in range(1, 10)]),
])
def test_ucr_sets_keep_their_published_split(cache, name, counts, classes):
    series = datasets.load(name, root=cache)
    assert series.counts == counts and series.class_names == classes
    first = pd.read_csv(series.files("test")[0])
    assert list(first.columns) == [f"c{k}" for k in range(series.info["channels"])]
    assert first.notna().all().all()


def test_gunpoint_nearest_neighbour_reproduces_the_archive(cache, tmp_path):
    """The UCR archive lists 1-NN Euclidean accuracy 0.913 on GunPoint with its full train split."""
    series = datasets.load("gunpoint", root=cache)
    full = tmp_path / "full_train"
    for split in ("train", "val"):  # the archive's train split is our train and val together
        for path in series.files(split):
            (full / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, full / path.parent.name / f"{split}_{path.name}")
    assert len(list(full.rglob("*.csv"))) == 50
    adapter = create_adapter("time_series", length=150)
    accuracy = evaluate_baseline("nearest_neighbour", FolderDataset(full, adapter), series.dataset("test", adapter),
                                 adapter)
    assert accuracy == pytest.approx(0.9133, abs=0.001)


@pytest.mark.parametrize("name, steps, season", [("co2", 2284, 52), ("sunspots", 309, 11)])
def test_forecasting_series_are_complete_and_time_ordered(cache, name, steps, season):
    series = datasets.load(name, root=cache)
    frame = pd.read_csv(series.series, parse_dates=["timestamp"])
    assert len(frame) == steps and series.info["season"] == season
    assert frame["timestamp"].is_monotonic_increasing and frame.notna().all().all()
    adapter = create_adapter("time_series", task="forecasting", length=2 * season, horizon=season)
    test = series.dataset("test", adapter)
    assert isinstance(test, ForecastingDataset) and len(test) > 0
    with pytest.raises(UniPerceptionError, match="series to forecast"):
        series.folder("train")


@pytest.mark.slow
def test_spoken_commands_hold_out_voices_and_refuse_silent_fallbacks(cache):
    speech = datasets.load("spoken_commands", root=cache)
    assert speech.class_names == sorted(["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"])
    speakers = speech.info["speakers"]
    assert not (set(speakers["train"]) & set(speakers["test"])) and not (set(speakers["val"]) & set(speakers["test"]))
    for split in ("train", "val", "test"):
        heard = {p.name.split("_")[0] for p in speech.files(split)}
        assert heard == set(speakers[split])  # file names start with the voice variant
        assert speech.counts[split] == len(speakers[split]) * 10 * 3
    assert len(speakers["test"]) >= 10 and len(speech.info["accents"]) >= 5
    assert "en-us-nyc" in speech.info["dropped_voices"]["accents"]  # sounds exactly like en-us
    wave, rate = soundfile.read(speech.files("test")[0])
    assert rate == 16000 and wave.shape == (16000,) and np.abs(wave).max() > 0.05


DIGIT_CLASSES = [str(d) for d in range(10)]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.mark.slow
def test_spoken_digits_share_the_digits_classes_and_hold_out_voices(cache):
    speech = datasets.load("spoken_digits", root=cache)
    assert speech.class_names == DIGIT_CLASSES == datasets.load("digits", root=cache).class_names
    assert speech.info["words"] == dict(zip(DIGIT_CLASSES, DIGIT_WORDS))
    assert datasets.available()["spoken_digits"]["modality"] == "audio"
    speakers = speech.info["speakers"]
    assert len(speakers["test"]) >= 10 and len(speakers["val"]) >= 5
    for one, other in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not (set(speakers[one]) & set(speakers[other]))
    for split in ("train", "val", "test"):
        files = speech.files(split)
        assert speech.counts[split] == len(files) == len(speakers[split]) * 10 * 2
        for digit in DIGIT_CLASSES:  # every voice says every digit twice, in two accents
            said = [p.name.split("_") for p in files if p.parent.name == digit]
            assert sorted(name[0] for name in said) == sorted(speakers[split] * 2)
            assert len({(name[0], name[1]) for name in said}) == len(said)
    adapter = create_adapter("audio")
    for split in ("train", "val", "test"):
        for path in speech.files(split)[::97][:4]:
            wave, rate = soundfile.read(path)
            assert rate == 16000 and wave.shape == (16000,) and np.abs(wave).max() > 0.05
            features = adapter.preprocess(adapter.load(path))
            assert features.shape == (1, 128, 128) and bool(features.isfinite().all()) and features.std() > 0


@pytest.mark.slow
def test_spoken_digits_are_deterministic(cache, tmp_path):
    speech = datasets.load("spoken_digits", root=cache)
    again = datasets.load("spoken_digits", root=tmp_path)  # built again: the same files, byte for byte
    assert _digest(again.root) == _digest(speech.root)


@pytest.mark.slow
def test_spoken_commands_keep_their_content_and_share_the_voice_split(cache):
    commands = datasets.load("spoken_commands", root=cache)
    digits = datasets.load("spoken_digits", root=cache)
    assert commands.root.name == "spoken_commands-v1" and "words" not in commands.info
    assert commands.class_names == sorted(["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"])
    assert commands.info["speakers"] == digits.info["speakers"]  # a voice held out of one set is held out of both
    for split in ("train", "val", "test"):
        assert commands.counts[split] == len(commands.files(split)) == len(commands.info["speakers"][split]) * 10 * 3
        assert {p.parent.name for p in commands.files(split)} == set(commands.class_names)
    assert "says each word 3 times" in commands.info["description"]
    assert "says each word 2 times" in digits.info["description"]


def test_digit_clips_are_labelled_by_the_digit_and_test_digits_are_unseen(cache):
    clips = datasets.load("digit_clips", root=cache)
    digits = datasets.load("digits", root=cache)
    assert clips.class_names == DIGIT_CLASSES == digits.class_names
    assert datasets.available()["digit_clips"]["modality"] == "video"
    assert clips.counts == {"train": 700, "val": 150, "test": 300}
    label = {int(p.stem): p.parent.name for split in ("train", "val", "test") for p in digits.files(split)}
    seen = {split: {int(p.stem) for p in digits.files(split)} for split in ("train", "val", "test")}
    motions = set()
    for split, per_class in (("train", 70), ("val", 15), ("test", 30)):
        files = clips.files(split)
        assert len(files) == clips.counts[split]
        assert pd.Series([p.parent.name for p in files]).value_counts().to_dict() == dict.fromkeys(DIGIT_CLASSES,
                                                                                                   per_class)
        used = [int(p.stem.split("digit")[1]) for p in files]
        assert set(used) <= seen[split]  # each clip's digit comes from the same split of digits
        assert all(label[index] == p.parent.name for index, p in zip(used, files))  # labelled by the digit shown
        motions |= {p.stem.split("_digit")[0].split("_", 1)[1] for p in files}
    assert motions == {"left", "right", "up", "down", "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out"}
    for path in clips.files("test")[::60]:
        frames = _decoded(path)
        assert frames.shape == (16, 32, 32) and frames.max() > 150  # a bright digit over faint noise
    adapter = create_adapter("video", num_frames=16, sampling="uniform", image_size=24, crop_pct=1.0)
    for path in clips.files("val")[::50]:
        sample = adapter.preprocess(adapter.load(path))
        assert sample.shape == (3, 96, 96) and bool(sample.isfinite().all())
    assert clips.dataset("test", adapter)[0][1] == 0


@pytest.mark.slow
def test_digit_clips_are_deterministic(cache, tmp_path):
    clips = datasets.load("digit_clips", root=cache)
    assert _digest(datasets.load("digit_clips", root=tmp_path).root) == _digest(clips.root)


def test_an_unknown_voice_name_is_caught_not_silently_used():
    from uniperception.datasets import speech

    binary = speech._espeak()
    kept, dropped = speech._distinct(binary, ["en+m3", "en+no-such-variant", "en-gb+m3", "en-us"], "en")
    assert kept == ["en+m3", "en-us"] and dropped == ["en+no-such-variant", "en-gb+m3"]


@pytest.mark.parametrize("name", ["spoken_commands", "spoken_digits"])
def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path, name):
    monkeypatch.setattr(shutil, "which", lambda program: None)
    with pytest.raises(DatasetBuildError, match=f"{name} needs the espeak-ng program.*apt-get install espeak-ng"):
        datasets.load(name, root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left behind


def test_an_interrupted_build_leaves_nothing_and_a_cached_set_is_reused(monkeypatch, tmp_path):
    from uniperception.datasets import images

    original = images.build_digits

    def failing(target, progress=None):
        original(target, progress)
        raise KeyboardInterrupt  # after every file is written, before the set is complete

    monkeypatch.setattr(images, "build_digits", failing)
    with pytest.raises(KeyboardInterrupt):
        datasets.load("digits", root=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(images, "build_digits", original)
    built = datasets.load("digits", root=tmp_path)
    info = json.loads((built.root / "info.json").read_text())
    monkeypatch.setattr(images, "build_digits", failing)  # a cached set is not built again
    assert datasets.load("digits", root=tmp_path).info == info


def test_an_unwritable_cache_names_the_folder(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(DatasetBuildError, match="cannot write the dataset cache.*UNIPERCEPTION_CACHE"):
        datasets.load("digits", root=blocked / "sub")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIPERCEPTION_CACHE", str(tmp_path / "c"))
    assert datasets.cache_root() == tmp_path / "c" / "datasets"
    monkeypatch.delenv("UNIPERCEPTION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert datasets.cache_root() == tmp_path / "x" / "uniperception" / "datasets"
