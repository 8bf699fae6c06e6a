"""Command-line interface: ``uniperception <command> [options]``.

Commands:
  info    build a backbone (optionally loading a checkpoint), re-parameterise it, check that both forms agree, and
          print parameter counts, FLOPs and measured CPU/GPU throughput of both forms.

Run ``uniperception <command> --help`` for the options of each command.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import List, Optional

import torch

__all__ = ["main", "build_parser"]


def _count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _forward_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (a multiply-add counts as 2), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(example)
    return counter.get_total_flops()


def _images_per_second(model: torch.nn.Module, batch: torch.Tensor, min_time: float, warmup: int = 2) -> float:
    """Median throughput of ``model(batch)`` in inference mode over repeats lasting at least ``min_time`` seconds."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(batch)
        times: List[float] = []
        started = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - started < min_time:
            tick = time.perf_counter()
            model(batch)
            if batch.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tick)
    return batch.shape[0] / statistics.median(times)


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
            raise ConfigurationError(f"unknown model {args.model!r}; UniRepLKNet variants: {known}, or any timm model")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniperception",
        description="UniRepLKNet for images, audio, video, point clouds and time series.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: uniperception info --model unireplknet_a --image-size 224",
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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from backbones.errors import BackboneError
    from modalities.errors import ModalityError

    from .errors import UniPerceptionError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BackboneError, ModalityError, UniPerceptionError) as exc:
        print(f"uniperception: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
