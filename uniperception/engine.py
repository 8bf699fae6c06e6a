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

A model of several modalities trains on all of them at once (a dataset per modality; see :class:`Trainer` and
:func:`modality_schedule`), and with ``align > 0`` is pulled into one embedding space across modalities
(:mod:`uniperception.alignment`).

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
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from . import distributed
from .data import collate_skipping
from .errors import UniPerceptionError
from .files import atomic_write

__all__ = ["SCHEDULES", "TrainConfig", "Trainer", "TrainingError", "modality_schedule"]

SCHEDULES = ("proportional", "round_robin")


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
    mixup: Union[float, Dict[str, float]] = 0.0  # one alpha, or one per modality ({"image": 0.8, "audio": 0.6})
    cutmix: Union[float, Dict[str, float]] = 0.0
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
    # several modalities: "proportional" (every batch of every set once per epoch, the modalities interleaved at
    # random in proportion to their batches) or "round_robin" (the modalities take turns batch by batch; an epoch
    # ends when the largest set has been seen once, the smaller ones starting over reshuffled)
    schedule: str = "proportional"
    # several modalities: weight of the contrastive term that aligns each modality's embeddings with those of an
    # anchor modality (align_to; default image, else the first), positives being samples of the same class name
    align: float = 0.0
    align_to: Optional[str] = None
    temperature: float = 0.07  # of the contrastive term

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.accumulation_steps < 1 or self.season < 1:
            raise UniPerceptionError("epochs, batch_size, accumulation_steps and season must be at least 1")
        if self.amp not in (None, "bf16", "fp16"):
            raise UniPerceptionError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        alphas = [v for a in (self.mixup, self.cutmix) for v in (a.values() if isinstance(a, dict) else [a])]
        if not 0 <= self.label_smoothing < 1 or any(not isinstance(v, (int, float)) or v < 0 for v in alphas):
            raise UniPerceptionError("label_smoothing must be in [0, 1) and mixup, cutmix non-negative numbers (or "
                                     "dicts of them keyed by modality)")
        if self.align < 0 or self.temperature <= 0:
            raise UniPerceptionError("align must be non-negative and temperature positive")
        if self.schedule not in SCHEDULES:
            raise UniPerceptionError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")


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


def modality_schedule(batches: Dict[str, int], schedule: str, seed: int, epoch: int) -> List[str]:
    """The modality of each step of an epoch, given each modality's number of batches: a function of
    ``(seed, epoch)`` alone, so every process of a distributed run and a resumed run take the same order.

    ``proportional``: each modality's batches once, interleaved at random (a seeded permutation), so a modality's
    share of the updates is its share of the data. ``round_robin``: the modalities in turn, ``max(batches)`` steps
    each, so every modality gets as many updates as the largest.
    """
    names = sorted(batches)
    if schedule == "round_robin":
        return [name for _ in range(max(batches.values())) for name in names]
    if schedule != "proportional":
        raise UniPerceptionError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    order = [name for name in names for _ in range(batches[name])]
    permutation = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return [order[i] for i in permutation.tolist()]


class Trainer:
    """Fit a :class:`UniPerceiver` on ``train_data`` and evaluate on ``val_data``.

    Datasets yield ``(sample, label)`` (classification) or ``(window, target)`` (forecasting), as the datasets of
    :mod:`uniperception.data` do; ``None`` items (unreadable samples) are skipped.

    A model of several modalities trains on all of them at once: ``train_data`` (and ``val_data``) is then a dict
    keyed by modality, one dataset each (a subset of the model's modalities is fine). Every step takes one batch of
    one modality through its adapter, stem, the shared backbone and its head; ``config.schedule`` orders the
    modalities within an epoch (:func:`modality_schedule`). Metrics are kept per modality (``val_<modality>_top1``,
    ``train_loss_<modality>``, ...) and as their mean over modalities (``val_top1``, ``val_loss``), which picks the
    best checkpoint.
    """

    def __init__(self, model, train_data: Union[Dataset, Dict[str, Dataset]],
                 val_data: Union[Dataset, Dict[str, Dataset], None] = None, config: Optional[TrainConfig] = None):
        self.config = config or TrainConfig()
        self.model = model
        self.train_sets = _per_modality(model, train_data, "train_data")
        self.val_sets = _per_modality(model, val_data, "val_data") if val_data is not None else {}
        self.modalities = sorted(self.train_sets)
        missing = sorted(set(self.val_sets) - set(self.train_sets))
        if missing:
            raise UniPerceptionError(f"val_data has modalities without training data: {missing}")
        self.joint = len(model.modalities) > 1
        self.task = model.task
        self.anchor, self.partners = None, {}
        if self.config.align > 0:
            self._set_up_alignment()
        elif self.task == "embedding":
            raise UniPerceptionError("an embedding model has no loss to train on its own: build it for "
                                     "classification, or align it with another modality (align > 0)")
        self.device = _device(self.config.device)
        if self.config.amp == "fp16" and self.device.type != "cuda":
            raise UniPerceptionError("amp='fp16' needs a CUDA device; use amp='bf16' on the CPU")
        length = getattr(model.adapters[self.modalities[0]], "length", None)
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

    def _set_up_alignment(self) -> None:
        """The anchor modality and, for every other one, the same-class partners it is paired with."""
        from .alignment import SameClassPartners, match_classes

        if len(self.train_sets) < 2:
            raise UniPerceptionError("align > 0 needs training data of at least two modalities")
        anchor = self.config.align_to or ("image" if "image" in self.train_sets else self.modalities[0])
        if anchor not in self.train_sets:
            raise UniPerceptionError(f"align_to={anchor!r} has no training data; modalities: {self.modalities}")
        if self.task not in ("classification", "embedding"):
            raise UniPerceptionError(f"alignment needs a classification or embedding model, not {self.task}")
        mixing = [m for m in self.modalities if m != anchor and
                  (_for_modality(self.config.mixup, m) > 0 or _for_modality(self.config.cutmix, m) > 0)]
        if mixing:
            raise UniPerceptionError(f"alignment pairs samples by class, which mixup/cutmix blur: turn them off "
                                     f"for {mixing} (mixup: {{{anchor!r}: ...}} keeps them for the anchor)")
        self.anchor = anchor
        anchor_set = self.train_sets[anchor]
        anchor_labels = _item_labels(anchor_set, anchor)
        for modality in self.modalities:
            if modality == anchor:
                continue
            data = self.train_sets[modality]
            shared, to_shared_a, to_shared_b = match_classes(_class_names(data, modality),
                                                             _class_names(anchor_set, anchor))
            labels = [to_shared_a.get(label, -1) for label in _item_labels(data, modality)]
            self.partners[modality] = (
                {int(k): int(v) for k, v in to_shared_a.items()},
                SameClassPartners(labels, [to_shared_b.get(label, -1) for label in anchor_labels],
                                  seed=self.config.seed),
            )

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
                # every parameter of a single-modality UniPerceiver takes part in each forward pass; with several,
                # a step leaves the other modalities' adapters, stems and heads without gradients
                find_unused_parameters=self.joint,
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
        self.mixups: Dict[str, Any] = {}
        if self.task == "classification":
            for m in self.modalities:
                mixup, cutmix = _for_modality(config.mixup, m), _for_modality(config.cutmix, m)
                if mixup > 0 or cutmix > 0:
                    self.mixups[m] = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix,
                                           label_smoothing=config.label_smoothing,
                                           num_classes=len(self.model.class_names[m]))
        if self.mixups:  # soft targets: mixed ones, and one-hot ones (smoothed) for modalities without mixing
            self.criterion = SoftTargetCrossEntropy()
        elif self.task == "classification":
            self.criterion = (LabelSmoothingCrossEntropy(config.label_smoothing) if config.label_smoothing > 0
                              else torch.nn.CrossEntropyLoss())
        else:
            self.criterion = torch.nn.MSELoss()

    def _loader(self, data: Dataset, shuffle: bool, epoch: int, modality: str, restart: int = 0) -> DataLoader:
        """Batches of one modality's set; ``restart`` numbers the passes after the first within an epoch
        (round-robin), each shuffled anew."""
        generator = torch.Generator().manual_seed(self.config.seed * 100003 + epoch * 101 + self.dist.rank
                                                  + restart * 7)
        if shuffle:
            # the same permutation in every process (seeded by seed and epoch), each taking every world_size-th
            # index: N processes with batch B together see what one process sees with batch N*B
            sampler = DistributedSampler(data, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True,
                                         seed=self.config.seed)
            sampler.set_epoch(epoch + restart * 100003)
            share = len(sampler)
        else:
            sampler = distributed.shard(len(data), self.dist)
            share = len(sampler)
        # a last training batch of one sample would give BatchNorm a single value per channel: leave it out
        drop_last = shuffle and share > self.config.batch_size and share % self.config.batch_size == 1
        return DataLoader(data, batch_size=self.config.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.config.num_workers, collate_fn=_Counting(self.model.adapters[modality]),
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
        if state.get("config", {}).get("schedule", "proportional") != self.config.schedule and self.joint:
            raise TrainingError(f"{path}: the run was trained with schedule={state['config']['schedule']!r}, not "
                                f"{self.config.schedule!r}: resume it with the same schedule")
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
        batches = {m: len(self._loader(data, True, 0, m)) for m, data in self._scheduled_sets().items()}
        for modality, count in batches.items():
            if not self.dist.all_true(count > 0):
                which = f"the {modality} training set" if self.joint else "the training set"
                raise UniPerceptionError(f"{which} is empty" if not self.dist.enabled else
                                         f"{which} is empty or smaller than the number of processes")
        self._build(len(modality_schedule(batches, self.config.schedule, self.config.seed, 0)))
        start, best = self._resume()
        for epoch in range(start, self.config.epochs):
            record = {"epoch": epoch, **self._train_epoch(epoch)}
            self.dist.broadcast_buffers(self.model)  # BatchNorm statistics as rank 0 has them, in every process
            if self.ema is not None:
                self.dist.broadcast_buffers(self.ema.module)
            metrics = {m: self.evaluate(data, use_ema=self.ema is not None, modality=m)
                       for m, data in sorted(self.val_sets.items())} if self.task != "embedding" else {}
            record.update(_validation_record(metrics, self.joint))
            if self.anchor is not None and self.anchor in self.val_sets:
                record.update(self.alignment_metrics(use_ema=self.ema is not None))
            self.history.append(record)
            self.model.mark_trained()
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
        """Lower is better: negative top-1 for classification, MAE for forecasting, negative cross-modal recall@1
        for an aligned embedding model, else the validation loss."""
        if "val_top1" in record:
            return -record["val_top1"]
        if "val_recall@1" in record:
            return -record["val_recall@1"]
        if "val_mae" in record:
            return record["val_mae"]
        return record.get("val_loss")

    def _scheduled_sets(self) -> Dict[str, Dataset]:
        """The training sets whose batches make the steps: all of them, except the anchor of an aligned embedding
        model, which has no loss of its own and trains as the partner of the others."""
        return {m: data for m, data in self.train_sets.items()
                if not (self.task == "embedding" and m == self.anchor)}

    def _loss(self, modality: str, inputs: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, epoch: int,
              step: int) -> torch.Tensor:
        """The step's loss: the task's on the batch and, for a modality aligned to the anchor, ``align`` times the
        contrastive loss between the batch's embeddings and those of same-class anchor samples drawn for it (one
        forward pass of both, so DistributedDataParallel sees one graph)."""
        from .alignment import contrastive_loss

        def task_loss(outputs):
            return self.criterion(outputs.float(), targets.float() if self.task == "forecasting" or
                                  targets.is_floating_point() else targets)

        if modality not in self.partners:
            return task_loss(self.net(inputs, modality=modality))
        to_shared, partners = self.partners[modality]
        shared = torch.tensor([to_shared.get(int(label), -1) for label in labels.tolist()])
        keep = shared >= 0
        anchor_set = self.train_sets[self.anchor]
        drawn = [(anchor_set[int(i)], label) for i, label in
                 zip(partners.draw(shared[keep], epoch, step).tolist(), shared[keep].tolist(), strict=True)]
        drawn = [(item[0], label) for item, label in drawn if item is not None]  # unreadable partners are left out
        if not drawn:
            return task_loss(self.net(inputs, modality=modality)) if self.task != "embedding" else \
                self.net(inputs, modality=modality).sum() * 0.0
        partner_batch, partner_labels = self._on_device((self.model.adapters[self.anchor].collate(
            [sample for sample, _ in drawn]), torch.tensor([label for _, label in drawn])))
        both = self.net({modality: inputs, self.anchor: partner_batch}, with_embedding=True)
        (outputs, embeddings), (_, anchor_embeddings) = both[modality], both[self.anchor]
        aligned = contrastive_loss(embeddings[keep.to(embeddings.device)].float(), anchor_embeddings.float(),
                                   shared[keep].to(embeddings.device), partner_labels,
                                   temperature=self.config.temperature)
        aligned = self.config.align * aligned
        return aligned if self.task == "embedding" else task_loss(outputs) + aligned

    @contextlib.contextmanager
    def _evaluating(self, use_ema: bool):
        """The model (its EMA with ``use_ema``, where there is one) in evaluation mode on the device, its mode
        restored afterwards."""
        model = self.ema.module if use_ema and getattr(self, "ema", None) is not None else self.model
        was_training = model.training
        model.eval().to(self.device, memory_format=self._memory_format)
        try:
            yield model
        finally:
            model.train(was_training)

    @torch.no_grad()
    def embeddings(self, data: Dataset, modality: str, use_ema: bool = False) -> tuple:
        """``(embeddings (N, C), labels (N,))`` of a labelled dataset of ``modality``, gathered from every
        process (in no particular order)."""
        vectors, labels = [], []
        with self._evaluating(use_ema) as model:
            for batch, _ in self._loader(data, False, 0, modality):
                if batch is None:
                    continue
                inputs, targets = self._on_device(batch)
                with self._autocast():
                    vectors.append(model(inputs, modality=modality, with_embedding=True)[1].float().cpu())
                labels.append(targets.cpu())
        shares = self.dist.gather((torch.cat(vectors) if vectors else torch.empty(0),
                                   torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)))
        return torch.cat([v for v, _ in shares if v.numel()]), torch.cat([l for _, l in shares])

    def alignment_metrics(self, use_ema: bool = False) -> Dict[str, float]:
        """On the validation sets: for each modality aligned to the anchor, class-level retrieval of anchor
        samples (``val_<m>_to_<anchor>_recall@1`` and ``@5``) and zero-shot classification by the anchor's class
        prototypes (``val_<m>_zero_shot_top1``), and the mean recall@1 (``val_recall@1``)."""
        from .alignment import class_prototypes, match_classes, prototype_accuracy, recall_at_k

        anchor_data = self.val_sets[self.anchor]
        anchor_vectors, anchor_labels = self.embeddings(anchor_data, self.anchor, use_ema)
        record: Dict[str, float] = {}
        for modality in sorted(set(self.val_sets) & set(self.partners)):
            data = self.val_sets[modality]
            shared, to_shared, to_shared_anchor = match_classes(_class_names(data, modality),
                                                                _class_names(anchor_data, self.anchor))
            vectors, labels = self.embeddings(data, modality, use_ema)
            query = torch.tensor([to_shared.get(int(l), -1) for l in labels.tolist()])
            gallery = torch.tensor([to_shared_anchor.get(int(l), -1) for l in anchor_labels.tolist()])
            q, g = query >= 0, gallery >= 0
            for name, value in recall_at_k(vectors[q], anchor_vectors[g], query[q], gallery[g]).items():
                record[f"val_{modality}_to_{self.anchor}_{name}"] = value
            prototypes = class_prototypes(anchor_vectors[g], gallery[g], len(shared))
            record[f"val_{modality}_zero_shot_top1"] = prototype_accuracy(prototypes, vectors[q], query[q])
        recalls = [v for k, v in record.items() if k.endswith("_recall@1")]
        if recalls:
            record["val_recall@1"] = sum(recalls) / len(recalls)
        return record

    def _batches(self, epoch: int):
        """``(modality, (batch, dropped))`` for every step of the epoch, in the schedule's order."""
        loaders = {m: self._loader(data, True, epoch, m) for m, data in self._scheduled_sets().items()}
        order = modality_schedule({m: len(l) for m, l in loaders.items()}, self.config.schedule, self.config.seed,
                                  epoch)
        iterators = {m: iter(loader) for m, loader in loaders.items()}
        restarts = {m: 0 for m in loaders}

        def steps():
            for modality in order:
                try:
                    yield modality, next(iterators[modality])
                except StopIteration:  # round-robin: a smaller set starts over, reshuffled
                    restarts[modality] += 1
                    loader = self._loader(self.train_sets[modality], True, epoch, modality, restarts[modality])
                    iterators[modality] = iter(loader)
                    yield modality, next(iterators[modality])

        return order, steps()

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        self.model.train()
        order, steps = self._batches(epoch)
        accumulation = self.config.accumulation_steps
        scheduled = sorted(self._scheduled_sets())
        losses = {m: 0.0 for m in scheduled}
        counts = {m: 0 for m in scheduled}
        skipped = 0
        self.optimizer.zero_grad(set_to_none=True)
        bar = tqdm(steps, total=len(order), desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="batch",
                   leave=False, disable=True if not self.dist.is_main else
                   (not self.config.progress) if self.config.progress is not None else None)
        for step, (modality, (batch, dropped)) in enumerate(bar):
            skipped += dropped
            if dropped and self.config.strict_data:
                raise TrainingError(f"{dropped} unreadable sample(s) in epoch {epoch + 1} (strict_data)")
            if not self.dist.all_true(batch is not None):
                continue  # every process skips together: the others must not wait in a collective alone
            inputs, targets = self._on_device(batch)
            labels = targets
            mixup = self.mixups.get(modality)
            if mixup is not None and inputs.shape[0] % 2 == 0:
                inputs, targets = mixup(inputs, targets)
            elif self.mixups and self.task == "classification":
                # timm's mixup needs an even batch, and a modality may train without it: smoothed hard labels
                targets = _smoothed_one_hot(targets, len(self.model.class_names[modality]),
                                            self.config.label_smoothing)
            update = (step + 1) % accumulation == 0 or step + 1 == len(order)
            # between updates, DDP need not all-reduce the gradients it only accumulates
            sync = contextlib.nullcontext() if update or not self.dist.enabled else self.net.no_sync()
            with sync:
                with self._autocast():
                    loss = self._loss(modality, inputs, targets, labels, epoch, step)
                if not self.dist.all_true(bool(torch.isfinite(loss))):
                    where = "" if not self.dist.enabled else f" (in at least one of {self.dist.world_size} processes)"
                    raise TrainingError(
                        f"the loss became {loss.item()}{where} in epoch {epoch + 1}, step {step + 1}"
                        f"{f' ({modality})' if self.joint else ''}; training "
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
            losses[modality] += loss.item() * inputs.shape[0]
            counts[modality] += inputs.shape[0]
            bar.set_postfix(loss=f"{sum(losses.values()) / max(sum(counts.values()), 1):.4f}",
                            lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
        sums = self.dist.all_sum([losses[m] for m in scheduled] + [counts[m] for m in scheduled] + [skipped])
        losses = dict(zip(scheduled, sums[:len(scheduled)], strict=True))
        counts = dict(zip(scheduled, sums[len(scheduled):-1], strict=True))
        skipped = int(sums[-1])
        if skipped and self.dist.is_main:
            warnings.warn(f"epoch {epoch + 1}: skipped {skipped} unreadable sample(s)", RuntimeWarning, stacklevel=2)
        self.skipped += skipped
        record = {"train_loss": sum(losses.values()) / max(sum(counts.values()), 1),
                  "lr": self.optimizer.param_groups[0]["lr"], "skipped": skipped}
        if self.joint:
            record.update({f"train_loss_{m}": losses[m] / max(counts[m], 1) for m in scheduled})
        return record

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
    def evaluate(self, data: Dataset, use_ema: bool = False, modality: Optional[str] = None) -> Dict[str, Any]:
        """Loss and metrics on ``data`` of ``modality`` (needed only with several): top-1, top-5, macro accuracy
        and the confusion matrix for classification; MSE, MAE and MASE against a seasonal-naive forecast for
        forecasting."""
        from .metrics import ClassificationMetrics, ForecastMetrics

        if modality is None:
            if len(self.model.modalities) > 1:
                raise UniPerceptionError(f"evaluate needs modality= for a model of {self.model.modalities}")
            modality = self.model.modalities[0]
        if self.task == "classification":
            metrics = ClassificationMetrics(len(self.model.class_names[modality]), self.model.class_names[modality])
        else:
            metrics = ForecastMetrics(season=self.config.season)
        loader = self._loader(data, False, 0, modality)
        bar = tqdm(loader, desc="evaluating", unit="batch", leave=False,
                   disable=True if not self.dist.is_main else
                   (not self.config.progress) if self.config.progress is not None else None)
        with self._evaluating(use_ema) as model:
            for batch, _ in bar:
                if batch is None:
                    continue
                inputs, targets = self._on_device(batch)
                with self._autocast():
                    outputs = model(inputs, modality=modality).float()
                if self.task == "classification":
                    metrics.update(outputs.cpu(), targets.cpu(), loss=F.cross_entropy(outputs, targets).item())
                else:
                    history = inputs[..., : targets.shape[-1]]
                    metrics.update(outputs.cpu(), targets.float().cpu(), history.float().cpu())
        shares = self.dist.gather(metrics)  # each process's counts (a confusion matrix, sums), not its outputs
        metrics = shares[0]
        for share in shares[1:]:
            metrics.merge(share)
        result = metrics.compute()
        if self.task == "forecasting" and "loss" not in result:
            result["loss"] = result["mse"]
        return result

    def _write_history(self, metrics: Dict[str, Dict[str, Any]]) -> None:
        """metrics.csv and history.json (every epoch), the latest validation metrics as JSON (keyed by modality
        when there are several), and PNG plots of the training curves and (classification) the confusion matrix of
        each modality (``confusion_matrix_<modality>.png`` when there are several)."""
        import pandas as pd

        from .metrics import plot_confusion_matrix, plot_training_curves, write_metrics_json

        plot_training_curves(self.history, self.output / "curves.png")
        if self.writer is not None:
            record = self.history[-1]
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{key}", value, record["epoch"] + 1)
            self.writer.flush()
        if metrics:
            epoch = self.history[-1]["epoch"]
            write_metrics_json(self.output / "val_metrics.json",
                               dict(metrics, epoch=epoch) if self.joint else dict(*metrics.values(), epoch=epoch))
            for modality, values in metrics.items():
                if "confusion_matrix" in values:
                    name = f"confusion_matrix_{modality}.png" if self.joint else "confusion_matrix.png"
                    plot_confusion_matrix(values["confusion_matrix"], self.model.class_names[modality],
                                          self.output / name)

        for name, text in (("metrics.csv", pd.DataFrame(self.history).to_csv(index=False)),
                           ("history.json", json.dumps(self.history, indent=1, default=float))):
            atomic_write(self.output / name, lambda temporary, text=text: Path(temporary).write_text(text))


def _for_modality(value: Union[float, Dict[str, float]], modality: str) -> float:
    return float(value.get(modality, 0.0) if isinstance(value, dict) else value)


def _smoothed_one_hot(labels: torch.Tensor, classes: int, smoothing: float) -> torch.Tensor:
    """The targets timm's ``Mixup`` makes for an unmixed batch: one-hot with label smoothing."""
    off = smoothing / classes
    return torch.full((labels.shape[0], classes), off, device=labels.device).scatter_(1, labels[:, None],
                                                                                         1.0 - smoothing + off)


def _class_names(data: Dataset, modality: str) -> List[str]:
    while isinstance(data, Subset):
        data = data.dataset
    names = getattr(data, "class_names", None)
    if not names:
        raise UniPerceptionError(f"alignment pairs samples by class: the {modality} dataset must have class_names "
                                 "(FolderDataset, ManifestDataset)")
    return list(names)


def _item_labels(data: Dataset, modality: str) -> List[int]:
    """Every item's label without reading a file: ``(path, label)`` items, or a ``labels``/``targets`` list (of
    a :class:`~torch.utils.data.Subset`'s dataset, taken at its indices)."""
    if isinstance(data, Subset):
        labels = _item_labels(data.dataset, modality)
        return [labels[i] for i in data.indices]
    items = getattr(data, "items", None)
    if items is not None:
        return [int(label) for _, label in items]
    for name in ("labels", "targets"):
        if getattr(data, name, None) is not None:
            return [int(label) for label in getattr(data, name)]
    raise UniPerceptionError(f"alignment draws same-class partners: the {modality} dataset must list its labels "
                             "(items of (path, label), or a labels attribute)")


def _per_modality(model, data: Any, what: str) -> Dict[str, Dataset]:
    """``data`` keyed by modality: a dict as given (modalities of the model only), or one dataset for a model of
    one modality."""
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(model.modalities))
        if unknown or not data:
            raise UniPerceptionError(f"{what} must be keyed by the model's modalities {model.modalities}, got "
                                     f"{sorted(data)}")
        return dict(data)
    if len(model.modalities) > 1:
        raise UniPerceptionError(f"this model has several modalities {model.modalities}: give {what} as a dict "
                                 "{modality: dataset}")
    return {model.modalities[0]: data}


def _validation_record(metrics: Dict[str, Dict[str, Any]], joint: bool) -> Dict[str, float]:
    """The numbers of each modality's validation metrics as ``val_<name>`` (one modality) or
    ``val_<modality>_<name>`` plus their mean over modalities as ``val_<name>`` (several)."""
    numbers = {m: {k: v for k, v in values.items() if isinstance(v, (int, float))} for m, values in metrics.items()}
    if not joint:
        return {f"val_{k}": v for values in numbers.values() for k, v in values.items()}
    record = {f"val_{m}_{k}": v for m, values in numbers.items() for k, v in values.items()}
    shared = set.intersection(*(set(values) for values in numbers.values())) if numbers else set()
    for key in sorted(shared - {"count"}):
        record[f"val_{key}"] = sum(values[key] for values in numbers.values()) / len(numbers)
    return record


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
