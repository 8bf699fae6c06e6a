"""Each inference lever of UniRepLKNet's fast CPU path switched off in turn, timed side by side with all of them on.

The model is what ``backbones.optimize_for_inference`` makes (deploy form, channels-last, kept freed memory; float32
and, with ``--bf16`` on a CPU with native bfloat16, wholly in bfloat16). In every round each way runs once, in strict
alternation, so a shared machine's drift hits all ways alike; ratios are medians of per-round ratios. Ways:

* ``all``: everything on;
* ``no kept weights``: ``backbones.ops.prepacked.keep_weights(False)``: oneDNN gets the plain Linear and
  downsampling weights on every call and reorders them itself (turning it off forgets the kept copies, so an
  untimed call after this way makes them again);
* ``torch depthwise``: ``use_backend("torch")``: PyTorch's convolution for every depthwise layer, not the measured
  policy (which picks our CPU kernels where they win);
* ``no narrow kernels``: oneDNN's Linear and convolution where our narrow kernels would run (33 to 48 outputs,
  float32, AVX-512 CPUs: UniRepLKNet-A's and F's first-stage ``Linear2`` and second stem convolution; elsewhere this
  way runs what ``all`` runs);
* ``plain``: ``reference_ops()``: PyTorch's straightforward ops and convolution for the same deploy-form model;
* with ``--compile``, ``compiled``: ``torch.compile`` (inductor) of the same model, what
  ``optimize_for_inference(compile=True)`` gives (a traced graph takes the blocks' module path, so inductor fuses
  PyTorch's ops and our kernels do not run; compiled once per batch size, in an untimed warm-up round).

"all over X" above 1 means the lever X turns off pays. Run from the repository root, on an idle machine::

    python benchmarks/levers.py --bf16 --output benchmarks/results/levers_cpu.md
    python benchmarks/levers.py --models unireplknet_t --compile --bf16 --output benchmarks/results/levers_compiled_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

try:
    import backbones  # noqa: F401  (registers unireplknet_* with timm)
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import backbones  # noqa: F401

from backbones.ops import prepacked, use_backend
from backbones.runtime import reference_ops
from backbones.unireplknet import _without_narrow_kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import optimized_models, write_report  # noqa: E402

WAYS = ("all", "no kept weights", "torch depthwise", "no narrow kernels", "plain")



def run_way(way: str, model: torch.nn.Module, x: torch.Tensor, compiled=None) -> float:
    """Seconds for one forward of ``model`` on ``x`` with ``way``'s lever off (``compiled``: the compiled model)."""
    previous = prepacked.keep_weights(way != "no kept weights")
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            if way == "compiled":
                compiled(x)
            elif way == "torch depthwise":
                with use_backend("torch"):
                    model(x)
            elif way == "no narrow kernels":
                with _without_narrow_kernels():
                    model(x)
            elif way == "plain":
                with reference_ops():
                    model(x)
            else:
                model(x)
            return time.perf_counter() - start
    finally:
        prepacked.keep_weights(previous)


def paired(model: torch.nn.Module, x: torch.Tensor, rounds: int, warmup: int, ways=WAYS,
           compiled=None) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {way: [] for way in ways}
    for index in range(warmup + rounds):
        for way in ways:
            seconds = run_way(way, model, x, compiled)
            if index >= warmup:
                times[way].append(seconds)
            if way == "no kept weights":  # turning keeping off forgot the copies: remake them, untimed
                run_way("all", model, x)
    return times


def table(args, progress: Callable[[str], None]) -> List[str]:
    ways = WAYS + (("compiled",) if args.compile else ())
    header = ["model", "dtype", "batch", "rounds", "all img/s"] + [f"{w} img/s" for w in ways[1:]] + [
        f"all over {w}" for w in ways[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for name, dtype, model in optimized_models(args.models, args.bf16, progress):
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.image_size, args.image_size)
            compiled = torch.compile(model) if args.compile else None  # one compilation per batch size
            times = paired(model, x, args.rounds, max(args.warmup, 1 if args.compile else 0), ways, compiled)
            speed = {w: batch / statistics.median(t) for w, t in times.items()}
            ratios = [statistics.median([o / a for a, o in zip(times["all"], times[w])]) for w in ways[1:]]
            row = [name, str(dtype).replace("torch.", ""), str(batch), str(args.rounds), f"{speed['all']:.1f}"]
            row += [f"{speed[w]:.1f}" for w in ways[1:]] + [f"{r:.2f}x" for r in ratios]
            lines.append("| " + " | ".join(row) + " |")
            progress(lines[-1])
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unireplknet_a", "unireplknet_t"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also the model wholly in bfloat16 (native CPUs only)")
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile of the same model (inductor; a compilation per batch size)")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown report here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    begin = time.perf_counter()
    lines = table(args, lambda line: print(line, flush=True))
    write_report("Inference levers, each switched off in turn", "levers.py", argv, [
        f"{args.image_size} px; {args.warmup} warm-up rounds, then {args.rounds} rounds of every way in alternation;"
        " ratios are medians of per-round ratios"], lines, begin, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
