"""Modality adapters: raw files and arrays in, ``(B, C', H, W)`` embedding maps out.

This package owns data loading, fixed preprocessing and the learnable embeddings of each modality. It never imports
:mod:`backbones` or :mod:`uniperception`.
"""

from .errors import InvalidInputError, ModalityError

__all__ = ["InvalidInputError", "ModalityError"]
