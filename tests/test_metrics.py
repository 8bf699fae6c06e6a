"""Evaluation metrics: hand-computed classification and forecasting examples, strict JSON and real PNG files."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from uniperception.errors import UniPerceptionError
from uniperception.metrics import (
    ClassificationMetrics,
    ForecastMetrics,
    plot_confusion_matrix,
    plot_training_curves,
    write_metrics_json,
)

# 6 classes, class "f" has no samples. Per sample: target, logits, top-1 prediction, rank of the target.
NAMES = ["a", "b", "c", "d", "e", "f"]
TARGETS = torch.tensor([0, 0, 1, 2, 2, 3, 4])
LOGITS = torch.tensor([
    [9.0, 1, 2, 3, 4, 5],  # true a, predicted a
    [0.0, 9, 1, 2, 3, 4],  # true a, predicted b, a ranked last: outside the top 5
    [1.0, 9, 2, 3, 4, 0],  # true b, predicted b
    [9.0, 0, 1, 2, 3, 4],  # true c, predicted a, c ranked 5th
    [0.0, 1, 9, 2, 3, 4],  # true c, predicted c
    [0.0, 1, 2, 3, 9, 4],  # true d, predicted e, d ranked 3rd
    [0.0, 1, 2, 3, 9, 4],  # true e, predicted e
])
CONFUSION = [
    [1, 1, 0, 0, 0, 0],
    [0, 1, 0, 0, 0, 0],
    [1, 0, 1, 0, 0, 0],
    [0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0],
]


def _known() -> ClassificationMetrics:
    metrics = ClassificationMetrics(6, class_names=NAMES)
    metrics.update(LOGITS, TARGETS)
    return metrics


def test_classification_metrics_on_a_known_example():
    result = _known().compute()
    assert result["top1"] == pytest.approx(4 / 7)
    assert result["top5"] == pytest.approx(6 / 7)
    # recalls of the 5 classes present: a 1/2, b 1, c 1/2, d 0, e 1; f has no samples and does not count
    assert result["macro_accuracy"] == pytest.approx(3 / 5)
    assert result["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5, "d": 0.0, "e": 1.0, "f": None}
    assert result["confusion_matrix"] == CONFUSION
    assert result["count"] == 7
    assert "loss" not in result


def test_probabilities_give_the_same_metrics_as_logits():
    metrics = ClassificationMetrics(6, class_names=NAMES)
    metrics.update(LOGITS.softmax(dim=1), TARGETS)
    assert metrics.compute() == _known().compute()


def test_top5_uses_all_classes_when_there_are_fewer_than_5_and_default_names():
    metrics = ClassificationMetrics(3)
    metrics.update(torch.tensor([[3.0, 2, 1], [3.0, 2, 1]]), torch.tensor([2, 0]))
    result = metrics.compute()
    assert result["top1"] == 0.5 and result["top5"] == 1.0
    assert result["per_class_accuracy"] == {"0": 1.0, "1": None, "2": 0.0}
    assert result["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [1, 0, 0]]


def test_soft_and_one_hot_targets_use_their_argmax():
    smoothed = torch.nn.functional.one_hot(TARGETS, 6).float() * 0.88 + 0.02
    metrics = ClassificationMetrics(6, class_names=NAMES)
    metrics.update(LOGITS, smoothed)
    assert metrics.compute() == _known().compute()
    one_hot = ClassificationMetrics(6, class_names=NAMES)
    one_hot.update(LOGITS, torch.nn.functional.one_hot(TARGETS, 6))  # integer (B, C)
    assert one_hot.compute() == _known().compute()
    mixed = ClassificationMetrics(3)
    mixed.update(torch.tensor([[0.0, 5.0, 1.0]]), torch.tensor([[0.3, 0.7, 0.0]]))  # a mixup target: class 1
    assert mixed.compute()["top1"] == 1.0 and mixed.compute()["confusion_matrix"][1] == [0, 1, 0]


def test_batches_of_one_accumulate_to_the_one_shot_result_and_reset_clears():
    metrics = ClassificationMetrics(6, class_names=NAMES)
    for logits, target in zip(LOGITS, TARGETS, strict=True):
        metrics.update(logits[None], target[None])
    assert metrics.compute() == _known().compute()
    metrics.update(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))  # an empty batch changes nothing
    assert metrics.count == 7
    metrics.reset()
    assert metrics.count == 0
    with pytest.raises(UniPerceptionError, match="at least one sample"):
        metrics.compute()


def test_loss_is_averaged_weighted_by_batch_size():
    metrics = ClassificationMetrics(2)
    metrics.update(torch.zeros(2, 2), torch.tensor([0, 1]), loss=1.0)
    metrics.update(torch.zeros(3, 2), torch.tensor([0, 1, 1]), loss=torch.tensor(2.0, requires_grad=True))
    assert metrics.compute()["loss"] == pytest.approx((2 * 1.0 + 3 * 2.0) / 5)  # 1.6, not the batch mean 1.5
    metrics.update(torch.zeros(1, 2), torch.tensor([0]))  # a batch without a loss only counts for accuracy
    result = metrics.compute()
    assert result["loss"] == pytest.approx(1.6) and result["count"] == 6


@pytest.mark.parametrize("logits, targets, message", [
    (torch.zeros(2, 5), torch.tensor([0, 1]), r"logits must be \(B, C\) with C = 6"),
    (torch.zeros(6), torch.tensor([0]), r"logits must be \(B, C\)"),
    (torch.zeros(2, 6), torch.tensor([0, 1, 2]), r"targets must be class indices \(B,\) = \(2,\)"),
    (torch.zeros(2, 6), torch.zeros(2, 5), r"soft targets must be \(B, C\) = \(2, 6\)"),
    (torch.zeros(2, 6), torch.tensor([0, 6]), r"labels \[6\] are out of range for 6 classes"),
    (torch.zeros(2, 6), torch.tensor([-1, 2]), r"labels \[-1\] are out of range"),
    (torch.tensor([[0.0, math.nan, 0, 0, 0, 0]]), torch.tensor([0]), "logits contains 1 NaN"),
    (torch.zeros(1, 6), torch.tensor([[math.nan, 1, 0, 0, 0, 0]]), "targets contains 1 NaN"),
    (torch.zeros(1, 6), torch.tensor([0.5]), "whole numbers"),
])
def test_classification_rejects_bad_batches(logits, targets, message):
    metrics = ClassificationMetrics(6)
    with pytest.raises(UniPerceptionError, match=message):
        metrics.update(logits, targets)
    assert metrics.count == 0  # nothing was half-added


def test_classification_rejects_bad_settings_and_nan_loss():
    with pytest.raises(UniPerceptionError, match="num_classes >= 1"):
        ClassificationMetrics(0)
    with pytest.raises(UniPerceptionError, match="2 class_names for 3 classes"):
        ClassificationMetrics(3, class_names=["a", "b"])
    with pytest.raises(UniPerceptionError, match=r"repeat \['a'\]"):
        ClassificationMetrics(3, class_names=["a", "b", "a"])
    with pytest.raises(UniPerceptionError, match="loss is NaN"):
        ClassificationMetrics(2).update(torch.zeros(1, 2), torch.tensor([0]), loss=math.nan)


def test_forecast_metrics_on_a_known_example():
    history = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]])  # (B=1, L=3, D=2)
    target = torch.tensor([[[4.0, 0.0], [6.0, 2.0]]])  # (1, T=2, 2)
    forecast = torch.tensor([[[5.0, 0.0], [5.0, 0.0]]])
    metrics = ForecastMetrics(season=1)
    metrics.update(forecast, target, history)
    result = metrics.compute()
    # errors 1, -1 | 0, -2; the naive forecast repeats 3 and 0: errors -1, -3 | 0, -2
    assert result["mse"] == 6 / 4 and result["mae"] == 4 / 4
    assert result["naive_mse"] == 14 / 4 and result["naive_mae"] == 6 / 4
    assert result["mase"] == pytest.approx(2 / 3)
    assert result["count"] == 4


def test_seasonal_naive_forecast_cycles_the_last_season_of_the_look_back():
    history = torch.tensor([10.0, 11, 12, 13, 14]).reshape(1, 5, 1)
    naive = ForecastMetrics(season=3).naive_forecast(history, horizon=7)
    assert naive.flatten().tolist() == [12, 13, 14, 12, 13, 14, 12]
    assert ForecastMetrics(season=1).naive_forecast(history, horizon=3).flatten().tolist() == [14, 14, 14]


@pytest.mark.parametrize("season", [1, 3])
def test_mase_is_one_for_the_seasonal_naive_forecast_and_zero_for_a_perfect_one(season):
    g = torch.Generator().manual_seed(season)
    history, target = torch.randn(4, 6, 2, generator=g), torch.randn(4, 5, 2, generator=g)
    steps = torch.arange(5) % season
    naive = history[:, 6 - season:, :][:, steps, :]
    as_naive = ForecastMetrics(season)
    as_naive.update(naive, target, history)
    result = as_naive.compute()
    assert result["mase"] == pytest.approx(1.0, abs=1e-12)
    assert result["mae"] == result["naive_mae"] > 0 and result["mse"] == result["naive_mse"]
    perfect = ForecastMetrics(season)
    perfect.update(target, target, history)
    assert perfect.compute()["mase"] == 0.0 < 1 and perfect.compute()["mse"] == 0.0


def test_forecast_batches_accumulate_to_the_one_shot_result():
    g = torch.Generator().manual_seed(0)
    forecast, target, history = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g), \
        torch.randn(3, 8, 2, generator=g)
    whole, parts = ForecastMetrics(2), ForecastMetrics(2)
    whole.update(forecast, target, history)
    for i in range(3):
        parts.update(forecast[i:i + 1], target[i:i + 1], history[i:i + 1])
    for key, value in whole.compute().items():
        assert parts.compute()[key] == pytest.approx(value, rel=1e-12)
    parts.reset()
    with pytest.raises(UniPerceptionError, match="at least one forecast"):
        parts.compute()


def test_mase_when_the_naive_forecast_is_exact():
    history = torch.full((2, 4, 1), 7.0)
    target = torch.full((2, 3, 1), 7.0)  # a constant series: the naive forecast makes no error
    exact = ForecastMetrics()
    exact.update(target, target, history)
    assert exact.compute()["naive_mae"] == 0.0 and exact.compute()["mase"] == 0.0
    wrong = ForecastMetrics()
    wrong.update(target + 0.5, target, history)
    assert wrong.compute()["mase"] == math.inf and wrong.compute()["mae"] == 0.5


@pytest.mark.parametrize("forecast, target, history, message", [
    (torch.zeros(1, 3, 2), torch.zeros(1, 4, 2), torch.zeros(1, 5, 2), "must have the same shape"),
    (torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(5, 2), r"forecast must be \(B, T, D\)"),
    (torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.zeros(1, 5, 1), r"history \(1, 5, 1\) must be"),
    (torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.zeros(2, 5, 2), r"history \(2, 5, 2\) must be"),
    (torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.zeros(1, 2, 2), "fewer than season = 3"),
    (torch.zeros(1, 3, 2), torch.tensor([[[0.0, 0], [math.nan, 0], [0, 0]]]), torch.zeros(1, 5, 2),
     "target contains 1 NaN"),
    (torch.full((1, 3, 2), math.nan), torch.zeros(1, 3, 2), torch.zeros(1, 5, 2), "forecast contains 6 NaN"),
])
def test_forecast_rejects_bad_batches(forecast, target, history, message):
    metrics = ForecastMetrics(season=3)
    with pytest.raises(UniPerceptionError, match=message):
        metrics.update(forecast, target, history)
    assert metrics.count == 0
    with pytest.raises(UniPerceptionError, match="season >= 1"):
        ForecastMetrics(season=0)


def _no_constants(token):
    raise ValueError(f"not strict JSON: {token}")


def test_metrics_json_round_trip(tmp_path):
    path = tmp_path / "run" / "metrics.json"  # the folder does not exist yet
    metrics = {
        "top1": torch.tensor(0.5),
        "confusion_matrix": torch.tensor([[1, 2], [3, 4]]),
        "curve": np.array([0.25, 0.5]),
        "count": np.int64(7),
        "scale": np.float32(0.125),
        "mase": math.inf,
        "low": -math.inf,
        "bad": float("nan"),
        "per_class_accuracy": {"a": 1.0, "b": None, 3: np.float64(np.inf)},
        "shape": (2, 3),
        "mixed": [torch.tensor(1.5), np.nan],
    }
    assert write_metrics_json(path, metrics) == path
    loaded = json.loads(path.read_text(), parse_constant=_no_constants)
    assert loaded == {
        "top1": 0.5,
        "confusion_matrix": [[1, 2], [3, 4]],
        "curve": [0.25, 0.5],
        "count": 7,
        "scale": 0.125,
        "mase": "inf",
        "low": "-inf",
        "bad": "nan",
        "per_class_accuracy": {"a": 1.0, "b": None, "3": "inf"},
        "shape": [2, 3],
        "mixed": [1.5, "nan"],
    }
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]  # no temporary file left
    write_metrics_json(path, {"top1": 0.75})  # overwritten in place
    assert json.loads(path.read_text()) == {"top1": 0.75}


def test_metrics_json_refuses_unknown_values_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_metrics_json(path, {"top1": 0.75})
    with pytest.raises(UniPerceptionError, match=r"metrics\['model'\]: object values have no JSON form"):
        write_metrics_json(path, {"top1": 0.5, "model": object()})
    assert json.loads(path.read_text()) == {"top1": 0.75}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def _png_size(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 0 and height > 0
    return width, height


def test_training_curves_are_png_files_with_one_or_two_panels(tmp_path):
    losses_only = [{"epoch": e, "train_loss": 2.0 / (e + 1)} for e in range(3)]
    one = plot_training_curves(losses_only, tmp_path / "losses.png")
    history = [
        {"epoch": 0, "train_loss": 2.0, "val_loss": 2.2, "val_top1": 0.3, "lr": 1e-3},
        {"epoch": 1, "train_loss": 1.5, "val_loss": None, "lr": 5e-4, "per_class_accuracy": {"a": 1.0}},
        {"epoch": 2, "train_loss": 1.0, "val_loss": 1.4, "val_top1": torch.tensor(0.6), "val_mae": 0.2,
         "lr": np.float64(1e-4)},
    ]
    two = plot_training_curves(history, tmp_path / "curves.png", title="run")
    (width_one, height_one), (width_two, height_two) = _png_size(one), _png_size(two)
    assert width_one == width_two and height_two > height_one  # the metrics panel is added below
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "losses.png"]


def test_training_curves_need_epochs_and_values(tmp_path):
    with pytest.raises(UniPerceptionError, match="non-empty list"):
        plot_training_curves([], tmp_path / "c.png")
    with pytest.raises(UniPerceptionError, match=r"history\[1\] needs a numeric 'epoch'"):
        plot_training_curves([{"epoch": 0, "train_loss": 1.0}, {"train_loss": 0.5}], tmp_path / "c.png")
    with pytest.raises(UniPerceptionError, match="no numbers to plot"):
        plot_training_curves([{"epoch": 0}], tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("classes", [3, 40])
def test_confusion_matrix_is_a_png_file(tmp_path, classes):
    g = torch.Generator().manual_seed(classes)
    matrix = torch.randint(0, 20, (classes, classes), generator=g)
    matrix[0] = 0  # a class without samples
    names = [f"class_{i}" for i in range(classes)]
    normalised = plot_confusion_matrix(matrix, names, tmp_path / "normalised.png")
    counts = plot_confusion_matrix(matrix.tolist(), names, tmp_path / "counts.png", normalize=False)
    width, height = _png_size(normalised)
    assert _png_size(counts) == (width, height)
    assert min(width, height) >= (1000 if classes == 40 else 300)  # the figure grows with the classes


def test_confusion_matrix_rejects_bad_tables(tmp_path):
    with pytest.raises(UniPerceptionError, match="square C x C"):
        plot_confusion_matrix([[1, 2, 3], [4, 5, 6]], None, tmp_path / "m.png")
    with pytest.raises(UniPerceptionError, match="2 class_names for a 3 x 3"):
        plot_confusion_matrix(np.eye(3), ["a", "b"], tmp_path / "m.png")
    with pytest.raises(UniPerceptionError, match="finite counts >= 0"):
        plot_confusion_matrix([[1, -1], [0, 1]], None, tmp_path / "m.png")
