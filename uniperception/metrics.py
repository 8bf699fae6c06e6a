"""Evaluation metrics of the training engine: accumulators over batches, a JSON writer and PNG plots.

``ClassificationMetrics(num_classes, class_names=None)``
    ``update(logits (B, C), targets (B,) or (B, C), loss=None)`` per batch; ``compute()`` gives top-1, top-5
    (top-``min(5, C)``), macro accuracy, per-class accuracy, the confusion matrix (rows true, columns predicted),
    the sample count and the mean loss. Counts are exact integers.
``ForecastMetrics(season=1)``
    ``update(forecast (B, T, D), target (B, T, D), history (B, L, D))`` per batch; ``compute()`` gives MSE, MAE, the
    errors of the seasonal-naive forecast and MASE (the model's MAE over the seasonal-naive MAE). Sums are float64.
``write_metrics_json(path, metrics)``
    strict JSON written atomically; tensors and numpy values become lists and numbers, ``inf``/``nan`` become the
    strings ``"inf"``, ``"-inf"`` and ``"nan"``.
``plot_training_curves(history, path)`` and ``plot_confusion_matrix(matrix, class_names, path)``
    PNG files written atomically with matplotlib's Agg canvas (no global backend switch).

Every function is pure apart from the files it writes; the accumulators hold only their own sums. Bad arguments
raise :class:`~uniperception.errors.UniPerceptionError` naming the problem.

Example::

    from uniperception.metrics import ClassificationMetrics, plot_confusion_matrix, write_metrics_json
    metrics = ClassificationMetrics(num_classes=3, class_names=["cat", "dog", "bird"])
    for images, labels in loader:
        logits = model(images)
        metrics.update(logits, labels, loss=criterion(logits, labels))
    result = metrics.compute()  # {"top1": 0.91, "top5": 1.0, "macro_accuracy": 0.9, ...}
    write_metrics_json("run/val_metrics.json", result)
    plot_confusion_matrix(result["confusion_matrix"], ["cat", "dog", "bird"], "run/confusion.png")
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .errors import UniPerceptionError

__all__ = [
    "ClassificationMetrics",
    "ForecastMetrics",
    "plot_confusion_matrix",
    "plot_training_curves",
    "write_metrics_json",
]

PathLike = Union[str, "os.PathLike[str]"]


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UniPerceptionError(f"{name} must be a tensor or an array, got {type(value).__name__} ({exc})") from None


def _check_real(tensor: torch.Tensor, name: str) -> None:
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise UniPerceptionError(f"{name} must hold real numbers, got dtype {tensor.dtype}")


def _check_no_nan(tensor: torch.Tensor, name: str, finite: bool = False) -> None:
    if not tensor.is_floating_point():
        return
    bad = ~torch.isfinite(tensor) if finite else torch.isnan(tensor)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        kind = "NaN or infinite values" if finite else "NaN values"
        raise UniPerceptionError(f"{name} contains {int(bad.sum())} {kind} (first at index {where})")


class ClassificationMetrics:
    """Top-1/top-5 accuracy, macro accuracy, per-class accuracy, confusion matrix and mean loss over batches.

    Args:
        num_classes: ``C``.
        class_names: ``C`` distinct names for ``per_class_accuracy``; ``"0"``, ``"1"``, ... by default.

    ``update`` takes logits or probabilities ``(B, C)`` (only their ranking matters) and targets that are class
    indices ``(B,)`` (an integer dtype, or floats holding whole numbers) or soft / one-hot targets ``(B, C)``, whose
    argmax is the class (the first maximum on ties). A batch may be empty or hold one sample.

    ``compute()`` returns:

    ``top1``, ``top5``
        fractions of samples whose class is the top prediction, or among the top ``min(5, C)`` predictions (ties
        between scores are broken by :func:`torch.topk`).
    ``macro_accuracy``
        the mean of the per-class recalls over the classes present in the targets.
    ``per_class_accuracy``
        ``{name: recall}``, ``None`` for a class without samples.
    ``confusion_matrix``
        ``C x C`` nested list of ints; row ``i`` counts the samples of true class ``i``, column ``j`` those predicted
        as ``j``.
    ``count``
        samples seen.
    ``loss``
        only when ``update`` was given losses: the mean over the samples of the batches that had one (each batch's
        loss weighted by its size).
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise UniPerceptionError(f"ClassificationMetrics needs an integer num_classes >= 1, got {num_classes!r}")
        self.num_classes = int(num_classes)
        if class_names is None:
            names = [str(i) for i in range(self.num_classes)]
        else:
            names = [str(n) for n in class_names]
            if len(names) != self.num_classes:
                raise UniPerceptionError(f"ClassificationMetrics: {len(names)} class_names for {self.num_classes} "
                                         "classes")
            if len(set(names)) != len(names):
                repeated = sorted({n for n in names if names.count(n) > 1})
                raise UniPerceptionError(f"ClassificationMetrics: class_names repeat {repeated}")
        self.class_names: List[str] = names
        self.topk = min(5, self.num_classes)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self._topk_correct = 0
        self._count = 0
        self._loss_sum = 0.0
        self._loss_count = 0

    def _targets(self, targets: Any, batch: int) -> torch.Tensor:
        targets = _as_tensor(targets, "targets")
        if targets.ndim == 2:
            _check_real(targets, "targets")
            if targets.shape != (batch, self.num_classes):
                raise UniPerceptionError(f"soft targets must be (B, C) = ({batch}, {self.num_classes}) like the "
                                         f"logits, got {tuple(targets.shape)}")
            _check_no_nan(targets, "targets")
            return targets.argmax(dim=1) if batch else torch.zeros(0, dtype=torch.int64, device=targets.device)
        if targets.ndim != 1 or targets.shape[0] != batch:
            raise UniPerceptionError(f"targets must be class indices (B,) = ({batch},) or soft targets (B, C) = "
                                     f"({batch}, {self.num_classes}), got {tuple(targets.shape)}")
        if targets.is_floating_point():
            _check_no_nan(targets, "targets", finite=True)
            if bool((targets != targets.round()).any()):
                raise UniPerceptionError("class index targets must be whole numbers; pass (B, C) soft targets for "
                                         "probabilities")
        elif targets.is_complex() or targets.dtype == torch.bool:
            raise UniPerceptionError(f"class index targets must be integers, got dtype {targets.dtype}")
        targets = targets.long()
        outside = (targets < 0) | (targets >= self.num_classes)
        if bool(outside.any()):
            bad = sorted({int(t) for t in targets[outside].tolist()})
            raise UniPerceptionError(f"labels {bad[:10]} are out of range for {self.num_classes} classes "
                                     f"(0 to {self.num_classes - 1})")
        return targets

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: Optional[Union[float, torch.Tensor]] = None
               ) -> None:
        """Add one batch: ``logits`` ``(B, C)``, ``targets`` ``(B,)`` or ``(B, C)``, ``loss`` the batch's mean loss."""
        logits = _as_tensor(logits, "logits")
        _check_real(logits, "logits")
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise UniPerceptionError(f"logits must be (B, C) with C = {self.num_classes}, got {tuple(logits.shape)}")
        batch = logits.shape[0]
        _check_no_nan(logits, "logits")
        targets = self._targets(targets, batch).to(logits.device)
        loss_value = None
        if loss is not None:
            loss_tensor = _as_tensor(loss, "loss")
            if loss_tensor.numel() != 1:
                raise UniPerceptionError(f"loss must be one number (the batch's mean), got shape "
                                         f"{tuple(loss_tensor.shape)}")
            loss_value = float(loss_tensor.reshape(()).item())
            if math.isnan(loss_value):
                raise UniPerceptionError("loss is NaN")
        if batch == 0:
            return
        top = logits.topk(self.topk, dim=1).indices  # (B, k)
        pairs = targets * self.num_classes + top[:, 0]
        counts = torch.bincount(pairs, minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)
        self._confusion += counts.cpu()
        self._topk_correct += int((top == targets[:, None]).any(dim=1).sum())
        self._count += batch
        if loss_value is not None:
            self._loss_sum += loss_value * batch
            self._loss_count += batch

    @property
    def count(self) -> int:
        """Samples seen since the last reset."""
        return self._count

    def merge(self, other: "ClassificationMetrics") -> "ClassificationMetrics":
        """Add what ``other`` has seen (e.g. another process's share of a validation set); returns ``self``."""
        if not isinstance(other, ClassificationMetrics) or other.num_classes != self.num_classes:
            raise UniPerceptionError("merge needs ClassificationMetrics with the same number of classes")
        self._confusion += other._confusion
        self._topk_correct += other._topk_correct
        self._count += other._count
        self._loss_sum += other._loss_sum
        self._loss_count += other._loss_count
        return self

    def compute(self) -> Dict[str, Any]:
        """The metrics of every batch since the last reset (see the class docstring); needs at least one sample."""
        if self._count == 0:
            raise UniPerceptionError("ClassificationMetrics.compute() needs at least one sample; update() first")
        confusion = self._confusion
        correct = confusion.diagonal()
        per_class_total = confusion.sum(dim=1)
        per_class = {}
        recalls = []
        for name, hit, total in zip(self.class_names, correct.tolist(), per_class_total.tolist(), strict=True):
            if total:
                per_class[name] = hit / total
                recalls.append(hit / total)
            else:
                per_class[name] = None
        result: Dict[str, Any] = {
            "top1": int(correct.sum()) / self._count,
            "top5": self._topk_correct / self._count,
            "macro_accuracy": math.fsum(recalls) / len(recalls),
            "per_class_accuracy": per_class,
            "confusion_matrix": confusion.tolist(),
            "count": self._count,
        }
        if self._loss_count:
            result["loss"] = self._loss_sum / self._loss_count
        return result


class ForecastMetrics:
    """MSE, MAE and MASE of forecasts, with the seasonal-naive forecast as the MASE scale.

    Args:
        season: ``m``, the seasonal period of the naive forecast (1: repeat the last observed value).

    The seasonal-naive forecast of horizon step ``h`` (0-based) repeats the value ``m`` steps before it:
    ``y_hat[h] = history[L - m + (h mod m)]``, i.e. the last ``m`` values of the look-back, cycled over the horizon.
    ``mase`` is the model's MAE divided by the seasonal-naive MAE on the same targets, both pooled over every value
    of every update (not averaged per series); below 1 the model beats the naive forecast. When the naive MAE is 0,
    ``mase`` is ``inf`` if the model's MAE is above 0 and ``0.0`` if it is 0 too.

    ``compute()`` returns ``mse``, ``mae``, ``mase``, ``naive_mse``, ``naive_mae`` and ``count`` (values compared,
    ``B * T * D`` summed over the updates).
    """

    def __init__(self, season: int = 1):
        if isinstance(season, bool) or not isinstance(season, numbers.Integral) or season < 1:
            raise UniPerceptionError(f"ForecastMetrics needs an integer season >= 1, got {season!r}")
        self.season = int(season)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self._sq, self._abs, self._naive_sq, self._naive_abs = 0.0, 0.0, 0.0, 0.0
        self._count = 0

    def naive_forecast(self, history: torch.Tensor, horizon: int) -> torch.Tensor:
        """The seasonal-naive forecast ``(B, T, D)`` of a look-back ``(B, L, D)`` with ``L >= season``."""
        history = _as_tensor(history, "history")
        if history.ndim != 3 or history.shape[1] < self.season:
            raise UniPerceptionError(f"history must be (B, L, D) with L >= season = {self.season}, got "
                                     f"{tuple(history.shape)}")
        last = history[:, history.shape[1] - self.season:, :]
        steps = torch.arange(horizon, device=history.device) % self.season
        return last[:, steps, :]

    def update(self, forecast: torch.Tensor, target: torch.Tensor, history: torch.Tensor) -> None:
        """Add one batch: ``forecast`` and ``target`` ``(B, T, D)``, ``history`` the look-back ``(B, L, D)``."""
        forecast, target, history = (_as_tensor(forecast, "forecast"), _as_tensor(target, "target"),
                                     _as_tensor(history, "history"))
        for name, tensor in (("forecast", forecast), ("target", target), ("history", history)):
            _check_real(tensor, name)
            if tensor.ndim != 3:
                raise UniPerceptionError(f"{name} must be (B, T, D) (history (B, L, D)), got {tuple(tensor.shape)}")
        if forecast.shape != target.shape:
            raise UniPerceptionError(f"forecast {tuple(forecast.shape)} and target {tuple(target.shape)} must have "
                                     "the same shape (B, T, D)")
        batch, horizon, variables = target.shape
        if horizon < 1:
            raise UniPerceptionError("forecast and target need a horizon T >= 1")
        if history.shape[0] != batch or history.shape[2] != variables:
            raise UniPerceptionError(f"history {tuple(history.shape)} must be (B, L, D) = ({batch}, L, {variables}) "
                                     f"like the target {tuple(target.shape)}")
        if history.shape[1] < self.season:
            raise UniPerceptionError(f"history holds {history.shape[1]} steps, fewer than season = {self.season}")
        for name, tensor in (("forecast", forecast), ("target", target), ("history", history)):
            _check_no_nan(tensor, name, finite=True)
        if batch == 0:
            return
        target64 = target.to(torch.float64)
        error = forecast.to(torch.float64) - target64
        naive_error = self.naive_forecast(history, horizon).to(device=target.device, dtype=torch.float64) - target64
        self._sq += float(error.square().sum())
        self._abs += float(error.abs().sum())
        self._naive_sq += float(naive_error.square().sum())
        self._naive_abs += float(naive_error.abs().sum())
        self._count += error.numel()

    @property
    def count(self) -> int:
        """Values compared since the last reset."""
        return self._count

    def merge(self, other: "ForecastMetrics") -> "ForecastMetrics":
        """Add what ``other`` has seen (e.g. another process's share of a validation set); returns ``self``."""
        if not isinstance(other, ForecastMetrics) or other.season != self.season:
            raise UniPerceptionError("merge needs ForecastMetrics with the same season")
        self._sq += other._sq
        self._abs += other._abs
        self._naive_sq += other._naive_sq
        self._naive_abs += other._naive_abs
        self._count += other._count
        return self

    def compute(self) -> Dict[str, Any]:
        """The metrics of every batch since the last reset (see the class docstring); needs at least one value."""
        if self._count == 0:
            raise UniPerceptionError("ForecastMetrics.compute() needs at least one forecast; update() first")
        mae, naive_mae = self._abs / self._count, self._naive_abs / self._count
        if naive_mae > 0:
            mase = mae / naive_mae
        else:
            mase = math.inf if mae > 0 else 0.0
        return {
            "mse": self._sq / self._count,
            "mae": mae,
            "mase": mase,
            "naive_mse": self._naive_sq / self._count,
            "naive_mae": naive_mae,
            "count": self._count,
        }


def _atomic_write(path: PathLike, write: Callable[[Any], None]) -> None:
    """Write through ``write(binary_file)`` into a temporary file beside ``path``, then rename it over ``path``."""
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    mode = os.stat(target).st_mode & 0o777 if os.path.isfile(target) else 0o644
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "nan"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return number
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_complex():
            raise UniPerceptionError(f"metrics{where}: complex tensors have no JSON form")
        return _jsonable(value.item() if value.ndim == 0 else value.tolist(), where)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, np.generic):
        return _jsonable(value.item(), where)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(key, np.generic):
                key = key.item()
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise UniPerceptionError(f"metrics{where}: key {key!r} is not a string or a number")
            name = key if isinstance(key, str) else str(key)
            if name in out:
                raise UniPerceptionError(f"metrics{where}: two keys are both written as {name!r}")
            out[name] = _jsonable(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise UniPerceptionError(f"metrics{where}: {type(value).__name__} values have no JSON form")


def write_metrics_json(path: PathLike, metrics: Mapping) -> PathLike:
    """Write ``metrics`` to ``path`` as strict JSON, atomically (a temporary file in the same folder, then
    :func:`os.replace`), and return ``path``.

    Tensors and numpy arrays become (nested) lists, 0-d tensors and numpy scalars numbers; ``inf``, ``-inf`` and
    ``nan`` become the strings ``"inf"``, ``"-inf"`` and ``"nan"``; tuples become lists and non-string keys strings.
    Missing parent folders are created. Anything else raises :class:`UniPerceptionError` naming the entry.
    """
    if not isinstance(metrics, Mapping):
        raise UniPerceptionError(f"write_metrics_json needs a dict of metrics, got {type(metrics).__name__}")
    text = json.dumps(_jsonable(metrics, ""), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    return path


def _scalar(value: Any) -> Optional[float]:
    """A plottable number, ``nan`` for None/inf (a gap in the curve), ``None`` for anything that is not a number."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.detach().reshape(()).item()
    elif isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else math.nan


def _is_loss(key: str) -> bool:
    return key == "loss" or key.endswith("_loss")


def _is_lr(key: str) -> bool:
    return key in ("lr", "learning_rate") or key.endswith("_lr")


def _save_png(figure: Any, path: PathLike, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    _atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi))


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: PathLike, title: Optional[str] = None
                         ) -> PathLike:
    """Training curves as a PNG at ``path``, written atomically; returns ``path``.

    Args:
        history: one dict per epoch (or evaluation) with ``"epoch"`` and any numbers, e.g. ``train_loss``,
            ``val_loss``, ``val_top1``, ``val_mae``, ``lr``. A key may be missing or ``None`` in some entries.
        path: the PNG file.
        title: the figure's title.

    Keys named ``loss`` or ending in ``_loss`` share the top panel; every other number is drawn on a second panel,
    the learning rate (``lr``, ``learning_rate``, ``*_lr``) on its own right-hand axis there (log scale when all its
    values are positive). Panels without keys are left out; values that are not numbers (dicts, lists) are ignored.
    """
    if isinstance(history, Mapping) or not isinstance(history, Sequence) or len(history) == 0:
        got = "an empty list" if isinstance(history, Sequence) else type(history).__name__
        raise UniPerceptionError(f"plot_training_curves needs a non-empty list of per-epoch dicts, got {got}")
    epochs: List[float] = []
    keys: List[str] = []
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise UniPerceptionError(f"history[{i}] must be a dict, got {type(entry).__name__}")
        epoch = _scalar(entry.get("epoch"))
        if epoch is None or math.isnan(epoch):
            raise UniPerceptionError(f"history[{i}] needs a numeric 'epoch', got {entry.get('epoch')!r}")
        epochs.append(epoch)
        for key, value in entry.items():
            if key != "epoch" and isinstance(key, str) and key not in keys and value is not None \
                    and _scalar(value) is not None:
                keys.append(key)
    if not keys:
        raise UniPerceptionError("plot_training_curves: history holds no numbers to plot besides 'epoch'")

    def series(key: str) -> List[float]:
        values = []
        for entry in history:
            value = _scalar(entry.get(key))
            values.append(math.nan if value is None else value)
        return values

    losses = [k for k in keys if _is_loss(k)]
    rates = [k for k in keys if _is_lr(k)]
    others = [k for k in keys if not _is_loss(k) and not _is_lr(k)]
    panels = int(bool(losses)) + int(bool(others or rates))

    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.4 * panels), layout="constrained")
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    marker = "o" if len(history) <= 50 else None
    panel = 0
    if losses:
        ax = axes[panel]
        for key in losses:
            ax.plot(epochs, series(key), marker=marker, markersize=3, label=key)
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        panel += 1
    if others or rates:
        ax = axes[panel]
        lines = []
        for key in others:
            lines += ax.plot(epochs, series(key), marker=marker, markersize=3, label=key)
        if others:
            ax.set_ylabel("metric")
            ax.grid(True, alpha=0.3)
        if rates:
            rate_ax = ax.twinx() if others else ax
            for key in rates:
                lines += rate_ax.plot(epochs, series(key), marker=marker, markersize=3, linestyle="--",
                                      color="tab:gray" if len(rates) == 1 else None, label=key)
            values = [v for key in rates for v in series(key) if not math.isnan(v)]
            if values and min(values) > 0:
                rate_ax.set_yscale("log")
            rate_ax.set_ylabel("learning rate")
            if not others:
                rate_ax.grid(True, alpha=0.3)
        ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize="small")
    axes[-1].set_xlabel("epoch")
    if title:
        figure.suptitle(title)
    _save_png(figure, path, dpi=100)
    return path


def plot_confusion_matrix(matrix: Any, class_names: Optional[Sequence[str]], path: PathLike, normalize: bool = True,
                          title: Optional[str] = None) -> PathLike:
    """A confusion matrix as a PNG at ``path``, written atomically; returns ``path``.

    Args:
        matrix: ``C x C`` counts (nested list, tensor or array), rows the true class, columns the predicted one, as
            ``ClassificationMetrics.compute()["confusion_matrix"]``.
        class_names: ``C`` names for the axes; ``None`` numbers the classes.
        path: the PNG file.
        normalize: divide each row by its total (a row without samples stays 0), so the diagonal shows per-class
            recall; otherwise counts are shown.
        title: the figure's title (by default says whether values are counts or row-normalised).

    Cells are annotated with their values when ``C <= 20``; the figure grows and the fonts shrink with ``C`` so that
    all names stay readable up to about 50 classes.
    """
    values = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else matrix
    try:
        values = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UniPerceptionError(f"plot_confusion_matrix: matrix is not a C x C table of numbers ({exc})") from None
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.shape[0] == 0:
        raise UniPerceptionError(f"plot_confusion_matrix needs a square C x C matrix, got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise UniPerceptionError("plot_confusion_matrix: the matrix must hold finite counts >= 0")
    classes = values.shape[0]
    names = [str(i) for i in range(classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != classes:
        raise UniPerceptionError(f"plot_confusion_matrix: {len(names)} class_names for a {classes} x {classes} "
                                 "matrix")
    if normalize:
        totals = values.sum(axis=1, keepdims=True)
        shown = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
        top = 1.0
    else:
        shown = values
        top = max(float(values.max()), 1.0)

    from matplotlib.figure import Figure

    side = min(4.0 + 0.3 * classes, 22.0)
    tick_size = max(5.0, min(10.0, 250.0 / classes))
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=top, interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    ax.set_xticks(range(classes), labels=names, rotation=90, fontsize=tick_size)
    ax.set_yticks(range(classes), labels=names, fontsize=tick_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or ("Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)"))
    if classes <= 20:
        cell_size = max(6.0, min(10.0, 140.0 / classes))
        whole = not normalize and bool(np.all(values == np.round(values)))
        for i in range(classes):
            for j in range(classes):
                value = shown[i, j]
                text = f"{int(value)}" if whole else (f"{value:.2f}" if normalize else f"{value:.3g}")
                ax.text(j, i, text, ha="center", va="center", fontsize=cell_size,
                        color="white" if value > top / 2 else "black")
    _save_png(figure, path, dpi=100)
    return path
