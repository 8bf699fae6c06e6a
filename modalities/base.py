"""The adapter contract and the modality registry.

An adapter turns raw data of one modality into the ``(B, C', H, W)`` embedding map the shared backbone reads:

``load(source) -> raw``
    read a path, bytes, a file object, an array or a tensor into the modality's raw form (no resizing, no
    normalisation), raising :class:`~modalities.errors.InvalidInputError` that names the source on any problem;
``preprocess(raw) -> sample``
    the fixed, deterministic per-sample transform (it runs in DataLoader workers): the map ``(C', H, W)`` itself for
    images, audio and video; points ``(P, C)`` for point clouds and a series ``(L, D + time features)`` for time
    series, whose maps are made by the learnable ``forward``;
``augment(sample) -> sample``
    train-time augmentation of one preprocessed sample (identity by default);
``collate(samples) -> batch``
    stack preprocessed samples into a batch (``(B, C', H, W)``, ``(B, P, C)`` or ``(B, L, D + F)``);
``forward(batch) -> (B * maps_per_sample, C', H, W)``
    the learnable part (identity for modalities that have none). A point cloud gives one map per view and a grouped
    time series one map per node: ``maps_per_sample`` says how many consecutive maps belong to one sample;
``encode(batch) -> (maps, context)``
    ``forward`` plus what a head needs to turn the backbone's features back into an answer (the number of maps per
    sample; for time series the instance-normalisation statistics that a forecast is de-normalised with);
``config``
    a JSON-serialisable dict; ``create_adapter(name, **config)`` rebuilds the same adapter.

Adapters register with :func:`register_modality`; other installed packages add theirs through the Python
entry-point group ``uniperception.modalities`` (each entry point names an adapter class), so a new modality needs no
fork.
"""

from __future__ import annotations

import inspect
import json
from importlib import metadata
from typing import Any, Callable, Dict, List, Sequence, Tuple, Type

import torch
from torch import nn

from .errors import InvalidInputError, ModalityError

__all__ = [
    "ENTRY_POINT_GROUP",
    "ModalityAdapter",
    "create_adapter",
    "list_modalities",
    "register_modality",
]

ENTRY_POINT_GROUP = "uniperception.modalities"

_REGISTRY: Dict[str, Type["ModalityAdapter"]] = {}
_ENTRY_POINTS_LOADED = False


class ModalityAdapter(nn.Module):
    """Base class of the modality adapters (see the module docstring for the contract)."""

    #: registered name, set by :func:`register_modality`
    name: str = ""

    def __init__(self, **config: Any):
        super().__init__()
        try:
            json.dumps(config)
        except TypeError as exc:
            raise ModalityError(f"{type(self).__name__} config must be JSON-serialisable: {exc}") from None
        self._config = dict(config)

    @property
    def config(self) -> Dict[str, Any]:
        """The keyword arguments that rebuild this adapter with :func:`create_adapter`."""
        return dict(self._config)

    @property
    def out_channels(self) -> int:
        """Channels ``C'`` of the embedding map the backbone's stem receives."""
        raise NotImplementedError

    @property
    def maps_per_sample(self) -> int:
        """How many consecutive maps of a ``forward`` output belong to one sample (views, nodes); 1 by default."""
        return 1

    def load(self, source: Any) -> Any:
        raise NotImplementedError

    def example(self, seed: int = 0) -> Any:
        """A synthetic raw input (random content of the configured size) that :meth:`prepare` accepts: for timing
        and for fixing an export's input size when no real file is at hand."""
        raise NotImplementedError(f"{type(self).__name__} has no synthetic example; give a real file instead")

    def preprocess(self, raw: Any) -> torch.Tensor:
        raise NotImplementedError

    def augment(self, sample: torch.Tensor) -> torch.Tensor:
        return sample

    def prepare(self, source: Any, train: bool = False) -> torch.Tensor:
        """``load``, ``preprocess`` and, for training, ``augment`` one source."""
        sample = self.preprocess(self.load(source))
        return self.augment(sample) if train else sample

    def collate(self, samples: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack preprocessed samples into a batch (a new leading dimension ``B``)."""
        if len(samples) == 0:
            raise InvalidInputError(f"{self.name}: cannot collate an empty list of samples")
        shapes = {tuple(s.shape) for s in samples}
        if len(shapes) != 1:
            raise InvalidInputError(f"{self.name}: samples of different shapes cannot form a batch: {sorted(shapes)}")
        return torch.stack(list(samples))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The learnable embedding; identity for modalities without one. ``(B, C', H, W) -> (B, C', H, W)``."""
        if batch.ndim != 4 or batch.shape[1] != self.out_channels:
            raise InvalidInputError(
                f"{self.name}: expected a preprocessed batch (B, {self.out_channels}, H, W), got {tuple(batch.shape)}"
            )
        return batch

    def encode(self, batch: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """``forward(batch)`` and the context a head needs: ``{"maps_per_sample": ...}`` at least."""
        return self(batch), {"maps_per_sample": self.maps_per_sample}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())


def register_modality(name: str) -> Callable[[Type[ModalityAdapter]], Type[ModalityAdapter]]:
    """Class decorator: register an adapter class under ``name``."""

    def decorate(cls: Type[ModalityAdapter]) -> Type[ModalityAdapter]:
        if not (isinstance(cls, type) and issubclass(cls, ModalityAdapter)):
            raise ModalityError(f"register_modality({name!r}) needs a ModalityAdapter subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ModalityError(f"modality {name!r} is already registered by {existing.__module__}.{existing.__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in _REGISTRY:
            continue
        try:
            register_modality(entry_point.name)(entry_point.load())
        except Exception as exc:  # a broken plugin must not break the built-in modalities or other plugins
            import warnings

            warnings.warn(f"modality plugin {entry_point.name!r} ({entry_point.value}) failed to load: {exc}",
                          RuntimeWarning, stacklevel=3)


def list_modalities() -> List[str]:
    """Names of the registered modalities, plugins included."""
    _load_entry_points()
    return sorted(_REGISTRY)


def create_adapter(name: str, **config: Any) -> ModalityAdapter:
    """Build the adapter registered as ``name`` with ``config``."""
    _load_entry_points()
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ModalityError(
            f"unknown modality {name!r}; registered modalities: {', '.join(sorted(_REGISTRY)) or 'none'}"
        ) from None
    accepted = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(config) - set(accepted))
        if unknown:
            raise ModalityError(
                f"{name}: unknown setting(s) {', '.join(map(repr, unknown))}; the {name} adapter takes "
                f"{', '.join(accepted) or 'no settings'}"
            )
    return cls(**config)
