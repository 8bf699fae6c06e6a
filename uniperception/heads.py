"""Heads: pooled backbone features to answers.

The backbone (``num_classes=0``) turns each embedding map into one pooled, layer-normalised feature vector
``(B * M, C)``, where ``M`` is the adapter's ``maps_per_sample`` (views of a point cloud, nodes of a grouped time
series; 1 for images, audio and video). A head reads those rows together with the adapter's ``encode`` context:

``ClassificationHead``
    ``(B * M, C) -> (B, num_classes)``. With several maps per sample, the ``M`` vectors of a sample are concatenated,
    layer-normalised and classified, as the released point-cloud recipe does with its views.
``ForecastingHead``
    ``(B * n, C) -> (B, T, D)``: each node's vector becomes the next ``T`` values of its ``D / n`` variables (one linear
    map shared by the nodes), then the adapter's instance normalisation is undone, so forecasts are in the input's
    units.
``EmbeddingHead``
    ``(B * M, C) -> (B, C)``: the mean of a sample's map vectors, comparable across modalities.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from einops import rearrange
from torch import nn

from modalities.time_series import denormalize

from .errors import UniPerceptionError

__all__ = ["ClassificationHead", "EmbeddingHead", "ForecastingHead"]


def _maps_per_sample(features: torch.Tensor, context: Optional[Dict[str, Any]], expected: int, head: str,
                     num_features: Optional[int] = None) -> int:
    maps = (context or {}).get("maps_per_sample", expected)
    if maps != expected:
        raise UniPerceptionError(f"{head} was built for {expected} maps per sample, the adapter made {maps}")
    wrong_width = num_features is not None and features.ndim == 2 and features.shape[1] != num_features
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] % maps or wrong_width:
        raise UniPerceptionError(
            f"{head}: expected pooled features (B * {maps}, {num_features or 'C'}), got {tuple(features.shape)}"
        )
    return maps


class ClassificationHead(nn.Module):
    """Class logits from pooled features.

    Args:
        num_features: ``C``, the backbone's ``num_features``.
        num_classes: classes.
        maps_per_sample: ``M``; above 1 the ``M`` vectors of a sample are concatenated and layer-normalised.
        dropout: dropout before the classifier.
    """

    def __init__(self, num_features: int, num_classes: int, maps_per_sample: int = 1, dropout: float = 0.0):
        super().__init__()
        if num_classes < 1 or maps_per_sample < 1:
            raise UniPerceptionError(
                f"ClassificationHead needs num_classes >= 1 and maps_per_sample >= 1, got {num_classes}, "
                f"{maps_per_sample}"
            )
        self.maps_per_sample, self.num_features = maps_per_sample, num_features
        width = num_features * maps_per_sample
        self.norm = nn.LayerNorm(width) if maps_per_sample > 1 else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor, context: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        maps = _maps_per_sample(features, context, self.maps_per_sample, "ClassificationHead", self.num_features)
        joined = rearrange(features, "(b m) c -> b (m c)", m=maps)
        return self.fc(self.drop(self.norm(joined)))


class EmbeddingHead(nn.Module):
    """One vector per sample: the mean of its ``maps_per_sample`` pooled feature vectors, ``(B, C)``."""

    def __init__(self, maps_per_sample: int = 1):
        super().__init__()
        if maps_per_sample < 1:
            raise UniPerceptionError(f"EmbeddingHead needs maps_per_sample >= 1, got {maps_per_sample}")
        self.maps_per_sample = maps_per_sample

    def forward(self, features: torch.Tensor, context: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        maps = _maps_per_sample(features, context, self.maps_per_sample, "EmbeddingHead")
        return rearrange(features, "(b m) c -> b m c", m=maps).mean(dim=1)


class ForecastingHead(nn.Module):
    """The next ``horizon`` steps of every variable, in the input's units.

    Args:
        num_features: ``C``, the backbone's ``num_features``.
        horizon: ``T``.
        num_variables: ``D``.
        num_nodes: ``n``, the adapter's grouping (``D`` divisible by ``n``); node ``j`` forecasts variables
            ``j * D/n`` to ``(j + 1) * D/n - 1``.
        dropout: dropout before the projection.
    """

    def __init__(self, num_features: int, horizon: int, num_variables: int, num_nodes: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if horizon < 1 or num_variables < 1 or num_nodes < 1 or num_variables % num_nodes:
            raise UniPerceptionError(
                f"ForecastingHead needs horizon >= 1 and num_variables divisible by num_nodes, got horizon "
                f"{horizon}, {num_variables} variables, {num_nodes} nodes"
            )
        self.horizon, self.num_variables, self.num_nodes = horizon, num_variables, num_nodes
        self.num_features = num_features
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(num_features, horizon * (num_variables // num_nodes))

    def forward(self, features: torch.Tensor, context: Dict[str, Any]) -> torch.Tensor:
        """``(B * n, C)`` and the adapter's ``encode`` context -> ``(B, T, D)`` de-normalised forecasts."""
        if context is None or "mean" not in context:
            raise UniPerceptionError("ForecastingHead needs the time-series adapter's encode() context to "
                                     "de-normalise its forecasts")
        if context.get("horizon", self.horizon) != self.horizon or context.get("num_variables", self.num_variables) \
                != self.num_variables:
            raise UniPerceptionError(
                f"ForecastingHead forecasts {self.horizon} steps of {self.num_variables} variables; the adapter is "
                f"set up for {context.get('horizon')} steps of {context.get('num_variables')} variables"
            )
        nodes = _maps_per_sample(features, context, self.num_nodes, "ForecastingHead", self.num_features)
        values = self.fc(self.drop(features))  # (B*n, T * D/n)
        values = rearrange(values, "(b n) (t v) -> b t (n v)", n=nodes, t=self.horizon)
        return denormalize(values, context)
