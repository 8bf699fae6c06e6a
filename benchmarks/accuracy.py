"""Accuracy on the built-in datasets, against simple baselines and the demo floors; a video-layout comparison and
the paper's kernel-size ablation. Writes RESULTS.md.

    python benchmarks/accuracy.py                      # everything (about an hour on 2 CPU cores)
    python benchmarks/accuracy.py --part demos         # demos, layouts or kernels
    python benchmarks/accuracy.py --quick              # the floors of the cheap sets only (CI)
    python benchmarks/accuracy.py --reuse              # keep runs whose results.json already exists

Every run is ``uniperception.demo.run_demo`` with the demo's settings (UniRepLKNet-A from scratch), so the numbers
are what ``uniperception demo`` gives. The exit status is 1 when a demo misses its floor. The tables of the results
file are rewritten on every run; a section headed "## Reading these numbers" at its end (written by hand) is kept.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUICK = ["digits", "co2"]  # the floors CI checks: cheap, and met with a margin
KERNELS = [3, 7, 13]
READING = "## Reading these numbers"


def kernel_plan(k: int):
    """UniRepLKNet-A's default plan with every large kernel (the 13s) set to ``k``; 3x3 blocks stay 3x3."""
    from backbones.unireplknet import default_kernel_sizes

    return [tuple(k if size > 3 else size for size in stage) for stage in default_kernel_sizes((2, 2, 6, 2))]


def runs(part: str, quick: bool) -> List[Dict[str, Any]]:
    from uniperception.demo import DEMOS

    plan: List[Dict[str, Any]] = []
    if part in ("all", "demos"):
        plan += [dict(part="demos", name=name, run_name=name) for name in (QUICK if quick else DEMOS)]
    if quick:
        return plan
    # the demos already are the reshape layout and K = 13: without them, those runs are made here
    with_demos = part == "all"
    if part in ("all", "layouts"):
        layouts = ("grid", "channels") if with_demos else ("reshape", "grid", "channels")
        # 48 channels of 24x24 would be smaller than the backbone's 32x32 minimum: that layout gets 32x32 frames
        plan += [dict(part="layouts", name="moving_digits", run_name=f"moving_digits_{layout}",
                      adapter=dict(layout=layout, **({"image_size": 32} if layout == "channels" else {})),
                      baseline=False) for layout in layouts]
    if part in ("all", "kernels"):
        for name in ("spoken_commands", "primitives"):
            plan += [dict(part="kernels", name=name, run_name=f"{name}_k{k}", kernel_sizes=kernel_plan(k),
                          baseline=False) for k in KERNELS if k != 13 or not with_demos]
            plan.append(dict(part="kernels", name=name, run_name=f"{name}_convnext_atto", backbone="convnext_atto",
                             baseline=False))
    return plan


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python "
            f"{platform.python_version()}")


def percent(value: float) -> str:
    return "-" if value != value else f"{100 * value:.1f}%"


def write_results(path: Path, results: Dict[str, Dict[str, Any]]) -> None:
    from uniperception.demo import DEMOS

    days = sorted({r["measured"][:10] for r in results.values()})
    total = sum(r["seconds"] for r in results.values())
    lines = ["# Results", "",
             f"Measured by `python benchmarks/accuracy.py` on {' and '.join(days)} ({machine()}); the runs took "
             f"{total / 60:.0f} min in all, each row's time and finishing time are its own (`--reuse` keeps earlier "
             "runs).",
             "Every model is UniRepLKNet-A trained from scratch with the settings of `uniperception.demo.DEMOS` "
             "(one run, seed 0); scores are on the test split.", ""]
    demos = [r for r in results.values() if r["part"] == "demos"]
    if demos:
        lines += ["## Demos against their baselines and floors", "",
                  "| dataset | modality | test | baseline | floor | met | epochs | time | finished (UTC) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in demos:
            if r["metric"] == "top1":
                test, base, floor = percent(r["score"]), f"{percent(r['baseline'])} ({r['baseline_name']})", \
                    f">= {percent(r['floor'])}"
            else:
                test = f"MASE {r['score']:.3f} (MAE {r['mae']:.3g})"
                base, floor = f"MASE 1 (MAE {r['naive_mae']:.3g}, {r['baseline_name']})", f"MASE < {r['floor']:g}"
            lines.append(f"| {r['dataset']} | {r['modality']} | {test} | {base} | {floor} | "
                         f"{'yes' if r['passed'] else 'NO'} | {r['epochs']} | {r['seconds'] / 60:.1f} min | "
                         f"{r['measured']} |")
        lines += ["", "Settings: " + "; ".join(f"{name}: {s.adapter}, {s.train}"
                                              + (f", drop path {s.drop_path}" if s.drop_path else "")
                                              for name, s in DEMOS.items() if name in {r['dataset'] for r in demos}),
                  ""]
    layouts = [r for r in results.values() if r["part"] == "layouts"]
    if layouts and "moving_digits" in results and "moving_digits_reshape" not in results:
        layouts.insert(0, results["moving_digits"])
    if layouts:
        lines += ["## Video layouts on moving_digits", "",
                  "How the 16 frames become one map: `reshape` (the released memory reshape, 4x4 frames of 24x24 -> "
                  "96x96), `grid` (a true 4x4 mosaic), `channels` (48 channels; 32x32 frames, as 24x24 is below "
                  "the backbone's minimum).", "",
                  "| layout | test top-1 | time |", "| --- | --- | --- |"]
        lines += [f"| {r['adapter'].get('layout', 'reshape')} | {percent(r['score'])} | {r['seconds'] / 60:.1f} min |"
                  for r in layouts]
        lines.append("")
    kernels = [r for r in results.values() if r["part"] == "kernels"]
    if kernels:
        lines += ["## Kernel-size ablation", "",
                  "UniRepLKNet-A with every large kernel set to K (3x3 blocks unchanged), and timm's ConvNeXt-atto "
                  "(7x7 depthwise, LayerNorm, 3.7M parameters) through the `backbone` argument. The paper reports "
                  "audio (Speech Commands V2) 73.6 (K=3), 94.3 (K=7), 94.7 (K=11), 98.5 (K=13).", "",
                  "| dataset | K=3 | K=7 | K=13 | ConvNeXt-atto 7x7 |", "| --- | --- | --- | --- | --- |"]
        for name in dict.fromkeys(r["dataset"] for r in kernels):
            runs_k = {k: results.get(f"{name}_k{k}") or (results.get(name) if k == 13 else None) for k in KERNELS}
            cells = [percent(runs_k[k]["score"]) if runs_k[k] else "-" for k in KERNELS]
            convnext = results.get(f"{name}_convnext_atto")
            cells.append(percent(convnext["score"]) if convnext else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    # the hand-written reading of the numbers, when the file has one, stays at the end
    previous = path.read_text() if path.is_file() else ""
    reading = previous[previous.index(READING):] if READING in previous else ""
    path.write_text("\n".join(lines) + ("\n" + reading if reading else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "demos", "layouts", "kernels"], default="all")
    parser.add_argument("--quick", action="store_true", help=f"only the floors of {', '.join(QUICK)}")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "accuracy"),
                        help="folder for the runs")
    parser.add_argument("--results", default=str(ROOT / "RESULTS.md"), help="the Markdown file to write")
    parser.add_argument("--reuse", action="store_true", help="keep runs whose results.json exists")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from uniperception.demo import format_results, report_floors, run_demo

    results: Dict[str, Dict[str, Any]] = {}
    for spec in runs(args.part, args.quick):
        spec = dict(spec)
        part = spec.pop("part")
        saved = Path(args.output) / spec["run_name"] / "results.json"
        if args.reuse and saved.is_file():
            result = json.loads(saved.read_text())
        else:
            print(f"== {spec['run_name']}", flush=True)
            result = run_demo(spec.pop("name"), args.output, progress=False, **spec)
        result["part"] = part
        result["measured"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime(saved.stat().st_mtime))
        results[result["run"]] = result
        print(format_results([result]).splitlines()[1], flush=True)
        write_results(Path(args.results), results)
    return report_floors([r for r in results.values() if r["part"] == "demos"])


if __name__ == "__main__":
    sys.exit(main())
