"""Shared helpers for the test suite: reference key lists and randomised model statistics."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import backbones  # noqa: F401  (registers the timm factories)
from backbones.unireplknet import GRNwithNHWC, UniRepLKNetBlock

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def dataset_cache(tmp_path_factory):
    """Built-in datasets are built once per test session into a temporary cache (an UNIPERCEPTION_CACHE already
    set, e.g. a warm one, is used instead)."""
    if "UNIPERCEPTION_CACHE" not in os.environ:
        os.environ["UNIPERCEPTION_CACHE"] = str(tmp_path_factory.mktemp("uniperception_cache"))
    from uniperception import datasets

    return datasets.cache_root()


def reference_keys(variant: str, form: str) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every tensor of an official UniRepLKNet checkpoint (``form`` is train or deploy)."""
    rows = []
    for line in (FIXTURES / f"keys_unireplknet_{variant}_{form}.txt").read_text().splitlines():
        name, shape = line.split("\t")
        rows.append((name, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def state_dict_from_reference(variant: str, form: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A state dict with exactly the official keys and shapes, filled with plausible random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in reference_keys(variant, form):
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(1000, dtype=torch.long)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.05
    return sd


def randomise_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, every GRN a non-zero gamma and beta, and
    every block a layer scale far from its 1e-6 initialisation, so re-parameterisation is tested on real work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=g) + 0.5)
                module.bias.copy_(torch.randn(c, generator=g) * 0.2)
            elif isinstance(module, GRNwithNHWC):
                module.gamma.copy_(torch.randn(module.gamma.shape, generator=g) * 0.2)
                if module.use_bias:
                    module.beta.copy_(torch.randn(module.beta.shape, generator=g) * 0.2)
            elif isinstance(module, UniRepLKNetBlock) and module.gamma is not None:
                module.gamma.copy_(torch.rand(module.gamma.shape, generator=g) * 0.4 + 0.1)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture
def single_thread():
    """One thread for tests on tiny tensors: faster than several contending for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_id: str, filename: str, data: bytes, commit: str = HUB_COMMIT) -> Path:
    """Store ``data`` as ``filename`` of ``repo_id`` at ``commit`` (the ``main`` branch) the way huggingface_hub
    does: content-addressed blob, snapshot symlink, ref file. Returns the snapshot path."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
