"""``uniperception bench`` and the adapters' synthetic examples it times."""

import json

import numpy as np
import pytest
import soundfile
import torch

from modalities import create_adapter
from modalities.errors import ModalityError
from uniperception import UniPerceiver
from uniperception.cli import main

SMALL = {
    "image": ["--adapter", "image_size=32"],
    "audio": ["--adapter", "target_frames=48", "--adapter", "num_mel_bins=32"],
    "video": ["--adapter", "num_frames=4", "--adapter", "image_size=32"],
    "point_cloud": ["--adapter", "num_points=128", "--adapter", "image_size=32"],
    "time_series": ["--adapter", "length=48", "--adapter", "num_variables=2"],
}
STAGES = ["preprocess (eval)", "preprocess (train, augmented)", "inference, train form", "inference, deploy form",
          "training step"]


def bench(capsys, *arguments):
    assert main(["bench", "--batch-size", "2", "--min-time", "0", "--json", *arguments]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("modality", sorted(SMALL))
def test_bench_times_every_stage_of_each_modality(modality, capsys):
    result = bench(capsys, "--modality", modality, *SMALL[modality])
    assert result["modality"] == modality and result["backbone"] == "unireplknet_a"
    assert [row["stage"] for row in result["results"]] == STAGES
    for row in result["results"]:
        assert row["samples_per_second"] > 0 and row["ms_per_call"] > 0
    assert result["gflops_per_sample"] > 0 and result["parameters"] > 4e6
    adapter = create_adapter(modality, **{a.split("=")[0]: int(a.split("=")[1]) for a in SMALL[modality][1::2]})
    assert result["sample_shape"] == "x".join(map(str, adapter.prepare(adapter.example()).shape))


def test_bench_forecasting_a_saved_model_and_a_real_file(tmp_path, capsys):
    result = bench(capsys, "--modality", "time_series", "--task", "forecasting", *SMALL["time_series"])
    assert result["task"] == "forecasting"

    model = UniPerceiver("audio", num_classes=3, target_frames=48, num_mel_bins=32)
    model.save_pretrained(tmp_path / "model")
    wave = 0.1 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
    soundfile.write(tmp_path / "tone.flac", wave, 8000)
    result = bench(capsys, "--model", str(tmp_path / "model"), "--example", str(tmp_path / "tone.flac"),
                   "--channels-last", "--amp", "bf16")
    assert result["modality"] == "audio" and result["amp"] == "bf16" and result["sample_shape"] == "1x32x48"
    assert [row["stage"] for row in result["results"]] == STAGES


def test_bench_prints_a_table(capsys):
    assert main(["bench", "--modality", "image", "--batch-size", "2", "--min-time", "0", *SMALL["image"]]) == 0
    out = capsys.readouterr().out
    assert "unireplknet_a on image (classification), one sample 3x32x32, batch 2" in out
    for stage in STAGES:
        assert stage in out


@pytest.mark.parametrize("arguments, message", [
    (["--batch-size", "1"], "at least 2"),
    (["--amp", "fp16", "--device", "cpu"], "needs a CUDA device"),
    (["--modality", "time_series", "--adapter", "image_size=64"], "unknown setting(s) 'image_size'"),
    (["--modality", "sound"], "unknown modality 'sound'"),
    (["--example", "/nonexistent/clip.wav", "--modality", "audio"], "/nonexistent/clip.wav"),
])
def test_bench_errors_are_one_line_messages(arguments, message, capsys):
    assert main(["bench", "--min-time", "0", *arguments]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("modality, settings", [
    ("image", {"image_size": 48}),
    ("audio", {"target_frames": 64, "sample_rate": 22050}),
    ("video", {"num_frames": 4, "image_size": 32, "sampling": "uniform"}),
    ("point_cloud", {"num_points": 64, "point_features": ["colors", "normals"], "image_size": 32}),
    ("time_series", {"num_variables": 3, "length": 40}),
    ("time_series", {"num_variables": 2, "length": 40, "task": "forecasting", "horizon": 8}),
])
def test_synthetic_examples_prepare_to_the_configured_size(modality, settings):
    adapter = create_adapter(modality, **settings)
    first, again, other = adapter.example(), adapter.example(), adapter.example(seed=1)
    sample = adapter.prepare(first)
    assert torch.isfinite(sample).all()
    torch.testing.assert_close(adapter.prepare(again), sample)  # seeded
    assert not torch.equal(adapter.prepare(other), sample)
    batch = adapter.collate([sample, adapter.prepare(first, train=True)])
    classes = {} if settings.get("task") == "forecasting" else {"num_classes": 2}
    model = UniPerceiver(modality, **classes, **settings)
    assert torch.isfinite(model.eval()(batch)).all()


def test_unknown_adapter_settings_name_what_the_adapter_takes():
    with pytest.raises(ModalityError, match="unknown setting.*'sample_rate'.*takes image_size"):
        create_adapter("image", sample_rate=16000)
