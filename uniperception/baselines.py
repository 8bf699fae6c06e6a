"""Simple baselines to read a model's results against: what a few lines of scikit-learn reach on the same inputs.

* ``logistic``: multinomial logistic regression on the adapter's preprocessed sample (the normalised image,
  spectrogram or frame layout), average-pooled to at most ``max_features`` values and standardised;
* ``d2_logistic``: logistic regression on the D2 shape distribution of a point cloud (Osada et al., 2002: a histogram
  of distances between random point pairs of the unit-sphere-normalised cloud);
* ``nearest_neighbour``: 1-nearest-neighbour with Euclidean distance on the series as given (the UCR/UEA archive's
  reference classifier: the univariate sets come z-normalised, the multivariate ones as recorded), channels
  concatenated, at the adapter's length (series of other lengths padded or resampled as the adapter does);
* forecasting: the seasonal-naive forecast (:class:`~uniperception.metrics.ForecastMetrics` reports it beside the
  model).

Each takes datasets that yield ``(sample, label)`` (as :mod:`uniperception.data` and :mod:`uniperception.datasets`
give) and returns the test accuracy (a fraction, like the engine's ``top1``).
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BASELINES", "evaluate_baseline"]

BASELINES = {
    "image": "logistic", "audio": "logistic", "video": "logistic", "point_cloud": "d2_logistic",
    "time_series": "nearest_neighbour",
}


def _stack(dataset) -> Tuple[torch.Tensor, np.ndarray]:
    samples, labels = [], []
    for item in (dataset[i] for i in range(len(dataset))):
        if item is None:
            continue
        samples.append(item[0])
        labels.append(int(item[1]))
    return torch.stack(samples), np.asarray(labels)


def _pooled(batch: torch.Tensor, max_features: int) -> np.ndarray:
    """``(N, C, H, W)`` average-pooled until ``C * H * W <= max_features``, flattened."""
    if batch.ndim == 4:
        factor = max(1, math.ceil(math.sqrt(batch[0].numel() / max_features)))
        if factor > 1:
            batch = F.avg_pool2d(batch, factor, ceil_mode=True)
    return batch.reshape(batch.shape[0], -1).double().numpy()


def _d2(batch: torch.Tensor, bins: int = 64, pairs: int = 8192, seed: int = 0) -> np.ndarray:
    """D2 histograms ``(N, bins)`` of ``(N, P, C)`` point clouds (xyz columns, unit sphere: distances in [0, 2])."""
    generator = torch.Generator().manual_seed(seed)
    xyz = batch[..., :3].double()
    first = torch.randint(0, xyz.shape[1], (pairs,), generator=generator)
    second = torch.randint(0, xyz.shape[1], (pairs,), generator=generator)
    distances = (xyz[:, first] - xyz[:, second]).norm(dim=-1)
    return np.stack([torch.histc(d, bins=bins, min=0.0, max=2.0).numpy() / pairs for d in distances])


def _series_values(batch: torch.Tensor, num_variables: int) -> np.ndarray:
    """The value columns of time-series samples ``(N, L, D + 6)``, flattened."""
    return batch[..., :num_variables].double().reshape(batch.shape[0], -1).numpy()


def evaluate_baseline(kind: str, train, test, adapter=None, max_features: int = 4096) -> float:
    """Fit baseline ``kind`` on ``train`` and return its top-1 accuracy on ``test`` (a fraction in [0, 1])."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = _stack(train)
    x_test, y_test = _stack(test)
    if kind == "logistic":
        features = (_pooled(x_train, max_features), _pooled(x_test, max_features))
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    elif kind == "d2_logistic":
        features = (_d2(x_train), _d2(x_test))
        classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    elif kind == "nearest_neighbour":
        variables = adapter.num_variables if adapter is not None else x_train.shape[-1] - 6
        features = (_series_values(x_train, variables), _series_values(x_test, variables))
        classifier = KNeighborsClassifier(n_neighbors=1)
    else:
        raise ValueError(f"unknown baseline {kind!r}; one of logistic, d2_logistic, nearest_neighbour")
    classifier.fit(features[0], y_train)
    return float((classifier.predict(features[1]) == y_test).mean())
