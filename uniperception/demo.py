"""``uniperception demo``: train a small UniRepLKNet on a built-in dataset and read it against a simple baseline.

Each demo builds its dataset (see :mod:`uniperception.datasets`), trains UniRepLKNet-A with the settings in
:data:`DEMOS` on the train split (keeping the epoch with the best validation accuracy, or MAE for forecasts; the
last epoch for the tiny UCR/UEA sets, whose validation splits are too small to choose by), evaluates on the
test split and fits the baseline of :mod:`uniperception.baselines` on the same train split (forecasts: the
seasonal-naive forecast). Everything lands in ``OUTPUT/<dataset>``: checkpoints, ``metrics.csv``, ``curves.png``,
``test_metrics.json``, ``confusion_matrix.png`` and the trained model in ``model/``.

Each demo also has a floor: the test score its settings must reach (top-1 accuracy as a fraction: digits 0.95,
spoken commands 0.90, moving digits 0.90, primitives 0.85, a UCR set its 1-nearest-neighbour baseline's; forecasts:
MASE below 1, i.e. better than seasonal-naive). ``quick=True`` trains fewer epochs for a smoke test and checks no floor.

Example::

    from uniperception.demo import run_demo
    result = run_demo("digits", "runs/demo")
    print(result["score"], result["baseline"], result["passed"])
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .errors import UniPerceptionError

__all__ = ["DEMOS", "DEFAULT_DATASETS", "DemoSettings", "format_results", "report_floors", "run_demo"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    dataset: str
    adapter: Dict[str, Any]
    train: Dict[str, Any]
    floor: Optional[float]  # test top-1 (a fraction) to reach; forecasting: MASE to stay below; None: the baseline's
    quick_epochs: int = 1
    backbone: str = "unireplknet_a"
    kernel_sizes: Any = None
    stride: int = 1  # forecasting windows
    drop_path: float = 0.0


DEMOS: Dict[str, DemoSettings] = {s.dataset: s for s in [
    DemoSettings("digits", dict(image_size=32, crop_pct=1.0, auto_augment=None, re_prob=0.0, hflip=0.0,
                                scale=(0.6, 1.0)),
                 dict(epochs=6, batch_size=32, lr=2e-3, warmup_epochs=0.5, label_smoothing=0.1), floor=0.95),
    DemoSettings("spoken_commands", dict(num_mel_bins=40, target_frames=96, freq_mask=8, time_mask=16),
                 dict(epochs=10, batch_size=32, lr=2e-3, warmup_epochs=0.5, label_smoothing=0.1), floor=0.90),
    DemoSettings("moving_digits", dict(num_frames=16, sampling="uniform", image_size=24, crop_pct=1.0, hflip=0.0,
                                       scale=(0.8, 1.0)),
                 dict(epochs=5, batch_size=16, lr=2e-3, warmup_epochs=0.5, label_smoothing=0.1), floor=0.90),
    DemoSettings("primitives", dict(num_points=1024, projection="depth", image_size=32),
                 dict(epochs=15, batch_size=16, lr=3e-3, warmup_epochs=1, label_smoothing=0.1), floor=0.85),
    # the UCR/UEA sets are tiny (30-216 training series, 6-54 for validation): the last epoch, not a noisy best
    DemoSettings("gunpoint", dict(length=150, min_d_model=16),
                 dict(epochs=60, batch_size=8, lr=2e-3, warmup_epochs=2, select="last"), floor=None),
    # 30 series: resampled to 64 steps of width 64, so each map row is one time step; mixup and drop path
    DemoSettings("arrowhead", dict(length=64, length_mode="resample", min_d_model=64),
                 dict(epochs=60, batch_size=8, lr=2e-3, warmup_epochs=2, mixup=0.2, select="last"), floor=None,
                 drop_path=0.1),
    DemoSettings("basic_motions", dict(length=100, num_variables=6, min_d_model=16),
                 dict(epochs=60, batch_size=8, lr=2e-3, warmup_epochs=2, select="last"), floor=None),
    # speakers differ in the levels of their cepstral coefficients: instance normalisation would remove them
    DemoSettings("japanese_vowels", dict(length=32, num_variables=12, length_mode="resample", min_d_model=16,
                                         normalization="none"),
                 dict(epochs=30, batch_size=16, lr=2e-3, warmup_epochs=1, select="last"), floor=None),
    DemoSettings("co2", dict(length=104, horizon=52, min_d_model=16),
                 dict(epochs=10, batch_size=32, lr=1e-3, warmup_epochs=1), floor=1.0, stride=4),
    DemoSettings("sunspots", dict(length=44, horizon=11, min_d_model=16),
                 dict(epochs=10, batch_size=16, lr=1e-3, warmup_epochs=1), floor=1.0),
]}

DEFAULT_DATASETS = {
    "image": ["digits"], "audio": ["spoken_commands"], "video": ["moving_digits"], "point_cloud": ["primitives"],
    "time_series": ["gunpoint", "co2"],
}


def run_demo(name: str, output: str = "runs/demo", quick: bool = False, epochs: Optional[int] = None,
             progress: Optional[bool] = None, seed: int = 0, device: str = "auto", run_name: Optional[str] = None,
             adapter: Optional[Dict[str, Any]] = None, train: Optional[Dict[str, Any]] = None,
             backbone: Optional[str] = None, kernel_sizes: Any = None, baseline: bool = True,
             drop_path: Optional[float] = None) -> Dict[str, Any]:
    """Build dataset ``name``, train, test and compare with the baseline; returns the results (also written to
    ``OUTPUT/<run_name or name>/results.json``).

    ``adapter``, ``train``, ``backbone`` and ``kernel_sizes`` change the demo's settings (ablations: another video
    layout, kernel size or backbone); ``baseline=False`` skips fitting the baseline."""
    from . import datasets
    from .baselines import BASELINES, evaluate_baseline
    from .engine import TrainConfig, Trainer
    from .metrics import plot_confusion_matrix, write_metrics_json
    from .model import UniPerceiver

    if name not in DEMOS:
        raise UniPerceptionError(f"no demo for {name!r}; demos: {', '.join(DEMOS)}")
    settings = DEMOS[name]
    started = time.perf_counter()
    data = datasets.load(name, progress=progress)
    folder = Path(output) / (run_name or name)
    adapter_settings = dict(settings.adapter, **(adapter or {}))
    torch.manual_seed(seed)
    model = UniPerceiver(data.modality, backbone=backbone or settings.backbone, task=data.task,
                         class_names=data.class_names, kernel_sizes=kernel_sizes or settings.kernel_sizes,
                         drop_path_rate=settings.drop_path if drop_path is None else drop_path, **adapter_settings)
    modality_adapter = model.adapters[data.modality]
    extra = dict(stride=settings.stride) if data.task == "forecasting" else dict(cache=True)
    train_data = data.dataset("train", modality_adapter, train=True, **extra)
    val = data.dataset("val", modality_adapter, **extra)
    test = data.dataset("test", modality_adapter, **extra)
    train_settings = dict(settings.train, **(train or {}))
    select = train_settings.pop("select", "best")
    if quick:
        train_settings["epochs"] = settings.quick_epochs
    if epochs is not None:
        train_settings["epochs"] = epochs
    config = TrainConfig(output=str(folder), seed=seed, progress=progress, device=device,
                         season=int(data.info.get("season", 1)), **train_settings)
    history = Trainer(model, train_data, val, config).fit()
    best = folder / "best.pt" if select == "best" and (folder / "best.pt").is_file() else folder / "last.pt"
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["model"])
    model.save_pretrained(folder / "model")
    metrics = Trainer(model, test, None, config).evaluate(test)
    write_metrics_json(folder / "test_metrics.json", metrics)

    result: Dict[str, Any] = dict(dataset=name, run=run_name or name, modality=data.modality, task=data.task,
                                  backbone=model.config.get("backbone"), adapter=adapter_settings,
                                  epochs=len(history), chosen_epoch=int(checkpoint["epoch"]) + 1,
                                  train=len(train_data), test=len(test))
    if data.task == "classification":
        plot_confusion_matrix(metrics["confusion_matrix"], data.class_names, folder / "confusion_matrix.png")
        kind = BASELINES[data.modality]
        reference = data.dataset("train", modality_adapter)  # the same training samples, not augmented
        if getattr(train_data, "cache", None) is not None:
            reference.cache = train_data.cache  # preprocessed once already (the cache holds them unaugmented)
        reached = evaluate_baseline(kind, reference, test, modality_adapter) if baseline else float("nan")
        floor = settings.floor if settings.floor is not None else reached
        result.update(metric="top1", score=metrics["top1"], baseline=reached,
                      baseline_name=kind if baseline else "(not fitted)", floor=floor,
                      passed=None if floor != floor else metrics["top1"] >= floor,  # NaN: no baseline, no floor
                      top5=metrics.get("top5"), macro=metrics.get("macro_accuracy"))
    else:
        result.update(metric="mase", score=metrics["mase"], baseline=1.0,
                      baseline_name=f"seasonal naive (season {config.season})", floor=settings.floor,
                      passed=metrics["mase"] < settings.floor, mse=metrics["mse"], mae=metrics["mae"],
                      naive_mse=metrics["naive_mse"], naive_mae=metrics["naive_mae"])
    if quick:
        result["passed"] = None  # a smoke test checks no floor
    result["seconds"] = round(time.perf_counter() - started, 1)
    (folder / "results.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def format_results(results: List[Dict[str, Any]]) -> str:
    """A plain-text table of :func:`run_demo` results."""
    lines = [f"{'dataset':<17} {'modality':<12} {'test':>9} {'baseline':>9} {'floor':>9}  {'':<6} {'time':>7}  "
             "baseline"]
    for r in results:
        if r["metric"] == "top1":
            score = f"{100 * r['score']:.1f}%"
            base = "-" if r["baseline"] != r["baseline"] else f"{100 * r['baseline']:.1f}%"  # NaN: not fitted
            floor = f">={100 * r['floor']:.1f}%"
        else:
            score, base, floor = f"{r['score']:.3f}", f"{r['baseline']:.3f}", f"<{r['floor']:.2f}"
        verdict = "-" if r["passed"] is None else ("ok" if r["passed"] else "BELOW")
        lines.append(f"{r['dataset']:<17} {r['modality']:<12} {score:>9} {base:>9} {floor:>9}  {verdict:<6} "
                     f"{r['seconds']:>6.0f}s  {r['baseline_name']}" + (" (MASE)" if r["metric"] == "mase" else ""))
    return "\n".join(lines)


def report_floors(results: List[Dict[str, Any]]) -> int:
    """Print the table of ``results`` and, on standard error, the demos below their floor; returns the exit status
    (1 when a demo missed its floor, else 0)."""
    print(format_results(results))
    missed = [r["dataset"] for r in results if r["passed"] is False]
    if missed:
        print(f"below the floor: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0
