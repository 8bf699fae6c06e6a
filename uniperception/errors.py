"""Every project error in one place: ``from uniperception.errors import CheckpointError, InvalidInputError, ...``.

Each package owns its errors (the import rule keeps :mod:`backbones` and :mod:`modalities` apart); this module
re-exports them so users catch them from one place.
"""

from backbones.errors import BackboneError, CheckpointError, ConfigurationError, InputShapeError
from modalities.errors import InvalidInputError, ModalityError

__all__ = [
    "BackboneError",
    "CheckpointError",
    "ConfigurationError",
    "InputShapeError",
    "InvalidInputError",
    "ModalityError",
    "UniPerceptionError",
]


class UniPerceptionError(Exception):
    """Base class of errors raised by :mod:`uniperception` itself."""
