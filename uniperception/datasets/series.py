"""Time series: UCR/UEA classification sets that aeon ships, and series that statsmodels ships for forecasting.

Classification sets keep their published train/test split; a stratified fifth of the train split (fixed seed)
becomes the validation split. Each series is one CSV file (one column per channel) in ``<split>/<class>/``.
Forecasting sets are one ``series.csv`` (timestamp, value) split in time order by
:class:`~uniperception.data.ForecastingDataset` with the fractions recorded in ``info.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import quiet

SEED = 20240919
UCR_LICENCE = ("UCR/UEA time series archive (timeseriesclassification.com), free for research with citation of "
               "the archive; shipped inside aeon (BSD-3-Clause)")


def _stratified_val(labels: List[str], fraction: float = 0.2) -> np.ndarray:
    """Indices of a seeded stratified ``fraction`` of ``labels`` (at least one per class)."""
    rng = np.random.default_rng(SEED)
    labels_array = np.asarray(labels)
    chosen = []
    for label in sorted(set(labels)):
        members = rng.permutation(np.flatnonzero(labels_array == label))
        chosen += members[: max(1, round(len(members) * fraction))].tolist()
    return np.array(sorted(chosen))


def _write_ucr(target: Path, name: str, loader, description: str, progress: Optional[bool]) -> Dict[str, Any]:
    import aeon

    splits = {}
    for part in ("train", "test"):
        X, y = loader(split=part)
        splits[part] = ([np.asarray(x, dtype=np.float64) for x in X], [str(label) for label in y])
    X_train, y_train = splits["train"]
    val = set(_stratified_val(y_train).tolist())
    layout = {
        "train": ([x for i, x in enumerate(X_train) if i not in val],
                  [c for i, c in enumerate(y_train) if i not in val]),
        "val": ([X_train[i] for i in sorted(val)], [y_train[i] for i in sorted(val)]),
        "test": splits["test"],
    }
    classes = sorted(set(y_train))
    counts, lengths = {}, set()
    for split, (series, labels) in layout.items():
        for label in classes:
            (target / split / label).mkdir(parents=True)
        for i, (x, label) in enumerate(tqdm(list(zip(series, labels, strict=True)), desc=f"{name} {split}",
                                            disable=quiet(progress), leave=False)):
            channels = x.reshape(-1, x.shape[-1])  # (channels, length)
            lengths.add(channels.shape[1])
            frame = pd.DataFrame(channels.T, columns=[f"c{k}" for k in range(channels.shape[0])])
            frame.to_csv(target / split / label / f"{i:04d}.csv", index=False, float_format="%.6g")
        counts[split] = len(series)
    return dict(
        source=f"{name} from aeon {aeon.__version__} (aeon.datasets), its published train/test split",
        licence=UCR_LICENCE, classes=classes, counts=counts, channels=int(channels.shape[0]),
        lengths=[min(lengths), max(lengths)],
        description=description + f" Validation: a stratified fifth of the train split (seed {SEED}).",
    )


def build_gunpoint(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    from aeon.datasets import load_gunpoint

    return _write_ucr(target, "GunPoint", load_gunpoint,
                      "Hand x-coordinate of an actor drawing a gun or pointing a finger (Ratanamahatana & Keogh), "
                      "150 steps, classes 1 (gun) and 2 (point).", progress)


def build_arrowhead(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    from aeon.datasets import load_arrow_head

    return _write_ucr(target, "ArrowHead", load_arrow_head,
                      "Outlines of projectile points converted to 251-step series, three types (Avonlea, Clovis, "
                      "Mix).", progress)


def build_basic_motions(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    from aeon.datasets import load_basic_motions

    return _write_ucr(target, "BasicMotions", load_basic_motions,
                      "Smart-watch accelerometer and gyroscope (6 channels, 100 steps) during standing, walking, "
                      "running and badminton.", progress)


def build_japanese_vowels(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    from aeon.datasets import load_japanese_vowels

    return _write_ucr(target, "JapaneseVowels", load_japanese_vowels,
                      "12 LPC cepstrum coefficients of nine male speakers uttering /ae/ (Kudo et al.), 7-29 steps; "
                      "the class is the speaker.", progress)


# ---------------------------------------------------------------------------------------------------------------------
# forecasting

STATSMODELS_LICENCE = "public data shipped by statsmodels (BSD-3-Clause)"


def build_co2(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    import statsmodels
    import statsmodels.api as sm

    frame = sm.datasets.co2.load_pandas().data
    gaps = int(frame["co2"].isna().sum())
    frame = frame.interpolate(method="time")
    frame.index.name = "timestamp"
    frame.to_csv(target / "series.csv", float_format="%.2f")
    return dict(
        source=f"statsmodels {statsmodels.__version__} datasets.co2: weekly CO2 at Mauna Loa (Keeling et al.), "
               "March 1958 to December 2001",
        licence=STATSMODELS_LICENCE, counts={"steps": len(frame)}, fractions=[0.7, 0.1, 0.2], season=52,
        description=f"ppm per week; {gaps} missing weeks filled by linear interpolation in time. Seasonal period 52.",
    )


def build_sunspots(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    import statsmodels
    import statsmodels.api as sm

    data = sm.datasets.sunspots.load_pandas().data
    frame = pd.DataFrame({"timestamp": pd.to_datetime(data["YEAR"].astype(int).astype(str) + "-12-31"),
                          "sunspots": data["SUNACTIVITY"].astype(float)})
    frame.to_csv(target / "series.csv", index=False, float_format="%.1f")
    return dict(
        source=f"statsmodels {statsmodels.__version__} datasets.sunspots: yearly mean sunspot numbers 1700-2008",
        licence=STATSMODELS_LICENCE, counts={"steps": len(frame)}, fractions=[0.7, 0.1, 0.2], season=11,
        description="Yearly values dated 31 December; the solar cycle is about 11 years (not exact), the season "
                    "used for the seasonal-naive baseline.",
    )
