"""Depthwise-convolution backends side by side on UniRepLKNet's layer shapes, and the dispatch policy they imply.

For every depthwise layer shape of UniRepLKNet-T and -S at 224 px (stage widths 80..768 at 56x56 .. 7x7), batch 1, 16
and 128, kernel sizes 3, 7, 13, 17 and 31, inputs in NCHW and channels-last layout, this script times each backend of
:mod:`backbones.ops` for the forward pass (inference) and for forward + backward (training), prints time and GFLOP/s
(a multiply-add is 2 FLOPs; training counts 3 convolutions' worth), and the machine's float32 matrix-multiply rate
measured in the same run. ``--write-policy`` stores the fastest backend of every measured case in
``backbones/ops/dwconv_policy.json``, which the dispatcher (``backend="auto"``, the default) reads; ``--verify``
then re-times the dispatcher's choice against plain ``F.conv2d`` at every shape.

Slow cases are cut short: a measurement repeats until ``--min-time`` has passed, but a single call slower than
``--max-call`` seconds is timed once, and a backend slower than 4x the fastest one so far at a shape is not repeated.
NCHW inputs are measured up to batch ``--nchw-max-batch`` (16): the backbone itself feeds its depthwise layers
channels-last tensors, which is the layout measured at every batch size.

    python benchmarks/dwconv.py --write-policy --verify --output benchmarks/results/dwconv_cpu.md   # CPU, minutes
    python benchmarks/dwconv.py --device cuda --dtypes float32 float16 bfloat16 --write-policy --verify --end-to-end
    python benchmarks/dwconv.py --skip-grid --end-to-end --end-to-end-models unireplknet_a unireplknet_t \
        --end-to-end-batch 16 --output benchmarks/results/dwconv_end_to_end_cpu.md
    python benchmarks/dwconv.py --quick                                                              # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backbones.ops import depthwise_conv2d, select_backend  # noqa: E402
from backbones.ops.depthwise import _BACKENDS  # noqa: E402
from backbones.ops.policy import POLICY_ENV, cpu_isa, reload_policy  # noqa: E402

# (channels, spatial size) of every stage of UniRepLKNet-T and -S at 224 px
LAYER_SHAPES = {
    "T": [(80, 56), (160, 28), (320, 14), (640, 7)],
    "S": [(96, 56), (192, 28), (384, 14), (768, 7)],
}
POLICY_PATH = ROOT / "backbones" / "ops" / "dwconv_policy.json"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# the libraries a matrix multiply is timed with; the machine's rate is the faster one's
MATMUL_LIBRARIES = ("torch.mm", "oneDNN")


def matmul_call(library: str, size: int = 2048, dtype: torch.dtype = torch.float32,
                device: torch.device = torch.device("cpu")) -> Optional[Callable[[], torch.Tensor]]:
    """One ``size x size`` product of random ``dtype`` matrices (2 * size^3 FLOPs a call) by ``library``, or None
    where it is not available: ``"torch.mm"`` is PyTorch's BLAS (MKL in the x86 wheels, cuBLAS on CUDA) into a kept
    output; ``"oneDNN"`` (CPU) is oneDNN's matmul on a weight reordered for it, the call our fast path and
    ``torch.compile``'s CPU backend make for a Linear. On AMD CPUs MKL does not run its best kernels (there it
    measured 0.72-0.85x oneDNN's float32 rate), so ``torch.mm`` alone would understate the machine."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    if library == "torch.mm":
        out = torch.empty_like(a)
        return lambda: torch.mm(a, b, out=out)
    if library != "oneDNN":
        raise ValueError(f"unknown matmul library {library!r}; known: {', '.join(MATMUL_LIBRARIES)}")
    if device.type != "cpu" or not (torch.backends.mkldnn.is_available()
                                    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(b, size)  # a Linear's (out, in) weight: a @ b.T
        torch.ops.mkldnn._linear_pointwise(a[:8], weight, None, "none", [], "")
    except RuntimeError:  # e.g. bfloat16 where this build's oneDNN has no kernel for it
        return None
    return lambda: torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], "")


def fastest_matmul(device: torch.device = torch.device("cpu"), size: int = 2048,
                   dtype: torch.dtype = torch.float32, repeats: int = 5) -> Tuple[str, float]:
    """The library of :data:`MATMUL_LIBRARIES` whose ``size x size`` product in ``dtype`` is fastest here, and its
    rate in GFLOP/s: after a warm-up call of each, ``repeats`` rounds of one call of each in turn (so drift of the
    machine's speed hits them alike), each library's best call."""
    steps = {library: step for library in MATMUL_LIBRARIES
             if (step := matmul_call(library, size, dtype, device)) is not None}
    best = dict.fromkeys(steps, float("inf"))
    for step in steps.values():
        step()
    synchronize(device)
    for _ in range(repeats):
        for library, step in steps.items():
            start = time.perf_counter()
            step()
            synchronize(device)
            best[library] = min(best[library], time.perf_counter() - start)
    library = min(best, key=best.get)
    return library, 2 * size**3 / best[library] / 1e9


def time_call(step: Callable[[], None], device, min_time: float, max_call: float, give_up_after: float) -> float:
    """Median seconds per call after a warm-up call.

    A warm-up call slower than ``max_call`` (or than ``give_up_after``, a multiple of the fastest backend so far) is
    the measurement itself: such calls last seconds, and one-time costs (kernel selection, FFT plans) are noise there.
    """
    tick = time.perf_counter()
    step()  # warm-up (kernel selection, compilation, caches)
    synchronize(device)
    first = time.perf_counter() - tick
    if first > max_call or first > give_up_after:
        return first
    times: List[float] = []
    started = time.perf_counter()
    while True:
        tick = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - tick)
        if times[-1] > max_call or times[-1] > give_up_after:
            break
        if len(times) >= 3 and time.perf_counter() - started >= min_time:
            break
    return statistics.median(times)


def make_step(backend: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, training: bool):
    if training:
        x = x.detach().requires_grad_()
        weight = weight.detach().requires_grad_()
        bias = bias.detach().requires_grad_()

        def step():
            x.grad = weight.grad = bias.grad = None
            depthwise_conv2d(x, weight, bias, backend=backend).sum().backward()
    else:

        def step():
            with torch.inference_mode():
                depthwise_conv2d(x, weight, bias, backend=backend)

    return step


def candidate_backends(device: torch.device, layout: str, training: bool) -> List[str]:
    names = ["torch", "torch_channels_last", "fft", "direct_fft_weight_grad"]
    if device.type == "cuda":
        names.append("triton")
    elif _BACKENDS["cpu_direct"].unavailable() is None:  # our kernels, where they build
        names.append("cpu_direct")
    if layout == "channels_last":
        names.remove("torch_channels_last")  # the same call as "torch" on channels-last input
    if not training:
        names.remove("direct_fft_weight_grad")  # its forward is the direct channels-last convolution
    return names


MARGIN = 0.8  # another backend must beat plain torch by 20% to be chosen: smaller gaps drown in timing noise


def choose_best(times_ms: Dict[str, float]) -> str:
    fastest = min(times_ms, key=times_ms.get)
    return fastest if times_ms[fastest] < MARGIN * times_ms["torch"] else "torch"


def run_case(args, device, dtype, model, channels, size, batch, kernel_size, layout, training) -> Dict:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(channels, 1, kernel_size, kernel_size, generator=generator) * 0.05).to(device, dtype)
    bias = torch.randn(channels, generator=generator).to(device, dtype)
    flops = 2 * batch * channels * size * size * kernel_size**2 * (3 if training else 1)
    times: Dict[str, float] = {}
    for name in candidate_backends(device, layout, training):
        if args.backends and name not in args.backends and name != "torch":
            continue
        if _BACKENDS[name].supports(x, weight) is not None:
            continue
        best_so_far = min(times.values(), default=float("inf"))
        seconds = time_call(make_step(name, x, weight, bias, training), device, args.min_time, args.max_call,
                            4 * best_so_far)
        times[name] = seconds
    best = choose_best(times)
    return dict(
        model=model, device=device.type, dtype=str(dtype).replace("torch.", ""),
        mode="training" if training else "inference", layout=layout, batch=batch, channels=channels,
        height=size, width=size, kernel_size=kernel_size, flops=flops,
        times_ms={k: v * 1e3 for k, v in times.items()}, best=best,
    )


def verify_case(args, device, dtype, case: Dict) -> None:
    """Time the dispatcher (backend="auto") and plain PyTorch side by side, alternating calls, at this shape."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(case["batch"], case["channels"], case["height"], case["width"], generator=generator)
    x = x.to(device=device, dtype=dtype)
    if case["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    k = case["kernel_size"]
    weight = (torch.randn(case["channels"], 1, k, k, generator=generator) * 0.05).to(device, dtype)
    bias = torch.randn(case["channels"], generator=generator).to(device, dtype)
    training = case["mode"] == "training"
    probe_x = x.detach().requires_grad_(training)
    with torch.set_grad_enabled(training):
        case["auto_choice"] = select_backend(probe_x, weight.detach().requires_grad_(training), "auto")
    steps = {name: make_step(name, x, weight, bias, training) for name in ("torch", "auto")}
    times: Dict[str, List[float]] = {"torch": [], "auto": []}
    started = time.perf_counter()
    for name, step in steps.items():  # warm-up both
        step()
    synchronize(device)
    while True:
        for name, step in steps.items():
            tick = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - tick)
        elapsed = time.perf_counter() - started
        if times["torch"][-1] > args.max_call or (len(times["torch"]) >= 3 and elapsed >= 2 * args.min_time):
            break
    case["verify_torch_ms"] = statistics.median(times["torch"]) * 1e3
    case["auto_ms"] = statistics.median(times["auto"]) * 1e3


def format_rows(cases: List[Dict], backends: List[str], markdown: bool) -> str:
    header = ["model", "dtype", "mode", "layout", "B", "C", "HxW", "K"]
    header += [f"{b} ms" for b in backends] + ["best", "best GFLOP/s", "best/torch"]
    if any("auto_ms" in c for c in cases):
        header += ["auto choice", "torch ms (again)", "auto ms", "auto vs torch"]
    rows = []
    for c in cases:
        t = c["times_ms"]
        row = [c["model"], c["dtype"], c["mode"], c["layout"], str(c["batch"]), str(c["channels"]),
               f"{c['height']}x{c['width']}", str(c["kernel_size"])]
        row += [f"{t[b]:.2f}" if b in t else "-" for b in backends]
        best_ms = t[c["best"]]
        row += [c["best"], f"{c['flops'] / best_ms / 1e6:.1f}", f"{t['torch'] / best_ms:.2f}x"]
        if "auto_ms" in c:
            row += [c["auto_choice"], f"{c['verify_torch_ms']:.2f}", f"{c['auto_ms']:.2f}",
                    f"{c['verify_torch_ms'] / c['auto_ms']:.2f}x"]
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def end_to_end(device: torch.device, dtype: torch.dtype, batch: int, min_time: float, name: str) -> str:
    """A training step of a UniRepLKNet at 224 px with the dispatcher's backends against PyTorch alone."""
    import timm

    import backbones  # noqa: F401

    results = {}
    for backend in ("torch", "auto"):
        torch.manual_seed(0)
        model = timm.create_model(name, depthwise_backend=backend).to(device).train()
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=device)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()

        results[backend] = batch / time_call(step, device, min_time, float("inf"), float("inf"))
    return (f"{name} training step at 224 px, batch {batch}, {str(dtype).replace('torch.', '')}, channels-last: "
            f"PyTorch alone {results['torch']:.1f} img/s, dispatcher {results['auto']:.1f} img/s "
            f"({results['auto'] / results['torch']:.2f}x)")


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    model = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--models", nargs="+", default=["T", "S"], choices=sorted(LAYER_SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 128])
    parser.add_argument("--kernel-sizes", nargs="+", type=int, default=[3, 7, 13, 17, 31])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    parser.add_argument("--nchw-max-batch", type=int, default=16,
                        help="measure NCHW input only up to this batch (the backbone feeds channels-last tensors)")
    parser.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="time only these backends (and torch, the baseline); default: every candidate")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of repeats per measurement")
    parser.add_argument("--max-call", type=float, default=1.0, help="time a call only once when slower than this")
    parser.add_argument("--write-policy", action="store_true", help=f"write the winners to {POLICY_PATH}")
    parser.add_argument("--policy-path", type=Path, default=POLICY_PATH)
    parser.add_argument("--verify", action="store_true", help="re-time backend='auto' against torch at every case")
    parser.add_argument("--end-to-end", action="store_true", help="training steps of whole models, torch vs auto")
    parser.add_argument("--end-to-end-models", nargs="+", default=["unireplknet_s"])
    parser.add_argument("--end-to-end-batch", type=int, default=64)
    parser.add_argument("--skip-grid", action="store_true", help="only the end-to-end measurement")
    parser.add_argument("--verify-policy", action="store_true",
                        help="skip the grid; verify the cases stored in the policy file for this device")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown report here")
    parser.add_argument("--quick", action="store_true", help="a smoke run on a few small cases")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.kernel_sizes = ["T"], [1], [7, 13]
        args.min_time, args.max_call = 0.02, 0.2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    started = time.time()
    library, matmul = fastest_matmul(device)
    header = [
        f"Machine: {machine_line(device)}",
        f"torch {torch.__version__}, Python {platform.python_version()}",
        f"float32 matmul rate: {matmul:.1f} GFLOP/s (best of 5 2048x2048 products by {library}, the faster of "
        f"{' and '.join(MATMUL_LIBRARIES)})",
    ]
    print("\n".join(header), flush=True)

    cases: List[Dict] = []
    for dtype_name in [] if (args.skip_grid or args.verify_policy) else args.dtypes:
        dtype = getattr(torch, dtype_name)
        for model in args.models:
            for channels, size in LAYER_SHAPES[model]:
                for kernel_size in args.kernel_sizes:
                    for batch in args.batches:
                        for layout in args.layouts:
                            if layout == "nchw" and batch > args.nchw_max_batch:
                                continue
                            for mode in args.modes:
                                case = run_case(args, device, dtype, model, channels, size, batch, kernel_size,
                                                layout, mode == "training")
                                cases.append(case)
                                t = case["times_ms"]
                                print(f"  {model} {dtype_name} {mode:9s} {layout:13s} B{batch:<3d} C{channels:<3d} "
                                      f"{size}x{size} K{kernel_size:<2d} "
                                      + " ".join(f"{k}={v:.2f}ms" for k, v in t.items())
                                      + f" -> {case['best']}", flush=True)

    if args.verify_policy:
        stored = json.loads(args.policy_path.read_text())["entries"]
        cases = [dict(e, model="T" if (e["channels"], e["height"]) in LAYER_SHAPES["T"] else "S",
                      flops=2 * e["batch"] * e["channels"] * e["height"] * e["width"] * e["kernel_size"] ** 2
                      * (3 if e["mode"] == "training" else 1), best=choose_best(e["times_ms"]))
                 for e in stored if e["device"] == device.type]
        os.environ[POLICY_ENV] = str(args.policy_path)
        args.verify = True

    if args.write_policy:
        # CPU entries are measured per instruction set (the policy matches a call to its own CPU's first)
        isa = cpu_isa() if device.type == "cpu" else None
        entries = [{k: c[k] for k in ("device", "dtype", "mode", "layout", "batch", "channels", "height", "width",
                                       "kernel_size", "best", "times_ms")} | ({"isa": isa} if isa else {})
                   for c in cases]
        existing, machines = [], {}
        measured = {(device.type, isa, c["dtype"], c["mode"]) for c in cases}
        if args.policy_path.exists():  # keep other devices', instruction sets', dtypes' and modes' entries
            stored = json.loads(args.policy_path.read_text())
            existing = [e for e in stored.get("entries", [])
                        if (e["device"], e.get("isa"), e["dtype"], e.get("mode")) not in measured]
            machines = stored.get("machines", {})
        policy = {
            "written_by": "benchmarks/dwconv.py",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "machines": {**machines, f"{device.type} {isa}" if isa else device.type: machine_line(device)},
            "entries": existing + entries,
        }
        args.policy_path.write_text(json.dumps(policy, indent=1) + "\n")
        print(f"wrote {len(entries)} {device.type} entries to {args.policy_path}")
        os.environ[POLICY_ENV] = str(args.policy_path)

    if args.verify:
        if len(reload_policy()) == 0:
            print("no policy to verify (run with --write-policy)", file=sys.stderr)
        for case in cases:
            verify_case(args, device, getattr(torch, case["dtype"]), case)

    backends = sorted({b for c in cases for b in c["times_ms"]}, key=list(_BACKENDS).index)
    if cases:
        print(format_rows(cases, backends, markdown=False))
    lines = []
    if args.verify and cases:
        ratios = [c["verify_torch_ms"] / c["auto_ms"] for c in cases]
        chose_other = [r for c, r in zip(cases, ratios) if c["auto_choice"] != "torch"]
        same = [r for c, r in zip(cases, ratios) if c["auto_choice"] == "torch"]
        lines.append(
            f"Dispatcher (auto) against plain torch, timed side by side with alternating calls: where it chose "
            f"another backend ({len(chose_other)} cases) the ratio ranges {min(chose_other, default=1):.2f}x.."
            f"{max(chose_other, default=1):.2f}x and is below 1 in {sum(r < 1 for r in chose_other)}; where it "
            f"kept torch ({len(same)} cases, the same kernel twice) the ratio ranges {min(same, default=1):.2f}x.."
            f"{max(same, default=1):.2f}x, which is the timing noise of this machine."
        )
    if args.end_to_end:
        for dtype_name in args.dtypes:
            for name in args.end_to_end_models:
                lines.append(end_to_end(device, getattr(torch, dtype_name), args.end_to_end_batch, 2.0, name))
                print(lines[-1], flush=True)
    lines.append(f"Total benchmark time: {time.time() - started:.0f} s")
    print("\n".join(lines))

    if args.output:
        command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0].replace(str(ROOT) + "/", "")] + sys.argv[1:])
        report = [
            "## Depthwise convolution backends",
            "",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            *[f"- {h}" for h in header],
            f"- Command: `{command}`",
            "- Times in ms per call; GFLOP/s of the fastest backend (multiply-add = 2 FLOPs; training = forward + "
            "input gradient + weight gradient = 3x the forward FLOPs).",
            "",
            format_rows(cases, backends, markdown=True) if cases else "",
            "",
            *[f"- {line}" for line in lines],
            "",
        ]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(report))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
