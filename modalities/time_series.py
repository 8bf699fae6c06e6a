"""Time series: CSV, TSV, Parquet, NPY, DataFrames and arrays to learnable ``(1, H, W)`` embedding maps.

A series of ``L`` steps and ``D`` variables is read into a :class:`TimeSeries`, given six calendar features per step
(:func:`time_features`) and fixed to the length the model reads (``preprocess``: ``(L, D + 6)``). The learnable
embedding (``forward``; the UniRepLKNet paper's Eq. 2, after Corrformer) then

1. normalises every series of the batch per variable over its ``L`` steps with a learnable affine (RevIN), keeping
   the statistics so a forecast can be de-normalised (:func:`denormalize`); ``normalization="none"`` keeps the
   values as given (only the affine applies), for sets whose classes lie in a sample's level and amplitude;
2. groups the ``D`` variables into ``num_nodes`` nodes of ``D / num_nodes`` consecutive variables (node ``k`` holds
   variables ``k * D/n`` to ``(k + 1) * D/n - 1``), each node becoming one map: ``(B, L, D) -> (B * n, L, D / n)``;
3. embeds the values with a circular ``Conv1d(D / n -> d_model, kernel 3)``, adds a linear embedding of the time
   features at every step and, when ``static_features`` (per-variable constants such as station coordinates) are
   given, a linear embedding of them averaged over the node's variables; then dropout;
4. lays the ``(L, d_model)`` sequence of each node out as a one-channel ``(H, W)`` map, row-major.

Map layout
    The flattened ``(L, d_model)`` sequence (time-major) is written row by row: map row ``r``, column ``c`` holds
    element ``r * W + c``, that is time step ``(r * W + c) // d_model``, channel ``(r * W + c) % d_model``; the cells
    after ``L * d_model`` are zeros. ``H = ceil(sqrt(L * d_model))`` and ``W = ceil(L * d_model / H)``
    (:func:`map_shape`). When ``d_model`` is not given it is the smallest ``d >= max(min_d_model, ceil(1024 / L))``
    that makes ``L * d`` a perfect square (with ``L = s**2 * r``, ``r`` square-free, ``d = r * m**2``), so the map is
    square and unpadded, unless that ``d`` exceeds twice the lower bound, in which case ``d`` is the lower bound and
    the map is padded. ``L = 96`` gives ``d_model = 96`` and a 96x96 map, ``L = 48`` gives 75 and 60x60, and the
    paper's ``L = 48, d_model = 768`` gives 192x192. Maps are at least 32x32, the backbone's smallest input.
    When ``W`` is a multiple of ``d_model`` every column holds one embedding channel, so vertically adjacent cells are
    the same channel ``W / d_model`` steps apart; with ``W = d_model`` (``L = 64, min_d_model = 64`` gives 64x64) each
    row is one time step. Otherwise a row ends mid-step and a column mixes channels. On ArrowHead (UCR, 30 training
    series) UniRepLKNet-A reached 60.6% test accuracy with ``L = 251, d_model = 16`` (64x63, 3.9 steps per row) and
    74.3% with the series resampled to ``L = 64, min_d_model = 64``, all else equal.

Constant series
    A variable whose standard deviation over the window is at most ``1e-6`` of its largest magnitude (or that is all
    zeros) is constant: it is normalised with divisor 1 and de-normalised with its true scale 0, so the forecast of a
    constant series is exactly that constant whatever the head outputs. Every other series round-trips:
    ``denormalize(normalize(x)) == x`` to float32 precision.

Formats
    numpy arrays and torch tensors ``(L,)`` or ``(L, D)``; pandas DataFrames and Series; paths, bytes and binary or
    text file objects of CSV (``.csv``; ``.tsv`` tab-separated; ``.txt`` with the separator taken from the first
    line: tab, comma, semicolon or spaces), Parquet (``.parquet``, ``.pq``, or any data starting with ``PAR1``) and
    ``.npy`` arrays. A CSV whose first line is numbers (and dates) has no header. Timestamps come from a DataFrame's
    DatetimeIndex, from ``timestamp_column``, or from the first column of datetime type, else the first column named
    time, timestamp, date, datetime or ds (any case) whose every value parses as a date, else the first text column
    whose every value parses as a date. Values come from
    ``value_columns``, else from every other column; an index column that pandas wrote to a CSV (``Unnamed: 0``
    holding ``0, 1, 2, ...``) and empty ``Unnamed`` columns left by trailing separators are dropped.

Raw form: :class:`TimeSeries` (float64 values ``(L, D)``, timestamps or None, column names, the source's name).

Missing values
    By default a missing value (an empty CSV field, NaN) is an :class:`~modalities.errors.InvalidInputError` naming
    its row (0-based data row; for a CSV also the file line) and column. ``fill="ffill"`` carries the last
    observation forward (leading gaps take the first observation), ``"interpolate"`` interpolates linearly in time
    (in steps without timestamps; gaps at either end take the nearest observation), ``"zero"`` writes zeros. A column
    with no value at all and infinite values are errors whatever ``fill`` is.

Example (a head turns each map's features into a forecast ``(B, horizon, D)``, de-normalised with the context)::

    >>> import numpy as np, pandas as pd, torch
    >>> frame = pd.DataFrame({"time": pd.date_range("2024-01-01", periods=200, freq="h"),
    ...                       "load": np.sin(np.arange(200) / 12), "temp": 20 + np.cos(np.arange(200) / 24)})
    >>> adapter = TimeSeriesAdapter(num_variables=2, task="forecasting", length=96, horizon=24)
    >>> series = adapter.load(frame)
    >>> inputs, targets = adapter.forecasting_windows(series, stride=8)
    >>> tuple(inputs.shape), tuple(targets.shape)
    ((11, 96, 8), (11, 24, 2))
    >>> maps, context = adapter.encode(inputs)
    >>> tuple(maps.shape)
    (11, 1, 96, 96)
    >>> forecast = denormalize(torch.zeros(11, 24, 2), context)   # a head's normalised output, back in units
    >>> tuple(forecast.shape), str(adapter.future_timestamps(series)[0])
    ((11, 24, 2), '2024-01-09 08:00:00')
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from einops import rearrange, repeat
from torch import nn

from .base import ModalityAdapter, register_modality
from .errors import InvalidInputError
from .sources import describe_source, open_file_source

__all__ = ["NUM_TIME_FEATURES", "TimeSeries", "TimeSeriesAdapter", "denormalize", "map_shape", "time_features"]

NUM_TIME_FEATURES = 6
TASKS = ("classification", "forecasting")
LENGTH_MODES = ("pad", "resample")
FILLS = (None, "ffill", "interpolate", "zero")
NORMALIZATIONS = ("instance", "none")
MIN_MAP_SIDE = 32
CONSTANT_TOLERANCE = 1e-6
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
TIMESTAMP_NAMES = ("time", "timestamp", "date", "datetime", "ds")
ACCEPTED = "an array, a tensor, a DataFrame or a Series"


class TimeSeries:
    """A loaded series: float64 ``values (L, D)``, ``timestamps`` (a ``pd.DatetimeIndex`` of length ``L``, or None),
    the ``columns`` the variables came from and the source's ``name`` for error messages."""

    def __init__(self, values: np.ndarray, timestamps: pd.DatetimeIndex | None = None,
                 columns: list[str] | None = None, name: str = "<series>"):
        self.values = np.asarray(values, dtype=np.float64)
        self.timestamps = timestamps
        self.columns = list(columns) if columns is not None else [str(i) for i in range(self.values.shape[-1])]
        self.name = name

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def num_variables(self) -> int:
        return int(self.values.shape[1])

    def __repr__(self) -> str:
        span = "" if self.timestamps is None or len(self) == 0 else f", {self.timestamps[0]} to {self.timestamps[-1]}"
        return f"TimeSeries({self.name}: {len(self)} steps x {self.num_variables} variables {self.columns}{span})"


# -------------------------------------------------------------------------------------------------------------------
# time features and map geometry


def time_features(timestamps: Any, length: int | None = None) -> np.ndarray:
    """Calendar features of each step, ``(L, 6)`` float64, each scaled to ``[-0.5, 0.5]``: minute ``/ 59``, hour
    ``/ 23``, weekday ``/ 6`` (Monday 0), day of month ``(d - 1) / 30``, day of year ``(d - 1) / 365`` and month
    ``(m - 1) / 11``, each minus 0.5. Zeros ``(length, 6)`` when ``timestamps`` is None."""
    if timestamps is None:
        if length is None:
            raise InvalidInputError("time_features: give timestamps, or the length of a series without them")
        return np.zeros((int(length), NUM_TIME_FEATURES), dtype=np.float64)
    stamps = pd.DatetimeIndex(timestamps)
    columns = [
        stamps.minute / 59.0,
        stamps.hour / 23.0,
        stamps.day_of_week / 6.0,
        (stamps.day - 1) / 30.0,
        (stamps.day_of_year - 1) / 365.0,
        (stamps.month - 1) / 11.0,
    ]
    return np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1) - 0.5


def _square_free_part(n: int) -> int:
    """``r`` in ``n = s**2 * r`` with ``r`` square-free."""
    part, factor = 1, 2
    while factor * factor <= n:
        count = 0
        while n % factor == 0:
            n //= factor
            count += 1
        if count % 2:
            part *= factor
        factor += 1
    return part * n


def map_shape(length: int, d_model: int | None = None, min_d_model: int = 64) -> tuple[int, int, int]:
    """``(d_model, H, W)`` of the map of an ``(length, d_model)`` sequence (see the module docstring for the rule).

    Raises :class:`InvalidInputError` when the map would be smaller than 32x32.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidInputError(f"map_shape: length must be a positive integer, got {length!r}")
    if isinstance(min_d_model, bool) or not isinstance(min_d_model, int) or min_d_model < 1:
        raise InvalidInputError(f"map_shape: min_d_model must be a positive integer, got {min_d_model!r}")
    smallest = MIN_MAP_SIDE * MIN_MAP_SIDE
    if d_model is None:
        lower = max(min_d_model, -(-smallest // length))
        square_free = _square_free_part(length)
        quotient = -(-lower // square_free)
        multiplier = math.isqrt(quotient - 1) + 1
        d_model = square_free * multiplier * multiplier
        if d_model > 2 * lower:
            d_model = lower
    elif isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise InvalidInputError(f"map_shape: d_model must be a positive integer or None, got {d_model!r}")
    elif length * d_model < smallest:
        raise InvalidInputError(
            f"map_shape: a ({length}, {d_model}) sequence makes a map smaller than {MIN_MAP_SIDE}x{MIN_MAP_SIDE} "
            f"(the backbone's smallest input); use d_model >= {-(-smallest // length)}"
        )
    cells = length * d_model
    height = math.isqrt(cells - 1) + 1
    width = -(-cells // height)
    return d_model, height, width


# -------------------------------------------------------------------------------------------------------------------
# instance normalisation


def denormalize(values: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
    """Undo the instance normalisation of :meth:`TimeSeriesAdapter.normalize` on ``values (B, T, D)`` (a forecast in
    normalised units) with the ``context`` of ``encode`` (keys ``mean (B, 1, D)``, ``scale (B, 1, D)``,
    ``affine_weight (D,)``, ``affine_bias (D,)``) -> ``(B, T, D)``. A constant variable (scale 0) comes out as exactly
    its constant."""
    missing = [k for k in ("mean", "scale", "affine_weight", "affine_bias") if k not in context]
    if missing:
        raise InvalidInputError(f"denormalize: the context lacks {missing}; pass the context that encode returned")
    mean, scale = context["mean"], context["scale"]
    weight, bias = context["affine_weight"], context["affine_bias"]
    if not isinstance(values, torch.Tensor) or values.ndim != 3 or values.shape[0] != mean.shape[0] \
            or values.shape[2] != mean.shape[2]:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise InvalidInputError(
            f"denormalize: expected values (B={mean.shape[0]}, T, D={mean.shape[2]}) matching the context, got {shape}"
        )
    safe_weight = torch.where(weight >= 0, weight + 1e-10, weight - 1e-10)
    restored = (values - bias) / safe_weight * scale + mean
    return torch.where(scale == 0, mean.to(restored.dtype).expand_as(restored), restored)


# -------------------------------------------------------------------------------------------------------------------
# the adapter


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise InvalidInputError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)


def _at(row: int, line_offset: int | None) -> str:
    """``row 3`` or, for a CSV, ``row 3 (line 5)``."""
    return f"row {row}" if line_offset is None else f"row {row} (line {row + line_offset})"


def _normalised_name(column: str) -> str:
    return column.strip().lower().replace(" ", "").replace("_", "").replace("-", "")


@register_modality("time_series")
class TimeSeriesAdapter(ModalityAdapter):
    """Series ``(L, D)`` to ``num_nodes`` one-channel ``(H, W)`` maps per sample through a learnable embedding.

    Args:
        num_variables: variables ``D`` every series must have.
        task: ``"classification"`` (one label per series) or ``"forecasting"`` (predict the next ``horizon`` steps).
        length: steps ``L`` the model reads: the look-back window for forecasting (the last ``length`` steps), the
            fixed series length for classification (see ``length_mode``).
        horizon: steps ``T`` to forecast (forecasting only).
        length_mode: classification only. ``"pad"``: shorter series repeat their last step (values and time
            features) up to ``length``, longer ones keep their first ``length`` steps; ``"resample"``: values and
            timestamps are interpolated linearly to ``length`` evenly spaced steps (time features are computed from
            the interpolated timestamps, so they do not jump across midnight or new year).
        d_model: embedding width; None picks it from ``length`` (see :func:`map_shape`).
        min_d_model: the smallest width chosen when ``d_model`` is None.
        num_nodes: nodes ``n`` the variables are grouped into, one map each; ``D`` must be divisible by ``n``.
        static_features: per-variable constants ``(D, S)`` (station coordinates, ...), embedded and added per node.
        timestamp_column: the column holding the timestamps (default: detected, see the module docstring).
        value_columns: the ``D`` columns holding the variables, in order (default: every other column).
        fill: missing values: None (an error), ``"ffill"``, ``"interpolate"`` or ``"zero"``.
        dropout: dropout on the embedded sequence.
        normalization: ``"instance"`` (RevIN: each sample's variables to zero mean and unit variance over the
            window, the statistics kept for :func:`denormalize`) or ``"none"`` (values as given; the statistics
            are mean 0 and scale 1). Instance normalisation makes a forecaster indifferent to level and scale, but
            it removes what a classifier may need: on JapaneseVowels (speakers told apart by the levels of their
            cepstral coefficients) 1-nearest-neighbour falls from 94.9% to 55.7% once every sample is normalised.
            With ``"none"`` the data should come on a moderate scale (standardise it once for the whole set).
        jitter: training noise, ``N(0, 1) * jitter * std`` of each variable over the sample (0 disables).
        scaling: training amplitude scaling, a factor ``N(1, scaling)`` per variable (0 disables).
    """

    def __init__(
        self,
        num_variables: int = 1,
        task: str = "classification",
        length: int = 96,
        horizon: int = 24,
        length_mode: str = "pad",
        d_model: int | None = None,
        min_d_model: int = 64,
        num_nodes: int = 1,
        static_features: list[list[float]] | None = None,
        timestamp_column: str | None = None,
        value_columns: list[str] | None = None,
        fill: str | None = None,
        dropout: float = 0.0,
        normalization: str = "instance",
        jitter: float = 0.03,
        scaling: float = 0.1,
    ):
        num_variables = _check_int("num_variables", num_variables, 1)
        if task not in TASKS:
            raise InvalidInputError(f"task must be one of {TASKS}, got {task!r}")
        length = _check_int("length", length, 2)
        horizon = _check_int("horizon", horizon, 1 if task == "forecasting" else 0)
        if length_mode not in LENGTH_MODES:
            raise InvalidInputError(f"length_mode must be one of {LENGTH_MODES}, got {length_mode!r}")
        if d_model is not None:
            d_model = _check_int("d_model", d_model, 1)
        min_d_model = _check_int("min_d_model", min_d_model, 1)
        num_nodes = _check_int("num_nodes", num_nodes, 1)
        if num_variables % num_nodes:
            raise InvalidInputError(
                f"num_variables={num_variables} cannot be grouped into num_nodes={num_nodes} equal nodes; "
                f"num_nodes must divide num_variables"
            )
        if fill not in FILLS:
            raise InvalidInputError(f"fill must be one of {FILLS}, got {fill!r}")
        dropout = _check_float("dropout", dropout, 0.0, 1.0)
        if normalization not in NORMALIZATIONS:
            raise InvalidInputError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        jitter = _check_float("jitter", jitter, 0.0)
        scaling = _check_float("scaling", scaling, 0.0)
        if timestamp_column is not None and not isinstance(timestamp_column, str):
            raise InvalidInputError(f"timestamp_column must be a column name (str), got {timestamp_column!r}")
        if value_columns is not None:
            if isinstance(value_columns, str) or not all(isinstance(c, str) for c in value_columns):
                raise InvalidInputError(f"value_columns must be a list of column names, got {value_columns!r}")
            value_columns = list(value_columns)
            if len(value_columns) != num_variables or len(set(value_columns)) != len(value_columns):
                raise InvalidInputError(
                    f"value_columns must name num_variables={num_variables} distinct columns, got {value_columns}"
                )
            if timestamp_column in value_columns:
                raise InvalidInputError(f"timestamp_column {timestamp_column!r} is also in value_columns")
        static = None
        if static_features is not None:
            try:
                static = np.asarray(static_features, dtype=np.float64)
            except (TypeError, ValueError):
                static = None
            if static is None or static.ndim != 2 or static.shape[0] != num_variables or static.shape[1] < 1:
                raise InvalidInputError(
                    f"static_features must be a (num_variables={num_variables}, S) list of number lists, got "
                    f"{static.shape if static is not None else static_features!r}"
                )
            if not np.isfinite(static).all():
                raise InvalidInputError("static_features must be finite numbers")
            static_features = static.tolist()
        chosen_d_model, height, width = map_shape(length, d_model, min_d_model)
        super().__init__(
            num_variables=num_variables, task=task, length=length, horizon=horizon, length_mode=length_mode,
            d_model=d_model, min_d_model=min_d_model, num_nodes=num_nodes, static_features=static_features,
            timestamp_column=timestamp_column, value_columns=value_columns, fill=fill, dropout=dropout,
            normalization=normalization, jitter=jitter, scaling=scaling,
        )
        self.num_variables, self.task, self.length, self.horizon = num_variables, task, length, horizon
        self.length_mode, self.num_nodes, self.fill = length_mode, num_nodes, fill
        self.timestamp_column, self.value_columns = timestamp_column, value_columns
        self.jitter, self.scaling, self.normalization = jitter, scaling, normalization
        self.d_model, self._map_size = chosen_d_model, (height, width)
        per_node = num_variables // num_nodes

        self.affine_weight = nn.Parameter(torch.ones(num_variables))
        self.affine_bias = nn.Parameter(torch.zeros(num_variables))
        self.value_embedding = nn.Conv1d(per_node, chosen_d_model, kernel_size=3, padding=1, padding_mode="circular",
                                         bias=False)
        nn.init.kaiming_normal_(self.value_embedding.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.time_embedding = nn.Linear(NUM_TIME_FEATURES, chosen_d_model, bias=False)
        if static is not None:
            self.register_buffer("static_features", torch.tensor(static, dtype=torch.float32), persistent=False)
            self.static_embedding: nn.Linear | None = nn.Linear(static.shape[1], chosen_d_model)
        else:
            self.static_features = None
            self.static_embedding = None
        self.dropout = nn.Dropout(dropout)

    @property
    def out_channels(self) -> int:
        return 1

    @property
    def maps_per_sample(self) -> int:
        return self.num_nodes

    @property
    def map_size(self) -> tuple[int, int]:
        """``(H, W)`` of every map."""
        return self._map_size

    # ---------------------------------------------------------------------------------------------------------------
    # loading

    def load(self, source: Any) -> TimeSeries:
        """A path, bytes or file object (CSV, TSV, TXT, Parquet, NPY), a DataFrame, a Series, an array or a tensor
        ``(L,)`` / ``(L, D)``, or a :class:`TimeSeries` -> a checked :class:`TimeSeries` (missing values filled as
        ``fill`` says)."""
        if isinstance(source, TimeSeries):
            return self._finish(source.values, source.timestamps, source.columns, source.name, None)
        name = describe_source(source)
        if isinstance(source, pd.DataFrame):
            return self._from_frame(source, name, None, from_file=False)
        if isinstance(source, pd.Series):
            frame = source.to_frame(name=source.name if source.name is not None else "value")
            return self._from_frame(frame, name, None, from_file=False)
        if isinstance(source, (np.ndarray, torch.Tensor, list, tuple)):
            return self._from_array(source, name)
        target = open_file_source(source, "time series", ACCEPTED)
        return self._from_file(source, target, name)

    # files

    def _from_file(self, source: Any, target: Any, name: str) -> TimeSeries:
        if isinstance(target, str):
            suffix = Path(target).suffix.lower()
            with open(target, "rb") as handle:
                head = handle.read(65536)
        else:
            data = target.read()
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not data:
                raise InvalidInputError(f"{name}: the file is empty")
            suffix = Path(str(getattr(source, "name", ""))).suffix.lower() if hasattr(source, "read") else ""
            head, target = data[:65536], io.BytesIO(data)
        if head.startswith(b"PAR1") or suffix in PARQUET_SUFFIXES:
            return self._read_parquet(target, name)
        if head.startswith(b"\x93NUMPY") or suffix == ".npy":
            return self._read_npy(target, name)
        if suffix and suffix not in CSV_SUFFIXES:
            raise InvalidInputError(
                f"{name}: unsupported file type {suffix!r}; expected .csv, .tsv, .txt, .parquet, .pq or .npy, or "
                f"{ACCEPTED}"
            )
        return self._read_csv(target, name, _separator(head, suffix))

    def _read_parquet(self, target: Any, name: str) -> TimeSeries:
        try:
            frame = pd.read_parquet(target)
        except (ValueError, OSError, TypeError) as exc:
            raise InvalidInputError(f"{name}: not a readable Parquet file ({exc})") from exc
        return self._from_frame(frame, name, None, from_file=True)

    def _read_npy(self, target: Any, name: str) -> TimeSeries:
        try:
            array = np.load(target, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InvalidInputError(f"{name}: not a readable .npy array ({exc})") from exc
        return self._from_array(array, name)

    def _read_csv(self, target: Any, name: str, separator: str) -> TimeSeries:
        def read(**options: Any) -> pd.DataFrame:
            if hasattr(target, "seek"):
                target.seek(0)
            # round_trip: every value exactly as written (pandas' default parser can miss by an ulp)
            return pd.read_csv(target, sep=separator, index_col=False, float_precision="round_trip", **options)

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                frame = read()
            if any("does not match length of data" in str(w.message) for w in caught):
                # a data row has more fields than the header: read the header as data, so pandas names the line
                read(header=None)
                raise InvalidInputError(f"{name}: cannot parse the CSV file: a row has more fields than the header")
            line_offset = 2
            if _is_data_line(frame.columns):
                frame = read(header=None)  # the first line is data: there is no header
                frame.columns = [str(i) for i in range(frame.shape[1])]
                line_offset = 1
        except InvalidInputError:
            raise
        except pd.errors.EmptyDataError as exc:
            raise InvalidInputError(f"{name}: the file holds no data") from exc
        except pd.errors.ParserError as exc:
            raise InvalidInputError(f"{name}: cannot parse the CSV file: {str(exc).strip()}") from exc
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{name}: not a UTF-8 text CSV file ({exc})") from exc
        except ValueError as exc:
            raise InvalidInputError(f"{name}: cannot parse the CSV file: {exc}") from exc
        return self._from_frame(frame, name, line_offset, from_file=True)

    # DataFrames

    def _from_frame(self, frame: pd.DataFrame, name: str, line_offset: int | None, from_file: bool) -> TimeSeries:
        columns = [str(c) for c in frame.columns]
        duplicated = sorted({c for c in columns if columns.count(c) > 1})
        if duplicated:
            raise InvalidInputError(f"{name}: duplicate column names {duplicated}")
        frame = frame.set_axis(columns, axis=1)
        if len(frame) == 0:
            raise InvalidInputError(f"{name}: the series has no data rows (columns: {columns})")
        timestamps, time_column = self._find_timestamps(frame, name, line_offset)
        remaining = [c for c in columns if c != time_column]
        if self.value_columns is not None:
            absent = [c for c in self.value_columns if c not in remaining]
            if absent:
                raise InvalidInputError(f"{name}: value_columns {absent} not found; the columns are {columns}")
            value_columns = list(self.value_columns)
        else:
            value_columns = remaining
            if from_file:
                value_columns = [c for c in value_columns if not _written_index_or_empty(frame, c, columns)]
        values = np.empty((len(frame), len(value_columns)), dtype=np.float64)
        for i, column in enumerate(value_columns):
            values[:, i] = _numeric(frame[column], column, name, line_offset)
        return self._finish(values, timestamps, value_columns, name, line_offset)

    def _find_timestamps(self, frame: pd.DataFrame, name: str,
                         line_offset: int | None) -> tuple[pd.DatetimeIndex | None, str | None]:
        """The timestamps and the column they came from (None for the index or when there are none)."""
        columns = list(frame.columns)
        index_name = None if frame.index.name is None else str(frame.index.name)
        if self.timestamp_column is not None:
            wanted = self.timestamp_column
            if wanted in columns:
                return _as_timestamps(frame[wanted], wanted, name, line_offset, explicit=True), wanted
            if index_name == wanted:
                return _as_timestamps(frame.index.to_series(), wanted, name, line_offset, explicit=True), None
            raise InvalidInputError(
                f"{name}: timestamp_column {wanted!r} not found; the columns are {columns}"
                + (f" and the index is {index_name!r}" if index_name is not None else "")
            )
        if isinstance(frame.index, pd.DatetimeIndex):
            return pd.DatetimeIndex(frame.index), None
        candidates = [c for c in columns if self.value_columns is None or c not in self.value_columns]
        for column in candidates:
            if pd.api.types.is_datetime64_any_dtype(frame[column]):
                return pd.DatetimeIndex(frame[column]), column
        if index_name is not None and _normalised_name(index_name) in TIMESTAMP_NAMES:
            parsed = _as_timestamps(frame.index.to_series(), index_name, name, line_offset, explicit=False)
            if parsed is not None:
                return parsed, None
        for column in candidates:
            if _normalised_name(column) in (*TIMESTAMP_NAMES, "", "unnamed:0"):
                parsed = _as_timestamps(frame[column], column, name, line_offset, explicit=False)
                if parsed is not None:
                    return parsed, column
        for column in candidates:  # failing those, the first text column that is all plausible, increasing dates
            if not (pd.api.types.is_numeric_dtype(frame[column]) or pd.api.types.is_bool_dtype(frame[column])
                    or isinstance(frame[column].dtype, pd.CategoricalDtype)):
                parsed = _as_timestamps(frame[column], column, name, line_offset, explicit=False)
                if parsed is not None and _plausible_time_axis(parsed):
                    return parsed, column
        return None, None

    # arrays

    def _from_array(self, data: Any, name: str) -> TimeSeries:
        if isinstance(data, torch.Tensor):
            if data.is_complex():
                raise InvalidInputError(f"{name}: complex values are not supported")
            tensor = data.detach().cpu()
            array = (tensor.double() if tensor.is_floating_point() else tensor).numpy()
        else:
            try:
                array = np.asarray(data)
            except (ValueError, TypeError) as exc:
                raise InvalidInputError(f"{name}: not a rectangular array of numbers ({exc})") from exc
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2:
            raise InvalidInputError(
                f"{name}: expected a series (steps,) or (steps, variables), got shape {tuple(array.shape)}"
            )
        if np.iscomplexobj(array):
            raise InvalidInputError(f"{name}: complex values are not supported")
        try:
            values = array.astype(np.float64)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"{name}: the array holds values that are not numbers ({exc})") from exc
        steps, variables = values.shape
        if variables != self.num_variables and steps == self.num_variables:
            raise InvalidInputError(
                f"{name}: got shape {tuple(values.shape)}, which looks like (variables, steps); expected "
                f"(steps, num_variables={self.num_variables}): pass the transposed array (array.T)"
            )
        return self._finish(values, None, [str(i) for i in range(variables)], name, None)

    # checks shared by every source

    def _finish(self, values: np.ndarray, timestamps: pd.DatetimeIndex | None, columns: list[str], name: str,
                line_offset: int | None) -> TimeSeries:
        values = np.array(values, dtype=np.float64)  # a copy: filling never touches the caller's data
        if values.ndim != 2:
            raise InvalidInputError(f"{name}: expected values (steps, variables), got shape {values.shape}")
        steps, variables = values.shape
        if steps == 0:
            raise InvalidInputError(f"{name}: the series has no steps")
        if variables != self.num_variables:
            raise InvalidInputError(
                f"{name}: expected num_variables={self.num_variables} variables, got {variables} (columns: {columns})"
            )
        if timestamps is not None:
            timestamps = pd.DatetimeIndex(timestamps)
            if len(timestamps) != steps:
                raise InvalidInputError(f"{name}: {len(timestamps)} timestamps for {steps} steps")
            missing = np.flatnonzero(np.asarray(timestamps.isna()))
            if missing.size:
                row = int(missing[0])
                raise InvalidInputError(f"{name}: missing or unparseable timestamp at {_at(row, line_offset)}")
            backwards = np.flatnonzero(np.diff(timestamps.asi8) <= 0)
            if backwards.size:
                row = int(backwards[0]) + 1
                raise InvalidInputError(
                    f"{name}: timestamps must be strictly increasing, but {_at(row, line_offset)} ({timestamps[row]}) "
                    f"does not come after {_at(row - 1, line_offset)} ({timestamps[row - 1]})"
                )
        infinite = np.argwhere(np.isinf(values))
        if infinite.size:
            row, column = (int(i) for i in infinite[0])
            raise InvalidInputError(
                f"{name}: infinite value at {_at(row, line_offset)}, column {columns[column]!r}; values must be finite"
            )
        missing_mask = np.isnan(values)
        empty = [columns[i] for i in np.flatnonzero(missing_mask.all(axis=0))]
        if empty:
            raise InvalidInputError(f"{name}: column {empty[0]!r} has no values (every row is missing)")
        if missing_mask.any():
            if self.fill is None:
                row, column = (int(i) for i in np.argwhere(missing_mask)[0])
                raise InvalidInputError(
                    f"{name}: missing value at {_at(row, line_offset)}, column {columns[column]!r}; fill the gaps "
                    f"first or pass fill='ffill', 'interpolate' or 'zero'"
                )
            values = _filled(values, missing_mask, timestamps, self.fill)
        if self.task == "forecasting" and steps < self.length:
            raise InvalidInputError(
                f"{name}: the series has {steps} steps; forecasting needs at least length={self.length} (the "
                f"look-back window)"
            )
        if steps < 2:
            raise InvalidInputError(f"{name}: the series has {steps} step; classification needs at least 2")
        return TimeSeries(values, timestamps, columns, name)

    # ---------------------------------------------------------------------------------------------------------------
    # preprocessing

    def _series_tensor(self, raw: TimeSeries) -> np.ndarray:
        """Values and time features, ``(L, D + 6)`` float64."""
        return np.concatenate([raw.values, time_features(raw.timestamps, len(raw))], axis=1)

    def example(self, seed: int = 0) -> pd.DataFrame:
        """``length`` hourly steps of ``num_variables`` random walks with a daily cycle, timestamped."""
        rng = np.random.default_rng(seed)
        steps = np.arange(self.length)[:, None]
        values = np.cumsum(rng.standard_normal((self.length, self.num_variables)), axis=0) \
            + 3 * np.sin(2 * np.pi * steps / 24)
        frame = pd.DataFrame(values, columns=[f"x{i}" for i in range(self.num_variables)])
        frame.insert(0, "timestamp", pd.date_range("2024-01-01", periods=self.length, freq="h"))
        return frame

    def preprocess(self, raw: TimeSeries) -> torch.Tensor:
        """``TimeSeries`` -> ``(length, D + 6)`` float32: the values, then the six time features. Forecasting: the
        last ``length`` steps (the input of a forecast of what follows). Classification: ``length`` steps by
        ``length_mode``."""
        self._check_raw(raw)
        steps = len(raw)
        if self.task == "forecasting":
            if steps < self.length:
                raise InvalidInputError(
                    f"{raw.name}: the series has {steps} steps; forecasting needs at least length={self.length}"
                )
            full = self._series_tensor(raw)[steps - self.length:]
        elif steps == self.length:
            full = self._series_tensor(raw)
        elif self.length_mode == "pad":
            full = self._series_tensor(raw)[: self.length]
            if steps < self.length:
                full = np.concatenate([full, np.repeat(full[-1:], self.length - steps, axis=0)], axis=0)
        else:
            full = self._resampled(raw)
        return torch.from_numpy(np.ascontiguousarray(full, dtype=np.float32))

    def _resampled(self, raw: TimeSeries) -> np.ndarray:
        steps = len(raw)
        positions = np.linspace(0.0, steps - 1.0, self.length)
        grid = np.arange(steps, dtype=np.float64)
        values = np.stack([np.interp(positions, grid, raw.values[:, i]) for i in range(raw.num_variables)], axis=1)
        stamps = raw.timestamps
        if stamps is not None:
            ticks = stamps.asi8
            offsets = np.interp(positions, grid, (ticks - ticks[0]).astype(np.float64))
            new = ticks[0] + np.round(offsets).astype(np.int64)
            resampled = pd.DatetimeIndex(new.view(f"M8[{stamps.unit}]"))
            stamps = resampled.tz_localize("UTC").tz_convert(stamps.tz) if stamps.tz is not None else resampled
        return np.concatenate([values, time_features(stamps, self.length)], axis=1)

    def _check_raw(self, raw: Any) -> None:
        if not isinstance(raw, TimeSeries):
            raise InvalidInputError(
                f"{self.name}: preprocess takes the TimeSeries that load returns, got {type(raw).__name__}"
            )
        if raw.values.ndim != 2 or raw.values.shape[1] != self.num_variables:
            raise InvalidInputError(
                f"{raw.name}: expected {self.num_variables} variables, got values of shape {raw.values.shape}"
            )

    def forecasting_windows(self, raw: TimeSeries, stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Every training window of a series, ``stride`` steps apart: inputs ``(N, length, D + 6)`` (values and time
        features of steps ``i * stride`` to ``i * stride + length - 1``) and targets ``(N, horizon, D)`` (the values
        of the ``horizon`` steps that follow), float32, with ``N = (L - length - horizon) // stride + 1``. The
        windows are views into one tensor built once."""
        if self.task != "forecasting":
            raise InvalidInputError(f"{self.name}: forecasting_windows needs task='forecasting', not {self.task!r}")
        self._check_raw(raw)
        stride = _check_int("stride", stride, 1)
        span = self.length + self.horizon
        if len(raw) < span:
            raise InvalidInputError(
                f"{raw.name}: the series has {len(raw)} steps; a training window needs length + horizon = "
                f"{self.length} + {self.horizon} = {span}"
            )
        full = torch.from_numpy(np.ascontiguousarray(self._series_tensor(raw), dtype=np.float32))
        windows = full.unfold(0, span, stride).permute(0, 2, 1)  # (N, span, D + 6)
        return windows[:, : self.length], windows[:, self.length:, : self.num_variables]

    def future_timestamps(self, raw: TimeSeries, horizon: int | None = None) -> pd.DatetimeIndex | None:
        """The timestamps of the ``horizon`` (default: the adapter's) steps after the series, at the frequency
        ``pd.infer_freq`` finds (calendar-aware: month starts stay month starts), else at the median step; None
        for a series without timestamps."""
        horizon = _check_int("horizon", self.horizon if horizon is None else horizon, 1)
        stamps = raw.timestamps
        if stamps is None:
            return None
        if len(stamps) < 2:
            raise InvalidInputError(f"{raw.name}: one timestamp gives no step to continue the series with")
        frequency = None
        if len(stamps) >= 3:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    frequency = pd.infer_freq(stamps)
                except (TypeError, ValueError):
                    frequency = None
        if frequency is not None:
            return pd.date_range(stamps[-1], periods=horizon + 1, freq=frequency)[1:]
        step = pd.Series(stamps).diff().median()
        return pd.DatetimeIndex([stamps[-1] + step * (i + 1) for i in range(horizon)])

    def augment(self, sample: torch.Tensor) -> torch.Tensor:
        """Training noise on one preprocessed ``(length, D + 6)`` sample; the time-feature columns are never touched.

        Jitter: ``N(0, 1) * jitter * std`` per step, with the std of each variable over the sample. Scaling (for
        classification): each variable times a factor drawn from ``N(1, scaling)``. A forecasting input is only
        jittered: scaling it without its target would teach the model to mis-scale its forecasts; use
        :meth:`augment_window` to scale both together.
        """
        if sample.ndim != 2 or sample.shape[1] != self.num_variables + NUM_TIME_FEATURES:
            raise InvalidInputError(
                f"{self.name}: expected a sample (L, {self.num_variables + NUM_TIME_FEATURES}), got "
                f"{tuple(sample.shape)}"
            )
        values, features = sample[:, : self.num_variables], sample[:, self.num_variables:]
        if self.task == "classification" and self.scaling > 0:
            values = values * (1 + self.scaling * torch.randn(self.num_variables, dtype=values.dtype,
                                                              device=values.device))
        values = self._jittered(values)
        return torch.cat([values, features], dim=1)

    def augment_window(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training noise on a forecasting window (``(length, D + 6)`` and ``(horizon, D)``, or batches of them): one
        ``N(1, scaling)`` factor per variable scales input and target alike, and the input is jittered as in
        :meth:`augment`. Time features are never touched."""
        width = self.num_variables + NUM_TIME_FEATURES
        if inputs.ndim < 2 or inputs.shape[-1] != width or targets.shape[-1] != self.num_variables \
                or targets.shape[:-2] != inputs.shape[:-2]:
            raise InvalidInputError(
                f"{self.name}: expected inputs (..., L, {width}) and targets (..., T, {self.num_variables}), got "
                f"{tuple(inputs.shape)} and {tuple(targets.shape)}"
            )
        values, features = inputs[..., : self.num_variables], inputs[..., self.num_variables:]
        if self.scaling > 0:
            factor = 1 + self.scaling * torch.randn(*inputs.shape[:-2], 1, self.num_variables, dtype=values.dtype,
                                                    device=values.device)
            values, targets = values * factor, targets * factor
        return torch.cat([self._jittered(values), features], dim=-1), targets

    def _jittered(self, values: torch.Tensor) -> torch.Tensor:
        if self.jitter <= 0:
            return values
        std = values.double().std(dim=-2, unbiased=False, keepdim=True).to(values.dtype)
        return values + torch.randn_like(values) * self.jitter * std

    # ---------------------------------------------------------------------------------------------------------------
    # the learnable embedding

    def normalize(self, values: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Instance normalisation with a learnable affine: ``values (B, L, D)`` -> ``((x - mean) / divisor * w + b``,
        statistics)``, mean and population std over ``L`` per sample and variable computed in float64. The divisor
        is the std, or 1 for a constant variable (see the module docstring), whose ``scale`` is 0. The statistics
        (``mean``, ``scale`` ``(B, 1, D)``, ``affine_weight``, ``affine_bias``) are what :func:`denormalize` needs.
        With ``normalization="none"`` the values pass as given (mean 0, scale 1) and only the affine applies."""
        if self.normalization == "none":
            stats = {"mean": torch.zeros_like(values[:, :1]), "scale": torch.ones_like(values[:, :1]),
                     "affine_weight": self.affine_weight, "affine_bias": self.affine_bias}
            return values * self.affine_weight + self.affine_bias, stats
        wide = values.double()
        mean = wide.mean(dim=1, keepdim=True)
        variance = wide.var(dim=1, unbiased=False, keepdim=True)
        magnitude = wide.abs().amax(dim=1, keepdim=True)
        constant = (variance <= (CONSTANT_TOLERANCE * magnitude) ** 2) | (magnitude == 0)
        # the square root of a constant's variance is never taken, so no infinite gradient reaches the input
        divisor = torch.where(constant, torch.ones_like(variance), variance).sqrt()
        centred = ((wide - mean) / divisor).to(values.dtype)
        normalised = centred * self.affine_weight + self.affine_bias
        stats = {
            "mean": mean.to(values.dtype),
            "scale": torch.where(constant, torch.zeros_like(divisor), divisor).to(values.dtype),
            "affine_weight": self.affine_weight,
            "affine_bias": self.affine_bias,
        }
        return normalised, stats

    def to_map(self, embedded: torch.Tensor) -> torch.Tensor:
        """``(N, length, d_model)`` -> ``(N, 1, H, W)`` row-major, zero-padded at the end (module docstring)."""
        if embedded.ndim != 3 or tuple(embedded.shape[1:]) != (self.length, self.d_model):
            raise InvalidInputError(
                f"{self.name}: to_map expects (N, {self.length}, {self.d_model}), got {tuple(embedded.shape)}"
            )
        height, width = self._map_size
        flat = embedded.reshape(embedded.shape[0], -1)
        padding = height * width - flat.shape[1]
        if padding:
            flat = torch.nn.functional.pad(flat, (0, padding))
        return flat.reshape(embedded.shape[0], 1, height, width)

    def from_map(self, maps: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` -> ``(N, length, d_model)``: the exact inverse of :meth:`to_map`."""
        height, width = self._map_size
        if maps.ndim != 4 or tuple(maps.shape[1:]) != (1, height, width):
            raise InvalidInputError(f"{self.name}: from_map expects (N, 1, {height}, {width}), got {tuple(maps.shape)}")
        flat = maps.reshape(maps.shape[0], -1)[:, : self.length * self.d_model]
        return flat.reshape(maps.shape[0], self.length, self.d_model)

    def _embed(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        width = self.num_variables + NUM_TIME_FEATURES
        if not isinstance(batch, torch.Tensor) or batch.ndim != 3 or batch.shape[1] != self.length \
                or batch.shape[2] != width:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise InvalidInputError(
                f"{self.name}: expected a preprocessed batch (B, length={self.length}, D + {NUM_TIME_FEATURES}="
                f"{width}), got {shape}"
            )
        # the statistics come from the batch as given (at least float32), so a bfloat16 embedding does not round the
        # level a forecast is de-normalised with; only what feeds the layers takes the parameters' dtype
        if batch.dtype not in (torch.float32, torch.float64):
            batch = batch.float()
        dtype = self.affine_weight.dtype
        values, features = batch[..., : self.num_variables], batch[..., self.num_variables:].to(dtype)
        normalised, stats = self.normalize(values)
        grouped = rearrange(normalised.to(dtype), "b l (n v) -> (b n) v l", n=self.num_nodes)
        embedded = self.value_embedding(grouped).transpose(1, 2)  # (B * n, L, d_model)
        embedded = embedded + repeat(self.time_embedding(features), "b l d -> (b n) l d", n=self.num_nodes)
        if self.static_embedding is not None:
            per_node = rearrange(self.static_embedding(self.static_features), "(n v) d -> n v d", n=self.num_nodes)
            embedded = embedded + repeat(per_node.mean(dim=1), "n d -> (b n) 1 d", b=batch.shape[0])
        return self.to_map(self.dropout(embedded)), stats

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, length, D + 6)`` -> maps ``(B * num_nodes, 1, H, W)``; sample ``b``'s node ``k`` is map
        ``b * num_nodes + k``."""
        return self._embed(batch)[0]

    def encode(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``forward(batch)`` and the context a head needs: ``maps_per_sample``, ``num_variables``, ``num_nodes`` and
        the normalisation statistics for :func:`denormalize`."""
        maps, stats = self._embed(batch)
        context: dict[str, Any] = {"maps_per_sample": self.num_nodes, "num_variables": self.num_variables,
                                   "num_nodes": self.num_nodes, **stats}
        if self.task == "forecasting":
            context["horizon"] = self.horizon
        return maps, context


# -------------------------------------------------------------------------------------------------------------------
# helpers for reading tables


def _plausible_time_axis(timestamps: pd.DatetimeIndex) -> bool:
    """Whether dates guessed from a text column look like a time axis (so codes such as "1-2" or "1,234", which
    pandas can read as dates, stay values): years 1900 to 2200, strictly increasing."""
    years = timestamps.year
    return bool(len(timestamps) > 0 and years.min() >= 1900 and years.max() <= 2200
                and timestamps.is_monotonic_increasing and timestamps.is_unique)


def _is_number(text: Any) -> bool:
    try:
        float(str(text))
    except ValueError:
        return False
    return True


def _is_date(text: Any) -> bool:
    text = str(text)
    if not any(ch.isdigit() for ch in text):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pd.Timestamp(text)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _is_data_line(header: Any) -> bool:
    """Whether the header pandas read is really data: numbers (at least one) and dates."""
    fields = [str(c) for c in header]
    return any(_is_number(f) for f in fields) and all(_is_number(f) or _is_date(f) for f in fields)


def _separator(head: bytes, suffix: str) -> str:
    """``.tsv``: tab; otherwise from the first non-empty line: tab, comma, semicolon, else runs of spaces."""
    if suffix == ".tsv":
        return "\t"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if suffix == ".csv":
        return ";" if "," not in first and ";" in first else ","
    if "\t" in first:
        return "\t"
    if "," in first:
        return ","
    if ";" in first:
        return ";"
    return r"\s+" if len(first.split()) > 1 else ","


def _written_index_or_empty(frame: pd.DataFrame, column: str, columns: list[str]) -> bool:
    """An ``Unnamed`` column of a file that is pandas' written RangeIndex (first column, ``0, 1, 2, ...``) or empty."""
    if not column.startswith("Unnamed:"):
        return False
    values = frame[column]
    if values.isna().all():
        return True
    return column == columns[0] and pd.api.types.is_integer_dtype(values) \
        and np.array_equal(values.to_numpy(), np.arange(len(values)))


def _numeric(column: pd.Series, label: str, name: str, line_offset: int | None) -> np.ndarray:
    """One column as float64, NaN where missing; an error naming the first value that is not a number."""
    if pd.api.types.is_bool_dtype(column):
        return column.astype("float64").to_numpy()
    if pd.api.types.is_datetime64_any_dtype(column) or pd.api.types.is_timedelta64_dtype(column):
        raise InvalidInputError(f"{name}: column {label!r} holds dates or durations, not numbers")
    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    converted = pd.to_numeric(column, errors="coerce")
    bad = np.flatnonzero(np.asarray(column.notna() & converted.isna()))
    if bad.size:
        row = int(bad[0])
        where = "" if line_offset is None else f" on line {row + line_offset}"
        if _as_timestamps(column, label, name, line_offset, explicit=False) is not None:
            where += f"; it holds dates: pass timestamp_column={label!r} to read them as the timestamps"
        raise InvalidInputError(
            f"{name}: column {label!r} is not numeric (row {row}: {column.iloc[row]!r}){where}"
        )
    return converted.to_numpy(dtype=np.float64, na_value=np.nan)


def _as_timestamps(column: pd.Series, label: str, name: str, line_offset: int | None,
                   explicit: bool) -> pd.DatetimeIndex | None:
    """A column as timestamps. Explicit (``timestamp_column``): an error naming a value that is not a date.
    Detected: None unless every present value parses."""
    if pd.api.types.is_datetime64_any_dtype(column):
        return pd.DatetimeIndex(column)
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        if explicit:
            raise InvalidInputError(
                f"{name}: timestamp column {label!r} holds numbers, not dates; convert it first (for example "
                f"pd.to_datetime(frame[{label!r}], unit='s')) or leave timestamp_column unset"
            )
        return None
    present = np.asarray(column.notna())
    if not present.any():
        return None if not explicit else pd.DatetimeIndex([pd.NaT] * len(column))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = pd.to_datetime(column, errors="coerce")
    except (ValueError, TypeError, OverflowError) as exc:
        if explicit:
            raise InvalidInputError(f"{name}: cannot read timestamp column {label!r} as dates ({exc})") from exc
        return None
    if not pd.api.types.is_datetime64_any_dtype(parsed):
        if explicit:
            raise InvalidInputError(f"{name}: cannot read timestamp column {label!r} as dates (mixed time zones?)")
        return None
    bad = np.flatnonzero(present & np.asarray(parsed.isna()))
    if bad.size:
        if explicit:
            row = int(bad[0])
            raise InvalidInputError(
                f"{name}: timestamp column {label!r} holds a value that is not a date at {_at(row, line_offset)}: "
                f"{column.iloc[row]!r}"
            )
        return None
    return pd.DatetimeIndex(parsed)


def _filled(values: np.ndarray, missing: np.ndarray, timestamps: pd.DatetimeIndex | None, fill: str) -> np.ndarray:
    """Fill the NaN of ``values (L, D)``; every column has at least one value."""
    if fill == "zero":
        return np.where(missing, 0.0, values)
    if fill == "ffill":
        return pd.DataFrame(values).ffill().bfill().to_numpy(dtype=np.float64)
    if timestamps is not None:
        ticks = timestamps.asi8
        axis = (ticks - ticks[0]).astype(np.float64)
    else:
        axis = np.arange(values.shape[0], dtype=np.float64)
    filled = values.copy()
    for i in np.flatnonzero(missing.any(axis=0)):
        known = ~missing[:, i]
        filled[:, i] = np.interp(axis, axis[known], values[known, i])
    return filled

