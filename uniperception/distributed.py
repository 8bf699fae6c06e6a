"""Data-parallel training across processes, as launched by ``torchrun``.

``torchrun --nproc_per_node=N -m uniperception train ...`` starts N processes with ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` in their environment; :class:`~uniperception.engine.Trainer` reads them, joins the process group
(``gloo`` on the CPU, ``nccl`` on CUDA GPUs, one GPU per local rank) and wraps the model in PyTorch's
``DistributedDataParallel``. ``batch_size`` is per process: the global batch is ``batch_size * N``.

Batch normalisation normalises each process's batch on its own unless ``sync_bn`` is set. PyTorch's
``SyncBatchNorm`` runs only on GPUs; on the CPU :class:`SyncBatchNorm` here takes its place: the batch mean and
variance are summed over all processes with an autograd-aware all-reduce, so forward values and gradients equal
those of one process holding the whole global batch.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedState", "SyncBatchNorm", "convert_sync_batchnorm", "launched_by_torchrun", "rank",
    "revert_sync_batchnorm", "setup", "shard",
]


@dataclasses.dataclass
class DistributedState:
    """The process's place in the group (``world_size == 1``: not distributed)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False  # this module created the process group (and destroys it in :meth:`close`)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_sum(self, values: List[float]) -> List[float]:
        """Element-wise sums of ``values`` over every process (float64)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process."""
        if not self.enabled:
            return bool(flag)
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item())

    def gather(self, obj: Any) -> List[Any]:
        """``obj`` of every process, in rank order, on every process."""
        if not self.enabled:
            return [obj]
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Give every process rank 0's buffers: DistributedDataParallel sends them before each forward pass, but
        each process then updates its BatchNorm running statistics from its own batch."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            self.created = False

    def _device(self) -> torch.device:
        backend = dist.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank under ``torchrun`` (0 otherwise), from the environment: known before the group exists."""
    return int(os.environ.get("RANK", "0"))


def setup(device: torch.device, timeout_minutes: float = 30.0) -> DistributedState:
    """Join the process group described by torchrun's environment; a single process gets a disabled state.

    ``device`` decides the backend: ``nccl`` for CUDA (the local rank's GPU becomes current), ``gloo`` otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return DistributedState(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    if not launched_by_torchrun():
        return DistributedState()
    from .errors import UniPerceptionError

    if not dist.is_available():
        raise UniPerceptionError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UniPerceptionError(f"WORLD_SIZE > 1 but {', '.join(missing)} are not set: launch with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistributedState(dist.get_world_size(), dist.get_rank(), local_rank, created=True)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the batches of all processes, on any device (PyTorch's runs on GPUs only).

    In training the per-channel mean is the all-reduced sum over the count of every process's values, and the
    variance the all-reduced sum of squared deviations from that mean (two passes: no cancellation as with
    ``E[x^2] - E[x]^2``). The all-reduce is autograd-aware, so gradients flow across processes exactly as through
    one process's batch. Running statistics get the unbiased variance, as in :class:`torch.nn.BatchNorm2d`.
    Evaluation, and training outside a process group, are plain batch normalisation.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        dims = [d for d in range(input.dim()) if d != 1]
        shape = [1, -1] + [1] * (input.dim() - 2)
        wide = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        count = torch.tensor([input.numel() / input.shape[1]], dtype=wide.dtype, device=input.device)
        sums = all_reduce(torch.cat([wide.sum(dims), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centred = wide - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / self.num_batches_tracked.item()) if self.momentum is None else self.momentum
                unbiased = var * (total / (total - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


# only these exact classes are converted: a subclass (timm's BatchNormAct2d adds an activation) would lose what it adds
_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every plain BatchNorm of ``module`` made synchronous: PyTorch's SyncBatchNorm on CUDA, :class:`SyncBatchNorm`
    on other devices. Parameters and buffers are kept (the same tensors), so an optimizer built before stays valid;
    :func:`revert_sync_batchnorm` puts the original modules back (re-parameterisation looks for them). BatchNorm
    subclasses (e.g. timm's BatchNormAct2d) are left as they are, with a warning."""
    target = nn.SyncBatchNorm if device.type == "cuda" else SyncBatchNorm
    skipped = set()

    def convert(child: nn.Module) -> Optional[nn.Module]:
        if type(child) not in _PLAIN_BATCHNORMS:
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, (nn.SyncBatchNorm,
                                                                                             SyncBatchNorm)):
                skipped.add(type(child).__name__)
            return None
        converted = target(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
        if child.affine:
            converted.weight, converted.bias = child.weight, child.bias
        if child.track_running_stats:
            converted.running_mean, converted.running_var = child.running_mean, child.running_var
            converted.num_batches_tracked = child.num_batches_tracked
        converted.train(child.training)
        object.__setattr__(converted, "_unsynced", child)  # not a submodule: stays out of the state dict
        return converted

    module = _swap(module, convert)
    if skipped:
        import warnings

        warnings.warn(f"sync_bn leaves {', '.join(sorted(skipped))} unsynchronised (BatchNorm subclasses)",
                      RuntimeWarning, stacklevel=2)
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: the original modules, which share the trained parameters and buffers."""
    def revert(child: nn.Module) -> Optional[nn.Module]:
        original = getattr(child, "_unsynced", None)
        if original is not None:
            original.train(child.training)
        return original

    return _swap(module, revert)


def _swap(module: nn.Module, replace) -> nn.Module:
    replaced = replace(module)
    if replaced is not None:
        return replaced
    for name, child in list(module.named_children()):
        new = _swap(child, replace)
        if new is not child:
            setattr(module, name, new)
    return module


def shard(length: int, state: Optional[DistributedState]) -> List[int]:
    """This process's share of ``range(length)`` for evaluation: every index once across processes, none padded."""
    if state is None or not state.enabled:
        return list(range(length))
    return list(range(state.rank, length, state.world_size))
