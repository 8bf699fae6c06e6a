"""Heads on the backbone's pooled features: per-view concatenation, forecasts in the input's units."""

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import backbones  # noqa: F401
from modalities import create_adapter
from uniperception.errors import UniPerceptionError
from uniperception.heads import ClassificationHead, EmbeddingHead, ForecastingHead


def test_classification_head_concatenates_the_views_of_each_sample():
    head = ClassificationHead(num_features=4, num_classes=3, maps_per_sample=2)
    features = torch.randn(6, 4)  # 3 samples x 2 views
    logits = head(features, {"maps_per_sample": 2})
    assert logits.shape == (3, 3)
    joined = torch.cat([features[0::2], features[1::2]], dim=1)  # sample i = rows 2i and 2i + 1
    assert torch.allclose(logits, head.fc(head.norm(joined)), atol=1e-6)
    # swapping two views of one sample changes its answer and only its answer
    swapped = features.clone()
    swapped[[0, 1]] = features[[1, 0]]
    changed = head(swapped)
    assert not torch.allclose(changed[0], logits[0]) and torch.allclose(changed[1:], logits[1:])


def test_heads_reject_mismatched_features():
    head = ClassificationHead(num_features=4, num_classes=3, maps_per_sample=4)
    with pytest.raises(UniPerceptionError, match="built for 4 maps per sample, the adapter made 3"):
        head(torch.randn(12, 4), {"maps_per_sample": 3})
    with pytest.raises(UniPerceptionError, match=r"expected pooled features \(B \* 4, 4\), got \(6, 4\)"):
        head(torch.randn(6, 4))
    with pytest.raises(UniPerceptionError, match=r"expected pooled features \(B \* 4, 4\), got \(8, 5\)"):
        head(torch.randn(8, 5))  # features of another backbone
    with pytest.raises(UniPerceptionError, match="maps_per_sample >= 1"):
        EmbeddingHead(0)
    with pytest.raises(UniPerceptionError, match="encode\\(\\) context"):
        ForecastingHead(4, horizon=2, num_variables=1)(torch.randn(2, 4), None)
    with pytest.raises(UniPerceptionError, match="divisible"):
        ForecastingHead(4, horizon=2, num_variables=3, num_nodes=2)
    adapter = create_adapter("time_series", num_variables=1, task="forecasting", length=32, horizon=6, min_d_model=32)
    _, context = adapter.encode(torch.randn(2, 32, 7))
    with pytest.raises(UniPerceptionError, match="forecasts 4 steps of 1 variables; the adapter is set up for 6 steps"):
        ForecastingHead(4, horizon=4, num_variables=1)(torch.randn(2, 4), context)


def test_embedding_head_averages_the_maps_of_a_sample():
    features = torch.randn(8, 5)
    pooled = EmbeddingHead(maps_per_sample=4)(features, {"maps_per_sample": 4})
    assert torch.allclose(pooled, features.view(2, 4, 5).mean(1))


def test_point_cloud_classification_end_to_end_trains():
    adapter = create_adapter("point_cloud", num_points=64, image_size=32, num_views=3)
    backbone = timm.create_model("unireplknet_a", in_chans=adapter.out_channels, num_classes=0)
    head = ClassificationHead(backbone.num_features, num_classes=5, maps_per_sample=adapter.maps_per_sample)
    clouds = torch.stack([adapter.preprocess(torch.randn(200, 3)) for _ in range(2)])
    maps, context = adapter.encode(clouds)
    logits = head(backbone(maps), context)
    assert logits.shape == (2, 5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    assert adapter.projection.point_embed.weight.grad.abs().sum() > 0
    assert head.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("num_nodes", [1, 2])
def test_forecast_of_a_constant_series_is_that_constant(num_nodes):
    adapter = create_adapter("time_series", num_variables=2, task="forecasting", length=32, horizon=6,
                             min_d_model=32, num_nodes=num_nodes)
    backbone = timm.create_model("unireplknet_a", in_chans=1, num_classes=0)
    head = ForecastingHead(backbone.num_features, horizon=6, num_variables=2, num_nodes=num_nodes)
    torch.nn.init.normal_(head.fc.weight, std=1.0)  # a head whose normalised output is far from zero
    frame = pd.DataFrame({"time": pd.date_range("2024-03-01", periods=40, freq="h"), "level": 17.25,
                          "flow": np.linspace(0, 3, 40)})
    inputs = adapter.collate([adapter.preprocess(adapter.load(frame))])
    maps, context = adapter.encode(inputs)
    assert maps.shape[0] == num_nodes
    forecast = head(backbone.eval()(maps), context)
    assert forecast.shape == (1, 6, 2)
    assert torch.all(forecast[..., 0] == 17.25)  # the constant variable comes back exactly
    assert not torch.allclose(forecast[..., 1], forecast[..., 1].mean().expand(6))  # the other one varies


def test_forecasts_are_in_the_input_units_and_train():
    rng = np.random.default_rng(0)
    steps = np.arange(200)
    values = np.stack([1000 + 50 * np.sin(steps / 5), -3 + 0.1 * np.cos(steps / 7)], axis=1)
    values += rng.normal(0, 0.01, values.shape)
    adapter = create_adapter("time_series", num_variables=2, task="forecasting", length=32, horizon=4,
                             min_d_model=32)
    inputs, targets = adapter.forecasting_windows(adapter.load(values), stride=16)
    backbone = timm.create_model("unireplknet_a", in_chans=1, num_classes=0)
    head = ForecastingHead(backbone.num_features, horizon=4, num_variables=2)
    maps, context = adapter.encode(inputs)
    forecast = head(backbone(maps), context)
    # de-normalised: each variable's forecast sits around its own level, not around zero
    assert (forecast[..., 0] - 1000).abs().mean() < 200 and (forecast[..., 1] + 3).abs().mean() < 2
    loss = torch.nn.functional.mse_loss(forecast, targets)
    loss.backward()
    assert torch.isfinite(loss)
    for module in (head.fc, adapter):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_nodes_and_variables_keep_their_places_from_embedding_to_forecast():
    """Each forecast variable depends on its own node's map only, and each sample on its own inputs only: the
    grouping of the embedding and the head's regrouping agree (B = 2, D = 6, n = 3)."""
    torch.manual_seed(0)
    adapter = create_adapter("time_series", num_variables=6, task="forecasting", length=32, horizon=3,
                             min_d_model=32, num_nodes=3)
    head = ForecastingHead(num_features=16, horizon=3, num_variables=6, num_nodes=3)
    inputs = torch.randn(2, 32, 12)
    maps, context = adapter.encode(inputs)
    features = maps.flatten(1)[:, :16].clone().requires_grad_(True)  # stands in for the backbone's features
    forecast = head(features, context)
    for b in range(2):
        for variable in range(6):
            (grad,) = torch.autograd.grad(forecast[b, :, variable].sum(), features, retain_graph=True)
            touched = grad.abs().sum(1).nonzero().flatten().tolist()
            assert touched == [b * 3 + variable // 2], (b, variable, touched)
    # and the maps: map b * n + k holds sample b's variables 2k and 2k + 1 only
    values = inputs.clone().requires_grad_(True)
    maps = adapter(values)
    for b in range(2):
        for node in range(3):
            (grad,) = torch.autograd.grad(maps[b * 3 + node].sum(), values, retain_graph=True)
            used = grad[..., :6].abs().sum(1).nonzero().tolist()
            assert used == [[b, 2 * node], [b, 2 * node + 1]], (b, node, used)
            assert grad[1 - b].abs().sum() == 0  # time features of the other sample do not leak in either
