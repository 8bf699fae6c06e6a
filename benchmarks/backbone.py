"""CPU throughput benchmark: UniRepLKNet-A/T against timm's ConvNeXt peers.

What is measured, all in one process so the numbers sit side by side:

* images/s at 224x224 px for ``unireplknet_a`` and ``unireplknet_t`` in four modes:
  ``eval``      train form, ``model.eval()`` under ``torch.inference_mode``;
  ``deploy``    the same model after ``model.reparameterize()`` (deploy form);
  ``deploy+cl`` deploy form with channels-last weights and input;
  ``train``     one training step (``model.train()``, forward + cross-entropy + backward + AdamW step, train form);
* timm's ``convnextv2_atto``, ``convnextv2_tiny`` and ``convnext_tiny`` (random init) in ``eval``, ``eval+cl``
  (channels-last) and ``train``;
* the machine's float32 matrix-multiply rate: best of several 2048x2048 ``torch.mm`` at torch's thread count.

For each row: achieved GFLOP/s = forward FLOPs per image x images/s / 1e9, and its fraction of the matmul rate.
Forward FLOPs are counted once per model form (train form; deploy form, which has fewer) by
``torch.utils.flop_counter.FlopCounterMode`` on one image (a multiply-add counts as 2 FLOPs; only conv and
matmul ops are counted). A training step is credited 3x the forward FLOPs (forward + backward).

Timing: ``--warmup`` untimed iterations, then iterations until both ``--min-time`` seconds and ``--min-iters``
iterations are reached; img/s = batch size / median iteration time (``time.perf_counter``). "vs eval" is the
speed ratio to the same model's ``eval`` row (for UniRepLKNet ``deploy`` rows: the deploy speed-up).

Run from the repository root (takes minutes; keep the machine otherwise idle)::

    python benchmarks/backbone.py --output benchmarks/results/backbone_cpu.md
    python benchmarks/backbone.py --quick            # smoke run: 64 px, batch 2, 0.2 s per measurement
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

try:
    import backbones  # noqa: F401  (registers unireplknet_* with timm)
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import backbones  # noqa: F401
import timm

UNIREPLKNET_MODELS = ("unireplknet_a", "unireplknet_t")
PEER_MODELS = ("convnextv2_atto", "convnextv2_tiny", "convnext_tiny")
ALL_MODELS = UNIREPLKNET_MODELS + PEER_MODELS
TRAIN_FLOP_FACTOR = 3
MATMUL_SIZE = 2048


@dataclass
class Result:
    model: str
    mode: str
    params_m: float
    forward_gflops: float  # per image, of the form measured
    images_per_s: float
    flop_factor: int = 1
    vs_eval: Optional[float] = None

    @property
    def achieved_gflops(self) -> float:
        return self.forward_gflops * self.flop_factor * self.images_per_s


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def matmul_gflops(size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 ``torch.mm`` rate in GFLOP/s (2 * size^3 FLOPs per product)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def median_iteration_time(step: Callable[[], None], warmup: int, min_time: float, min_iters: int) -> float:
    for _ in range(warmup):
        step()
    times: List[float] = []
    begin = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - begin < min_time:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_gflops(model: torch.nn.Module, image_size: int) -> float:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def inference_step(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            model(images)

    return step


def training_step(model: torch.nn.Module, images: torch.Tensor, num_classes: int) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(0, num_classes, (images.shape[0],))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def benchmark_model(name: str, args: argparse.Namespace) -> List[Result]:
    """Measure every mode of one model; returns its rows in table order."""
    size = args.image_size
    images = torch.randn(args.batch_size, 3, size, size)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    timing = dict(warmup=args.warmup, min_time=args.min_time, min_iters=args.min_iters)
    results: List[Result] = []

    def measure(mode: str, model, step, batch: int, flop_factor: int = 1, gflops: Optional[float] = None) -> None:
        gflops = forward_gflops(model, size) if gflops is None else gflops
        seconds = median_iteration_time(step, **timing)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        results.append(Result(name, mode, params, gflops, batch / seconds, flop_factor))
        print(f"  {name:<16} {mode:<10} {batch / seconds:9.1f} img/s", file=sys.stderr, flush=True)

    model = timm.create_model(name, pretrained=False).eval()
    train_form_gflops = forward_gflops(model, size)
    measure("eval", model, inference_step(model, images), args.batch_size, gflops=train_form_gflops)
    is_unireplknet = name in UNIREPLKNET_MODELS
    if is_unireplknet:
        model.reparameterize()
        measure("deploy", model, inference_step(model, images), args.batch_size)
    model = model.to(memory_format=torch.channels_last)
    measure("deploy+cl" if is_unireplknet else "eval+cl", model, inference_step(model, images_cl), args.batch_size)
    del model

    model = timm.create_model(name, pretrained=False)
    train_images = torch.randn(args.train_batch_size, 3, size, size)
    step = training_step(model, train_images, model.num_classes)
    measure("train", model, step, args.train_batch_size, TRAIN_FLOP_FACTOR, gflops=train_form_gflops)

    eval_rate = results[0].images_per_s
    for result in results:
        if result.mode != "train":
            result.vs_eval = result.images_per_s / eval_rate
    return results


def format_table(results: List[Result], matmul_rate: float, markdown: bool) -> str:
    header = ["model", "params (M)", "GFLOPs/img", "mode", "img/s", "achieved GFLOP/s", "of matmul", "vs eval"]
    rows = [
        [
            r.model, f"{r.params_m:.2f}", f"{r.forward_gflops:.3f}", r.mode, f"{r.images_per_s:.1f}",
            f"{r.achieved_gflops:.1f}", f"{r.achieved_gflops / matmul_rate:.1%}",
            f"{r.vs_eval:.2f}x" if r.vs_eval is not None else "-",
        ]
        for r in results
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if i in (0, 3) else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows])


def notes(args: argparse.Namespace) -> List[str]:
    return [
        f"Input {args.image_size}x{args.image_size} px, float32, random weights; inference batch {args.batch_size}, "
        f"training batch {args.train_batch_size}; median of >= {args.min_iters} iterations and >= {args.min_time} s "
        f"after {args.warmup} warm-up iteration(s).",
        "GFLOPs/img: forward FLOPs of the measured form (FlopCounterMode, multiply-add = 2 FLOPs). "
        f"`train` rows (forward + cross-entropy + backward + AdamW step) credit {TRAIN_FLOP_FACTOR}x the forward "
        "FLOPs in achieved GFLOP/s.",
        "`+cl`: channels-last weights and input. `vs eval`: speed ratio to the model's train-form `eval` row "
        "(UniRepLKNet `deploy`: the deploy speed-up).",
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, help="inference batch size (default 16; --quick: 2)")
    parser.add_argument("--train-batch-size", type=int, help="training-step batch size (default 8; --quick: 2)")
    parser.add_argument("--image-size", type=int, help="input side in px (default 224; --quick: 64)")
    parser.add_argument("--min-time", type=float, help="minimum seconds per measurement (default 2; --quick: 0.2)")
    parser.add_argument("--min-iters", type=int, help="minimum timed iterations (default 5; --quick: 3)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up iterations (default 3; --quick: 1)")
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=list(ALL_MODELS), metavar="MODEL",
                        help=f"subset of: {' '.join(ALL_MODELS)}")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--output", type=Path, help="write a Markdown section with the results to this file")
    args = parser.parse_args(argv)
    defaults = dict(batch_size=(16, 2), train_batch_size=(8, 2), image_size=(224, 64), min_time=(2.0, 0.2),
                    min_iters=(5, 3), warmup=(3, 1))
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    command = "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else [sys.argv[0], *argv]))
    machine = f"{cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable)"
    matmul_rate = matmul_gflops()
    facts = [
        f"Machine: {machine}",
        f"torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}, "
        f"torch threads {torch.get_num_threads()} (default, not set)",
        f"float32 matmul rate: {matmul_rate:.1f} GFLOP/s (best of 5 torch.mm {MATMUL_SIZE}x{MATMUL_SIZE})",
    ]
    print("\n".join(facts), flush=True)

    results: List[Result] = []
    for name in args.models:
        results.extend(benchmark_model(name, args))

    print()
    print(format_table(results, matmul_rate, args.markdown))
    print("\n".join(f"* {note}" for note in notes(args)))

    if args.output is not None:
        date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        section = ["## Backbone CPU throughput", ""]
        section += [f"- Date: {date}", *(f"- {fact}" for fact in facts), f"- Command: `{command}`", ""]
        section += [format_table(results, matmul_rate, markdown=True), ""]
        section += [f"- {note}" for note in notes(args)]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(section) + "\n")
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
