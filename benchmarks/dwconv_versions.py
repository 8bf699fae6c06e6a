"""Our CPU depthwise kernels against an earlier version of themselves, side by side in one process.

Builds ``backbones/ops/csrc/depthwise_cpu.cpp`` as it was at a git revision (``--base``, default ``HEAD``) or from a
file (``--base-source``) beside the current source, with the same flags, then at UniRepLKNet's depthwise layer shapes
(T's 13x13 layers at batch 16 and 1, the training branches' sizes and dilations, 3x3 layers) checks that both give
the same forward outputs and weight gradients (bit for bit, or the largest difference), and times each kernel of the
two versions in strict alternation. A kernel change is measured this way before the dispatch policy is re-fitted
(``benchmarks/dwconv.py --write-policy``). Run from the repository root, on an idle machine::

    python benchmarks/dwconv_versions.py --base c73da6a~1 --output benchmarks/results/dwconv_versions_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

try:
    import backbones  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import backbones  # noqa: F401

from backbones.ops import cpu_depthwise

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PATH = cpu_depthwise.SOURCE.relative_to(ROOT).as_posix()

# (batch, channels, size, kernel, dilation): T's 13x13 deploy layers at batch 16 and two at batch 1, the 13x13 Dilated
# Reparam Block's training branches at T's third stage, and T's 3x3 layers
CASES: List[Tuple[int, int, int, int, int]] = [
    (16, 80, 56, 13, 1), (16, 160, 28, 13, 1), (16, 320, 14, 13, 1), (16, 640, 7, 13, 1),
    (1, 80, 56, 13, 1), (1, 320, 14, 13, 1),
    (16, 320, 14, 5, 1), (16, 320, 14, 7, 2), (16, 320, 14, 3, 3), (16, 320, 14, 3, 5),
    (16, 80, 56, 3, 1), (16, 320, 14, 3, 1),
]
QUICK_CASES = [(2, 16, 14, 13, 1), (2, 16, 9, 7, 2), (2, 16, 8, 3, 1)]


def base_source(revision: Optional[str], path: Optional[Path], workdir: Path) -> Tuple[Path, str]:
    """The earlier source as a file, and how it is named in the report."""
    if path is not None:
        if not path.is_file():
            raise SystemExit(f"--base-source {path}: no such file")
        return path, str(path)
    try:
        text = subprocess.run(["git", "show", f"{revision}:{SOURCE_PATH}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise SystemExit("git is not installed: pass the earlier source with --base-source FILE") from None
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--base {revision}: git cannot show {SOURCE_PATH} there ({exc.stderr.strip()})") from None
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    file = workdir / "depthwise_cpu.cpp"
    file.write_text(text)
    return file, f"`{revision}` ({commit})" if commit and commit != revision else f"`{revision}`"


def timed(calls: List[Callable[[], object]], rounds: int, repeats: int) -> List[float]:
    """Median ms per call of each of ``calls``, timed in strict alternation, ``repeats`` calls per turn."""
    times: List[List[float]] = [[] for _ in calls]
    for call in calls:  # warm-up
        call()
    for _ in range(rounds):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            times[index].append((time.perf_counter() - start) / repeats * 1e3)
    return [statistics.median(t) for t in times]


def difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if torch.equal(a, b):
        return "same bits"
    return f"max diff {(a.float() - b.float()).abs().max().item():.1e}"


def compare(base, current, case, dtype: torch.dtype, rounds: int) -> List[str]:
    batch, channels, size, kernel, dilation = case
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(channels, 1, kernel, kernel), torch.randn(channels)
    grad = torch.randn_like(x)
    blocked = [m.blocked_weight(weight) for m in (base, current)]  # each version's own weight layout
    forwards = [lambda m=m, w=w: m.forward_blocked(x, w, bias, dilation) for m, w in zip((base, current), blocked)]
    weight_grads = [lambda m=m: m.weight_grad(x, grad, kernel, dilation) for m in (base, current)]
    same_forward = difference(*(f() for f in forwards))
    same_grad = difference(*(f() for f in weight_grads))
    repeats = max(1, int(2e8 // (batch * channels * size * size * kernel * kernel)))
    forward_ms = timed(forwards, rounds, repeats)
    grad_ms = timed(weight_grads, rounds, repeats)
    return [f"{batch}", f"{channels}", f"{size}x{size}", f"{kernel}", f"{dilation}", str(dtype).replace("torch.", ""),
            f"{forward_ms[0]:.3f}", f"{forward_ms[1]:.3f}", f"{forward_ms[0] / forward_ms[1]:.2f}x", same_forward,
            f"{grad_ms[0]:.3f}", f"{grad_ms[1]:.3f}", f"{grad_ms[0] / grad_ms[1]:.2f}x", same_grad]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the earlier kernels (default HEAD)")
    parser.add_argument("--base-source", type=Path, help="the earlier kernels' source file (instead of --base)")
    parser.add_argument("--bf16", action="store_true", help="also time bfloat16 maps")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a smoke run: three small cases, two rounds")
    parser.add_argument("--output", type=Path)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    begin = time.perf_counter()
    reason = cpu_depthwise.unavailable_reason()
    if reason is not None:
        raise SystemExit(reason)
    current = cpu_depthwise.extension()
    with tempfile.TemporaryDirectory() as workdir:
        source, base_name = base_source(None if args.base_source else args.base, args.base_source, Path(workdir))
        same_source = source.read_bytes() == cpu_depthwise.SOURCE.read_bytes()
        print(f"building the base kernels ({base_name}){' : the same source as the current one' * same_source}",
              flush=True)
        try:
            base = current if same_source else cpu_depthwise.build_source(source)
        except Exception as exc:  # a compiler error in the earlier source
            raise SystemExit(f"building the base kernels ({base_name}) failed: {type(exc).__name__}: "
                             f"{str(exc)[-1500:]}") from None
    missing = [name for name in ("blocked_weight", "forward_blocked", "weight_grad") if not hasattr(base, name)]
    if missing:
        raise SystemExit(f"the base kernels ({base_name}) lack {', '.join(missing)}: too old to compare")
    cases = QUICK_CASES if args.quick else CASES
    rounds = 2 if args.quick else args.rounds
    dtypes = [torch.float32] + ([torch.bfloat16] if args.bf16 else [])
    header = ["B", "C", "HxW", "K", "dilation", "dtype", "base fwd ms", "current fwd ms", "fwd speed-up", "fwd outputs",
              "base wgrad ms", "current wgrad ms", "wgrad speed-up", "weight gradients"]
    rows = []
    for dtype in dtypes:
        for case in cases:
            row = compare(base, current, case, dtype, rounds)
            print("  " + " ".join(row), flush=True)
            rows.append(row)
    body = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    body += ["| " + " | ".join(row) + " |" for row in rows]
    details = [f"Base: {base_name}; current: the working tree's `{SOURCE_PATH}`",
               f"{rounds} rounds, the two versions' calls in strict alternation; times are medians; speed-up = base "
               "time over current time; weight gradients in float32 (both dtypes)"]
    print(write_report("Depthwise CPU kernels against an earlier version", "dwconv_versions.py", argv, details, body,
                       begin, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
