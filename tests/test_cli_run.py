"""The command line's train, eval, predict and export on real files, options from a YAML file, and its errors."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from uniperception.cli import main


def write_images(root, per_class=4):
    rng = np.random.default_rng(0)
    for name, value in (("dark", 30), ("light", 220)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(value, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_train_eval_predict_export_from_the_command_line(tmp_path, capsys):
    data = write_images(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 2\nbatch-size: 4\nlr: 0.002\nwarmup_epochs: 0.5\nadapter:\n  image_size: 32\n"
                      "  auto_augment: null\n  re_prob: 0.0\n")
    output = tmp_path / "run"
    assert main(["train", "--config", str(config), "--modality", "image", "--data", str(data), "--val-data",
                 str(data), "--output", str(output), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 epoch(s)" in out and "mixup 0.8, cutmix 1.0 (the image recipe's" in out
    assert torch.load(output / "last.pt", weights_only=False)["config"]["mixup"] == 0.8
    model = output / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    saved = json.loads((model / "config.json").read_text())
    assert saved["class_names"] == {"image": ["dark", "light"]} and saved["adapters"]["image"]["image_size"] == 32
    assert list(pd.read_csv(output / "metrics.csv")["epoch"]) == [0, 1]

    assert main(["eval", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["count"] == 8 and 0 <= metrics["top1"] <= 100
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    files = [str(data / "dark" / "0.png"), str(data / "light" / "1.png")]
    assert main(["predict", "--model", str(model), "--json", *files]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in rows] == files and all(r["label"] in ("dark", "light") for r in rows)

    assert main(["export", "--model", str(model), "--format", "folder", "--output", str(tmp_path / "deploy")]) == 0
    assert json.loads((tmp_path / "deploy" / "config.json").read_text())["deploy"] is True
    assert main(["export", "--model", str(model), "--format", "onnx", "--example", files[0], "--output",
                 str(tmp_path / "model.onnx")]) == 0
    assert (tmp_path / "model.onnx").stat().st_size > 0


def test_forecasting_from_a_csv_series(tmp_path, capsys):
    steps = np.arange(240)
    frame = pd.DataFrame({"time": pd.date_range("2024-01-01", periods=240, freq="h"),
                          "load": 5 + np.sin(2 * np.pi * steps / 24)})
    series = tmp_path / "load.csv"
    frame.to_csv(series, index=False)
    output = tmp_path / "run"
    assert main(["train", "--modality", "time_series", "--series", str(series), "--stride", "8", "--epochs", "1",
                 "--batch-size", "8", "--adapter", "length=32", "--adapter", "horizon=4", "--adapter",
                 "min_d_model=32", "--output", str(output)]) == 0
    assert "mixup" not in capsys.readouterr().out
    assert torch.load(output / "last.pt", weights_only=False)["config"]["mixup"] == 0.0
    assert main(["predict", "--model", str(output / "model"), "--json", str(series)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert len(row["forecast"]) == 4 and row["timestamps"][0] == "2024-01-11 00:00:00"


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    data = write_images(tmp_path / "data", per_class=1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(bad), "--data", str(data)]) == 2
    assert "unknown options ['learning_rate']" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--data", str(data), "--output", str(blocker / "run"), "--adapter", "image_size=32"]) == 2
    assert "cannot write the output folder" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "nothing"), "a.png"]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    assert main(["train", "--modality", "image", "--output", str(tmp_path / "x")]) == 2
    assert "give the data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--amp", "fp8"])


def test_a_config_file_can_turn_the_recipe_mixing_off(tmp_path, capsys):
    data = write_images(tmp_path / "data")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"mixup": 0, "cutmix": 0.0, "epochs": 1, "batch_size": 4,
                                  "adapter": {"image_size": 32}}))
    assert main(["train", "--config", str(config), "--data", str(data), "--output", str(tmp_path / "run")]) == 0
    assert "recipe" not in capsys.readouterr().out
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["config"]
    assert saved["mixup"] == 0 and saved["cutmix"] == 0
