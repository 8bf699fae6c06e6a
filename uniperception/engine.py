"""Training and evaluation of a :class:`~uniperception.model.UniPerceiver`: resumable, deterministic on the CPU.

The recipe is timm's: AdamW (weight decay skipping norms, biases, layer scales and GRN parameters), linear warmup and
cosine decay per update, label smoothing, mixup where asked, EMA of the weights, gradient accumulation and clipping,
automatic mixed precision (bfloat16 on CPU and GPU, float16 with loss scaling on GPU), optional gradient
checkpointing.

Checkpoints: at the end of every epoch ``last.pt`` (and ``best.pt`` when the validation metric improves) are written
atomically (a temporary file renamed into place) with the model, optimizer, scheduler, EMA, loss scaler, the RNG
states and the history, so a run killed at any moment (SIGKILL included) resumes from its last complete epoch with
``resume=True``. The shuffled order depends only on ``(seed, epoch)`` (PyTorch's DistributedSampler, also in one
process), so on the CPU with ``num_workers=0`` the resumed run's losses equal an uninterrupted run's.

Unreadable samples are dropped from their batch with a warning and counted (``strict_data=True`` raises instead); a
non-finite loss stops the run with :class:`TrainingError`, the last checkpoint intact; an output folder that cannot
be written fails before training starts.

Launched by ``torchrun --nproc_per_node=N`` the same code trains with DistributedDataParallel (see
:mod:`uniperception.distributed`): every process draws its share of each epoch's shuffled order, ``batch_size`` is
per process, ``sync_bn`` synchronises BatchNorm (on the CPU too), validation is split across processes and gathered,
and only rank 0 shows progress and writes checkpoints, metrics and plots. The shuffled order is the same as one
process's, so N processes with batch B see the batches one process sees with batch N*B (when N divides the
dataset; otherwise PyTorch's DistributedSampler repeats a few samples to give every process an equal share).

Metrics go to ``metrics.csv`` and ``history.json`` every epoch, and with ``tensorboard=True`` also to TensorBoard
event files in ``OUTPUT/tensorboard`` (the loss and learning rate of every update, every epoch's metrics; needs the
``tensorboard`` package).

Example::

    from uniperception import UniPerceiver
    from uniperception.data import FolderDataset
    from uniperception.engine import Trainer, TrainConfig

    model = UniPerceiver("image", num_classes=10, image_size=64)
    train = FolderDataset("digits/train", model.adapters["image"], train=True)
    val = FolderDataset("digits/val", model.adapters["image"])
    history = Trainer(model, train, val, TrainConfig(epochs=5, batch_size=32, output="runs/digits")).fit()
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .data import collate_skipping
from .errors import UniPerceptionError
from .files import atomic_write

__all__ = ["TrainConfig", "Trainer", "TrainingError"]


class TrainingError(UniPerceptionError, RuntimeError):
    """Training cannot go on (a non-finite loss, an unwritable output folder, a checkpoint that does not fit)."""


@dataclasses.dataclass
class TrainConfig:
    """Settings of a training run (every field can come from a YAML or JSON file through the CLI)."""

    output: str = "runs/uniperception"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: Optional[float] = None
    accumulation_steps: int = 1
    clip_grad: Optional[float] = None
    amp: Optional[str] = None  # None, "bf16" or "fp16"
    grad_checkpointing: bool = False
    channels_last: bool = False  # weights and 4-D inputs in channels-last layout (faster CPU steps: BENCHMARKS.md)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    resume: bool = False
    strict_data: bool = False
    progress: Optional[bool] = None  # None: a progress bar only on a terminal
    sync_bn: bool = False  # synchronise BatchNorm statistics across torchrun processes
    season: int = 1  # forecasting: the seasonal period of the naive forecast that MASE divides by
    tensorboard: bool = False  # also write TensorBoard event files to OUTPUT/tensorboard

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.accumulation_steps < 1 or self.season < 1:
            raise UniPerceptionError("epochs, batch_size, accumulation_steps and season must be at least 1")
        if self.amp not in (None, "bf16", "fp16"):
            raise UniPerceptionError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if not 0 <= self.label_smoothing < 1 or self.mixup < 0 or self.cutmix < 0:
            raise UniPerceptionError("label_smoothing must be in [0, 1) and mixup, cutmix non-negative")


def _atomic_save(payload: Any, path: Path) -> None:
    atomic_write(path, lambda temporary: torch.save(payload, temporary))


def _rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Counting:
    """:func:`~uniperception.data.collate_skipping`, and how many unreadable (None) items it dropped."""

    def __init__(self, adapter):
        self.collate = collate_skipping(adapter)

    def __call__(self, items):
        return self.collate(items), sum(item is None for item in items)


class Trainer:
    """Fit a single-modality :class:`UniPerceiver` on ``train_data`` and evaluate on ``val_data``.

    Datasets yield ``(sample, label)`` (classification) or ``(window, target)`` (forecasting), as the datasets of
    :mod:`uniperception.data` do; ``None`` items (unreadable samples) are skipped.
    """

    def __init__(self, model, train_data: Dataset, val_data: Optional[Dataset] = None,
                 config: Optional[TrainConfig] = None):
        self.config = config or TrainConfig()
        if len(model.modalities) != 1:
            raise UniPerceptionError("Trainer trains one modality at a time; this model has "
                                     f"{model.modalities}")
        self.model, self.train_data, self.val_data = model, train_data, val_data
        self.modality = model.modalities[0]
        self.adapter = model.adapters[self.modality]
        self.task = model.task
        if self.task == "embedding":
            raise UniPerceptionError("an embedding model has no loss to train; build it for classification")
        self.device = _device(self.config.device)
        if self.config.amp == "fp16" and self.device.type != "cuda":
            raise UniPerceptionError("amp='fp16' needs a CUDA device; use amp='bf16' on the CPU")
        length = getattr(self.adapter, "length", None)
        if self.task == "forecasting" and length is not None and self.config.season > length:
            raise UniPerceptionError(f"season {self.config.season} is longer than the look-back of {length} steps: "
                                     "the seasonal-naive forecast needs one whole season of history")
        self.output = Path(self.config.output)
        self.history: List[Dict[str, Any]] = []
        self.skipped = 0
        self.dist = distributed.DistributedState()
        self.net = model  # what the training loop calls: the model, or its DistributedDataParallel wrapper
        self.writer = None

    # ---------------------------------------------------------------------------------------------------------------
    # set-up

    def _check_output(self) -> None:
        problem = None
        if self.dist.is_main:
            try:
                self.output.mkdir(parents=True, exist_ok=True)
                probe = self.output / ".write_test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as exc:
                problem = f"{self.output}: cannot write the output folder ({exc.strerror or exc})"
            if problem is None and self.config.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    problem = "tensorboard=True needs the tensorboard package: pip install tensorboard"
                else:
                    self.writer = SummaryWriter(str(self.output / "tensorboard"))
        problem = self.dist.broadcast(problem)
        if problem is not None:
            raise TrainingError(problem)

    def _build(self, steps_per_epoch: int) -> None:
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler
        from timm.utils import ModelEmaV3

        config = self.config
        self.model.to(self.device, memory_format=self._memory_format)
        if config.grad_checkpointing and hasattr(self.model.backbone, "set_grad_checkpointing"):
            self.model.backbone.set_grad_checkpointing(True)
        if self.dist.enabled:
            if config.sync_bn:
                distributed.convert_sync_batchnorm(self.model, self.device)
            from torch.nn.parallel import DistributedDataParallel

            # oneDNN returns the weight gradient of a channels-last convolution in channels-last strides; DDP then
            # copies it into its bucket with a strided copy (a few kilobytes per layer) and says so once per process
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # every parameter of a single-modality UniPerceiver takes part in each forward pass
                find_unused_parameters=False,
            )
        self.optimizer = create_optimizer_v2(self.model, opt="adamw", lr=config.lr,
                                             weight_decay=config.weight_decay, filter_bias_and_bn=True)
        self.updates_per_epoch = max(1, math.ceil(steps_per_epoch / config.accumulation_steps))
        total = config.epochs * self.updates_per_epoch
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=total, lr_min=config.min_lr, warmup_t=round(config.warmup_epochs *
                                                                                 self.updates_per_epoch),
            warmup_lr_init=config.lr * 1e-3, warmup_prefix=True, t_in_epochs=False,
        )
        self.ema = ModelEmaV3(self.model, decay=config.ema_decay) if config.ema_decay else None
        self.num_updates = 0
        self.scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
        self.mixup = None
        if self.task == "classification" and (config.mixup > 0 or config.cutmix > 0):
            classes = len(self.model.class_names[self.modality])
            self.mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                               label_smoothing=config.label_smoothing, num_classes=classes)
            self.criterion = SoftTargetCrossEntropy()
        elif self.task == "classification":
            self.criterion = (LabelSmoothingCrossEntropy(config.label_smoothing) if config.label_smoothing > 0
                              else torch.nn.CrossEntropyLoss())
        else:
            self.criterion = torch.nn.MSELoss()

    def _loader(self, data: Dataset, shuffle: bool, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.config.seed * 100003 + epoch * 101 + self.dist.rank)
        if shuffle:
            # the same permutation in every process (seeded by seed and epoch), each taking every world_size-th
            # index: N processes with batch B together see what one process sees with batch N*B
            sampler = DistributedSampler(data, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True,
                                         seed=self.config.seed)
            sampler.set_epoch(epoch)
            share = len(sampler)
        else:
            sampler = distributed.shard(len(data), self.dist)
            share = len(sampler)
        # a last training batch of one sample would give BatchNorm a single value per channel: leave it out
        drop_last = shuffle and share > self.config.batch_size and share % self.config.batch_size == 1
        return DataLoader(data, batch_size=self.config.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.config.num_workers, collate_fn=_Counting(self.adapter),
                          worker_init_fn=_seed_worker, generator=generator)

    def _autocast(self):
        if self.config.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ---------------------------------------------------------------------------------------------------------------
    # checkpoints

    def _state(self, epoch: int, best: Optional[float]) -> Dict[str, Any]:
        return {
            "epoch": epoch, "best": best, "history": self.history, "skipped": self.skipped,
            "num_updates": self.num_updates,
            "model": self.model.state_dict(), "model_config": self.model.config,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": self._rngs[0], "rng_per_rank": self._rngs, "world_size": self.dist.world_size,
            "config": dataclasses.asdict(self.config),
        }

    def _resume(self) -> tuple:
        path = self.output / "last.pt"
        if not (self.config.resume and path.is_file()):
            return 0, None
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # an unreadable checkpoint must not be silently replaced by a fresh run
            raise TrainingError(f"{path}: cannot resume from this checkpoint ({exc})") from exc
        if state.get("model_config", {}).get("modalities") != self.model.config["modalities"]:
            raise TrainingError(f"{path}: the checkpoint belongs to another model configuration")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) == self.dist.world_size:
            _set_rng_state(per_rank[self.dist.rank])
        elif self.dist.is_main:
            warnings.warn(f"{path} was written by {len(per_rank)} process(es), this run has {self.dist.world_size}: "
                          "random augmentation will not repeat the interrupted run's", RuntimeWarning, stacklevel=3)
        self.history, self.skipped = list(state["history"]), int(state.get("skipped", 0))
        self.num_updates = int(state["num_updates"])
        return int(state["epoch"]) + 1, state["best"]

    # ---------------------------------------------------------------------------------------------------------------
    # the loops

    def fit(self) -> List[Dict[str, Any]]:
        """Train for ``config.epochs`` epochs (continuing a saved run with ``resume=True``); returns the history: one
        dict per epoch with ``train_loss``, ``lr``, ``skipped`` and the validation metrics."""
        self.dist = distributed.setup(self.device)
        try:
            self._fit()
        finally:
            if self.writer is not None:
                self.writer.close()
            distributed.revert_sync_batchnorm(self.model)
            if getattr(self, "ema", None) is not None:
                distributed.revert_sync_batchnorm(self.ema.module)
            self.net = self.model
        self.dist.close()  # only after success: a failed process must not wait for the others at a barrier
        self.dist = distributed.DistributedState()
        return self.history

    def _fit(self) -> None:
        self._check_output()
        seed = self.config.seed + self.dist.rank  # each process draws its own augmentation
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        steps = len(self._loader(self.train_data, True, 0))
        if not self.dist.all_true(steps > 0):
            raise UniPerceptionError("the training set is empty" if not self.dist.enabled else
                                     "the training set is empty or smaller than the number of processes")
        self._build(steps)
        start, best = self._resume()
        for epoch in range(start, self.config.epochs):
            record = {"epoch": epoch, **self._train_epoch(epoch)}
            self.dist.broadcast_buffers(self.model)  # BatchNorm statistics as rank 0 has them, in every process
            if self.ema is not None:
                self.dist.broadcast_buffers(self.ema.module)
            metrics = None
            if self.val_data is not None:
                metrics = self.evaluate(self.val_data, use_ema=self.ema is not None)
                record.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            self.history.append(record)
            score = self._score(record)
            improved = score is not None and (best is None or score < best)
            if improved:
                best = score
            self._rngs = self.dist.gather(_rng_state())
            if self.dist.is_main:
                _atomic_save(self._state(epoch, best), self.output / "last.pt")
                if improved:
                    _atomic_save(self._state(epoch, best), self.output / "best.pt")
                self._write_history(metrics)
            self.dist.barrier()  # no process runs ahead of the checkpoint it would resume from

    def _score(self, record: Dict[str, Any]) -> Optional[float]:
        """Lower is better: negative top-1 for classification, MAE for forecasting, else the validation loss."""
        if "val_top1" in record:
            return -record["val_top1"]
        if "val_mae" in record:
            return record["val_mae"]
        return record.get("val_loss")

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        self.model.train()
        loader = self._loader(self.train_data, True, epoch)
        accumulation = self.config.accumulation_steps
        total_loss, seen, skipped = 0.0, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="batch", leave=False,
                   disable=True if not self.dist.is_main else
                   (not self.config.progress) if self.config.progress is not None else None)
        for step, (batch, dropped) in enumerate(bar):
            skipped += dropped
            if dropped and self.config.strict_data:
                raise TrainingError(f"{dropped} unreadable sample(s) in epoch {epoch + 1} (strict_data)")
            if not self.dist.all_true(batch is not None):
                continue  # every process skips together: the others must not wait in a collective alone
            inputs, targets = self._on_device(batch)
            if self.mixup is not None and inputs.shape[0] % 2 == 0:
                inputs, targets = self.mixup(inputs, targets)
            elif self.mixup is not None:  # timm's mixup needs an even batch: use hard labels for this one
                targets = F.one_hot(targets, len(self.model.class_names[self.modality])).float()
            update = (step + 1) % accumulation == 0 or step + 1 == len(loader)
            # between updates, DDP need not all-reduce the gradients it only accumulates
            sync = contextlib.nullcontext() if update or not self.dist.enabled else self.net.no_sync()
            with sync:
                with self._autocast():
                    outputs = self.net(inputs)
                    loss = self.criterion(outputs.float(), targets.float() if self.task == "forecasting" or
                                          targets.is_floating_point() else targets)
                if not self.dist.all_true(bool(torch.isfinite(loss))):
                    where = "" if not self.dist.enabled else f" (in at least one of {self.dist.world_size} processes)"
                    raise TrainingError(
                        f"the loss became {loss.item()}{where} in epoch {epoch + 1}, step {step + 1}; training "
                        f"stopped with the last checkpoint ({self.output / 'last.pt'}) intact. Lower the learning "
                        "rate, enable gradient clipping or check the data for NaN/Inf"
                    )
                scaled = loss / accumulation
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            if update:
                self._update()
                if self.writer is not None:
                    self.writer.add_scalar("train/loss", loss.item(), self.num_updates)
                    self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.num_updates)
            total_loss += loss.item() * inputs.shape[0]
            seen += inputs.shape[0]
            bar.set_postfix(loss=f"{total_loss / max(seen, 1):.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        total_loss, seen, skipped = self.dist.all_sum([total_loss, seen, skipped])
        skipped = int(skipped)
        if skipped and self.dist.is_main:
            warnings.warn(f"epoch {epoch + 1}: skipped {skipped} unreadable sample(s)", RuntimeWarning, stacklevel=2)
        self.skipped += skipped
        return {"train_loss": total_loss / max(seen, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "skipped": skipped}

    def _update(self) -> None:
        if self.config.clip_grad:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        self.scheduler.step_update(num_updates=self.num_updates)
        if self.ema is not None:
            self.ema.update(self.model, step=self.num_updates)

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.config.channels_last else torch.preserve_format

    def _on_device(self, batch):
        """``(inputs, targets)`` on the device; 4-D inputs channels-last when the config asks for it."""
        inputs, targets = (t.to(self.device) for t in batch)
        if self.config.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets

    @torch.no_grad()
    def evaluate(self, data: Dataset, use_ema: bool = False) -> Dict[str, Any]:
        """Loss and metrics on ``data``: top-1, top-5, macro accuracy and the confusion matrix for classification;
        MSE, MAE and MASE against a seasonal-naive forecast for forecasting."""
        from .metrics import ClassificationMetrics, ForecastMetrics

        model = self.ema.module if use_ema and getattr(self, "ema", None) is not None else self.model
        was_training = model.training
        model.eval().to(self.device, memory_format=self._memory_format)
        if self.task == "classification":
            metrics = ClassificationMetrics(len(self.model.class_names[self.modality]),
                                            self.model.class_names[self.modality])
        else:
            metrics = ForecastMetrics(season=self.config.season)
        loader = self._loader(data, False, 0)
        bar = tqdm(loader, desc="evaluating", unit="batch", leave=False,
                   disable=True if not self.dist.is_main else
                   (not self.config.progress) if self.config.progress is not None else None)
        try:
            for batch, _ in bar:
                if batch is None:
                    continue
                inputs, targets = self._on_device(batch)
                with self._autocast():
                    outputs = model(inputs).float()
                if self.task == "classification":
                    metrics.update(outputs.cpu(), targets.cpu(), loss=F.cross_entropy(outputs, targets).item())
                else:
                    history = inputs[..., : targets.shape[-1]]
                    metrics.update(outputs.cpu(), targets.float().cpu(), history.float().cpu())
        finally:
            model.train(was_training)
        shares = self.dist.gather(metrics)  # each process's counts (a confusion matrix, sums), not its outputs
        metrics = shares[0]
        for share in shares[1:]:
            metrics.merge(share)
        result = metrics.compute()
        if self.task == "forecasting" and "loss" not in result:
            result["loss"] = result["mse"]
        return result

    def _write_history(self, metrics: Optional[Dict[str, Any]]) -> None:
        """metrics.csv and history.json (every epoch), the latest validation metrics as JSON, and PNG plots of the
        training curves and (classification) the confusion matrix."""
        import pandas as pd

        from .metrics import plot_confusion_matrix, plot_training_curves, write_metrics_json

        plot_training_curves(self.history, self.output / "curves.png")
        if self.writer is not None:
            record = self.history[-1]
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{key}", value, record["epoch"] + 1)
            self.writer.flush()
        if metrics is not None:
            write_metrics_json(self.output / "val_metrics.json", dict(metrics, epoch=self.history[-1]["epoch"]))
            if "confusion_matrix" in metrics:
                plot_confusion_matrix(metrics["confusion_matrix"], self.model.class_names[self.modality],
                                      self.output / "confusion_matrix.png")

        for name, text in (("metrics.csv", pd.DataFrame(self.history).to_csv(index=False)),
                           ("history.json", json.dumps(self.history, indent=1, default=float))):
            atomic_write(self.output / name, lambda temporary, text=text: Path(temporary).write_text(text))


def _device(request: str) -> torch.device:
    """``auto``: the GPU when there is one (the local rank's under torchrun), else the CPU."""
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(request)
    if device.type == "cuda" and device.index is None and distributed.launched_by_torchrun():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
