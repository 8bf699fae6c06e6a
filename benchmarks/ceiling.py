"""Where the time of UniRepLKNet's fast CPU path goes, and how close to the matmul rate it could get.

The model is what ``backbones.optimize_for_inference`` makes (deploy form, channels-last, kept freed memory; float32
and, with ``--bf16`` on a CPU with native bfloat16, wholly in bfloat16). In every round, in strict alternation:

* the whole model once, each stem/downsampling layer and each stage timed inside that call (forward hooks on them);
* every matrix multiply of that forward again on its own, at its shape and with its weights, as the fast path calls
  it: each block's ``Linear1`` (``C -> 4C``) and ``Linear2`` (``4C -> C``) as oneDNN calls on kept weights, with no
  post-op (the fast path fuses GELU, and adds the residual, into them), or our narrow kernel where the model uses it
  (33 to 48 outputs, float32, AVX-512), and each stem/downsampling convolution (the narrow kernel's likewise, without
  the LayerNorm it runs in the model);
* every depthwise convolution again on its own, through the dispatcher the blocks use;
* a ``2048 x 2048`` matmul by the faster here of ``torch.mm`` and oneDNN's: the machine's matrix-multiply rate in
  the same round.

Per part: the time inside the model, its matrix multiplies alone, what ``Linear1``'s GELU epilogue adds to them,
its depthwise convolutions alone, and the rest (GRN, SE, LayerNorm, the residual adds, layout and allocation: the
part's time less the other three). FLOPs are counted from the shapes (a
multiply-add is 2 FLOPs), as PyTorch's FLOP counter counts the same ops. "Of matmul" is a rate over the matmul
rate of the same round, median over rounds.

The last lines are ceilings: the fraction of the matmul rate the whole model would reach if everything but its matrix
multiplies (and depthwise convolutions) took no time. A target above the first ceiling cannot be met by fusing or
speeding up the rest; it needs faster matrix multiplies at these shapes than oneDNN's. Run from the repository root,
on an idle machine::

    python benchmarks/ceiling.py --bf16 --output benchmarks/results/ceiling_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

try:
    import backbones  # noqa: F401  (registers unireplknet_* with timm)
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import backbones  # noqa: F401

from backbones.ops import prepacked
from backbones.ops.cpu_depthwise import narrow_conv3x3_s2, narrow_linear
from backbones.unireplknet import UniRepLKNet, UniRepLKNetBlock, _narrow_conv_applies, _narrow_linear_applies

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone import MATMUL_LIBRARY, MATMUL_SIZE, matmul_step  # noqa: E402
from dwconv import MATMUL_LIBRARIES  # noqa: E402
from common import optimized_models, write_report  # noqa: E402

MATMUL_GFLOP = 2 * MATMUL_SIZE**3 / 1e9


class Part:
    """One stem/downsampling layer or stage (``container``, the module timed inside the forward): its timed calls and
    their FLOPs."""

    def __init__(self, name: str, container: nn.Module):
        self.name = name
        self.container = container
        self.gemms: List[Callable[[], object]] = []
        self.gemms_gelu: List[Callable[[], object]] = []  # the same, Linear1 with its GELU post-op
        self.gemm_gflop = 0.0
        self.depthwise: List[Callable[[], object]] = []
        self.depthwise_gflop = 0.0


def _linear_call(linear: nn.Linear, x: torch.Tensor, gelu: bool = False) -> Callable[[], object]:
    """``linear`` on the channels-last rows ``x`` as the fast path calls it (kept oneDNN weight; GELU epilogue or
    none; a ``Linear2`` of 33 to 48 outputs as our narrow kernel, where the model runs it so)."""
    rows = x.numel() // linear.in_features
    post_op, algorithm = ("gelu", "none") if gelu else ("none", "")
    if not gelu and _narrow_linear_applies(linear, x):
        return lambda: narrow_linear(x, linear.weight, linear.bias)

    def call():
        weight = prepacked.linear_weight(linear.weight, rows, x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, weight, linear.bias, post_op, [], algorithm)
    return call


def parts_of(model: UniRepLKNet, x: torch.Tensor) -> List[Part]:
    """The stem/downsampling layers and stages of ``model`` with the calls that replay their matrix multiplies and
    depthwise convolutions at the shapes one forward on ``x`` gives them."""
    shapes: Dict[nn.Module, Tuple[int, ...]] = {}
    watched = [m for layer in model.downsample_layers for m in layer.modules() if isinstance(m, nn.Conv2d)]
    watched += [m for m in model.modules() if isinstance(m, UniRepLKNetBlock)]
    handles = [m.register_forward_pre_hook(lambda m, args: shapes.__setitem__(m, tuple(args[0].shape)))
               for m in watched]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    dtype = next(model.parameters()).dtype
    parts = []
    for index in range(len(model.stages)):
        for kind, container in (("downsample", model.downsample_layers[index]), ("stage", model.stages[index])):
            part = Part(("stem" if index == 0 else f"downsample {index}") if kind == "downsample" else f"stage {index}",
                        container)
            for module in container.modules():
                if kind == "downsample" and isinstance(module, nn.Conv2d) and module.groups == 1:
                    image = torch.randn(shapes[module], dtype=dtype).contiguous(memory_format=torch.channels_last)
                    out = module(image)
                    if _narrow_conv_applies(module, image):  # as the model runs it (there with its LayerNorm)
                        part.gemms.append(lambda module=module, image=image: narrow_conv3x3_s2(
                            image, module.weight, module.bias))
                    else:
                        part.gemms.append(lambda module=module, image=image: module(image))
                    part.gemms_gelu.append(part.gemms[-1])
                    part.gemm_gflop += 2 * out.numel() * module.in_channels * module.kernel_size[0] * \
                        module.kernel_size[1] / 1e9
                elif isinstance(module, UniRepLKNetBlock):
                    batch, channels, height, width = shapes[module]
                    linear1, linear2 = module.pwconv1[1], module.pwconv2[0]
                    rows1 = torch.randn(batch, height, width, linear1.in_features, dtype=dtype)
                    rows2 = torch.randn(batch, height, width, linear2.in_features, dtype=dtype)
                    part.gemms += [_linear_call(linear1, rows1), _linear_call(linear2, rows2)]
                    part.gemms_gelu += [_linear_call(linear1, rows1, gelu=True), part.gemms[-1]]
                    rows = batch * height * width
                    part.gemm_gflop += 2 * rows * (linear1.in_features * linear1.out_features
                                                   + linear2.in_features * linear2.out_features) / 1e9
                    image = torch.randn(shapes[module], dtype=dtype).contiguous(memory_format=torch.channels_last)
                    part.depthwise.append(lambda module=module, image=image: module.dwconv(image))
                    part.depthwise_gflop += 2 * rows * channels * module.kernel_size**2 / 1e9
            parts.append(part)
    return parts


def timed_forward(model: nn.Module, x: torch.Tensor, parts: List[Part]) -> Tuple[float, Dict[str, float]]:
    """Seconds of one forward and of each part inside it."""
    inside: Dict[str, float] = {}
    starts: Dict[str, float] = {}
    handles = []
    for part in parts:
        handles.append(part.container.register_forward_pre_hook(
            lambda m, args, name=part.name: starts.__setitem__(name, time.perf_counter())))
        handles.append(part.container.register_forward_hook(
            lambda m, args, out, name=part.name: inside.__setitem__(name, time.perf_counter() - starts[name])))
    try:
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start, inside
    finally:
        for handle in handles:
            handle.remove()


def total_seconds(calls: List[Callable[[], object]]) -> float:
    start = time.perf_counter()
    for call in calls:
        call()
    return time.perf_counter() - start


def measure(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, rounds: int, warmup: int):
    parts = parts_of(model, x)
    mm = matmul_step(MATMUL_SIZE, dtype)
    times: Dict[str, List[float]] = defaultdict(list)
    with torch.inference_mode(False), torch.no_grad():
        for index in range(warmup + rounds):
            whole, inside = timed_forward(model, x, parts)
            row = {"whole": whole}
            for part in parts:
                row[part.name] = inside[part.name]
                order = [(" gemm", part.gemms), (" gemm+gelu", part.gemms_gelu)]
                for suffix, calls in order[::-1] if index % 2 else order:  # neither always runs on warm caches
                    row[part.name + suffix] = total_seconds(calls)
                row[part.name + " depthwise"] = total_seconds(part.depthwise)
            row["head"] = whole - sum(inside.values())  # pooling, norm and classifier: the rest of the forward
            for suffix in (" gemm", " gemm+gelu", " depthwise"):
                row["head" + suffix] = 0.0
            start = time.perf_counter()
            mm()
            row["matmul"] = time.perf_counter() - start
            if index >= warmup:
                for key, value in row.items():
                    times[key].append(value)
    return parts, times


def rate_fraction(times: Dict[str, List[float]], keys: List[str], gflop: float) -> float:
    """Median over rounds of (``gflop`` / the summed seconds of ``keys``) over the round's matmul rate."""
    fractions = []
    for index, matmul in enumerate(times["matmul"]):
        seconds = sum(times[key][index] for key in keys)
        fractions.append(gflop / seconds / (MATMUL_GFLOP / matmul) if seconds > 0 else float("nan"))
    return statistics.median(fractions)


def table(args, progress: Callable[[str], None]) -> Tuple[List[str], List[str]]:
    header = ["model", "dtype", "batch", "part", "ms in model", "share", "GEMM GFLOP", "GEMM alone ms",
              "GEMM of matmul", "GELU post-op ms", "depthwise GFLOP", "depthwise alone ms", "rest ms",
              "part of matmul"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
    ceilings = []
    for name, dtype, model in optimized_models(args.models, args.bf16, progress):
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.image_size, args.image_size, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            parts, times = measure(model, x, dtype, args.rounds, args.warmup)
            med = {key: statistics.median(value) for key, value in times.items()}
            label = [name, str(dtype).replace("torch.", ""), str(batch)]

            def row(part_name, keys, gemm, depthwise, share):
                """One table row from the summed medians of ``keys`` (each a part's name)."""
                total = sum(med[k] for k in keys)
                gemm_alone = sum(med[k + " gemm"] for k in keys)
                gelu = statistics.median(sum(times[k + " gemm+gelu"][i] - times[k + " gemm"][i] for k in keys)
                                         for i in range(len(times["whole"])))
                depthwise_alone = sum(med[k + " depthwise"] for k in keys)
                rest = total - gemm_alone - gelu - depthwise_alone

                def fraction(which, gflop):
                    return f"{rate_fraction(times, which, gflop):.0%}" if gflop else "-"
                return "| " + " | ".join(label + [
                    part_name, f"{total * 1e3:.1f}", share, f"{gemm:.2f}", f"{gemm_alone * 1e3:.1f}",
                    fraction([k + " gemm" for k in keys], gemm), f"{gelu * 1e3:.1f}",
                    f"{depthwise:.2f}", f"{depthwise_alone * 1e3:.1f}", f"{rest * 1e3:.1f}",
                    fraction(keys, gemm + depthwise)]) + " |"

            for part in parts:
                lines.append(row(part.name, [part.name], part.gemm_gflop, part.depthwise_gflop,
                                 f"{med[part.name] / med['whole']:.0%}"))
            gemm = sum(p.gemm_gflop for p in parts)
            depthwise = sum(p.depthwise_gflop for p in parts)
            names = [p.name for p in parts]
            lines.append(row("head", ["head"], 0.0, 0.0, f"{med['head'] / med['whole']:.0%}"))
            lines.append(row("**whole model**", names + ["head"], gemm, depthwise, "100%"))
            progress("\n".join(lines[-len(parts) - 2:]))
            gemm_keys = [k + " gemm" for k in names]
            gelu_keys = [k + " gemm+gelu" for k in names]
            depthwise_keys = [k + " depthwise" for k in names]
            matmul_rate = MATMUL_GFLOP / statistics.median(times["matmul"])
            ceilings.append(
                f"- {name}, {str(dtype).replace('torch.', '')}, batch {batch} ({args.rounds} rounds, matmul "
                f"{matmul_rate:.0f} GFLOP/s): the whole model reaches "
                f"{rate_fraction(times, ['whole'], gemm + depthwise):.1%} of the matmul rate; its matrix "
                f"multiplies alone run at {rate_fraction(times, gemm_keys, gemm):.1%} of it. Were everything else "
                f"free, the model would reach {rate_fraction(times, gemm_keys, gemm + depthwise):.1%}; with the "
                f"depthwise convolutions timed too, {rate_fraction(times, gemm_keys + depthwise_keys, gemm + depthwise):.1%}; "
                f"and with Linear1's GELU as well, "
                f"{rate_fraction(times, gelu_keys + depthwise_keys, gemm + depthwise):.1%}.")
            progress(ceilings[-1])
    return lines, ceilings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unireplknet_t"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also the model wholly in bfloat16 (native CPUs only)")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown report here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    begin = time.perf_counter()
    lines, ceilings = table(args, lambda line: print(line, flush=True))
    write_report("Where the fast path's time goes: matrix multiplies, depthwise convolutions and the rest",
                 "ceiling.py", argv, [
                     f"{args.image_size} px; {args.warmup} warm-up rounds, then {args.rounds} rounds, each: the whole "
                     f"model (parts timed inside it), every matrix multiply and depthwise convolution alone, a "
                     f"{MATMUL_SIZE}x{MATMUL_SIZE} matmul by "
                     + ", ".join(f"{library} ({str(dtype).replace('torch.', '')})"
                                 for dtype, library in MATMUL_LIBRARY.items())
                     + f" (the faster here of {' and '.join(MATMUL_LIBRARIES)}); times are medians, fractions medians "
                     "of per-round fractions",
                     "GEMM: the blocks' Linears and the stem/downsampling convolutions; GELU post-op: what Linear1's "
                     "GELU epilogue adds to them; rest: the part's time in the model less its GEMMs, their GELU and "
                     "its depthwise convolutions alone (GRN, SE, LayerNorm, residual adds, layout, allocation)"], [*lines, "", "Ceilings:", "", *ceilings], begin, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
