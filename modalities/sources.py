"""Where raw data comes from: naming a source in error messages and opening file-like sources."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np
import torch

from .errors import InvalidInputError

__all__ = ["describe_source", "open_file_source"]


def describe_source(source: Any) -> str:
    """How an error message names a source: its path, or a short description of in-memory data."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if hasattr(source, "read"):
        return getattr(source, "name", None) or f"<{type(source).__name__}>"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"<{type(source).__name__} of shape {tuple(source.shape)}>"
    return f"<{type(source).__name__}>"


def open_file_source(source: Any, kind: str, accepted: str) -> Union[str, BinaryIO]:
    """A path (as a string), bytes (as a buffer) or a binary file object, checked to be there and not empty.

    Args:
        source: what the user gave.
        kind: ``"image"``, ``"audio"`` or ``"video"``, for the messages.
        accepted: what else the adapter accepts, for the message about an unsupported type.
    """
    name = describe_source(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"{name}: no such {kind} file")
        if path.stat().st_size == 0:
            raise InvalidInputError(f"{name}: the file is empty")
        return str(path)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InvalidInputError(f"{name}: no {kind} data (0 bytes)")
        return io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        return source
    raise InvalidInputError(
        f"{name}: cannot read {kind} from {type(source).__name__}; give a path, bytes, a file object or {accepted}"
    )
