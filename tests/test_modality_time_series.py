"""The time-series adapter on real files written by pandas: formats, time features, lengths, windows, the learnable
embedding and its lossless map layout, instance normalisation, bad input."""

import doctest
import io
import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the timm factories)
from modalities import InvalidInputError, create_adapter
from modalities import time_series as ts_module
from modalities.time_series import (
    NUM_TIME_FEATURES,
    TimeSeries,
    TimeSeriesAdapter,
    denormalize,
    map_shape,
    time_features,
)


def frame(steps=40, columns=("load", "temp"), freq="h", seed=0):
    rng = np.random.default_rng(seed)
    data = {"timestamp": pd.date_range("2024-01-01", periods=steps, freq=freq)}
    for i, column in enumerate(columns):
        data[column] = rng.standard_normal(steps) * (i + 1) * 10 + i * 100
    return pd.DataFrame(data)


def values_of(table, columns=("load", "temp")):
    return table[list(columns)].to_numpy(dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------------
# the map layout


@pytest.mark.parametrize("length, d_model, expected", [
    (96, None, (96, 96, 96)),
    (48, None, (75, 60, 60)),
    (48, 768, (768, 192, 192)),
    (131, None, (64, 92, 92)),      # a prime length: the square d_model would exceed 2 * 64, so the map is padded
    (8, None, (128, 32, 32)),       # short series: d_model grows to reach the 32x32 minimum
])
def test_map_shape_examples(length, d_model, expected):
    assert map_shape(length, d_model) == expected


def test_map_shape_rule_for_every_length():
    for length in range(2, 400):
        d_model, height, width = map_shape(length)
        lower = max(64, -(-1024 // length))
        assert lower <= d_model <= 2 * lower
        assert height >= 32 and width >= 32 and height * width >= length * d_model > (height - 1) * width
        side = math.isqrt(length * d_model)
        if side * side == length * d_model:
            assert height == width == side
        else:  # no square d_model close enough to the lower bound: the lower bound, padded
            assert d_model == lower
    with pytest.raises(InvalidInputError, match="smaller than 32x32"):
        map_shape(10, 50)


@pytest.mark.parametrize("length, d_model, padded", [(96, None, False), (131, None, True), (48, 768, False)])
def test_to_map_and_from_map_are_lossless(length, d_model, padded):
    adapter = TimeSeriesAdapter(length=length, d_model=d_model)
    embedded = torch.randn(3, length, adapter.d_model)
    maps = adapter.to_map(embedded)
    height, width = adapter.map_size
    assert maps.shape == (3, 1, height, width)
    assert torch.equal(adapter.from_map(maps), embedded)
    # row-major placement: map cell (r, c) holds step (r*W + c) // d_model, channel (r*W + c) % d_model
    for r, c in [(0, 0), (1, 5), (height // 2, width - 1), (height - 2, 3)]:
        index = r * width + c
        step, channel = divmod(index, adapter.d_model)
        assert maps[1, 0, r, c] == embedded[1, step, channel]
    tail = maps.flatten(1)[:, length * adapter.d_model:]
    assert (tail.numel() > 0) == padded and torch.all(tail == 0)


# ---------------------------------------------------------------------------------------------------------------------
# instance normalisation


def test_normalize_and_denormalize_round_trip():
    adapter = TimeSeriesAdapter(num_variables=5, task="forecasting", length=64, horizon=8)
    with torch.no_grad():
        adapter.affine_weight.copy_(torch.tensor([1.5, -0.7, 0.3, 2.0, 1.0]))
        adapter.affine_bias.copy_(torch.tensor([0.1, -2.0, 0.0, 5.0, 0.3]))
    scales = torch.tensor([1e-3, 1.0, 1e3, 10.0, 1.0])
    offsets = torch.tensor([0.0, -5.0, 1e4, 3.0, 0.0])
    values = torch.randn(4, 64, 5) * scales + offsets
    values[:, :, 4] = 7.25                                        # a constant variable
    normalised, stats = adapter.normalize(values)
    assert stats["mean"].shape == (4, 1, 5) and stats["scale"].shape == (4, 1, 5)
    assert torch.all(stats["scale"][:, :, 4] == 0) and torch.all(stats["scale"][:, :, :4] > 0)
    centred = (normalised - adapter.affine_bias) / adapter.affine_weight
    assert torch.allclose(centred[..., :4].mean(1), torch.zeros(4, 4), atol=1e-5)
    assert torch.allclose(centred[..., :4].std(1, unbiased=False), torch.ones(4, 4), atol=1e-5)
    restored = denormalize(normalised, stats)
    values.requires_grad_(True)
    adapter.normalize(values)[0].sum().backward()           # a constant variable gives no infinite gradient
    assert torch.isfinite(values.grad).all()
    values = values.detach()
    tolerance = 4 * torch.finfo(torch.float32).eps * values.abs().amax(1, keepdim=True)
    assert torch.all((restored - values).abs() <= tolerance)
    assert torch.equal(restored[..., 4], values[..., 4])


def test_a_constant_series_is_forecast_as_that_constant():
    adapter = TimeSeriesAdapter(num_variables=2, task="forecasting", length=32, horizon=8)
    with torch.no_grad():
        adapter.affine_weight.copy_(torch.tensor([0.5, -1.3]))
        adapter.affine_bias.copy_(torch.tensor([0.2, 0.7]))
    series = adapter.load(np.full((40, 2), 3.7))
    _, context = adapter.encode(adapter.preprocess(series).unsqueeze(0))
    forecast = denormalize(torch.randn(1, 8, 2) * 100, context)
    assert torch.all(forecast == torch.tensor(3.7, dtype=torch.float32))
    # only the second variable constant: it stays exact, the first follows the head
    mixed = np.stack([np.sin(np.arange(40) / 3.0), np.full(40, -12.5)], axis=1)
    _, context = adapter.encode(adapter.preprocess(adapter.load(mixed)).unsqueeze(0))
    head = torch.randn(1, 8, 2) * 100
    forecast = denormalize(head, context)
    assert torch.all(forecast[..., 1] == -12.5)
    assert forecast[..., 0].std() > 1 and torch.isfinite(forecast).all()
    assert torch.allclose(forecast[..., 0], (head[..., 0] - 0.2) / 0.5 * context["scale"][0, 0, 0]
                          + context["mean"][0, 0, 0], rtol=1e-5)


def test_without_normalisation_level_and_amplitude_reach_the_map():
    adapter = TimeSeriesAdapter(num_variables=2, task="forecasting", length=32, horizon=4, normalization="none")
    with torch.no_grad():
        adapter.affine_weight.copy_(torch.tensor([2.0, -0.5]))
        adapter.affine_bias.copy_(torch.tensor([0.25, 1.0]))
    values = torch.randn(3, 32, 2) * torch.tensor([3.0, 0.1]) + torch.tensor([10.0, -4.0])
    normalised, stats = adapter.normalize(values)
    assert torch.equal(normalised, values * adapter.affine_weight + adapter.affine_bias)
    assert torch.all(stats["mean"] == 0) and torch.all(stats["scale"] == 1)
    assert torch.allclose(denormalize(normalised, stats), values, atol=1e-5)
    # two samples that differ only in level give one map with instance normalisation and two without
    batch = torch.zeros(2, 32, 2 + NUM_TIME_FEATURES)
    batch[:, :, :2] = torch.sin(torch.arange(32.0) / 4).view(1, 32, 1)
    batch[1, :, :2] += 5.0
    instance = TimeSeriesAdapter(num_variables=2, length=32)
    plain = TimeSeriesAdapter(num_variables=2, length=32, normalization="none")
    maps = instance(batch)
    assert torch.allclose(maps[0], maps[1], atol=1e-5)
    maps = plain(batch)
    assert (maps[0] - maps[1]).abs().max() > 1
    assert TimeSeriesAdapter(**plain.config).normalization == "none"


def test_zero_series_and_denormalize_checks_shapes():
    adapter = TimeSeriesAdapter(num_variables=1, task="forecasting", length=32, horizon=4)
    maps, context = adapter.encode(torch.zeros(2, 32, 1 + NUM_TIME_FEATURES))
    assert torch.isfinite(maps).all()
    assert torch.all(denormalize(torch.randn(2, 4, 1), context) == 0)
    with pytest.raises(InvalidInputError, match="matching the context"):
        denormalize(torch.randn(3, 4, 1), context)


# ---------------------------------------------------------------------------------------------------------------------
# files written by pandas


def test_csv_with_a_detected_timestamp_column(tmp_path):
    table = frame()
    path = tmp_path / "sensors.csv"
    table.to_csv(path, index=False)
    series = TimeSeriesAdapter(num_variables=2, length=16).load(path)
    assert series.columns == ["load", "temp"] and series.name == str(path)
    np.testing.assert_array_equal(series.values, values_of(table))
    assert series.timestamps.equals(pd.DatetimeIndex(table["timestamp"]))


def test_csv_with_a_named_timestamp_column_and_value_columns(tmp_path):
    table = frame().rename(columns={"timestamp": "when"})
    table["note_id"] = np.arange(len(table)) * 3
    path = tmp_path / "sensors.csv"
    table.to_csv(path, index=False)
    adapter = TimeSeriesAdapter(num_variables=2, length=16, timestamp_column="when", value_columns=["temp", "load"])
    series = adapter.load(path)
    assert series.columns == ["temp", "load"]
    np.testing.assert_array_equal(series.values, values_of(table, ("temp", "load")))
    assert series.timestamps.equals(pd.DatetimeIndex(table["when"]))
    with pytest.raises(InvalidInputError, match=r"timestamp_column 'stamp' not found; the columns are \['when'"):
        TimeSeriesAdapter(num_variables=2, timestamp_column="stamp").load(path)
    with pytest.raises(InvalidInputError, match=r"value_columns \['pressure'\] not found"):
        TimeSeriesAdapter(num_variables=2, value_columns=["load", "pressure"]).load(path)


def test_dataframes_series_and_csv_with_a_written_datetime_index(tmp_path):
    table = frame().set_index("timestamp")
    adapter = TimeSeriesAdapter(num_variables=2, length=16)
    in_memory = adapter.load(table)
    np.testing.assert_array_equal(in_memory.values, table.to_numpy())
    assert in_memory.timestamps.equals(table.index) and in_memory.name == "<DataFrame>"
    path = tmp_path / "indexed.csv"
    table.to_csv(path)                       # the unnamed index becomes the first column
    from_csv = adapter.load(path)
    np.testing.assert_array_equal(from_csv.values, table.to_numpy())
    assert from_csv.timestamps.equals(pd.DatetimeIndex(table.index))
    plain = tmp_path / "range_index.csv"
    table.reset_index(drop=True).to_csv(plain)   # a written RangeIndex is dropped, not taken for a variable
    assert adapter.load(plain).columns == ["load", "temp"]
    single = TimeSeriesAdapter(length=16).load(table["load"])
    assert single.columns == ["load"] and single.timestamps.equals(table.index)


def test_tsv_txt_and_headerless_csv(tmp_path):
    table = frame()
    adapter = TimeSeriesAdapter(num_variables=2, length=16)
    tsv = tmp_path / "sensors.tsv"
    table.to_csv(tsv, sep="\t", index=False)
    series = adapter.load(tsv)
    np.testing.assert_array_equal(series.values, values_of(table))
    assert series.timestamps.equals(pd.DatetimeIndex(table["timestamp"]))
    txt = tmp_path / "numbers.txt"
    txt.write_text("\n".join(f"{float(a)!r} {float(b)!r}" for a, b in values_of(table)) + "\n")
    np.testing.assert_array_equal(adapter.load(txt).values, values_of(table))
    headerless = tmp_path / "numbers.csv"
    table[["load", "temp"]].to_csv(headerless, index=False, header=False)
    loaded = adapter.load(headerless)
    np.testing.assert_array_equal(loaded.values, values_of(table))
    assert loaded.timestamps is None
    dated = tmp_path / "dated.csv"
    table.to_csv(dated, index=False, header=False)
    loaded = adapter.load(dated)
    np.testing.assert_array_equal(loaded.values, values_of(table))
    assert loaded.timestamps.equals(pd.DatetimeIndex(table["timestamp"]))
    # a text column of dates under any name is the timestamp column when no other is found
    renamed = tmp_path / "renamed.csv"
    table.rename(columns={"timestamp": "Period"}).to_csv(renamed, index=False)
    assert adapter.load(renamed).timestamps.equals(pd.DatetimeIndex(table["timestamp"]))


def test_parquet_paths_bytes_and_file_objects(tmp_path):
    table = frame()
    adapter = TimeSeriesAdapter(num_variables=2, length=16)
    path = tmp_path / "sensors.parquet"
    table.to_parquet(path, index=False)
    indexed = tmp_path / "indexed.pq"
    table.set_index("timestamp").to_parquet(indexed)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    csv_bytes = table.to_csv(index=False).encode()
    with open(path, "rb") as handle:
        from_handle = adapter.load(handle)
    for series in (adapter.load(path), adapter.load(indexed), adapter.load(buffer.getvalue()),
                   adapter.load(csv_bytes), adapter.load(io.StringIO(csv_bytes.decode())), from_handle):
        np.testing.assert_array_equal(series.values, values_of(table))
        assert series.timestamps.equals(pd.DatetimeIndex(table["timestamp"]))
    assert adapter.load(buffer.getvalue()).name == f"<{len(buffer.getvalue())} bytes>"


def test_npy_arrays_and_tensors(tmp_path):
    data = np.random.default_rng(1).standard_normal((30, 3))
    path = tmp_path / "series.npy"
    np.save(path, data)
    adapter = TimeSeriesAdapter(num_variables=3, length=16)
    for source in (path, path.read_bytes(), data, torch.from_numpy(data), data.tolist()):
        series = adapter.load(source)
        np.testing.assert_array_equal(series.values, data)
        assert series.timestamps is None and series.columns == ["0", "1", "2"]
    one = TimeSeriesAdapter(length=16).load(np.arange(20, dtype=np.int32))
    assert one.values.shape == (20, 1) and one.values.dtype == np.float64


# ---------------------------------------------------------------------------------------------------------------------
# time features, lengths, windows


def test_time_features_of_known_timestamps():
    stamps = pd.DatetimeIndex(["2021-03-15 13:45", "2020-12-31 23:59", "2023-01-01 00:00"])
    expected = np.array([
        [45 / 59 - 0.5, 13 / 23 - 0.5, 0 / 6 - 0.5, 14 / 30 - 0.5, 73 / 365 - 0.5, 2 / 11 - 0.5],   # a Monday
        [59 / 59 - 0.5, 23 / 23 - 0.5, 3 / 6 - 0.5, 30 / 30 - 0.5, 365 / 365 - 0.5, 11 / 11 - 0.5],  # leap year
        [0 / 59 - 0.5, 0 / 23 - 0.5, 6 / 6 - 0.5, 0 / 30 - 0.5, 0 / 365 - 0.5, 0 / 11 - 0.5],       # a Sunday
    ])
    np.testing.assert_allclose(time_features(stamps), expected, rtol=0, atol=1e-15)
    assert np.all(time_features(None, 7) == 0) and time_features(None, 7).shape == (7, NUM_TIME_FEATURES)
    series = TimeSeriesAdapter(num_variables=2, length=3, task="forecasting").load(frame(steps=5)[:5])
    sample = TimeSeriesAdapter(num_variables=2, length=3, task="forecasting").preprocess(series)
    assert sample.shape == (3, 2 + NUM_TIME_FEATURES) and sample.dtype == torch.float32
    assert torch.allclose(sample[:, 2:], torch.from_numpy(time_features(series.timestamps[-3:])).float())


def test_classification_pad_crop_and_resample():
    table = frame(steps=50)
    series = TimeSeriesAdapter(num_variables=2).load(table)
    full = np.concatenate([values_of(table), time_features(table["timestamp"])], axis=1)
    padded = TimeSeriesAdapter(num_variables=2, length=64).preprocess(series)
    assert padded.shape == (64, 8)
    assert torch.equal(padded[:50], torch.from_numpy(full).float())
    assert torch.equal(padded[50:], padded[49:50].expand(14, 8))
    cropped = TimeSeriesAdapter(num_variables=2, length=32).preprocess(series)
    assert torch.equal(cropped, torch.from_numpy(full[:32]).float())
    same = TimeSeriesAdapter(num_variables=2, length=50, length_mode="resample").preprocess(series)
    assert torch.equal(same, torch.from_numpy(full).float())
    # resampling a straight line 0..49 over 50 steps to 99 steps gives 0, 0.5, 1, ..., 49
    line = TimeSeries(np.stack([np.arange(50.0), np.arange(50.0) * -2], axis=1),
                      pd.date_range("2024-01-01", periods=50, freq="h"), ["a", "b"], "line")
    stretched = TimeSeriesAdapter(num_variables=2, length=99, length_mode="resample").preprocess(line)
    assert stretched.shape == (99, 8)
    assert torch.allclose(stretched[:, 0], torch.arange(99) / 2.0)
    assert torch.allclose(stretched[:, 1], -torch.arange(99.0))
    half_hours = pd.date_range("2024-01-01", periods=99, freq="30min")
    assert torch.allclose(stretched[:, 2:], torch.from_numpy(time_features(half_hours)).float())
    shrunk = TimeSeriesAdapter(num_variables=2, length=25, length_mode="resample").preprocess(series)
    assert shrunk.shape == (25, 8) and torch.equal(shrunk[0], torch.from_numpy(full[0]).float())
    assert torch.allclose(shrunk[-1], torch.from_numpy(full[-1]).float())


def test_forecasting_input_and_windows():
    table = frame(steps=150)
    adapter = TimeSeriesAdapter(num_variables=2, task="forecasting", length=32, horizon=8)
    series = adapter.load(table)
    full = torch.from_numpy(np.concatenate([values_of(table), time_features(table["timestamp"])], axis=1)).float()
    assert torch.equal(adapter.preprocess(series), full[-32:])
    inputs, targets = adapter.forecasting_windows(series, stride=3)
    count = (150 - 32 - 8) // 3 + 1
    assert inputs.shape == (count, 32, 8) and targets.shape == (count, 8, 2)
    for i in range(count):
        assert torch.equal(inputs[i], full[3 * i: 3 * i + 32])
        assert torch.equal(targets[i], full[3 * i + 32: 3 * i + 40, :2])
    assert adapter.forecasting_windows(series)[0].shape[0] == 150 - 40 + 1
    short = adapter.load(table[:35])
    with pytest.raises(InvalidInputError, match="needs length \\+ horizon = 32 \\+ 8 = 40"):
        adapter.forecasting_windows(short)


def test_future_timestamps():
    adapter = TimeSeriesAdapter(num_variables=2, task="forecasting", length=16, horizon=5)
    series = adapter.load(frame(steps=20))
    expected = pd.date_range("2024-01-01 20:00", periods=5, freq="h")
    assert adapter.future_timestamps(series).equals(expected)
    assert len(adapter.future_timestamps(series, horizon=2)) == 2
    monthly = TimeSeriesAdapter(task="forecasting", length=16, horizon=3).load(
        pd.Series(np.arange(20.0), index=pd.date_range("2020-01-01", periods=20, freq="MS")))
    assert list(adapter.future_timestamps(monthly, 3).strftime("%Y-%m-%d")) == ["2021-09-01", "2021-10-01",
                                                                                 "2021-11-01"]
    irregular = pd.DatetimeIndex(["2024-01-01 00:00", "2024-01-01 00:10", "2024-01-01 00:21", "2024-01-01 00:30"])
    odd = TimeSeries(np.zeros((4, 2)), irregular, ["a", "b"], "odd")
    assert adapter.future_timestamps(odd, 2).equals(pd.DatetimeIndex(["2024-01-01 00:40", "2024-01-01 00:50"]))
    assert adapter.future_timestamps(adapter.load(np.zeros((20, 2)))) is None


# ---------------------------------------------------------------------------------------------------------------------
# missing values


def gappy_csv(tmp_path):
    table = pd.DataFrame({
        "date": pd.date_range("2024-01-01", periods=8, freq="D"),
        "a": [np.nan, 2.0, 3.0, np.nan, np.nan, 6.0, 7.0, np.nan],
        "b": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    })
    path = tmp_path / "gappy.csv"
    table.to_csv(path, index=False)
    return path


def test_missing_values_are_an_error_naming_row_column_and_line(tmp_path):
    path = gappy_csv(tmp_path)
    with pytest.raises(InvalidInputError, match=r"gappy.csv: missing value at row 0 \(line 2\), column 'a'"):
        TimeSeriesAdapter(num_variables=2, length=4).load(path)
    data = np.ones((10, 2))
    data[6, 1] = np.nan
    with pytest.raises(InvalidInputError, match=r"missing value at row 6, column '1'; .*fill="):
        TimeSeriesAdapter(num_variables=2, length=4).load(data)


@pytest.mark.parametrize("fill, expected", [
    ("ffill", [2.0, 2.0, 3.0, 3.0, 3.0, 6.0, 7.0, 7.0]),
    ("interpolate", [2.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 7.0]),
    ("zero", [0.0, 2.0, 3.0, 0.0, 0.0, 6.0, 7.0, 0.0]),
])
def test_fill_modes(tmp_path, fill, expected):
    series = TimeSeriesAdapter(num_variables=2, length=4, fill=fill).load(gappy_csv(tmp_path))
    np.testing.assert_allclose(series.values[:, 0], expected)
    assert np.all(series.values[:, 1] == 1.0)


def test_interpolation_follows_the_timestamps():
    stamps = pd.DatetimeIndex(["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 04:00"])
    table = pd.DataFrame({"v": [0.0, np.nan, 8.0]}, index=stamps)
    series = TimeSeriesAdapter(length=2, fill="interpolate").load(table)
    np.testing.assert_allclose(series.values[:, 0], [0.0, 2.0, 8.0])
    assert np.isnan(table["v"].iloc[1])            # the caller's data is untouched


# ---------------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_files(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2\n3,4\n5,6,7\n8,9\n")
    with pytest.raises(InvalidInputError, match=r"ragged.csv: cannot parse the CSV file: .*line 4"):
        TimeSeriesAdapter(num_variables=2).load(ragged)
    ragged_first = tmp_path / "ragged_first.csv"
    ragged_first.write_text("a,b\n1,2,3\n3,4\n")
    with pytest.raises(InvalidInputError, match=r"ragged_first.csv: cannot parse the CSV file: Error tokeniz.*line 2"):
        TimeSeriesAdapter(num_variables=2).load(ragged_first)
    sales = tmp_path / "sales.csv"
    sales.write_text("date,price,units\n2024-01-01,1.5,3\n2024-01-02,2.5,4\n2024-01-03,3.0,5\n2024-01-04,abc,6\n")
    with pytest.raises(InvalidInputError,
                       match=r"sales.csv: column 'price' is not numeric \(row 3: 'abc'\) on line 5"):
        TimeSeriesAdapter(num_variables=2).load(sales)
    two_dates = b"start,end,price\n2024-01-01,2024-01-02,1.5\n2024-01-02,2024-01-03,2.5\n"
    with pytest.raises(InvalidInputError,
                       match=r"^<\d+ bytes>: column 'end' is not numeric \(row 0: '2024-01-02'\) on line 2; it holds "
                             r"dates: pass timestamp_column='end'"):
        TimeSeriesAdapter(num_variables=2).load(two_dates)
    header_only = tmp_path / "header.csv"
    header_only.write_text("time,value\n")
    with pytest.raises(InvalidInputError, match="header.csv: the series has no data rows"):
        TimeSeriesAdapter().load(header_only)
    binary = tmp_path / "noise.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InvalidInputError, match="noise.csv"):
        TimeSeriesAdapter().load(binary)
    sheet = tmp_path / "book.xlsx"
    sheet.write_bytes(b"PK\x03\x04 spreadsheet")
    with pytest.raises(InvalidInputError, match=r"book.xlsx: unsupported file type '.xlsx'"):
        TimeSeriesAdapter().load(sheet)


def test_non_increasing_and_missing_timestamps(tmp_path):
    table = frame(steps=10)
    table.loc[6, "timestamp"] = table.loc[4, "timestamp"]
    path = tmp_path / "order.csv"
    table.to_csv(path, index=False)
    with pytest.raises(InvalidInputError,
                       match=r"order.csv: timestamps must be strictly increasing, but row 6 \(line 8\)"):
        TimeSeriesAdapter(num_variables=2, length=4).load(path)
    text = frame(steps=10).to_csv(index=False).splitlines()
    text[4] = "," + text[4].split(",", 1)[1]
    gap = tmp_path / "nat.csv"
    gap.write_text("\n".join(text) + "\n")
    with pytest.raises(InvalidInputError, match=r"nat.csv: missing or unparseable timestamp at row 3 \(line 5\)"):
        TimeSeriesAdapter(num_variables=2, length=4, timestamp_column="timestamp").load(gap)
    text = frame(steps=10).to_csv(index=False).splitlines()
    text[5] = "yesterday," + text[5].split(",", 1)[1]
    word = tmp_path / "word.csv"
    word.write_text("\n".join(text) + "\n")
    with pytest.raises(InvalidInputError, match=r"'timestamp' holds a value that is not a date at row 4 .*'yesterday'"):
        TimeSeriesAdapter(num_variables=2, length=4, timestamp_column="timestamp").load(word)


@pytest.mark.parametrize("adapter_config, data, message", [
    ({"num_variables": 2}, np.zeros((4, 5, 2)), r"expected a series \(steps,\) .*, got shape \(4, 5, 2\)"),
    ({"num_variables": 3}, np.zeros((3, 50)), r"got shape \(3, 50\), which looks like \(variables, steps\).*array.T"),
    ({"num_variables": 3}, np.zeros((50, 2)), r"expected num_variables=3 variables, got 2 \(columns: \['0', '1'\]\)"),
    ({"num_variables": 1}, np.array([1.0, np.inf, 2.0]), r"infinite value at row 1, column '0'"),
    ({"num_variables": 1, "fill": "zero"}, np.array([1.0, -np.inf, 2.0]), "infinite value"),
    ({"num_variables": 2}, np.stack([np.ones(10), np.full(10, np.nan)], 1), r"column '1' has no values"),
    ({"num_variables": 2, "fill": "interpolate"}, np.stack([np.ones(10), np.full(10, np.nan)], 1),
     r"column '1' has no values"),
    ({"num_variables": 1, "fill": "ffill"}, np.full(10, np.nan), r"column '0' has no values"),
    ({"num_variables": 1, "task": "forecasting", "length": 32}, np.ones(20),
     r"has 20 steps; forecasting needs at least length=32"),
    ({"num_variables": 1}, np.ones(1), r"has 1 step; classification needs at least 2"),
    ({"num_variables": 1}, np.zeros(0), r"has no steps"),
    ({"num_variables": 1}, np.array(["a", "b"]), r"values that are not numbers"),
    ({"num_variables": 1}, [[1.0, 2.0], [3.0]], r"not a rectangular array"),
])
def test_bad_arrays(adapter_config, data, message):
    with pytest.raises(InvalidInputError, match=message):
        TimeSeriesAdapter(**adapter_config).load(data)


def test_wrong_number_of_columns_names_them(tmp_path):
    path = tmp_path / "three.csv"
    frame(columns=("a", "b", "c")).to_csv(path, index=False)
    with pytest.raises(InvalidInputError, match=r"three.csv: expected num_variables=2 variables, got 3 .*'a', 'b'"):
        TimeSeriesAdapter(num_variables=2).load(path)


@pytest.mark.parametrize("config, message", [
    ({"num_variables": 6, "num_nodes": 4}, "num_nodes must divide num_variables"),
    ({"task": "regression"}, "task must be one of"),
    ({"length": 1}, "length must be an integer >= 2"),
    ({"task": "forecasting", "horizon": 0}, "horizon must be an integer >= 1"),
    ({"fill": "mean"}, "fill must be one of"),
    ({"length_mode": "stretch"}, "length_mode must be one of"),
    ({"normalization": "batch"}, "normalization must be one of"),
    ({"num_variables": 2, "static_features": [[1.0, 2.0]]}, r"static_features must be a \(num_variables=2, S\)"),
    ({"num_variables": 2, "value_columns": ["a"]}, "value_columns must name num_variables=2"),
    ({"dropout": 1.0}, "dropout must be a number"),
    ({"length": 10, "d_model": 50}, "smaller than 32x32"),
])
def test_bad_configuration(config, message):
    with pytest.raises(InvalidInputError, match=message):
        TimeSeriesAdapter(**config)


def test_bad_batches():
    adapter = TimeSeriesAdapter(num_variables=2, length=32)
    with pytest.raises(InvalidInputError, match=r"expected a preprocessed batch \(B, length=32, D \+ 6=8\)"):
        adapter(torch.zeros(2, 32, 7))
    with pytest.raises(InvalidInputError, match="got \\(32, 8\\)"):
        adapter(torch.zeros(32, 8))


# ---------------------------------------------------------------------------------------------------------------------
# the learnable embedding and the backbone


def test_encode_shapes_context_and_gradients():
    static = [[52.5, 13.4], [48.1, 11.6], [50.9, 4.4], [41.9, 12.5]]
    adapter = TimeSeriesAdapter(num_variables=4, task="forecasting", length=48, horizon=12, num_nodes=2,
                                static_features=static, dropout=0.1)
    assert adapter.maps_per_sample == 2 and adapter.out_channels == 1 and adapter.map_size == (60, 60)
    table = frame(steps=80, columns=("a", "b", "c", "d"))
    inputs, _ = adapter.forecasting_windows(adapter.load(table), stride=10)
    batch = adapter.collate([inputs[i] for i in range(3)])
    maps, context = adapter.encode(batch)
    assert maps.shape == (6, 1, 60, 60) and torch.isfinite(maps).all()
    assert context["maps_per_sample"] == 2 and context["num_nodes"] == 2 and context["num_variables"] == 4
    assert context["mean"].shape == (3, 1, 4) and context["scale"].shape == (3, 1, 4)
    (maps.square().mean() + denormalize(torch.randn(3, 12, 4), context).mean()).backward()
    for parameter in (adapter.value_embedding.weight, adapter.time_embedding.weight, adapter.affine_weight,
                      adapter.affine_bias, adapter.static_embedding.weight, adapter.static_embedding.bias):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert torch.equal(adapter.static_features, torch.tensor(static))


def test_nodes_see_only_their_own_variables():
    adapter = TimeSeriesAdapter(num_variables=4, length=32, num_nodes=2).eval()
    batch = torch.randn(2, 32, 10)
    before = adapter(batch)
    changed = batch.clone()
    changed[:, :, 3] = torch.randn(2, 32)          # a variable of node 1
    after = adapter(changed)
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])   # node 0 of both samples
    assert not torch.allclose(before[1], after[1])


def test_maps_go_through_the_backbone():
    adapter = TimeSeriesAdapter(num_variables=2, length=32)    # d_model 72, 48x48 maps
    model = timm.create_model("unireplknet_a", in_chans=1, num_classes=0).eval()
    table = frame(steps=32)
    batch = adapter.collate([adapter.prepare(table), adapter.prepare(table[["load", "temp"]])])
    with torch.no_grad():
        features = model(adapter(batch))
    assert features.shape == (2, model.num_features) and torch.isfinite(features).all()


def test_config_rebuilds_the_adapter():
    adapter = TimeSeriesAdapter(num_variables=4, task="forecasting", length=48, horizon=12, num_nodes=2,
                                static_features=[[1, 2], [3, 4], [5, 6], [7, 8]], value_columns=["a", "b", "c", "d"],
                                fill="ffill", dropout=0.1)
    rebuilt = create_adapter("time_series", **adapter.config)
    assert isinstance(rebuilt, TimeSeriesAdapter) and rebuilt.config == adapter.config
    assert rebuilt.map_size == adapter.map_size and rebuilt.d_model == adapter.d_model == 75
    rebuilt.load_state_dict(adapter.state_dict())
    batch = torch.randn(2, 48, 10)
    assert torch.equal(rebuilt.eval()(batch), adapter.eval()(batch))


def test_augment_leaves_time_features_alone():
    adapter = TimeSeriesAdapter(num_variables=3, length=40, jitter=0.05, scaling=0.2)
    sample = adapter.prepare(frame(steps=40, columns=("a", "b", "c")))
    augmented = [adapter.augment(sample) for _ in range(4)]
    assert all(torch.equal(a[:, 3:], sample[:, 3:]) for a in augmented)
    assert all(not torch.allclose(a[:, :3], sample[:, :3]) for a in augmented)
    quiet = TimeSeriesAdapter(num_variables=3, length=40, jitter=0.0, scaling=0.0)
    assert torch.equal(quiet.augment(sample), sample)
    # forecasting: one factor scales input and target alike; the input alone is only jittered
    forecaster = TimeSeriesAdapter(num_variables=3, task="forecasting", length=32, horizon=8, jitter=0.0, scaling=0.2)
    inputs, targets = forecaster.forecasting_windows(forecaster.load(frame(steps=60, columns=("a", "b", "c"))))
    new_inputs, new_targets = forecaster.augment_window(inputs[0], targets[0])
    factor = new_inputs[0, :3] / inputs[0, 0, :3]
    assert torch.allclose(new_inputs[:, :3], inputs[0, :, :3] * factor, rtol=1e-5)
    assert torch.allclose(new_targets, targets[0] * factor, rtol=1e-5)
    assert torch.equal(new_inputs[:, 3:], inputs[0, :, 3:])
    assert torch.equal(forecaster.augment(inputs[0]), inputs[0])


def test_module_example_runs():
    result = doctest.testmod(ts_module)
    assert result.attempted > 0 and result.failed == 0


def test_text_codes_that_parse_as_dates_stay_values():
    codes = pd.DataFrame({"station": ["1-2", "2-3", "3-4", "4-5"], "v": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(InvalidInputError, match=r"column 'station' is not numeric \(row 0: '1-2'\)"):
        TimeSeriesAdapter(num_variables=1).load(codes)
    with pytest.raises(InvalidInputError, match=r"column 'price' is not numeric \(row 0: '1,234'\)"):
        TimeSeriesAdapter(num_variables=1).load(b'price\n"1,234"\n"2,345"\n')
    days = pd.DataFrame({"day": ["2024-01-01", "2024-01-02", "2024-01-03"], "v": [1.0, 2.0, 3.0]})
    assert TimeSeriesAdapter(num_variables=1).load(days).timestamps[2] == pd.Timestamp("2024-01-03")


def test_low_precision_embedding_keeps_the_forecast_level():
    adapter = TimeSeriesAdapter(num_variables=1, task="forecasting", length=32, horizon=4, min_d_model=32)
    level = 1000 + torch.sin(torch.arange(32.0) / 3).view(1, 32, 1)
    inputs = torch.cat([level, torch.zeros(1, 32, 6)], dim=2)
    _, exact = adapter.encode(inputs)
    _, low = adapter.to(torch.bfloat16).encode(inputs)
    assert low["mean"].dtype == torch.float32
    assert torch.allclose(low["mean"], exact["mean"]) and torch.allclose(low["scale"], exact["scale"])
    assert low["horizon"] == 4


def test_augmentation_stays_on_the_batch_device():
    adapter = TimeSeriesAdapter(num_variables=2, task="forecasting", length=8, horizon=2, min_d_model=128)
    inputs, targets = torch.randn(3, 8, 8, device="meta"), torch.randn(3, 2, 2, device="meta")
    moved_inputs, moved_targets = adapter.augment_window(inputs, targets)
    assert moved_inputs.device.type == "meta" and moved_targets.device.type == "meta"
    classifier = TimeSeriesAdapter(num_variables=2, length=8, min_d_model=128)
    assert classifier.augment(torch.randn(8, 8, device="meta")).device.type == "meta"
