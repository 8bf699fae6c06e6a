"""CPU throughput benchmark: UniRepLKNet-A/T against timm's ConvNeXt peers, each in its fastest way.

What is measured, all in one process so the numbers sit side by side (224 px, float32, random weights):

* inference at every ``--batch-sizes`` (default 1 and 16), each model in every ``--variants`` way:
  ``eager`` (NCHW), ``eager+cl`` (channels-last weights and input), ``compiled`` and ``compiled+cl``
  (``torch.compile``, inductor, one compilation per batch size, compile time excluded). UniRepLKNet runs in its
  deploy form (``model.reparameterize()``); its train form in eval mode is one more row (``train form``), so the
  deploy speed-up shows, and ``plain`` is its deploy form eager, NCHW, with the blocks' straightforward ops
  (``backbones.reference_ops()``: no GRN factor folded into weights, no in-place GELU/GRN, no fused
  Linear+GELU). "Plain" is that row for UniRepLKNet and the eager NCHW row for the peers;
* training steps (forward + cross-entropy + backward + AdamW step) at ``--train-batch-size``: UniRepLKNet-A and -T
  plain (reference ops) and in every ``--train-variants`` way (eager, eager+cl, compiled), the peers eager only;
* then, after ``backbones.keep_freed_memory()`` (malloc keeps freed blocks for reuse; process-wide, so measured
  after everything above), every model again in each ``--keep-variants`` way (rows ``...+keep``) and training
  eager+keep (UniRepLKNet also eager+cl+keep). Peers get the allocator setting too: it is any process's to make;
* the machine's float32 matrix-multiply rate: best of several 2048x2048 products at torch's thread count, by the
  faster here of ``torch.mm`` (PyTorch's BLAS, MKL) and oneDNN's matmul (on AMD CPUs MKL's is the slower one);
* with ``--memory``: the peak memory of one training step of each ``--memory-models`` model at
  ``--memory-batch-size`` (default UniRepLKNet-T at 32), with and without gradient checkpointing, each in a fresh
  process: the process's peak resident memory during the step (``VmHWM``, reset through ``/proc/self/clear_refs``
  just before it) minus its resident memory before it (model, optimizer and input already allocated). The child
  makes resident memory follow live allocations (glibc serves every block above 64 KiB as its own mapping and
  unmaps it on free; no transparent huge pages), so the number is what the tensors need rather than what malloc
  happened to retain;
* with ``--paired``: UniRepLKNet plain against its eager+cl ways and against its ConvNeXt V2 peer's compiled+cl and
  eager+cl (each with and without ``keep_freed_memory()``), timed in strict alternation in two worker processes,
  so drift of a shared machine hits every side alike;
* with ``--bf16``: after ``keep_freed_memory()``, in one worker and in strict alternation, UniRepLKNet's float32
  eager+cl against its deploy form wholly in bfloat16 (``bf16+cl``: what
  ``backbones.optimize_for_inference(model, dtype=torch.bfloat16)`` makes) and under bfloat16 autocast
  (``autocast+cl``), and its ConvNeXt V2 peer in bfloat16 eager, compiled and under autocast, with the fraction of
  the measured bfloat16 matrix-multiply rate. Run on CPUs with native bfloat16 (AVX-512 BF16 or AMX); elsewhere
  oneDNN emulates bfloat16 tens of times slower than float32, so the check is skipped and the report says why
  (``--bf16-emulated`` runs it anyway).

For each row: achieved GFLOP/s = forward FLOPs per image x images/s / 1e9 (training: 3x forward), and its fraction
of the matmul rate. Forward FLOPs are counted per model form by ``torch.utils.flop_counter.FlopCounterMode`` on one
image, on PyTorch's own ops (a multiply-add counts as 2 FLOPs; only conv and matmul ops are counted). A second table
keeps each model's fastest way per batch, and the last lists the CPU speed targets (met or not, with the numbers).

Timing: ``--warmup`` untimed iterations (the first compiles), then iterations until both ``--min-time`` seconds and
``--min-iters`` iterations are reached; img/s = batch size / median iteration time (``time.perf_counter``).

Run from the repository root (compiling takes most of the time: tens of minutes on 2 cores; keep the machine idle)::

    python benchmarks/backbone.py --output benchmarks/results/backbone_cpu.md
    python benchmarks/backbone.py --variants eager eager+cl --train-variants eager   # no compilation
    python benchmarks/backbone.py --quick            # smoke run: 64 px, batch 2, eager only, 0.2 s per measurement
    python benchmarks/backbone.py --paired-only --bf16 --memory   # the paired float32 and bfloat16 checks, memory
"""

import argparse
import contextlib
import ctypes
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

try:
    import backbones  # noqa: F401  (registers unireplknet_* with timm)
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import backbones  # noqa: F401
import timm

from backbones.runtime import keep_freed_memory, reference_ops
from dwconv import MATMUL_LIBRARIES, fastest_matmul, matmul_call  # noqa: E402

UNIREPLKNET_MODELS = ("unireplknet_a", "unireplknet_t")
PEER_MODELS = ("convnextv2_atto", "convnextv2_tiny", "convnext_tiny")
ALL_MODELS = UNIREPLKNET_MODELS + PEER_MODELS
VARIANTS = ("eager", "eager+cl", "compiled", "compiled+cl")
TRAIN_VARIANTS = ("eager", "eager+cl", "compiled")
KEEP_SUFFIX = "+keep"
TRAIN_FLOP_FACTOR = 3
MATMUL_SIZE = 2048


@dataclass
class Result:
    model: str
    form: str  # "deploy", "train form" (eval mode), "model" (peers), "training"
    variant: str
    batch: int
    params_m: float
    forward_gflops: float  # per image, of the form measured
    images_per_s: float
    flop_factor: int = 1
    vs_plain: Optional[float] = None

    @property
    def achieved_gflops(self) -> float:
        return self.forward_gflops * self.flop_factor * self.images_per_s


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def cpu_features() -> str:
    """The vector and matrix extensions that decide CPU float32 and bfloat16 speed, from ``/proc/cpuinfo``."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX-BF16")]
    present = [label for flag, label in wanted if flag in flags]
    return ", ".join(present) if present else "no AVX2"


# the library each dtype's matrix multiply is timed with (set by main() and handed to the paired workers)
MATMUL_LIBRARY = {}


def matmul_step(size: int = MATMUL_SIZE, dtype: torch.dtype = torch.float32) -> Callable[[], torch.Tensor]:
    """One ``size x size`` product of random ``dtype`` matrices (2 * size^3 FLOPs a call) by the library of
    :data:`MATMUL_LIBRARY` for ``dtype``, else the fastest of ``dwconv.MATMUL_LIBRARIES`` here (chosen once)."""
    if dtype not in MATMUL_LIBRARY:
        MATMUL_LIBRARY[dtype] = fastest_matmul(torch.device("cpu"), size, dtype)[0]
    return matmul_call(MATMUL_LIBRARY[dtype], size, dtype)


def matmul_gflops(size: int = MATMUL_SIZE, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The machine's matrix-multiply rate in ``dtype``, GFLOP/s: the fastest of ``dwconv.MATMUL_LIBRARIES`` (best of
    ``repeats`` products each); the library is kept in :data:`MATMUL_LIBRARY` for every later matmul here."""
    library, rate = fastest_matmul(torch.device("cpu"), size, dtype, repeats)
    MATMUL_LIBRARY[dtype] = library
    return rate


def rate_text(gflops: float) -> str:
    """A GFLOP/s figure for a table: whole numbers, but two significant digits below 10 (emulated bfloat16)."""
    return f"{gflops:.0f}" if gflops >= 10 else f"{gflops:.2g}"


def matmul_fact(dtype: torch.dtype, rate: float) -> str:
    return (f"{str(dtype).replace('torch.', '')} matmul rate: {rate:.1f} GFLOP/s (best of 5 "
            f"{MATMUL_SIZE}x{MATMUL_SIZE} products by {MATMUL_LIBRARY[dtype]}, the faster here of "
            f"{' and '.join(MATMUL_LIBRARIES)}; every matmul timed below uses it)")


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
    """Forward GFLOPs of one image, counted on PyTorch's own ops (``reference_ops``): the fast paths compute the
    same products through calls the counter does not see (our depthwise kernels, oneDNN calls on kept weights)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), reference_ops(), counter:
        model(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def in_layout(tensor: torch.Tensor, variant: str) -> torch.Tensor:
    if "bf16" in variant:
        tensor = tensor.to(torch.bfloat16)
    return tensor.contiguous(memory_format=torch.channels_last) if "+cl" in variant else tensor.contiguous()


def runnable(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The model laid out, in bfloat16 (``bf16`` variants) and (for ``compiled`` variants) wrapped as ``variant``
    says; a fresh compilation."""
    if "bf16" in variant:
        model = model.to(torch.bfloat16)
    model = model.to(memory_format=torch.channels_last if "+cl" in variant else torch.contiguous_format)
    if variant.startswith("compiled"):
        torch._dynamo.reset()
        return torch.compile(model, dynamic=False)
    return model


def inference_step(model: Callable, images: torch.Tensor, reference: bool = False,
                   autocast: bool = False) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad(), (reference_ops() if reference else contextlib.nullcontext()), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(images)

    return step


def training_step(model: torch.nn.Module, images: torch.Tensor, num_classes: int,
                  variant: str = "eager") -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(0, num_classes, (images.shape[0],))
    forward = runnable(model, variant)
    images = in_layout(images, variant)
    ops = reference_ops if variant == "plain" else contextlib.nullcontext

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with ops():
            F.cross_entropy(forward(images), labels).backward()
        optimizer.step()

    return step


def benchmark_model(name: str, args: argparse.Namespace, keep: bool = False) -> List[Result]:
    """Measure one model in every way of one phase (``keep``: after ``keep_freed_memory()``); rows in table order."""
    size = args.image_size
    timing = dict(warmup=args.warmup, min_time=args.min_time, min_iters=args.min_iters)
    results: List[Result] = []
    is_unireplknet = name in UNIREPLKNET_MODELS
    suffix = KEEP_SUFFIX if keep else ""

    def measure(form: str, variant: str, batch: int, params: float, gflops: float, step, flop_factor: int = 1):
        seconds = median_iteration_time(step, **timing)
        results.append(Result(name, form, variant, batch, params, gflops, batch / seconds, flop_factor))
        print(f"  {name:<16} {form:<10} {variant:<17} batch {batch:<4} {batch / seconds:9.1f} img/s",
              file=sys.stderr, flush=True)

    model = timm.create_model(name, pretrained=False).eval()
    train_form_gflops = forward_gflops(model, size)
    train_form_params = sum(p.numel() for p in model.parameters()) / 1e6
    if is_unireplknet and not keep:
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, size, size)
            measure("train form", "eager", batch, train_form_params, train_form_gflops, inference_step(model, images))
    if is_unireplknet:
        model.reparameterize()
    form = "deploy" if is_unireplknet else "model"
    gflops = forward_gflops(model, size)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if is_unireplknet and not keep:
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, size, size)
            measure(form, "plain", batch, params, gflops, inference_step(runnable(model, "eager"), images, True))
    for variant in args.keep_variants if keep else args.variants:
        for batch in args.batch_sizes:
            images = in_layout(torch.randn(batch, 3, size, size), variant)
            measure(form, variant + suffix, batch, params, gflops, inference_step(runnable(model, variant), images))
    del model

    if keep:
        train_variants = ["eager", "eager+cl"] if is_unireplknet else ["eager"]
    elif is_unireplknet:
        train_variants = ["plain", *args.train_variants]
    else:
        train_variants = [v for v in args.train_variants if v == "eager"]
    for variant in train_variants:
        model = timm.create_model(name, pretrained=False)
        images = torch.randn(args.train_batch_size, 3, size, size)
        measure("training", variant + suffix, args.train_batch_size, train_form_params, train_form_gflops,
                training_step(model, images, model.num_classes, variant), TRAIN_FLOP_FACTOR)
        del model
    torch._dynamo.reset()
    return results


def set_vs_plain(results: List[Result]) -> None:
    """Each row's speed over its plain row: same model and batch, form deploy/model/training, way ``plain`` where
    measured (UniRepLKNet) else ``eager``; ``train form`` rows against the deploy form's plain row."""
    plain = {}
    for way in ("eager", "plain"):  # plain overrides eager
        plain.update({(r.model, r.form, r.batch): r.images_per_s for r in results
                      if r.variant == way and r.form != "train form"})
    for r in results:
        reference = plain.get((r.model, "deploy" if r.form == "train form" else r.form, r.batch))
        r.vs_plain = None if reference is None else r.images_per_s / reference


def format_table(header: List[str], rows: List[List[str]], markdown: bool, left=(0, 1, 3)) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join(":---" if i in left else "---:" for i in range(len(header))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

    def line(row):
        cells = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in cells)

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows])


def results_table(results: List[Result], matmul_rate: float, markdown: bool) -> str:
    header = ["model", "form", "batch", "way", "params (M)", "GFLOPs/img", "img/s", "achieved GFLOP/s", "of matmul",
              "vs plain"]
    rows = [[r.model, r.form, str(r.batch), r.variant, f"{r.params_m:.2f}", f"{r.forward_gflops:.3f}",
             f"{r.images_per_s:.1f}", f"{r.achieved_gflops:.1f}", f"{r.achieved_gflops / matmul_rate:.1%}",
             f"{r.vs_plain:.2f}x" if r.vs_plain is not None else "-"] for r in results]
    return format_table(header, rows, markdown)


def fastest(results: List[Result], model: str, form: str, batch: Optional[int] = None) -> Optional[Result]:
    rows = [r for r in results if r.model == model and r.form == form and (batch is None or r.batch == batch)]
    return max(rows, key=lambda r: r.images_per_s) if rows else None


def fastest_table(results: List[Result], matmul_rate: float, markdown: bool) -> str:
    header = ["model", "form", "batch", "fastest way", "img/s", "of matmul", "vs plain"]
    rows = []
    for model in dict.fromkeys(r.model for r in results):
        for form in ("deploy", "model", "training"):
            for batch in dict.fromkeys(r.batch for r in results if r.model == model and r.form == form):
                best = fastest(results, model, form, batch)
                rows.append([model, form, str(batch), best.variant, f"{best.images_per_s:.1f}",
                             f"{best.achieved_gflops / matmul_rate:.1%}",
                             f"{best.vs_plain:.2f}x" if best.vs_plain is not None else "-"])
    return format_table(header, rows, markdown)


def targets(results: List[Result], matmul_rate: float) -> List[str]:
    """The float32 CPU targets, each as one line: met or unmet, with its numbers (skipped when not measured)."""
    lines = []

    def check(text: str, value: float, goal: float) -> None:
        lines.append(f"{'met' if value >= goal else 'UNMET'}: {text} ({value:.2f}, target >= {goal:g})")

    # vs_plain is each row's speed over the plain row of its model, form and batch (see set_vs_plain)
    t16 = fastest(results, "unireplknet_t", "deploy", 16)
    if t16 and t16.vs_plain is not None:
        check(f"UniRepLKNet-T batch 16, fastest ({t16.variant}) over plain eager deploy", t16.vs_plain, 1.4)
        check(f"UniRepLKNet-T batch 16 ({t16.variant}), fraction of the matmul rate", t16.achieved_gflops / matmul_rate,
              0.8)
    peer = fastest(results, "convnextv2_tiny", "model", 16)
    if t16 and peer:
        check(f"UniRepLKNet-T batch 16 img/s over convnextv2_tiny's fastest ({peer.variant})",
              t16.images_per_s / peer.images_per_s, 1.0)
    a16, atto = fastest(results, "unireplknet_a", "deploy", 16), fastest(results, "convnextv2_atto", "model", 16)
    if a16 and atto:
        check(f"UniRepLKNet-A batch 16 img/s over convnextv2_atto's fastest ({atto.variant})",
              a16.images_per_s / atto.images_per_s, 1.0)
    t1 = fastest(results, "unireplknet_t", "deploy", 1)
    if t1 and t1.vs_plain is not None:
        check(f"UniRepLKNet-T batch-1 latency, plain eager deploy over fastest ({t1.variant})", t1.vs_plain, 1.3)
    for model in UNIREPLKNET_MODELS:
        best = fastest(results, model, "training")
        if best and best.vs_plain is not None:
            check(f"{model} training step, fastest ({best.variant}) over plain eager train form", best.vs_plain, 1.3)
    return lines


def resident_bytes(field: str = "VmRSS") -> int:
    """The process's resident memory now (``VmRSS``) or its peak since the last reset (``VmHWM``), from
    ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise SystemExit(f"memory: /proc/self/status has no {field}")


def exact_resident_memory() -> None:
    """Make resident memory follow live allocations: every block above 64 KiB its own mapping, unmapped when freed
    (fixed glibc thresholds, so they are not raised on the fly), and no transparent huge pages (no 2 MiB rounding
    or background collapsing). Without this the same step measured 4.19 and 4.55 GiB in two runs."""
    libc = ctypes.CDLL("libc.so.6")
    for parameter in (-3, -1):  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        if not libc.mallopt(parameter, 64 * 1024):
            raise SystemExit("memory: mallopt failed (not glibc?)")
    libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE


def memory_child(name: str, batch: int, image_size: int, checkpointing: bool) -> None:
    """In a fresh process: one training step; prints the step's peak memory above what was resident before it."""
    exact_resident_memory()
    model = timm.create_model(name, pretrained=False)
    model.set_grad_checkpointing(checkpointing)
    step = training_step(model, torch.randn(batch, 3, image_size, image_size), model.num_classes)
    before = resident_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident memory
    step()
    peak = resident_bytes("VmHWM")
    print(json.dumps({"model": name, "batch": batch, "checkpointing": checkpointing, "before": before,
                      "peak": peak}))


def memory_table(args: argparse.Namespace) -> Tuple[str, List[str]]:
    """The memory table (Markdown) and the checkpointing target line of each model."""
    rows, goals = [], []
    for name in args.memory_models:
        measured = {}
        for checkpointing in (False, True):
            done = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, str(args.memory_batch_size), str(args.image_size),
                 str(int(checkpointing))], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"memory measurement of {name} failed:\n{done.stderr[-2000:]}")
            measured[checkpointing] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {name:<16} memory, checkpointing {checkpointing}: "
                  f"{(measured[checkpointing]['peak'] - measured[checkpointing]['before']) / 2**30:.2f} GiB",
                  file=sys.stderr, flush=True)
        plain, saved = (measured[c]["peak"] - measured[c]["before"] for c in (False, True))
        rows.append([name, str(args.memory_batch_size), f"{plain / 2**30:.2f}", f"{saved / 2**30:.2f}",
                     f"{1 - saved / plain:.0%}"])
        goal = "met" if 1 - saved / plain >= 0.4 else "UNMET"
        goals.append(f"{goal}: {name} training-step peak memory at batch {args.memory_batch_size}, "
                                 f"reduction with gradient checkpointing ({1 - saved / plain:.2f}, target >= 0.4)")
    header = ["model", "batch", "step peak (GiB)", "with checkpointing (GiB)", "reduction"]
    return format_table(header, rows, markdown=True, left=(0,)), goals


PEERS = {"unireplknet_a": "convnextv2_atto", "unireplknet_t": "convnextv2_tiny"}
# (worker, which model, way) timed in this order every round: "ours" is the UniRepLKNet model, "peer" its ConvNeXt V2
PAIRED_KEYS = (("default", "ours", "plain"), ("default", "ours", "eager+cl"), ("keep", "ours", "eager+cl"),
               ("default", "peer", "compiled+cl"), ("keep", "peer", "eager+cl"), ("keep", "peer", "compiled+cl"),
               ("keep", "matmul", "float32"))
# "matmul": one MATMUL_SIZE product (by MATMUL_LIBRARY's library), timed in the same rounds, so "of matmul" is a
# per-round ratio that drift of the machine's speed does not skew
# the bfloat16 check, all after keep_freed_memory(): our float32 eager+cl against our bfloat16 ways (the whole model
# in bfloat16, as optimize_for_inference(dtype=torch.bfloat16) makes it, and float32 weights under bfloat16 autocast)
# and the peer's bfloat16 ways
BF16_PAIRED_KEYS = (("keep", "ours", "eager+cl"), ("keep", "ours", "bf16+cl"), ("keep", "ours", "autocast+cl"),
                    ("keep", "peer", "bf16+cl"), ("keep", "peer", "compiled+bf16+cl"), ("keep", "peer", "autocast+cl"),
                    ("keep", "matmul", "bfloat16"))


# the training check, all in the default-allocator worker: our train form's plain step (PyTorch's ops alone, as
# reference_ops() runs it), its eager steps in both layouts, and the peer's eager steps
TRAIN_PAIRED_KEYS = (("default", "ours", "train:plain"), ("default", "ours", "train:eager"),
                     ("default", "ours", "train:eager+cl"), ("default", "peer", "train:eager"),
                     ("default", "peer", "train:eager+cl"))


def paired_child(batch: int, image_size: int, keep: bool) -> None:
    """A timing server for the paired check: reads ``MODEL WAY`` per stdin line, runs it once, prints its seconds.

    Each (model, way) is built on first request (so a compilation lands in a warm-up round)."""
    if keep and not keep_freed_memory(True):
        raise SystemExit("paired check: keep_freed_memory() is not available here (not glibc)")
    images = torch.randn(batch, 3, image_size, image_size)
    steps = {}

    def build(name: str, way: str) -> Callable[[], None]:
        if name == "matmul":  # the machine's matrix-multiply rate, in the same rounds
            return matmul_step(MATMUL_SIZE, getattr(torch, way))
        if way.startswith("train:"):  # a training step of the train form (AdamW, cross-entropy)
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
            return training_step(model, images, model.num_classes, way.split(":", 1)[1])
        model = timm.create_model(name, pretrained=False).eval()
        if name in UNIREPLKNET_MODELS:
            model.reparameterize()
        if way == "plain":
            return inference_step(model, images, reference=True)
        return inference_step(runnable(model, way), in_layout(images, way), autocast="autocast" in way)

    print("ready", flush=True)
    for line in sys.stdin:
        name, way = line.split()
        if (name, way) not in steps:
            steps[name, way] = build(name, way)
        start = time.perf_counter()
        steps[name, way]()
        print(time.perf_counter() - start, flush=True)


def paired_times(name: str, batch: int, args: argparse.Namespace, keys=PAIRED_KEYS) -> dict:
    """Seconds of every way of ``keys`` in each of ``args.paired_rounds`` rounds, timed in strict alternation in
    worker processes (default allocator, and after ``keep_freed_memory()``, as the keys name them)."""
    models = {"ours": name, "peer": PEERS[name], "matmul": "matmul"}
    workers = {}
    for allocator in dict.fromkeys(key[0] for key in keys):
        workers[allocator] = subprocess.Popen(
            [sys.executable, __file__, "--paired-child", str(batch), str(args.image_size),
             str(int(allocator == "keep")),
             *(item for dtype, library in MATMUL_LIBRARY.items()
               for item in ("--matmul-library", str(dtype).replace("torch.", ""), library))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if workers[allocator].stdout.readline().strip() != "ready":
            raise SystemExit(f"paired check: the {allocator} worker failed to start")

    def run(key) -> float:
        allocator, which, way = key
        worker = workers[allocator]
        worker.stdin.write(f"{models[which]} {way}\n")
        worker.stdin.flush()
        answer = worker.stdout.readline()
        if not answer:
            raise SystemExit(f"paired check: the {allocator} worker died running {models[which]} {way}")
        return float(answer)

    for _ in range(max(1, args.warmup)):
        for key in keys:
            run(key)
    times = {key: [] for key in keys}
    for _ in range(args.paired_rounds):
        for key in keys:
            times[key].append(run(key))
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    return times


def paired_label(key) -> str:
    return key[2] + (KEEP_SUFFIX if key[0] == "keep" else "")


def paired_ratio(times: dict, slower, faster) -> float:
    """Median over rounds of ``time(slower) / time(faster)``: how many times faster ``faster`` ran."""
    return statistics.median(n / d for n, d in zip(times[slower], times[faster], strict=True))


MATMUL_GFLOP = 2 * MATMUL_SIZE**3 / 1e9  # one matmul of the paired rounds


def paired_fraction(times: dict, key, gflop: float, matmul_key) -> float:
    """Median over rounds of the GFLOP/s of ``key`` (``gflop`` per call) over the matmul rate in the same round."""
    return statistics.median((gflop / t) / (MATMUL_GFLOP / m)
                             for t, m in zip(times[key], times[matmul_key], strict=True))


def paired_matmul_rate(times: dict, matmul_key) -> float:
    """Median GFLOP/s of the matmul timed in the paired rounds."""
    return MATMUL_GFLOP / statistics.median(times[matmul_key])


def paired_fastest(name: str, batch: int, args: argparse.Namespace, keys, baseline):
    """Time ``keys`` in alternation (:func:`paired_times`); return the seconds per key, img/s per key, and our
    fastest key other than ``baseline`` and the peer's fastest key (best median img/s)."""
    times = paired_times(name, batch, args, keys)
    speed = {key: batch / statistics.median(seconds) for key, seconds in times.items()}
    ours = max((k for k in keys if k[1] == "ours" and k != baseline), key=speed.get)
    theirs = max((k for k in keys if k[1] == "peer"), key=speed.get)
    return times, speed, ours, theirs


def paired_table(args: argparse.Namespace) -> Tuple[str, List[str]]:
    """UniRepLKNet's plain form, its fastest eager ways and its ConvNeXt V2 peer's fastest ways, timed in strict
    alternation (:func:`paired_times`) so drift of a shared machine hits all alike. "Fastest" and the peer's fastest
    are the ways with the best median; ratios are medians over rounds of the per-round ratio. Returns the table and
    the target lines."""
    rows, goals = [], []

    def check(text: str, value: float, goal: float) -> None:
        goals.append(f"{'met' if value >= goal else 'UNMET'}: {text} ({value:.2f}, target >= {goal:g})")

    plain = ("default", "ours", "plain")
    for name in [m for m in args.models if m in UNIREPLKNET_MODELS]:
        peer = PEERS[name]
        gflops = forward_gflops(timm.create_model(name, pretrained=False).eval().reparameterize(), args.image_size)
        for batch in args.batch_sizes:
            times, speed, ours, theirs = paired_fastest(name, batch, args, PAIRED_KEYS, plain)
            fraction = paired_fraction(times, ours, batch * gflops, ("keep", "matmul", "float32"))
            over_plain, over_peer = paired_ratio(times, plain, ours), paired_ratio(times, theirs, ours)
            rows.append([name, str(batch), str(args.paired_rounds), f"{speed[plain]:.1f}",
                         f"{speed['default', 'ours', 'eager+cl']:.1f}", f"{speed['keep', 'ours', 'eager+cl']:.1f}",
                         paired_label(ours), f"{over_plain:.2f}x", f"{fraction:.1%}", peer, paired_label(theirs),
                         f"{speed[theirs]:.1f}", f"{over_peer:.2f}x",
                         rate_text(paired_matmul_rate(times, ('keep', 'matmul', 'float32')))])
            print(f"  {name:<16} paired, batch {batch}: " + " ".join(rows[-1][3:]), file=sys.stderr, flush=True)
            variant = f"UniRepLKNet-{name[-1].upper()}"
            if batch == max(args.batch_sizes):
                if name == "unireplknet_t":
                    check(f"{variant} batch {batch}, paired, fastest ({paired_label(ours)}) over plain", over_plain,
                          1.4)
                    check(f"{variant} batch {batch}, paired, {paired_label(ours)}, fraction of the matmul rate",
                          fraction, 0.8)
                check(f"{variant} batch {batch}, paired, {paired_label(ours)} over {peer}'s fastest "
                      f"({paired_label(theirs)})", over_peer, 1.0)
            if batch == 1 and name == "unireplknet_t":
                check(f"{variant} batch-1 latency, paired, plain over fastest ({paired_label(ours)})", over_plain,
                      1.3)
    header = ["model", "batch", "rounds", "plain img/s", "eager+cl img/s", "eager+cl+keep img/s", "fastest",
              "vs plain", "of matmul", "peer", "peer's fastest", "peer img/s", "vs peer", "matmul GFLOP/s"]
    return format_table(header, rows, markdown=True, left=(0, 6, 9, 10)), goals


def train_paired_table(args: argparse.Namespace) -> Tuple[str, List[str]]:
    """Training steps (:data:`TRAIN_PAIRED_KEYS`) at ``args.train_batch_size``, timed in strict alternation. Returns
    the table and the target lines (our fastest step at least 1.3x the plain step)."""
    rows, goals = [], []
    plain, compiled = ("default", "ours", "train:plain"), ("default", "ours", "train:compiled")
    keys = TRAIN_PAIRED_KEYS + ((compiled,) if args.train_compiled else ())
    batch = args.train_batch_size
    for name in [m for m in args.models if m in UNIREPLKNET_MODELS]:
        peer = PEERS[name]
        times, speed, ours, theirs = paired_fastest(name, batch, args, keys, plain)
        ours_way, their_way = (key[2].split(":", 1)[1] for key in (ours, theirs))  # the way without "train:"
        over_plain, over_peer = paired_ratio(times, plain, ours), paired_ratio(times, theirs, ours)
        rows.append([name, str(batch), str(args.paired_rounds), f"{speed[plain]:.1f}",
                     f"{speed['default', 'ours', 'train:eager']:.1f}",
                     f"{speed['default', 'ours', 'train:eager+cl']:.1f}",
                     *([f"{speed[compiled]:.1f}"] if args.train_compiled else []), ours_way, f"{over_plain:.2f}x", peer,
                     their_way, f"{speed[theirs]:.1f}", f"{over_peer:.2f}x"])
        print(f"  {name:<16} training, batch {batch}: " + " ".join(rows[-1][3:]), file=sys.stderr, flush=True)
        goals.append(f"{'met' if over_plain >= 1.3 else 'UNMET'}: UniRepLKNet-{name[-1].upper()} training step, "
                     f"batch {batch}, paired, fastest ({ours_way}) over plain ({over_plain:.2f}, target >= 1.3)")
    header = ["model", "batch", "rounds", "plain img/s", "eager img/s", "eager+cl img/s",
              *(["compiled img/s"] if args.train_compiled else []), "fastest", "vs plain", "peer", "peer's fastest",
              "peer img/s", "vs peer"]
    left = tuple(header.index(column) for column in ("model", "fastest", "peer", "peer's fastest"))
    return format_table(header, rows, markdown=True, left=left), goals


def bf16_table(args: argparse.Namespace) -> Tuple[str, List[str]]:
    """Our float32 eager+cl against our bfloat16 ways and the peer's (:data:`BF16_PAIRED_KEYS`), timed in strict
    alternation after ``keep_freed_memory()``. Returns the table and the target lines (bfloat16 faster than our
    float32 path)."""
    rows, goals = [], []
    fp32 = ("keep", "ours", "eager+cl")
    for name in [m for m in args.models if m in UNIREPLKNET_MODELS]:
        peer = PEERS[name]
        gflops = forward_gflops(timm.create_model(name, pretrained=False).eval().reparameterize(), args.image_size)
        for batch in args.batch_sizes:
            times, speed, ours, theirs = paired_fastest(name, batch, args, BF16_PAIRED_KEYS, fp32)
            over_fp32 = paired_ratio(times, fp32, ours)
            autocast_over_fp32 = paired_ratio(times, fp32, ("keep", "ours", "autocast+cl"))
            over_peer = paired_ratio(times, theirs, ours)
            rows.append([name, str(batch), str(args.paired_rounds), f"{speed[fp32]:.1f}",
                         f"{speed['keep', 'ours', 'bf16+cl']:.1f}", f"{speed['keep', 'ours', 'autocast+cl']:.1f}",
                         paired_label(ours), f"{over_fp32:.2f}x", f"{autocast_over_fp32:.2f}x",
                         f"{paired_fraction(times, ours, batch * gflops, ('keep', 'matmul', 'bfloat16')):.1%}", peer,
                         paired_label(theirs), f"{speed[theirs]:.1f}", f"{over_peer:.2f}x",
                         rate_text(paired_matmul_rate(times, ('keep', 'matmul', 'bfloat16')))])
            print(f"  {name:<16} bfloat16, batch {batch}: " + " ".join(rows[-1][3:]), file=sys.stderr, flush=True)
            goals.append(f"{'met' if over_fp32 > 1 else 'UNMET'}: UniRepLKNet-{name[-1].upper()} batch {batch}, "
                         f"paired, bfloat16 ({paired_label(ours)}) over float32 eager+cl+keep ({over_fp32:.2f}, "
                         f"target > 1)")
    header = ["model", "batch", "rounds", "float32 eager+cl+keep img/s", "bf16+cl+keep img/s",
              "autocast+cl+keep img/s", "fastest bf16", "vs float32", "autocast vs float32", "of bf16 matmul", "peer",
              "peer's fastest bf16", "peer img/s", "vs peer", "bf16 matmul GFLOP/s"]
    return format_table(header, rows, markdown=True, left=(0, 6, 10, 11)), goals


def notes(args: argparse.Namespace) -> List[str]:
    return [
        f"Input {args.image_size}x{args.image_size} px, float32, random weights; inference batch "
        f"{' and '.join(map(str, args.batch_sizes))}, training batch {args.train_batch_size}; median of >= "
        f"{args.min_iters} iterations and >= {args.min_time} s after {args.warmup} warm-up iteration(s).",
        "GFLOPs/img: forward FLOPs of the measured form (FlopCounterMode, multiply-add = 2 FLOPs). Training rows "
        f"(forward + cross-entropy + backward + AdamW step, train form) credit {TRAIN_FLOP_FACTOR}x the forward FLOPs.",
        "Ways: `plain` UniRepLKNet eager NCHW with the blocks' straightforward ops (`backbones.reference_ops()`), "
        "`eager` NCHW (UniRepLKNet with its fast inference ops: oneDNN Linear+GELU, then GRN's factor folded into "
        "Linear2's weights on large maps, else GRN in place), `+cl` "
        "channels-last weights and input, `compiled` torch.compile (inductor, static shapes), `+keep` measured after "
        "`backbones.keep_freed_memory()` (glibc keeps freed blocks for reuse; every model gets it). `vs plain`: "
        "speed ratio to the same model's plain row at that batch (UniRepLKNet: `plain` of its deploy form, so the "
        "`train form` rows show the deploy speed-up inverted; peers: eager NCHW).",
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="inference batch sizes (default 1 16; --quick: 2)")
    parser.add_argument("--train-batch-size", type=int, help="training-step batch size (default 8; --quick: 2)")
    parser.add_argument("--image-size", type=int, help="input side in px (default 224; --quick: 64)")
    parser.add_argument("--min-time", type=float, help="minimum seconds per measurement (default 2; --quick: 0.2)")
    parser.add_argument("--min-iters", type=int, help="minimum timed iterations (default 5; --quick: 3)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up iterations (default 3; --quick: 1)")
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=list(ALL_MODELS), metavar="MODEL",
                        help=f"subset of: {' '.join(ALL_MODELS)}")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="inference ways (default all; --quick: eager)")
    parser.add_argument("--train-variants", nargs="+", choices=TRAIN_VARIANTS,
                        help="training ways of UniRepLKNet (default all; --quick: eager); peers train eager only")
    parser.add_argument("--keep-variants", nargs="*", choices=VARIANTS,
                        help="inference ways measured again after keep_freed_memory() (default eager eager+cl "
                             "compiled+cl; --quick: eager; none to skip the phase)")
    parser.add_argument("--memory", action="store_true", help="also measure training-step peak memory")
    parser.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    parser.add_argument("--memory-models", nargs="+", choices=ALL_MODELS, default=["unireplknet_t"], metavar="MODEL")
    parser.add_argument("--memory-batch-size", type=int, default=32)
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true",
                        help="also time UniRepLKNet plain, its eager+cl ways and its ConvNeXt V2 peer's fastest ways "
                             "in strict alternation")
    parser.add_argument("--paired-only", action="store_true", help="only the paired check")
    parser.add_argument("--train-paired-only", action="store_true", help="only the paired training check")
    parser.add_argument("--train-compiled", action="store_true",
                        help="the paired training check also times our torch.compile'd training step (inductor; "
                             "one compilation of forward and backward per model)")
    parser.add_argument("--bf16", action="store_true",
                        help="also time UniRepLKNet and its ConvNeXt V2 peer in bfloat16 (the whole model, and "
                             "autocast) against our float32 eager+cl, in strict alternation")
    parser.add_argument("--bf16-only", action="store_true", help="only the bfloat16 check")
    parser.add_argument("--bf16-emulated", action="store_true",
                        help="run the bfloat16 check on a CPU without native bfloat16 too (slow: minutes a round)")
    parser.add_argument("--paired-rounds", type=int, default=10, help="rounds of the paired check (default 10)")
    parser.add_argument("--paired-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--matmul-library", nargs=2, action="append", default=[], metavar=("DTYPE", "LIBRARY"),
                        help=argparse.SUPPRESS)  # the parent's choice, handed to the paired workers
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--output", type=Path, help="write a Markdown section with the results to this file")
    args = parser.parse_args(argv)
    defaults = dict(batch_sizes=([1, 16], [2]), train_batch_size=(8, 2), image_size=(224, 64), min_time=(2.0, 0.2),
                    min_iters=(5, 3), warmup=(3, 1), variants=(list(VARIANTS), ["eager", "eager+cl"]),
                    train_variants=(list(TRAIN_VARIANTS), ["eager"]),
                    keep_variants=(["eager", "eager+cl", "compiled+cl"], ["eager"]))
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if "eager" not in args.variants:
        args.variants = ["eager", *args.variants]  # the plain reference every ratio needs
    if "eager" not in args.train_variants:
        args.train_variants = ["eager", *args.train_variants]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.memory_child:
        name, batch, size, checkpointing = args.memory_child
        memory_child(name, int(batch), int(size), bool(int(checkpointing)))
        return
    for dtype, library in args.matmul_library:
        MATMUL_LIBRARY[getattr(torch, dtype)] = library
    if args.paired_child:
        batch, size, keep = args.paired_child
        paired_child(int(batch), int(size), bool(int(keep)))
        return
    command = "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else [sys.argv[0], *argv]))
    machine = f"{cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable)"
    matmul_rate = matmul_gflops()
    facts = [
        f"Machine: {machine}; {cpu_features()}",
        f"torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}, "
        f"torch threads {torch.get_num_threads()} (default, not set)",
        matmul_fact(torch.float32, matmul_rate),
    ]
    bf16 = args.bf16 or args.bf16_only
    if bf16 and not backbones.native_bfloat16() and not args.bf16_emulated:
        # emulated bfloat16 is tens of times slower than float32: a 2048x2048 product alone takes seconds, and the
        # check would time emulation, not the models; one small product says by how much
        _, emulated = fastest_matmul(size=512, dtype=torch.bfloat16, repeats=1)
        facts.append(f"bfloat16 check not run: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), and oneDNN "
                     f"emulates it (a 512x512 bfloat16 product ran at {rate_text(emulated)} GFLOP/s against "
                     f"{matmul_rate:.0f} in float32); --bf16-emulated runs it anyway")
        bf16 = False
    bf16_matmul_rate = matmul_gflops(dtype=torch.bfloat16) if bf16 else float("nan")
    if bf16:
        facts.append(f"{matmul_fact(torch.bfloat16, bf16_matmul_rate)}; oneDNN bfloat16 native: "
                     f"{backbones.native_bfloat16()}")
    print("\n".join(facts), flush=True)

    results: List[Result] = []
    only = args.memory_only or args.paired_only or args.bf16_only or args.train_paired_only
    for name in [] if only else args.models:
        results.extend(benchmark_model(name, args))
    if args.keep_variants and not only:
        if not keep_freed_memory(True):
            print("keep_freed_memory: not available here (not glibc); no +keep rows", file=sys.stderr)
        else:
            for name in args.models:
                results.extend(benchmark_model(name, args, keep=True))
    order = {name: i for i, name in enumerate(args.models)}
    forms = {"train form": 0, "deploy": 1, "model": 1, "training": 2}
    results.sort(key=lambda r: (order[r.model], forms[r.form]))  # stable: within a form, phases in order
    set_vs_plain(results)
    paired, paired_goals = paired_table(args) if args.paired or args.paired_only else ("", [])
    train_paired, train_goals = (train_paired_table(args) if args.paired or args.paired_only or args.train_paired_only
                                 else ("", []))
    low, low_goals = bf16_table(args) if bf16 else ("", [])
    memory, memory_goals = memory_table(args) if args.memory or args.memory_only else ("", [])
    goals = targets(results, matmul_rate) + paired_goals + train_goals + low_goals + memory_goals

    for markdown in ([False, True] if args.markdown and results else [False] if results else []):
        print()
        print(results_table(results, matmul_rate, markdown))
        print()
        print(fastest_table(results, matmul_rate, markdown))
    if results:
        print("\n".join(f"* {note}" for note in notes(args)))
    for table in (paired, train_paired):
        if table:
            print()
            print(table)
    if low:
        print()
        print(low)
    if memory:
        print()
        print(memory)
    print("\n".join(goals))

    if args.output is not None:
        date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        section = ["## Backbone CPU throughput", ""]
        section += [f"- Date: {date}", *(f"- {fact}" for fact in facts), f"- Command: `{command}`", ""]
        if results:
            section += [results_table(results, matmul_rate, markdown=True), ""]
            section += ["Fastest way per model, form and batch:", "",
                        fastest_table(results, matmul_rate, markdown=True), ""]
            section += [f"- {note}" for note in notes(args)]
        if paired:
            section += ["", "Paired check (UniRepLKNet deploy form plain and eager+cl, its ConvNeXt V2 peer "
                        "compiled+cl, in a default-allocator worker; both models' eager+cl and the peer's compiled+cl "
                        "in a keep_freed_memory() worker; all timed in strict alternation; ratios are medians of "
                        "per-round ratios; \"of matmul\" divides by a matmul timed in the same rounds, whose median "
                        "rate is the last column):", "", paired]
        if train_paired:
            section += ["", "Paired training check (train form, AdamW step with cross-entropy: our plain step with "
                        "PyTorch's ops alone, our eager steps in NCHW and channels-last"
                        + (", our torch.compile'd step" if args.train_compiled else "") + ", the peer's eager steps; all "
                        "timed in strict alternation in one default-allocator worker; ratios are medians of "
                        "per-round ratios):", "", train_paired]
        if low:
            section += ["", "bfloat16 check (after keep_freed_memory(), all timed in strict alternation in one worker: "
                        "our float32 eager+cl, our deploy form wholly in bfloat16 (`bf16+cl`, what "
                        "`optimize_for_inference(dtype=torch.bfloat16)` makes) and under bfloat16 autocast with "
                        "float32 weights (`autocast+cl`), the peer in bfloat16 eager, compiled and under autocast; "
                        "ratios are medians of per-round ratios; \"of bf16 matmul\" divides by a bfloat16 matmul "
                        "timed in the same rounds):", "", low]
        if memory:
            section += ["", "Training-step peak memory (one fresh process per row: peak resident memory during the "
                        "step minus resident memory before it):", "", memory]
        if goals:
            section += ["", "Targets:", "", *(f"- {goal}" for goal in goals)]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(section) + "\n")
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
