"""The measured dispatch policy: which depthwise-convolution backend is fastest for a call.

``benchmarks/dwconv.py --write-policy`` times every backend on UniRepLKNet's layer shapes and writes the winner of
each shape to ``dwconv_policy.json`` beside this file (or to the file named by ``UNIPERCEPTION_DWCONV_POLICY``). A
call is matched to the nearest measured shape of its device type, mode (inference or training) and input layout,
preferring its own dtype, by distance in log-space over kernel size (weighted most), spatial size, channels and batch.
Where nothing was measured (for example on a GPU before the benchmark ran there) the policy answers ``None`` and the
caller uses PyTorch.

CPU entries carry the vector instruction set they were measured with (``"isa"``: PyTorch's
``torch.backends.cpu.get_cpu_capability()``, e.g. ``"AVX512"`` or ``"AVX2"``): which backend wins depends on it (our
kernels hold more in AVX-512's 32 registers than in AVX2's 16, and oneDNN's kernels differ too). A call is matched
against the entries of the running CPU's instruction set where the file has any for its mode and layout, else
against all CPU entries (and entries written before the field existed count for every instruction set).
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional

__all__ = [
    "POLICY_ENV", "DispatchPolicy", "cpu_isa", "current_policy", "default_policy_path", "load_policy", "reload_policy",
]

POLICY_ENV = "UNIPERCEPTION_DWCONV_POLICY"


@functools.lru_cache(maxsize=1)
def cpu_isa() -> str:
    """The vector instruction set PyTorch's CPU kernels run with here (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``, ...),
    the key that CPU policy entries are measured under."""
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except (ImportError, AttributeError, RuntimeError):
        return "DEFAULT"


def default_policy_path() -> Path:
    return Path(os.environ.get(POLICY_ENV) or Path(__file__).with_name("dwconv_policy.json"))


class DispatchPolicy:
    """Nearest-measured-shape lookup over benchmark entries.

    Each entry is a dict with ``device`` ("cpu" or "cuda"), ``dtype`` ("float32", ...), ``mode`` ("inference" or
    "training"), ``layout`` ("nchw" or "channels_last"), ``batch``, ``channels``, ``height``, ``width``,
    ``kernel_size`` and ``best`` (a backend name), and for CPU entries optionally ``isa`` (the instruction set they
    were measured with; see :func:`cpu_isa`). ``isa`` is the instruction set calls are matched for (default: this
    CPU's).
    """

    _FIELDS = ("device", "dtype", "mode", "layout", "best")
    _SIZES = ("batch", "channels", "height", "width", "kernel_size")

    def __init__(self, entries: List[Dict], isa: Optional[str] = None):
        valid = [e for e in entries if self._valid(e)]
        if len(valid) != len(entries):
            warnings.warn(f"depthwise dispatch policy: {len(entries) - len(valid)} malformed entries ignored",
                          RuntimeWarning, stacklevel=3)
        self.entries = valid
        self.isa = cpu_isa() if isa is None else isa
        # all entries of a (device, mode, layout), and those of them measured with this CPU's instruction set (or
        # with none named); a call uses the second list where it is not empty
        self._index: Dict[tuple, List[Dict]] = {}
        self._own: Dict[tuple, List[Dict]] = {}
        for entry in valid:
            key = (entry["device"], entry["mode"], entry["layout"])
            self._index.setdefault(key, []).append(entry)
            if entry["device"] != "cpu" or entry.get("isa") in (None, self.isa):
                self._own.setdefault(key, []).append(entry)

    @classmethod
    def _valid(cls, entry) -> bool:
        return (
            isinstance(entry, dict)
            and all(isinstance(entry.get(k), str) for k in cls._FIELDS)
            and all(isinstance(entry.get(k), int) and entry[k] > 0 for k in cls._SIZES)
            and isinstance(entry.get("isa", ""), str)
        )

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def _distance(entry: Dict, batch: int, channels: int, pixels: int, kernel_size: int, dtype: str) -> float:
        return (
            4.0 * abs(math.log2(entry["kernel_size"]) - math.log2(kernel_size))
            + abs(math.log2(entry["height"] * entry["width"]) - math.log2(pixels))
            + abs(math.log2(entry["channels"]) - math.log2(channels))
            + 0.5 * abs(math.log2(entry["batch"]) - math.log2(batch))
            + (0.0 if entry["dtype"] == dtype else 8.0)
        )

    @functools.lru_cache(maxsize=4096)
    def choose(
        self, device: str, dtype: str, mode: str, layout: str, batch: int, channels: int, height: int, width: int,
        kernel_size: int,
    ) -> Optional[str]:
        candidates = self._own.get((device, mode, layout)) or self._index.get((device, mode, layout))
        if not candidates:
            return None
        pixels = max(1, height * width)
        nearest = min(
            candidates,
            key=lambda e: self._distance(e, max(1, batch), max(1, channels), pixels, kernel_size, dtype),
        )
        return nearest["best"]


def load_policy(path: Optional[Path] = None) -> DispatchPolicy:
    """The policy stored at ``path`` (default: :func:`default_policy_path`); empty when there is no such file.

    A file that exists but cannot be read gives an empty policy and one warning.
    """
    path = Path(path) if path is not None else default_policy_path()
    try:
        with open(path) as f:
            data = json.load(f)
        return DispatchPolicy(data.get("entries", []))
    except FileNotFoundError:
        return DispatchPolicy([])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"depthwise dispatch policy {str(path)!r} is unreadable ({exc}); using PyTorch's convolution",
                      RuntimeWarning, stacklevel=2)
        return DispatchPolicy([])


_CURRENT: Dict[str, DispatchPolicy] = {}


def current_policy() -> DispatchPolicy:
    """The policy in force, read once per policy path (``UNIPERCEPTION_DWCONV_POLICY`` or the shipped file)."""
    location = os.environ.get(POLICY_ENV, "")
    policy = _CURRENT.get(location)
    if policy is None:
        policy = _CURRENT[location] = load_policy()
    return policy


def reload_policy() -> DispatchPolicy:
    """Read the policy file again (after the benchmark wrote a new one) and forget cached dispatch decisions."""
    from .depthwise import clear_decisions

    _CURRENT.clear()
    clear_decisions()
    return current_policy()
