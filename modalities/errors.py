"""Errors raised by :mod:`modalities` for bad input; re-exported by ``uniperception.errors``."""

__all__ = ["ModalityError", "InvalidInputError"]


class ModalityError(Exception):
    """Base class of every error raised by :mod:`modalities`."""


class InvalidInputError(ModalityError, ValueError):
    """A file or array cannot be turned into an embedding map: it names the source, the problem and the expectation."""
