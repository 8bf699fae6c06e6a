"""Errors raised by :mod:`backbones` for user mistakes.

Every error names what was wrong and what was expected; ``uniperception.errors`` re-exports them so users can catch
them from one place.
"""

__all__ = ["BackboneError", "CheckpointError", "InputShapeError", "ConfigurationError"]


class BackboneError(Exception):
    """Base class of every error raised by :mod:`backbones`."""


class CheckpointError(BackboneError, ValueError):
    """A checkpoint file cannot be read, or its tensors do not fit the model."""


class InputShapeError(BackboneError, ValueError):
    """An input tensor has the wrong rank, channel count or spatial size."""


class ConfigurationError(BackboneError, ValueError):
    """A model was asked for with an impossible configuration (unknown variant, bad kernel plan, ...)."""
