"""Datasets from disk for every modality: class folders, CSV manifests and forecasting windows.

``FolderDataset(root, adapter)``
    ``root/<class name>/<file>``: one subfolder per class (sorted names give the labels), files with the modality's
    suffixes, hidden files skipped.
``ManifestDataset(manifest, adapter, split=None)``
    a CSV file with columns ``path`` and ``label`` and optionally ``split`` (``train``, ``val``, ``test``, ...);
    relative paths are taken from the manifest's folder. Labels are names; the sorted distinct names are the classes
    unless ``class_names`` fixes them.
``ForecastingDataset(source, adapter, split="train")``
    one CSV/Parquet series cut into look-back and horizon windows, split in time order: the first ``fractions[0]`` of
    the steps are forecast in training, the next ``fractions[1]`` in validation and the rest in testing (a window's
    look-back may reach back into the previous part, its targets never do).

Items are ``(sample, label)`` (``(window, target)`` for forecasting). A sample that cannot be read (corrupt file,
wrong format) is returned as ``None`` with a warning and listed in ``dataset.skipped`` (of the process that read
it: with DataLoader workers, count the dropped items in the main process), and :func:`collate_skipping` drops it
from the batch; with ``strict=True`` the error is raised instead.

Example::

    from modalities import create_adapter
    from uniperception.data import FolderDataset, collate_skipping
    adapter = create_adapter("audio")
    train = FolderDataset("speech/train", adapter, train=True)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True,
                                         collate_fn=collate_skipping(adapter))
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import pandas as pd
import torch
from torch.utils.data import Dataset

from modalities import InvalidInputError
from modalities.base import ModalityAdapter

from .errors import UniPerceptionError

__all__ = ["FILE_SUFFIXES", "FolderDataset", "ForecastingDataset", "ManifestDataset", "collate_skipping"]

FILE_SUFFIXES: Dict[str, Tuple[str, ...]] = {
    "image": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"),
    "audio": (".wav", ".flac", ".ogg", ".mp3"),
    "video": (".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif"),
    "point_cloud": (".ply", ".pcd", ".xyz", ".xyzn", ".xyzrgb", ".pts", ".off", ".obj", ".stl", ".npy", ".npz"),
    "time_series": (".csv", ".tsv", ".txt", ".parquet", ".pq", ".npy"),
}


class _LabelledFiles(Dataset):
    """Shared reading of ``(path, label)`` items through an adapter, with bad samples skipped or raised."""

    def __init__(self, items: List[Tuple[Path, int]], class_names: List[str], adapter, train: bool, strict: bool,
                 cache: bool = False):
        self.items, self.class_names, self.adapter = items, class_names, adapter
        self.train, self.strict = train, strict
        self.skipped: List[str] = []
        # the preprocessed sample can be kept only where augmentation runs after preprocessing (the base prepare)
        self.cache: Optional[Dict[int, Optional[torch.Tensor]]] = (
            {} if cache and type(adapter).prepare is ModalityAdapter.prepare else None)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, int]]:
        path, label = self.items[index]
        if self.cache is not None:
            if index not in self.cache:
                self.cache[index] = self._read(path, lambda: self.adapter.preprocess(self.adapter.load(path)))
            sample = self.cache[index]
            if sample is None:
                return None
            return (self.adapter.augment(sample.clone()) if self.train else sample.clone()), label
        sample = self._read(path, lambda: self.adapter.prepare(path, train=self.train))
        return None if sample is None else (sample, label)

    def _read(self, path: Path, read: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
        try:
            return read()
        except InvalidInputError as exc:
            if self.strict:
                raise
            self.skipped.append(str(path))
            warnings.warn(f"skipped a sample that cannot be read: {exc}", RuntimeWarning, stacklevel=3)
            return None

    def counts(self) -> Dict[str, int]:
        """Samples per class name."""
        counts = {name: 0 for name in self.class_names}
        for _, label in self.items:
            counts[self.class_names[label]] += 1
        return counts


def _suffixes(adapter, extensions: Optional[Sequence[str]]) -> Tuple[str, ...]:
    if extensions is not None:
        return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if adapter.name not in FILE_SUFFIXES:
        raise UniPerceptionError(f"no default file suffixes for modality {adapter.name!r}; pass extensions=")
    return FILE_SUFFIXES[adapter.name]


class FolderDataset(_LabelledFiles):
    """``root/<class>/<file>`` -> ``(sample, label)``; see the module docstring.

    Args:
        root: the folder of class folders.
        adapter: the modality adapter that prepares each file.
        train: apply the adapter's training augmentation.
        extensions: file suffixes to take (default: the modality's usual ones).
        class_names: fix the classes (and their order); folders not named are an error.
        strict: raise on an unreadable sample instead of skipping it.
        cache: keep each preprocessed sample in memory after its first read (training augmentation still runs on
            every access). Only for adapters that augment after preprocessing (audio, point clouds, time series);
            image and video adapters augment while decoding, so for them this does nothing. It pays off with
            ``num_workers=0`` (as :class:`~uniperception.engine.Trainer` uses by default): DataLoader workers each
            keep their own copy, lost when the loader ends.
    """

    def __init__(self, root: Union[str, os.PathLike], adapter, train: bool = False,
                 extensions: Optional[Sequence[str]] = None, class_names: Optional[Sequence[str]] = None,
                 strict: bool = False, cache: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise UniPerceptionError(f"{root}: no such folder of class folders")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if class_names is not None:
            unknown = sorted(set(folders) - set(class_names))
            if unknown:
                raise UniPerceptionError(f"{root}: folders {unknown} are not among class_names {list(class_names)}")
            folders = list(class_names)
        if not folders:
            raise UniPerceptionError(f"{root}: holds no class folders (expected {root}/<class name>/<file>)")
        suffixes = _suffixes(adapter, extensions)
        items = []
        for label, name in enumerate(folders):
            folder = root / name
            if folder.is_dir():
                items += [(path, label) for path in sorted(folder.rglob("*"))
                          if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in suffixes]
        if not items:
            raise UniPerceptionError(f"{root}: no files with suffixes {', '.join(suffixes)} in its class folders")
        super().__init__(items, list(folders), adapter, train, strict, cache)


class ManifestDataset(_LabelledFiles):
    """A CSV manifest (``path,label[,split]``) -> ``(sample, label)``; see the module docstring.

    Args:
        manifest: the CSV file.
        adapter: the modality adapter that prepares each file.
        split: keep the rows of this split (needs a ``split`` column); None keeps every row.
        train: apply the adapter's training augmentation.
        class_names: fix the classes (and their order); by default the sorted distinct labels of the whole manifest,
            so every split numbers them alike.
        strict: raise on an unreadable sample instead of skipping it; missing files are always an error.
        cache: keep preprocessed samples in memory, as for :class:`FolderDataset`.
    """

    def __init__(self, manifest: Union[str, os.PathLike], adapter, split: Optional[str] = None,
                 train: bool = False, class_names: Optional[Sequence[str]] = None, strict: bool = False,
                 cache: bool = False):
        manifest = Path(manifest)
        try:
            table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        except FileNotFoundError:
            raise UniPerceptionError(f"{manifest}: no such manifest file") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise UniPerceptionError(f"{manifest}: not a readable CSV manifest ({exc})") from None
        missing = [c for c in ("path", "label") if c not in table.columns]
        if missing:
            raise UniPerceptionError(f"{manifest}: needs columns path and label (optionally split); it has "
                                     f"{list(table.columns)}")
        names = list(class_names) if class_names is not None else sorted(set(table["label"]))
        unknown = sorted(set(table["label"]) - set(names))
        if unknown:
            raise UniPerceptionError(f"{manifest}: labels {unknown[:10]} are not among class_names")
        if split is not None:
            if "split" not in table.columns:
                raise UniPerceptionError(f"{manifest}: split={split!r} asked for, but there is no split column")
            available = sorted(set(table["split"]))
            table = table[table["split"] == split]
            if table.empty:
                raise UniPerceptionError(f"{manifest}: no rows of split {split!r}; splits: {available}")
        if table.empty:
            raise UniPerceptionError(f"{manifest}: the manifest has no rows")
        base, label_of = manifest.parent, {name: i for i, name in enumerate(names)}
        items = [((base / path) if not Path(path).is_absolute() else Path(path), label_of[label])
                 for path, label in zip(table["path"], table["label"], strict=True)]
        absent = [str(path) for path, _ in items if not path.is_file()]
        if absent:
            raise UniPerceptionError(f"{manifest}: {len(absent)} listed file(s) do not exist, e.g. "
                                     f"{', '.join(absent[:3])}")
        super().__init__(items, names, adapter, train, strict, cache)


class ForecastingDataset(Dataset):
    """Windows of one series with a time-ordered split; see the module docstring.

    Args:
        source: a CSV/Parquet file, DataFrame or array the time-series adapter reads.
        adapter: a ``time_series`` adapter with ``task="forecasting"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        fractions: shares of the steps whose values are forecast in each split (they sum to 1).
        stride: steps between consecutive windows.
        train: jitter and scale windows with the adapter's ``augment_window``.
    """

    SPLITS = ("train", "val", "test")

    def __init__(self, source: Any, adapter, split: str = "train", fractions: Sequence[float] = (0.7, 0.1, 0.2),
                 stride: int = 1, train: bool = False):
        if getattr(adapter, "name", None) != "time_series" or getattr(adapter, "task", None) != "forecasting":
            raise UniPerceptionError("ForecastingDataset needs a time_series adapter with task='forecasting'")
        if split not in self.SPLITS:
            raise UniPerceptionError(f"split must be one of {self.SPLITS}, got {split!r}")
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise UniPerceptionError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
        self.adapter, self.split, self.train = adapter, split, train
        self.series = adapter.load(source)
        steps, length, horizon = len(self.series), adapter.length, adapter.horizon
        bounds = [0, round(steps * fractions[0]), round(steps * (fractions[0] + fractions[1])), steps]
        part = self.SPLITS.index(split)
        first_target, end = max(bounds[part], length), bounds[part + 1]  # targets lie in [first_target, end)
        inputs, targets = adapter.forecasting_windows(self.series, stride=1)  # window i forecasts from step i + L
        starts = torch.arange(inputs.shape[0]) + length  # first target step of each window
        keep = (starts >= first_target) & (starts + horizon <= end)
        chosen = keep.nonzero().flatten()[::stride]
        if chosen.numel() == 0:
            raise UniPerceptionError(
                f"{self.series.name}: the {split} part (steps {bounds[part]} to {end} of {steps}) is too short for "
                f"one window of {length} look-back + {horizon} horizon steps"
            )
        self.inputs, self.targets, self.first_steps = inputs[chosen], targets[chosen], starts[chosen]

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        window, target = self.inputs[index], self.targets[index]
        if self.train:
            return self.adapter.augment_window(window, target)
        return window.clone(), target.clone()


def collate_skipping(adapter) -> Callable[[List[Any]], Any]:
    """A DataLoader ``collate_fn`` that drops skipped (``None``) items and stacks the rest with the adapter:
    ``(batch, labels)``, or None when every item of the batch was skipped."""

    def collate(items: List[Any]):
        kept = [item for item in items if item is not None]
        if not kept:
            return None
        samples, labels = zip(*kept, strict=True)
        labels = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.tensor(labels)
        return adapter.collate(list(samples)), labels

    return collate
