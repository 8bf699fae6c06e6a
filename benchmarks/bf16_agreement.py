"""bfloat16 against float32 on real data: top-1 agreement and logit error of trained models on built-in test sets.

For each dataset, a model trained by ``uniperception demo`` (UniRepLKNet-A from scratch; trained here first when
``RUNS/<dataset>/model`` does not exist) classifies the whole test split three ways:

* ``float32``: ``backbones.optimize_for_inference(model)`` (deploy form, fast ops, channels-last);
* ``bf16``: ``backbones.optimize_for_inference(model, dtype=torch.bfloat16)``, the whole network in bfloat16;
* ``autocast``: the float32 deploy form under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Reported per dataset and way: test top-1, top-1 agreement with float32 (the share of test samples whose predicted
class is the same), and the logit error per sample, ``max |logit - float32 logit| / max |float32 logit|`` (median
and largest over the test set; the tests bound it by 3e-2 on random inputs).

    python benchmarks/bf16_agreement.py                          # digits, spoken_commands, moving_digits
    python benchmarks/bf16_agreement.py --runs runs/demo --datasets digits --output benchmarks/results/x.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import backbones  # noqa: E402
from uniperception import UniPerceiver, datasets  # noqa: E402
from uniperception.data import collate_skipping  # noqa: E402
from uniperception.demo import DEMOS, run_demo  # noqa: E402

DEFAULT_DATASETS = ("digits", "spoken_commands", "moving_digits")
WAYS = ("float32", "bf16", "autocast")


def logits_and_labels(model: torch.nn.Module, loader: DataLoader, autocast: bool = False) -> tuple:
    """Logits (float32) and labels of the whole loader."""
    outputs, labels = [], []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for batch in loader:
            if batch is None:
                continue
            inputs, targets = batch
            outputs.append(model(inputs).float())
            labels.append(targets)
    return torch.cat(outputs), torch.cat(labels)


def per_sample_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``max |actual - expected| / max |expected|`` per sample (row)."""
    return (actual - expected).abs().amax(dim=1) / expected.abs().amax(dim=1).clamp_min(1e-12)


def measure(name: str, runs: Path, batch_size: int, progress: bool) -> Dict[str, object]:
    folder = runs / name / "model"
    if not folder.is_dir():
        print(f"== {name}: no trained model in {folder}; training it (uniperception demo)", file=sys.stderr)
        run_demo(name, output=str(runs), progress=progress)
    model = UniPerceiver.from_pretrained(folder)
    data = datasets.load(name, progress=progress)
    if data.task != "classification":
        raise SystemExit(f"{name}: top-1 agreement needs a classification set, {name} is {data.task}")
    adapter = model.adapters[data.modality]
    test = data.dataset("test", adapter)
    loader = DataLoader(test, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping(adapter))

    float32 = backbones.optimize_for_inference(copy.deepcopy(model))
    logits = {"float32": logits_and_labels(float32, loader)}
    logits["autocast"] = logits_and_labels(float32, loader, autocast=True)
    low = backbones.optimize_for_inference(copy.deepcopy(model), dtype=torch.bfloat16)
    logits["bf16"] = logits_and_labels(low, loader)
    reference, labels = logits["float32"]
    predicted = reference.argmax(dim=1)
    row: Dict[str, object] = dict(dataset=name, modality=data.modality, samples=len(labels),
                                  classes=reference.shape[1])
    for way in WAYS:
        out = logits[way][0]
        errors = per_sample_error(out, reference)
        row[way] = dict(top1=(out.argmax(dim=1) == labels).float().mean().item(),
                        agreement=(out.argmax(dim=1) == predicted).float().mean().item(),
                        disagreements=int((out.argmax(dim=1) != predicted).sum()),
                        median_error=statistics.median(errors.tolist()), max_error=errors.max().item())
    print(f"  {name}: " + ", ".join(f"{way} top-1 {row[way]['top1']:.1%} agreement {row[way]['agreement']:.2%}"
                                    for way in WAYS), file=sys.stderr, flush=True)
    return row


def table(rows: List[Dict[str, object]]) -> str:
    header = ["dataset", "modality", "test samples", "float32 top-1", "bf16 top-1", "bf16 agreement",
              "bf16 logit error, median / max", "autocast top-1", "autocast agreement",
              "autocast logit error, median / max"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if i < 2 else "---:" for i in range(len(header)))
             + "|"]
    for row in rows:
        cells = [row["dataset"], row["modality"], str(row["samples"]), f"{row['float32']['top1']:.1%}"]
        for way in ("bf16", "autocast"):
            result = row[way]
            cells += [f"{result['top1']:.1%}",
                      f"{result['agreement']:.2%} ({result['disagreements']} differ)",
                      f"{result['median_error']:.4f} / {result['max_error']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/demo"),
                        help="folder of demo runs (RUNS/<dataset>/model); missing ones are trained")
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), choices=sorted(DEMOS),
                        metavar="DATASET")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--output", type=Path, help="write a Markdown section with the results to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = [measure(name, args.runs, args.batch_size, not args.no_progress) for name in args.datasets]
    text = table(rows)
    print(text)
    if args.output is not None:
        command = "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else [sys.argv[0], *argv]))
        date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        section = ["## bfloat16 against float32 on the built-in test sets", "", f"- Date: {date}",
                   f"- torch {torch.__version__}, Python {platform.python_version()}, oneDNN bfloat16 native: "
                   f"{backbones.native_bfloat16()}", f"- Command: `{command}`", "", text, ""]
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(section))
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
