"""Built-in real datasets, one or more per modality, made on first use from what installed packages ship.

No dataset hub is needed: every set is generated from data inside Python packages or by real tools, written as
ordinary files (PNG, WAV, MP4, PLY, CSV) into a cache folder, and read back through the same adapters and datasets
as a user's own files. Splits are deterministic (fixed seeds); a set is built once (in well under a minute on two
cores) and then loaded from the cache.

==================  ===========  ====================================================================================
name                modality     content
==================  ===========  ====================================================================================
``digits``          image        scikit-learn's 1797 handwritten digits (8x8, 10 classes)
``spoken_commands`` audio        10 command words spoken by espeak-ng across English accents and voice variants,
                                 at random speeds and pitches; test and validation voices never speak in training
``spoken_digits``   audio        the digits "zero" to "nine" spoken the same way (same voice split), in classes
                                 "0" to "9": the class names of ``digits`` and ``digit_clips``
``moving_digits``   video        16-frame clips of real handwritten digits in 8 motions (4 directions, 2 rotations,
                                 zoom in and out): telling them apart needs the frame order
``digit_clips``     video        16-frame clips of a real handwritten digit in a random one of those motions,
                                 labelled by the digit ("0" to "9"); digits follow the ``digits`` split
``primitives``      point_cloud  surfaces of open3d's primitive meshes (8 shapes) with random proportions, pose and
                                 jitter
``gunpoint``,       time_series  UCR/UEA classification sets shipped by aeon (their train/test splits, validation
``arrowhead``,                   taken from train)
``basic_motions``,
``japanese_vowels``
``co2``,            time_series  series shipped by statsmodels, for forecasting: weekly Mauna Loa CO2 and yearly
``sunspots``                     sunspot numbers (time-ordered split)
==================  ===========  ====================================================================================

Example::

    from uniperception import UniPerceiver, datasets

    digits = datasets.load("digits")           # built into the cache on first use
    print(digits.info["source"], digits.class_names, digits.counts)
    model = UniPerceiver("image", class_names=digits.class_names, image_size=32)
    train = digits.dataset("train", model.adapters["image"], train=True)

The cache folder is ``$UNIPERCEPTION_CACHE/datasets`` (default ``~/.cache/uniperception/datasets``); each set is
built into a temporary folder and renamed into place when complete, so an interrupted build leaves nothing half
written behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from ..errors import UniPerceptionError

__all__ = ["BuiltinDataset", "DatasetBuildError", "available", "cache_root", "load"]

SPLITS = ("train", "val", "test")


class DatasetBuildError(UniPerceptionError):
    """A built-in dataset cannot be made here (a missing tool or package, an unwritable cache)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    modality: str
    task: str
    version: int
    builder: str  # "module:function" inside this package, imported on demand
    summary: str


_SPECS: Dict[str, _Spec] = {spec.name: spec for spec in [
    _Spec("digits", "image", "classification", 1, "images:build_digits",
          "scikit-learn's handwritten digits, 8x8 PNG, 10 classes"),
    _Spec("spoken_commands", "audio", "classification", 1, "speech:build_spoken_commands",
          "10 command words by espeak-ng voices, 1 s 16 kHz WAV, voices held out for validation and test"),
    _Spec("spoken_digits", "audio", "classification", 1, "speech:build_spoken_digits",
          "the digits zero to nine by espeak-ng voices, classes 0-9 as in digits, 1 s 16 kHz WAV, voices held out"),
    _Spec("moving_digits", "video", "classification", 1, "images:build_moving_digits",
          "16-frame 32x32 H.264 MP4 clips of handwritten digits in 8 motions"),
    _Spec("digit_clips", "video", "classification", 1, "images:build_digit_clips",
          "16-frame 32x32 H.264 MP4 clips of a moving handwritten digit, labelled by the digit (classes 0-9)"),
    _Spec("primitives", "point_cloud", "classification", 1, "shapes:build_primitives",
          "2048-point PLY surfaces of 8 open3d primitive meshes"),
    _Spec("gunpoint", "time_series", "classification", 1, "series:build_gunpoint",
          "UCR GunPoint (aeon): 150-step motion series, 2 classes"),
    _Spec("arrowhead", "time_series", "classification", 1, "series:build_arrowhead",
          "UCR ArrowHead (aeon): 251-step outline series, 3 classes"),
    _Spec("basic_motions", "time_series", "classification", 1, "series:build_basic_motions",
          "UEA BasicMotions (aeon): 6-channel 100-step accelerometer/gyroscope series, 4 classes"),
    _Spec("japanese_vowels", "time_series", "classification", 1, "series:build_japanese_vowels",
          "UEA JapaneseVowels (aeon): 12-channel variable-length LPC series, 9 speakers"),
    _Spec("co2", "time_series", "forecasting", 1, "series:build_co2",
          "weekly atmospheric CO2 at Mauna Loa 1958-2001 (statsmodels), gaps interpolated"),
    _Spec("sunspots", "time_series", "forecasting", 1, "series:build_sunspots",
          "yearly sunspot numbers 1700-2008 (statsmodels)"),
]}


def available() -> Dict[str, Dict[str, str]]:
    """Every built-in set: ``{name: {"modality", "task", "summary"}}``."""
    return {name: dict(modality=s.modality, task=s.task, summary=s.summary) for name, s in _SPECS.items()}


def cache_root() -> Path:
    """Where built sets live: ``$UNIPERCEPTION_CACHE/datasets``, else ``$XDG_CACHE_HOME/uniperception/datasets``,
    else ``~/.cache/uniperception/datasets``."""
    base = os.environ.get("UNIPERCEPTION_CACHE")
    if base:
        return Path(base).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "uniperception" / "datasets"


@dataclasses.dataclass
class BuiltinDataset:
    """A built set in the cache: ``root/<split>/<class>/<file>`` (classification) or ``root/series.csv``
    (forecasting), with ``info.json`` describing its source, licence, classes, counts and how it was made."""

    name: str
    modality: str
    task: str
    root: Path
    info: Dict[str, Any]

    @property
    def class_names(self) -> Optional[List[str]]:
        return self.info.get("classes")

    @property
    def counts(self) -> Dict[str, int]:
        """Samples per split (forecasting: steps of the series)."""
        return self.info.get("counts", {})

    def folder(self, split: str) -> Path:
        """The class folders of ``split`` (``train``, ``val`` or ``test``)."""
        if self.task != "classification":
            raise UniPerceptionError(f"{self.name} is a series to forecast: use .series and ForecastingDataset")
        if split not in SPLITS:
            raise UniPerceptionError(f"split must be one of {SPLITS}, got {split!r}")
        return self.root / split

    @property
    def series(self) -> Path:
        """The CSV file of a forecasting set."""
        if self.task != "forecasting":
            raise UniPerceptionError(f"{self.name} is a classification set: use .folder(split)")
        return self.root / "series.csv"

    def files(self, split: str) -> List[Path]:
        """The files of ``split``, class by class in sorted order."""
        return sorted(p for p in self.folder(split).rglob("*") if p.is_file())

    def dataset(self, split: str, adapter, train: bool = False, **kwargs):
        """A :class:`~uniperception.data.FolderDataset` (or :class:`~uniperception.data.ForecastingDataset`, with
        the dataset's ``fractions``) of ``split`` read through ``adapter``."""
        from ..data import FolderDataset, ForecastingDataset

        if self.task == "forecasting":
            kwargs.setdefault("fractions", tuple(self.info["fractions"]))
            return ForecastingDataset(self.series, adapter, split=split, train=train, **kwargs)
        return FolderDataset(self.folder(split), adapter, train=train, class_names=self.class_names, **kwargs)


def load(name: str, root: Union[str, os.PathLike, None] = None, rebuild: bool = False,
         progress: Optional[bool] = None) -> BuiltinDataset:
    """The built-in set ``name``, built into the cache first if needed (``rebuild=True`` builds it again).

    ``root`` overrides the cache folder. ``progress``: a progress bar while building (default: on a terminal).
    """
    spec = _SPECS.get(name)
    if spec is None:
        raise UniPerceptionError(f"unknown built-in dataset {name!r}; available: {', '.join(_SPECS)}")
    base = Path(root).expanduser() if root is not None else cache_root()
    target = base / f"{name}-v{spec.version}"
    marker = target / "info.json"
    if marker.is_file() and not rebuild:
        return _opened(spec, target)
    try:
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
    except OSError as exc:
        raise DatasetBuildError(f"{base}: cannot write the dataset cache ({exc.strerror or exc}); set "
                                "UNIPERCEPTION_CACHE to a writable folder") from None
    try:
        started = time.perf_counter()
        info = _builder(spec)(staging, progress=progress)
        info.update(name=name, modality=spec.modality, task=spec.task, version=spec.version,
                    build_seconds=round(time.perf_counter() - started, 1))
        (staging / "info.json").write_text(json.dumps(info, indent=1))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp made it private; the cache may be shared
        if target.exists():
            if not rebuild and marker.is_file():  # another process finished first: keep its copy
                shutil.rmtree(staging, ignore_errors=True)
                return _opened(spec, target)
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if not marker.is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process put its complete copy there meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _opened(spec, target)


def quiet(progress: Optional[bool]) -> Optional[bool]:
    """tqdm's ``disable`` for a ``progress`` flag (None: a bar only on a terminal)."""
    return None if progress is None else not progress


def _opened(spec: _Spec, target: Path) -> BuiltinDataset:
    try:
        info = json.loads((target / "info.json").read_text())
    except (OSError, ValueError) as exc:
        raise UniPerceptionError(f"{target / 'info.json'}: unreadable ({exc}); rebuild with rebuild=True") from None
    return BuiltinDataset(spec.name, spec.modality, spec.task, target, info)


def _builder(spec: _Spec) -> Callable[..., Dict[str, Any]]:
    import importlib

    module, function = spec.builder.split(":")
    return getattr(importlib.import_module(f".{module}", __name__), function)
