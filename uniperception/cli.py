"""Command-line interface: ``uniperception <command> [options]``.

Commands:
  train   train a model on files from disk (class folders, a CSV manifest, or a series to forecast) and save it
  eval    evaluate a saved model on a dataset: accuracy and confusion matrix, or MSE/MAE/MASE, as JSON and PNG
  predict answers of a saved model for files
  export  a saved model in deploy form (re-parameterised), as a model folder or as ONNX
  info    build a backbone (optionally loading a checkpoint), re-parameterise it, check that both forms agree, and
          print parameter counts, FLOPs and measured CPU/GPU throughput of both forms.
  bench   time preprocessing, inference (train and deploy form) and a training step of a model on one
          modality
  demo    train on a built-in dataset (digits, spoken commands, moving digits, shapes, UCR series, CO2, ...) and
          compare with a simple baseline

Every option of train, eval, predict, export and bench can also come from a YAML or JSON file (``--config
run.yaml``, keys named like the options, ``batch_size`` or ``batch-size``); options on the command line win.

Run ``uniperception <command> --help`` for the options of each command.

Every command lets ``malloc`` keep the large blocks each step frees for reuse (``backbones.keep_freed_memory``):
faster on the CPU, at the price of the process keeping its peak memory. Set ``UNIPERCEPTION_KEEP_FREED_MEMORY=0``
to leave the allocator as it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from backbones.runtime import keep_freed_memory

__all__ = ["main", "build_parser"]

KEEP_MEMORY_ENV = "UNIPERCEPTION_KEEP_FREED_MEMORY"


def _count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (a multiply-add counts as 2), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # with autograd on: the counter hooks every tensor that requires grad, which inference mode would leave without
    # a graph (a forecasting head receives the adapter's affine parameters)
    with counter:
        model(example)
    return counter.get_total_flops()


def _median_seconds(fn, min_time: float, warmup: int = 2, cuda: bool = False) -> float:
    """Median wall time of ``fn()`` over at least three repeats lasting at least ``min_time`` seconds together."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times: List[float] = []
    started = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - started < min_time:
        tick = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def _images_per_second(model: torch.nn.Module, batch: torch.Tensor, min_time: float, warmup: int = 2) -> float:
    """Median throughput of ``model(batch)`` in inference mode over repeats lasting at least ``min_time`` seconds."""
    with torch.inference_mode():
        return batch.shape[0] / _median_seconds(lambda: model(batch), min_time, warmup, batch.is_cuda)


def cmd_info(args: argparse.Namespace) -> int:
    import timm

    import backbones
    from backbones.errors import ConfigurationError

    kwargs = dict(in_chans=args.in_chans, num_classes=args.num_classes)
    if args.kernel_sizes:
        try:
            kwargs["kernel_sizes"] = tuple(int(k) for k in args.kernel_sizes.split(","))
        except ValueError:
            raise ConfigurationError(
                f"--kernel-sizes takes one integer per stage separated by commas, e.g. 3,13,13,11; "
                f"got {args.kernel_sizes!r}"
            ) from None
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigurationError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("--device cuda was asked for but PyTorch sees no CUDA GPU on this machine")
    try:
        model = timm.create_model(args.model, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            known = ", ".join(timm.list_models("unireplknet_*"))
            raise ConfigurationError(
                f"unknown model {args.model!r}; UniRepLKNet variants: {known}, or any timm model") from None
        raise
    if args.checkpoint:
        report = backbones.load_checkpoint(model, args.checkpoint, strict=True)
        print(report)
    model = model.to(device).eval()
    size = args.image_size
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, args.in_chans, size, size, device=device)
    single = batch[:1]

    rows = []
    result = dict(model=args.model, in_chans=args.in_chans, num_classes=args.num_classes, image_size=size,
                  batch_size=args.batch_size, device=str(device), threads=torch.get_num_threads())
    train_params = _count_parameters(model)
    flops = _forward_flops(model, single)
    with torch.inference_mode():
        reference = model(batch)
    speed = _images_per_second(model, batch, args.min_time)
    rows.append(("train form (eval)", train_params, flops, speed))

    if hasattr(model, "reparameterize"):
        deployed = copy.deepcopy(model)
        deployed.reparameterize()
        with torch.inference_mode():
            converted = deployed(batch)
        max_abs = (converted - reference).abs().max().item()
        rel = max_abs / max(reference.abs().max().item(), 1e-30)
        result.update(reparam_max_abs_diff=max_abs, reparam_relative_error=rel)
        d_speed = _images_per_second(deployed, batch, args.min_time)
        rows.append(("deploy form", _count_parameters(deployed), _forward_flops(deployed, single), d_speed))

    result["forms"] = [
        dict(form=name, parameters=p, gflops_per_image=f / 1e9, images_per_second=s) for name, p, f, s in rows
    ]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    print(f"{args.model}: in_chans={args.in_chans}, num_classes={args.num_classes}, input {size}x{size}, "
          f"batch {args.batch_size}, {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"{'form':<20} {'params':>12} {'GFLOPs/img':>11} {'img/s':>9}")
    for name, p, f, s in rows:
        print(f"{name:<20} {p / 1e6:>11.2f}M {f / 1e9:>11.2f} {s:>9.1f}")
    if len(rows) == 2:
        print(f"deploy form speed-up: {rows[1][3] / rows[0][3]:.2f}x")
        print(f"train vs deploy outputs: max |diff| {result['reparam_max_abs_diff']:.3g}, "
              f"relative error {result['reparam_relative_error']:.3g}")
        if not args.checkpoint:
            print("(random initialisation: layer scale starts at 1e-6, so the blocks barely touch the output; "
                  "pass --checkpoint for a check on trained weights)")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# bench


def _bench_model(args: argparse.Namespace):
    from .model import UniPerceiver

    if args.model:
        return UniPerceiver.from_pretrained(args.model)
    settings = _adapter_settings(args.adapter)
    task = args.task
    if task == "forecasting":
        settings.setdefault("horizon", 24)
    return UniPerceiver(args.modality, backbone=args.backbone, task=task, kernel_sizes=args.kernel_sizes,
                        num_classes=args.num_classes if task == "classification" else None, **settings)


def cmd_bench(args: argparse.Namespace) -> int:
    from .engine import _device
    from .errors import UniPerceptionError

    args = _merged(args, args.parser)
    device = _device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UniPerceptionError("--device cuda was asked for but PyTorch sees no CUDA GPU on this machine")
    if args.amp == "fp16" and device.type != "cuda":
        raise UniPerceptionError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    if args.batch_size < 2:
        raise UniPerceptionError("--batch-size must be at least 2 (a training step's BatchNorm needs two samples)")
    torch.manual_seed(0)
    model = _bench_model(args)
    modality = model.modalities[0]
    adapter = model.adapters[modality]
    raw = args.example if args.example else adapter.example()
    cuda = device.type == "cuda"
    amp = (torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
           if args.amp else torch.autocast(device.type, enabled=False))
    rows = []

    def row(stage: str, seconds: float, items: int, flops: Optional[float] = None) -> None:
        rows.append(dict(stage=stage, samples_per_second=items / seconds, ms_per_call=seconds * 1e3,
                         gflops_per_second=flops / seconds / 1e9 if flops else None))

    # preprocessing of one sample on this process's threads: what one DataLoader worker delivers
    row("preprocess (eval)", _median_seconds(lambda: adapter.prepare(raw), args.min_time), 1)
    row("preprocess (train, augmented)", _median_seconds(lambda: adapter.prepare(raw, train=True), args.min_time), 1)
    sample = adapter.prepare(raw)
    batch = adapter.collate([sample] * args.batch_size).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last and batch.ndim == 4:
        batch = batch.contiguous(memory_format=memory_format)
    model = model.to(device, memory_format=memory_format)
    flops = _forward_flops(model.eval(), batch[:2]) / 2

    def inference(net: torch.nn.Module, stage: str, per_sample: float) -> None:
        net.eval()
        with torch.inference_mode(), amp:
            seconds = _median_seconds(lambda: net(batch), args.min_time, cuda=cuda)
        row(stage, seconds, args.batch_size, per_sample * args.batch_size)

    if not model.deploy:
        inference(model, "inference, train form", flops)
    deployed = copy.deepcopy(model)
    if not deployed.deploy:
        deployed.reparameterize()
    deploy_flops = _forward_flops(deployed.eval(), batch[:2]) / 2
    inference(deployed, "inference, deploy form", deploy_flops)
    if args.compile:
        inference(torch.compile(deployed), "inference, deploy form, compiled", deploy_flops)

    # a whole training step: forward, loss, backward, AdamW update
    from timm.optim import create_optimizer_v2

    trained = copy.deepcopy(model) if not model.deploy else None
    if trained is None:
        print("(the model is in deploy form: no training step measured)", file=sys.stderr)
    else:
        trained.train()
        if args.grad_checkpointing and hasattr(trained.backbone, "set_grad_checkpointing"):
            trained.backbone.set_grad_checkpointing(True)
        optimizer = create_optimizer_v2(trained, opt="adamw", lr=1e-4, weight_decay=0.05)
        scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
        with torch.no_grad():
            outputs = trained(batch[:2])
        if trained.task == "classification":
            targets = torch.randint(0, outputs.shape[-1], (args.batch_size,), device=device)
            criterion = torch.nn.CrossEntropyLoss()
        else:
            targets = torch.randn((args.batch_size, *outputs.shape[1:]), device=device)
            criterion = torch.nn.MSELoss()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with amp:
                loss = criterion(trained(batch).float(), targets)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()

        # a backward pass costs two forward passes (input and weight gradients). PyTorch's counter is not used for
        # it: its convolution_backward formula counts a depthwise weight gradient C times over
        train_flops = 3 * flops
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = _median_seconds(step, args.min_time, cuda=cuda)
        row("training step", seconds, args.batch_size, train_flops * args.batch_size)
        if cuda:
            rows[-1]["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    shape = "x".join(str(d) for d in sample.shape)
    result = dict(modality=modality, backbone=model.config.get("backbone"), task=model.task, sample_shape=shape,
                  batch_size=args.batch_size, device=str(device), threads=torch.get_num_threads(),
                  amp=args.amp, channels_last=args.channels_last, torch=torch.__version__,
                  parameters=_count_parameters(model), gflops_per_sample=flops / 1e9, results=rows)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['backbone']} on {modality} ({model.task}), one sample {shape}, batch {args.batch_size}, {device} "
          f"({result['threads']} threads), {args.amp or 'float32'}"
          f"{', channels-last' if args.channels_last else ''}, torch {torch.__version__}")
    print(f"{_count_parameters(model) / 1e6:.2f}M parameters, {flops / 1e9:.3f} GFLOPs per sample (forward; a "
          "training step counts 3x)")
    print(f"{'stage':<36} {'samples/s':>10} {'ms/call':>10} {'GFLOP/s':>9}")
    for entry in rows:
        rate = f"{entry['gflops_per_second']:.1f}" if entry["gflops_per_second"] else "-"
        extra = f"  peak {entry['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in entry else ""
        print(f"{entry['stage']:<36} {entry['samples_per_second']:>10.1f} {entry['ms_per_call']:>10.2f} "
              f"{rate:>9}{extra}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    from . import datasets
    from .demo import DEFAULT_DATASETS, DEMOS, format_results, report_floors, run_demo
    from .errors import UniPerceptionError

    if args.list:
        for name, spec in datasets.available().items():
            print(f"{name:<17} {spec['modality']:<12} {spec['task']:<15} {spec['summary']}")
        return 0
    if args.dataset:
        names = list(args.dataset)
    elif args.modality == "all":
        names = [name for modality in DEFAULT_DATASETS for name in DEFAULT_DATASETS[modality]]
    elif args.modality in DEFAULT_DATASETS:
        names = DEFAULT_DATASETS[args.modality]
    else:
        raise UniPerceptionError(f"--modality must be one of {', '.join(DEFAULT_DATASETS)} or all, got "
                                 f"{args.modality!r}")
    unknown = [name for name in names if name not in DEMOS]
    if unknown:
        raise UniPerceptionError(f"no demo for {', '.join(unknown)}; demos: {', '.join(DEMOS)}")
    results = []
    for name in names:
        settings = DEMOS[name]
        epochs = args.epochs or (settings.quick_epochs if args.quick else settings.train["epochs"])
        print(f"== {name}: UniRepLKNet-A, {epochs} epoch(s); output in {Path(args.output) / name}", flush=True)
        result = run_demo(name, args.output, quick=args.quick, epochs=args.epochs, device=args.device)
        results.append(result)
        print(format_results([result]).splitlines()[1], flush=True)
    print()
    return report_floors(results)


# ---------------------------------------------------------------------------------------------------------------------
# train, eval, predict, export


def _read_config_file(path: Optional[str]) -> dict:
    from .errors import UniPerceptionError

    if not path:
        return {}
    try:
        import yaml

        with open(path) as handle:
            loaded = yaml.safe_load(handle)  # YAML is a superset of JSON
    except FileNotFoundError:
        raise UniPerceptionError(f"{path}: no such configuration file") from None
    except yaml.YAMLError as exc:
        raise UniPerceptionError(f"{path}: not a readable YAML or JSON file ({exc})") from None
    if not isinstance(loaded, dict):
        raise UniPerceptionError(f"{path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def _merged(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Options from ``--config`` where the command line left them at their default."""
    from .errors import UniPerceptionError

    values = _read_config_file(getattr(args, "config", None))
    known = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UniPerceptionError(f"{args.config}: unknown options {unknown}; run uniperception {args.command} --help")
    for key, value in values.items():
        if getattr(args, key) == known[key].default:
            setattr(args, key, value)
    return args


def _adapter_settings(pairs) -> dict:
    """``key=value`` pairs (values read as YAML: numbers, booleans, lists) or a mapping from a config file."""
    import yaml

    from .errors import UniPerceptionError

    if isinstance(pairs, dict):
        return dict(pairs)
    settings = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UniPerceptionError(f"--adapter takes key=value, got {pair!r}")
        settings[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return settings


def _dataset(args: argparse.Namespace, adapter, split: Optional[str], train: bool):
    from .data import FolderDataset, ForecastingDataset, ManifestDataset
    from .errors import UniPerceptionError

    if getattr(args, "series", None):
        return ForecastingDataset(args.series, adapter, split=split or "train", stride=args.stride, train=train)
    if getattr(args, "manifest", None):
        return ManifestDataset(args.manifest, adapter, split=split, train=train, strict=args.strict_data)
    folder = args.data if split in (None, "train") or not getattr(args, "val_data", None) else args.val_data
    if not folder:
        raise UniPerceptionError("give the data: --data FOLDER (class folders), --manifest CSV or --series FILE")
    return FolderDataset(folder, adapter, train=train, strict=args.strict_data)


def _manifest_columns(path: str) -> List[str]:
    import pandas as pd

    try:
        return list(pd.read_csv(path, nrows=0).columns)
    except Exception:  # the dataset reports an unreadable manifest with its own message
        return []


def _manifest_splits(path: str) -> set:
    import pandas as pd

    return set(pd.read_csv(path, usecols=["split"], dtype=str)["split"])


# mixup and cutmix alphas of the published recipes, used when --mixup / --cutmix are not given: the ImageNet recipe
# (ConvNeXt's, which UniRepLKNet trains with) and the AudioSet/speech recipe; the other modalities train without
RECIPE_MIXING = {"image": (0.8, 1.0), "audio": (0.6, 0.0)}


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed
    from .engine import TrainConfig, Trainer
    from .model import UniPerceiver

    args = _merged(args, args.parser)
    if distributed.rank() != 0:
        warnings.simplefilter("ignore")  # under torchrun, rank 0 alone reports
    torch.manual_seed(args.seed)
    if args.datasets:
        return _train_jointly(args)
    task = "forecasting" if args.series else "classification"
    recipe = RECIPE_MIXING.get(args.modality, (0.0, 0.0)) if task == "classification" else (0.0, 0.0)
    if args.mixup is None or args.cutmix is None:
        args.mixup = recipe[0] if args.mixup is None else args.mixup
        args.cutmix = recipe[1] if args.cutmix is None else args.cutmix
        if any(recipe) and distributed.rank() == 0:
            print(f"mixup {args.mixup}, cutmix {args.cutmix} (the {args.modality} recipe's; --mixup 0 --cutmix 0 "
                  "disables)")
    adapter_settings = _adapter_settings(args.adapter)
    # class names come from the training data: a first pass with a throw-away adapter
    from modalities import create_adapter

    probe_settings = dict(adapter_settings)
    if args.modality == "time_series":
        probe_settings.setdefault("task", task)
    probe = create_adapter(args.modality, **probe_settings)
    names = None
    splits = bool(args.manifest) and "split" in _manifest_columns(args.manifest)
    if task == "classification":
        names = _dataset(args, probe, "train" if splits else None, False).class_names
    model = UniPerceiver(args.modality, backbone=args.backbone, task=task, class_names=names,
                         kernel_sizes=args.kernel_sizes, drop_path_rate=args.drop_path, **adapter_settings)
    if args.weights:
        model.load_backbone_weights(args.weights)
    adapter = model.adapters[args.modality]
    train = _dataset(args, adapter, "train" if splits or args.series else None, True)
    val = None
    if args.series or (splits and "val" in _manifest_splits(args.manifest)) or args.val_data:
        val = _dataset(args, adapter, "val", False)
    return _fit_and_save(model, train, val, args)


def _fit_and_save(model, train, val, args: argparse.Namespace) -> int:
    """Train, then save the best weights (rank 0) to OUTPUT/model and print a one-line summary."""
    from . import distributed
    from .engine import TrainConfig, Trainer

    fields = {f for f in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    history = Trainer(model, train, val, config).fit()
    if distributed.rank() != 0:
        return 0  # under torchrun rank 0 alone saves the model and reports
    best = Path(config.output) / ("best.pt" if (Path(config.output) / "best.pt").is_file() else "last.pt")
    model.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["model"])
    saved = model.save_pretrained(Path(config.output) / "model")
    last = history[-1]
    summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
    print(f"trained {len(history)} epoch(s): {summary}; model saved to {saved} (weights of {best.name})")
    return 0


def _dataset_specs(given: Any) -> Dict[str, Dict[str, Any]]:
    """``--dataset MODALITY=SOURCE`` pairs or a config file's ``datasets:`` mapping as ``{modality: spec}``, where a
    spec holds one of ``builtin`` (a built-in set's name), ``data`` (class folders, with an optional ``val_data``)
    or ``manifest`` (a CSV with a split column), and optionally ``adapter`` (that modality's adapter settings)."""
    from . import datasets
    from .errors import UniPerceptionError

    if isinstance(given, dict):
        pairs = list(given.items())
    else:
        pairs = []
        for pair in given:
            modality, sep, source = str(pair).partition("=")
            if not sep or not modality or not source:
                raise UniPerceptionError(f"--dataset takes MODALITY=SOURCE, got {pair!r}")
            pairs.append((modality.strip(), source.strip()))
    specs: Dict[str, Dict[str, Any]] = {}
    for modality, spec in pairs:
        if modality in specs:
            raise UniPerceptionError(f"two datasets for {modality}: give one per modality")
        if isinstance(spec, str):
            spec = {"builtin": spec} if spec in datasets.available() else {"data": spec}
        if not isinstance(spec, dict) or sum(k in spec for k in ("builtin", "data", "manifest")) != 1:
            raise UniPerceptionError(f"the {modality} dataset needs exactly one of builtin, data or manifest, got "
                                     f"{spec!r}")
        unknown = sorted(set(spec) - {"builtin", "data", "val_data", "manifest", "adapter"})
        if unknown:
            raise UniPerceptionError(f"the {modality} dataset has unknown keys {unknown}; known: builtin, data, "
                                     "val_data, manifest, adapter")
        if "builtin" in spec:
            found = datasets.available().get(spec["builtin"])
            if found is None or found["modality"] != modality or found["task"] != "classification":
                raise UniPerceptionError(f"{spec['builtin']!r} is not a built-in {modality} classification set; "
                                         f"those are: {', '.join(n for n, d in datasets.available().items() if d['modality'] == modality and d['task'] == 'classification') or 'none'}")
        specs[modality] = spec
    if len(specs) < 2:
        raise UniPerceptionError("joint training needs datasets of at least two modalities "
                                 "(--dataset image=digits --dataset audio=speech/train ...)")
    return specs


def _joint_data(modality: str, spec: Dict[str, Any], adapter, args: argparse.Namespace):
    """``(train, val or None)`` of one modality's dataset spec, read through ``adapter``."""
    from . import datasets
    from .data import FolderDataset, ManifestDataset

    if "builtin" in spec:
        built = datasets.load(spec["builtin"])
        return built.dataset("train", adapter, train=True), built.dataset("val", adapter)
    if "manifest" in spec:
        val = None
        if "split" in _manifest_columns(spec["manifest"]) and "val" in _manifest_splits(spec["manifest"]):
            val = ManifestDataset(spec["manifest"], adapter, split="val", strict=args.strict_data)
        split = "train" if "split" in _manifest_columns(spec["manifest"]) else None
        return ManifestDataset(spec["manifest"], adapter, split=split, train=True, strict=args.strict_data), val
    train = FolderDataset(spec["data"], adapter, train=True, strict=args.strict_data)
    val = FolderDataset(spec["val_data"], adapter, strict=args.strict_data) if spec.get("val_data") else None
    return train, val


def _train_jointly(args: argparse.Namespace) -> int:
    """One model, one shared backbone, several modalities: a dataset per modality (``--dataset`` or the config
    file's ``datasets:``), each modality's mixup/cutmix recipe unless given."""
    from . import distributed
    from .model import UniPerceiver

    specs = _dataset_specs(args.datasets)
    if args.series or args.manifest or args.data or args.adapter:
        from .errors import UniPerceptionError

        raise UniPerceptionError("with --dataset (or datasets: in the config) give each modality's data and adapter "
                                 "settings there, not --data/--manifest/--series/--adapter")
    modalities = sorted(specs)
    if args.mixup is None:
        args.mixup = {m: RECIPE_MIXING.get(m, (0.0, 0.0))[0] for m in modalities}
    if args.cutmix is None:
        args.cutmix = {m: RECIPE_MIXING.get(m, (0.0, 0.0))[1] for m in modalities}
    if distributed.rank() == 0:
        print(f"joint training on {', '.join(modalities)} ({args.schedule} schedule); mixup {args.mixup}, cutmix "
              f"{args.cutmix}")
    adapters = {m: _adapter_settings(specs[m].get("adapter")) for m in modalities}
    # class names come from the training data: a first pass with throw-away adapters
    from modalities import create_adapter

    names = {m: _joint_data(m, specs[m], create_adapter(m, **adapters[m]), args)[0].class_names for m in modalities}
    model = UniPerceiver(modalities, backbone=args.backbone, class_names=names, kernel_sizes=args.kernel_sizes,
                         drop_path_rate=args.drop_path, adapters=adapters)
    if args.weights:
        model.load_backbone_weights(args.weights)
    pairs = {m: _joint_data(m, specs[m], model.adapters[m], args) for m in modalities}
    train = {m: pair[0] for m, pair in pairs.items()}
    val = {m: pair[1] for m, pair in pairs.items() if pair[1] is not None}
    return _fit_and_save(model, train, val or None, args)


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine import TrainConfig, Trainer
    from .metrics import plot_confusion_matrix, write_metrics_json
    from .model import UniPerceiver

    args = _merged(args, args.parser)
    model = UniPerceiver.from_pretrained(args.model)
    modality = model.modalities[0]
    data = _dataset(args, model.adapters[modality], args.split, False)
    output = Path(args.output)
    config = TrainConfig(output=str(output), batch_size=args.batch_size, device=args.device, season=args.season,
                         num_workers=args.num_workers, strict_data=args.strict_data)
    metrics = Trainer(model, data, None, config).evaluate(data)
    output.mkdir(parents=True, exist_ok=True)
    write_metrics_json(output / "metrics.json", metrics)
    if "confusion_matrix" in metrics:
        plot_confusion_matrix(metrics["confusion_matrix"], model.class_names[modality], output / "confusion_matrix.png")
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    print(json.dumps(shown, indent=2, default=str))
    print(f"metrics written to {output / 'metrics.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .model import UniPerceiver

    args = _merged(args, args.parser)
    model = UniPerceiver.from_pretrained(args.model)
    if model.task == "embedding":  # a model without classes answers with its embeddings
        vectors = model.embed(list(args.files), batch_size=args.batch_size)
        results = [{"source": str(f), "embedding": v} for f, v in zip(args.files, vectors, strict=True)]
    else:
        results = model.predict(list(args.files), batch_size=args.batch_size)
    rows = []
    for result in results:
        row = {"source": result["source"]}
        if "class_name" in result:
            top = result["probabilities"].topk(min(args.top, result["probabilities"].numel()))
            names = model.class_names[result.get("modality", model.modalities[0])]
            row.update(label=result["class_name"], probability=round(float(top.values[0]), 4),
                       top=[(names[i], round(float(p), 4))
                            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)])
        elif "forecast" in result:
            stamps = result["timestamps"]
            row.update(columns=result["columns"], forecast=result["forecast"].tolist(),
                       timestamps=[str(t) for t in stamps] if stamps is not None else None)
        else:
            row.update(embedding=result["embedding"].tolist())
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if "label" in row:
                print(f"{row['source']}: {row['label']} ({row['probability']:.3f})")
            else:
                print(json.dumps(row))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .errors import UniPerceptionError
    from .model import UniPerceiver

    args = _merged(args, args.parser)
    model = UniPerceiver.from_pretrained(args.model).reparameterize()
    target = Path(args.output)
    if args.format == "folder":
        model.save_pretrained(target)
        print(f"deploy form saved to {target}")
        return 0
    if not args.example:
        raise UniPerceptionError("ONNX export needs --example FILE: a raw file that fixes the input size")
    modality = model.modalities[0]
    adapter = model.adapters[modality]
    batch = adapter.collate([adapter.prepare(args.example)])
    model.export_onnx(target, modality=modality, batch=batch)
    print(f"ONNX model written to {target} (input 'batch' {tuple(batch.shape[1:])} per sample, batch dynamic)")
    return 0


def _data_options(parser: argparse.ArgumentParser, split_default: Optional[str]) -> None:
    data = parser.add_argument_group("data (one of --data, --manifest, --series)")
    data.add_argument("--data", help="folder with one subfolder per class")
    data.add_argument("--manifest", help="CSV file with columns path,label[,split] (paths relative to it)")
    data.add_argument("--series", help="CSV or Parquet series to forecast (time-ordered train/val/test split)")
    data.add_argument("--split", default=split_default, help="split of a manifest or series to use")
    data.add_argument("--stride", type=int, default=1, help="steps between forecasting windows")
    data.add_argument("--season", type=int, default=1,
                      help="forecasting: seasonal period of the naive forecast MASE compares with (1: last value)")
    data.add_argument("--strict-data", action="store_true", help="stop on an unreadable sample instead of skipping")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")


def _add_run_commands(sub) -> None:
    from .engine import SCHEDULES, TrainConfig

    defaults = TrainConfig()
    train = sub.add_parser(
        "train", help="train a model on files from disk",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train UniRepLKNet (or any timm backbone) on one modality: image, audio or video files in class "
        "folders or a CSV manifest, point clouds, or a time series to forecast. The trained model is saved to "
        "OUTPUT/model (config.json + model.safetensors) with the best validation weights; checkpoints, "
        "metrics.csv and plots go to OUTPUT. Example: uniperception train --modality audio --data speech/train "
        "--val-data speech/val --epochs 20 --output runs/speech. On several processes or GPUs: torchrun "
        "--nproc_per_node=N -m uniperception train ... (--batch-size is per process).",
    )
    train.add_argument("--config", help="YAML or JSON file with any of these options")
    train.add_argument("--modality", default="image", help="image, audio, video, point_cloud or time_series")
    train.add_argument("--backbone", default="unireplknet_a", help="UniRepLKNet variant or any timm model")
    train.add_argument("--kernel-sizes", type=int, default=None, help="kernel size of the last stage (e.g. 11)")
    train.add_argument("--weights", default=None, help="backbone weights to start from (official .pth files too)")
    train.add_argument("--adapter", action="append", metavar="KEY=VALUE",
                       help="adapter setting, repeatable, e.g. --adapter image_size=64")
    _data_options(train, None)
    train.add_argument("--val-data", help="validation folder (with --data)")
    train.add_argument("--dataset", dest="datasets", action="append", metavar="MODALITY=SOURCE",
                       help="joint training: one dataset per modality, repeatable (a built-in set's name or a folder "
                       "of class folders), e.g. --dataset image=digits --dataset audio=spoken_digits; a config file "
                       "may give datasets: {audio: {data: DIR, val_data: DIR, adapter: {target_frames: 64}}}")
    run = train.add_argument_group("training")
    run.add_argument("--output", default=defaults.output, help="folder for checkpoints, metrics and the model")
    run.add_argument("--epochs", type=int, default=defaults.epochs)
    run.add_argument("--batch-size", type=int, default=defaults.batch_size)
    run.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of AdamW")
    run.add_argument("--min-lr", type=float, default=defaults.min_lr, help="learning rate at the end of the cosine")
    run.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    run.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    run.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    run.add_argument("--mixup", type=float, default=None,
                     help="mixup alpha, 0 disables (default: the modality recipe's, see RECIPE_MIXING)")
    run.add_argument("--cutmix", type=float, default=None,
                     help="cutmix alpha, 0 disables (default: the modality recipe's)")
    run.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the backbone")
    run.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights (e.g. 0.999)")
    run.add_argument("--accumulation-steps", type=int, default=defaults.accumulation_steps)
    run.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    run.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision")
    run.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks to save memory")
    run.add_argument("--channels-last", action="store_true",
                     help="weights and 4-D inputs channels-last (UniRepLKNet-A/T training steps at 224 px on "
                          "2 CPU cores: 1.12x/1.25x, BENCHMARKS.md)")
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--schedule", choices=list(SCHEDULES), default=defaults.schedule,
                     help="joint training: the order of the modalities' batches in an epoch (proportional: all "
                     "batches once, interleaved in proportion to the data; round_robin: in turn, smaller sets "
                     "repeated)")
    run.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    run.add_argument("--sync-bn", action="store_true",
                     help="under torchrun, BatchNorm statistics over the global batch (CPU and GPU)")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write TensorBoard event files to OUTPUT/tensorboard (needs the tensorboard package)")
    train.set_defaults(func=cmd_train, parser=train)

    evaluate = sub.add_parser(
        "eval", help="evaluate a saved model",
        description="Accuracy (top-1, top-5, macro) and confusion matrix, or MSE/MAE/MASE for forecasts, written to "
        "OUTPUT/metrics.json (and confusion_matrix.png). Example: uniperception eval --model runs/speech/model "
        "--data speech/test",
    )
    evaluate.add_argument("--config", help="YAML or JSON file with any of these options")
    evaluate.add_argument("--model", required=True, help="folder written by train or save_pretrained")
    _data_options(evaluate, "test")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--output", default="evaluation", help="folder for metrics.json and plots")
    evaluate.set_defaults(func=cmd_eval, parser=evaluate)

    predict = sub.add_parser("predict", help="answers of a saved model for files",
                             description="Example: uniperception predict --model runs/speech/model yes.wav no.flac")
    predict.add_argument("files", nargs="+", help="files to answer for")
    predict.add_argument("--config", help="YAML or JSON file with any of these options")
    predict.add_argument("--model", required=True, help="folder written by train or save_pretrained")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--top", type=int, default=3, help="classes listed per file (with --json)")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(func=cmd_predict, parser=predict)

    export = sub.add_parser(
        "export", help="a saved model in deploy form, as a folder or ONNX",
        description="Re-parameterise a saved model and write it as a model folder (--format folder) or an ONNX file "
        "(--format onnx, with --example FILE fixing the input size). Example: uniperception export --model "
        "runs/speech/model --format onnx --example yes.wav --output speech.onnx",
    )
    export.add_argument("--config", help="YAML or JSON file with any of these options")
    export.add_argument("--model", required=True, help="folder written by train or save_pretrained")
    export.add_argument("--format", choices=["folder", "onnx"], default="folder")
    export.add_argument("--example", help="a raw file of the modality (ONNX only)")
    export.add_argument("--output", required=True, help="target folder or .onnx file")
    export.set_defaults(func=cmd_export, parser=export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniperception",
        description="UniRepLKNet for images, audio, video, point clouds and time series.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  uniperception train --modality image --data photos/train --val-data photos/val "
        "--epochs 10 --output runs/photos\n  uniperception predict --model runs/photos/model cat.jpg\n"
        "  uniperception info --model unireplknet_a --image-size 224",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True

    info = sub.add_parser(
        "info",
        help="size, FLOPs and speed of a backbone in train and deploy form",
        description="Build a backbone, re-parameterise it into its deploy form, check both forms agree and measure "
        "parameters, FLOPs and throughput of each.",
    )
    info.add_argument("--model", default="unireplknet_a", help="unireplknet_{a,f,p,n,t,s,b,l,xl} or any timm model")
    info.add_argument("--in-chans", type=int, default=3, help="input channels (1 for spectrograms)")
    info.add_argument("--num-classes", type=int, default=1000, help="classes of the head; 0 for pooled features")
    info.add_argument("--kernel-sizes", default=None, help="kernel size per stage, e.g. 3,13,13,11")
    info.add_argument("--image-size", type=int, default=224, help="input height and width in pixels")
    info.add_argument("--batch-size", type=int, default=8, help="batch size for the throughput measurement")
    info.add_argument("--min-time", type=float, default=2.0, help="seconds to spend timing each form")
    info.add_argument("--checkpoint", default=None, help="a .pth/.safetensors file to load first (official files too)")
    info.add_argument("--device", default="cpu", help="cpu or cuda")
    info.add_argument("--json", action="store_true", help="print the results as JSON")
    info.set_defaults(func=cmd_info)
    _add_run_commands(sub)

    bench = sub.add_parser(
        "bench", help="speed of preprocessing, inference and training for a modality",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Time every stage of a model on one modality with this machine: preprocessing one sample (what a "
        "DataLoader worker delivers), inference in train and deploy form (optionally compiled), and a whole "
        "training step (forward, backward, AdamW), with FLOP rates and, on CUDA, peak memory. Inputs are "
        "synthetic unless --example names a real file. Example: uniperception bench --modality audio "
        "--batch-size 16 --amp bf16",
    )
    bench.add_argument("--config", help="YAML or JSON file with any of these options")
    bench.add_argument("--modality", default="image", help="image, audio, video, point_cloud or time_series")
    bench.add_argument("--backbone", default="unireplknet_a", help="UniRepLKNet variant or any timm model")
    bench.add_argument("--model", default=None, help="time a saved model folder instead of building one")
    bench.add_argument("--task", choices=["classification", "forecasting"], default="classification")
    bench.add_argument("--num-classes", type=int, default=10)
    bench.add_argument("--kernel-sizes", type=int, default=None, help="kernel size of the last stage")
    bench.add_argument("--adapter", action="append", metavar="KEY=VALUE",
                       help="adapter setting, repeatable, e.g. --adapter image_size=128")
    bench.add_argument("--example", default=None, help="a raw file to time instead of a synthetic input")
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    bench.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision")
    bench.add_argument("--channels-last", action="store_true", help="model and input in channels-last layout")
    bench.add_argument("--compile", action="store_true", help="also time torch.compile of the deploy form")
    bench.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the training step")
    bench.add_argument("--min-time", type=float, default=2.0, help="seconds to spend timing each stage")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.set_defaults(func=cmd_bench, parser=bench)

    demo = sub.add_parser(
        "demo", help="train on a built-in dataset and compare with a simple baseline",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Build a built-in dataset (made from data that installed packages ship, cached), train "
        "UniRepLKNet-A on it, and print its test score beside a simple baseline (logistic regression, "
        "1-nearest-neighbour, or seasonal-naive for forecasts) and the floor its settings must reach. Curves, "
        "confusion matrix, test metrics and the model go to OUTPUT/<dataset>. Exits with 1 when a score is below "
        "its floor. Example: uniperception demo --modality audio",
    )
    demo.add_argument("--modality", default="image",
                      help="image, audio, video, point_cloud, time_series, or all (the default dataset of each)")
    demo.add_argument("--dataset", action="append", help="a built-in dataset by name (repeatable; see --list)")
    demo.add_argument("--output", default="runs/demo", help="folder for the runs")
    demo.add_argument("--epochs", type=int, default=None, help="override the demo's epochs")
    demo.add_argument("--quick", action="store_true", help="one epoch each, no floor checked (a smoke test)")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--list", action="store_true", help="list the built-in datasets and exit")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from backbones.errors import BackboneError
    from modalities.errors import ModalityError

    from .errors import UniPerceptionError

    args = build_parser().parse_args(argv)
    if os.environ.get(KEEP_MEMORY_ENV, "1") != "0":
        # the CLI owns its process: let malloc reuse the large blocks each step frees (backbones.runtime)
        keep_freed_memory(True)
    try:
        return args.func(args)
    except (BackboneError, ModalityError, UniPerceptionError) as exc:
        print(f"uniperception: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
