"""``uniperception demo``: built-in data to a trained, tested model beside its baseline; and the baselines."""

import json

import pytest

from uniperception import demo as demo_module
from uniperception.cli import main


@pytest.fixture
def cache(tmp_path):
    return tmp_path  # the runs go here; the datasets come from the session's cache


def test_demo_lists_the_built_in_datasets(capsys):
    assert main(["demo", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "spoken_commands", "moving_digits", "primitives", "gunpoint", "co2", "sunspots"):
        assert name in out


def test_a_quick_demo_trains_tests_and_saves_everything(cache, capsys):
    output = cache / "runs"
    assert main(["demo", "--dataset", "gunpoint", "--quick", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "gunpoint" in out and "nearest_neighbour" in out
    run = output / "gunpoint"
    result = json.loads((run / "results.json").read_text())
    assert result["epochs"] == 1 and result["passed"] is None and 0 <= result["score"] <= 1
    assert 0.5 < result["baseline"] <= 1  # 1-NN on GunPoint is far above chance
    for name in ("curves.png", "confusion_matrix.png", "test_metrics.json", "metrics.csv", "model/config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "test_metrics.json").read_text())["count"] == 150


def test_a_quick_forecasting_demo_reports_mase_against_seasonal_naive(cache, capsys):
    assert main(["demo", "--dataset", "sunspots", "--quick", "--output", str(cache / "runs")]) == 0
    result = json.loads((cache / "runs" / "sunspots" / "results.json").read_text())
    assert result["metric"] == "mase" and result["score"] > 0 and "season 11" in result["baseline_name"]
    assert result["naive_mae"] > 0 and result["mae"] == pytest.approx(result["score"] * result["naive_mae"])


def test_a_score_below_its_floor_fails_the_command(cache, capsys, monkeypatch):
    def below(name, output, **kwargs):
        return dict(dataset=name, run=name, modality="image", task="classification", metric="top1", score=0.5,
                    baseline=0.9, baseline_name="logistic", floor=0.95, passed=False, seconds=1.0)

    monkeypatch.setattr(demo_module, "run_demo", below)
    assert main(["demo", "--dataset", "digits", "--output", str(cache / "runs")]) == 1
    captured = capsys.readouterr()
    assert "BELOW" in captured.out and "below the floor: digits" in captured.err


@pytest.mark.parametrize("arguments, message", [
    (["--dataset", "mnist"], "no demo for mnist"),
    (["--modality", "smell"], "--modality must be one of"),
])
def test_demo_errors_are_one_line_messages(arguments, message, cache, capsys):
    assert main(["demo", *arguments, "--output", str(cache / "runs")]) == 2
    assert message in capsys.readouterr().err
