"""Does sharing one backbone across modalities help? Per-modality models against one jointly trained model, with and
without contrastive alignment, on the built-in digit sets of three modalities (the same ten classes "0".."9"):
``digits`` (handwritten digit images), ``spoken_digits`` (the digits spoken by espeak-ng voices) and ``digit_clips``
(videos of a moving handwritten digit).

Every way gets the same budget of samples seen: ``--epochs`` passes over each modality's training split (the joint
models interleave the three sets, proportional schedule, so one of their epochs sees what the three separate models
see in one epoch each; the aligned model also embeds one same-class image partner per audio and video sample).
All models are UniRepLKNet-A with the demo recipes of :mod:`uniperception.demo`; each is read at its last epoch on
the test splits:

* top-1 accuracy per modality;
* class-level cross-modal retrieval: audio and video test samples as queries against the image test split as the
  gallery (recall@1 and @5), beside the expected recall of a random ranking;
* zero-shot classification of audio and video by the class prototypes (mean embeddings) of the image test split.

Separate models embed each modality in a space of its own, so their cross-modal numbers show what no shared space
gives. Usage::

    python benchmarks/multimodal.py --epochs 6 --seeds 0 --write benchmarks/results/multimodal_cpu_amd_epyc.md
    python benchmarks/multimodal.py --quick          # 1 epoch, a smoke test

It prints a Markdown table (``--write FILE`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from uniperception import UniPerceiver, datasets  # noqa: E402
from uniperception.alignment import (chance_recall_at_k, class_prototypes, prototype_accuracy,  # noqa: E402
                                     recall_at_k)
from uniperception.demo import DEMOS  # noqa: E402
from uniperception.engine import TrainConfig, Trainer  # noqa: E402

SETS = {"image": "digits", "audio": "spoken_digits", "video": "digit_clips"}
RECIPES = {"image": "digits", "audio": "spoken_commands", "video": "moving_digits"}  # adapter settings per modality
ANCHOR = "image"


def adapter_settings(modality: str) -> Dict[str, Any]:
    return dict(DEMOS[RECIPES[modality]].adapter)


def train_settings(epochs: int, seed: int, output: Path, **extra) -> TrainConfig:
    recipe = DEMOS["digits"].train
    return TrainConfig(epochs=epochs, batch_size=recipe["batch_size"], lr=recipe["lr"],
                       warmup_epochs=recipe["warmup_epochs"], label_smoothing=recipe["label_smoothing"], seed=seed,
                       output=str(output), progress=False, **extra)


def test_numbers(tests: Dict[str, Any], embed_with: Dict[str, Trainer]) -> Dict[str, float]:
    """Top-1 per modality, and retrieval and zero-shot of audio and video against the image test split."""
    row: Dict[str, float] = {}
    for modality, data in tests.items():
        row[f"{modality} top-1"] = embed_with[modality].evaluate(data, modality=modality)["top1"]
    vectors = {m: embed_with[m].embeddings(data, m) for m, data in tests.items()}
    gallery, gallery_labels = vectors[ANCHOR]
    prototypes = class_prototypes(gallery, gallery_labels, 10)
    for modality in ("audio", "video"):
        queries, labels = vectors[modality]
        for name, value in recall_at_k(queries, gallery, labels, gallery_labels).items():
            row[f"{modality}->image {name}"] = value
        row[f"{modality} zero-shot"] = prototype_accuracy(prototypes, queries, labels)
    return row


def run(way: str, epochs: int, seed: int, output: Path, sets: Dict[str, Any]) -> Dict[str, float]:
    started = time.perf_counter()
    torch.manual_seed(seed)
    names = {m: sets[m].class_names for m in SETS}
    if way == "separate":
        trainers, models = {}, {}
        for modality in SETS:
            torch.manual_seed(seed)
            model = UniPerceiver(modality, class_names=names[modality], **adapter_settings(modality))
            train = sets[modality].dataset("train", model.adapters[modality], train=True)
            val = sets[modality].dataset("val", model.adapters[modality])
            trainer = Trainer(model, train, val, train_settings(epochs, seed, output / way / modality))
            trainer.fit()
            trainers[modality], models[modality] = trainer, model
        tests = {m: sets[m].dataset("test", models[m].adapters[m]) for m in SETS}
        row = test_numbers(tests, trainers)
    else:
        model = UniPerceiver(list(SETS), class_names=names, adapters={m: adapter_settings(m) for m in SETS})
        train = {m: sets[m].dataset("train", model.adapters[m], train=True) for m in SETS}
        val = {m: sets[m].dataset("val", model.adapters[m]) for m in SETS}
        extra = dict(align=1.0, temperature=0.1) if way == "joint + alignment" else {}
        trainer = Trainer(model, train, val, train_settings(epochs, seed, output / way.replace(" + ", "_"), **extra))
        trainer.fit()
        tests = {m: sets[m].dataset("test", model.adapters[m]) for m in SETS}
        row = test_numbers(tests, {m: trainer for m in SETS})
    row["minutes"] = (time.perf_counter() - started) / 60
    return row


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ways", nargs="+", default=["separate", "joint", "joint + alignment"])
    parser.add_argument("--output", default="runs/multimodal")
    parser.add_argument("--quick", action="store_true", help="1 epoch: a smoke test, no conclusions")
    parser.add_argument("--write", metavar="FILE", help="also write the table to FILE (with the command)")
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    sets = {m: datasets.load(name) for m, name in SETS.items()}
    rows = []
    for seed in args.seeds:
        for way in args.ways:
            row = run(way, epochs, seed, Path(args.output) / f"seed{seed}", sets)
            rows.append({"way": way, "seed": seed, **row})
            print(json.dumps(rows[-1]), flush=True)
    labels = {m: [label for _, label in sets[m].dataset("test", _NoAdapter(m)).items] for m in SETS}
    chance = {m: chance_recall_at_k(labels[m], labels[ANCHOR]) for m in ("audio", "video")}
    columns = [c for c in rows[0] if c not in ("way", "seed")]
    lines = [f"epochs {epochs}, UniRepLKNet-A, {_cpu_name()}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads", "",
             "| way | seed | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['way']} | {row['seed']} | " + " | ".join(
            f"{row[c]:.1f}" if c == "minutes" else f"{100 * row[c]:.1f}%" for c in columns) + " |")
    lines.append("| chance | - | " + " | ".join(
        f"{100 * chance[c.split('->')[0]][c.split(' ')[-1]]:.1f}%" if "->" in c else
        ("10.0%" if "top-1" in c or "zero-shot" in c else "-") for c in columns) + " |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        Path(args.write).write_text(f"python benchmarks/multimodal.py --epochs {epochs} --seeds "
                                    f"{' '.join(map(str, args.seeds))}\n\n{text}\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _NoAdapter:
    """Enough of an adapter for listing a split's files and labels without reading them."""

    def __init__(self, name: str):
        self.name = name


if __name__ == "__main__":
    sys.exit(main())
