"""Can data loading keep up? Preprocessing throughput of each modality adapter on one core, beside the training
throughput of UniRepLKNet-A on the maps it produces.

For each adapter the script writes a real file with the usual tool (a JPEG with Pillow, WAV clips with soundfile, an
MP4 with PyAV), then measures, in one process:

* samples/s of ``adapter.prepare(path, train=...)`` (decode + preprocess [+ augment]) with ``torch.set_num_threads(1)``,
  for evaluation and training;
* images/s of a UniRepLKNet-A training step (forward, cross-entropy, backward, AdamW) on batches of those maps, with
  torch's default thread count;
* the ratio: how many times faster one preprocessing core is than the model. The target is at least 2x.

    python benchmarks/preprocess.py --output benchmarks/results/preprocess_cpu.md
    python benchmarks/preprocess.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import soundfile  # noqa: E402
import timm  # noqa: E402
from PIL import Image  # noqa: E402

import backbones  # noqa: E402,F401
from modalities import create_adapter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone import median_iteration_time  # noqa: E402  (the backbone benchmark's timing loop)


def write_inputs(folder: Path, quick: bool) -> Dict[str, Dict]:
    """Real files for each case: name -> dict(adapter config, path, description)."""
    rng = np.random.default_rng(0)
    photo = folder / "photo.jpg"
    smooth = np.cumsum(rng.integers(-3, 4, (375, 500, 3)), axis=1)
    Image.fromarray(np.clip(smooth + 128, 0, 255).astype(np.uint8)).save(photo, quality=90)
    speech = folder / "speech_1s.wav"
    soundfile.write(speech, (rng.standard_normal(16000) * 0.1).astype(np.float32), 16000, subtype="PCM_16")
    music = folder / "music_10s_44k.flac"
    soundfile.write(music, (rng.standard_normal((441000, 2)) * 0.1).astype(np.float32), 44100, subtype="PCM_16")
    clip = folder / "clip_10s.mp4"
    frames = 40 if quick else 250
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for t in range(frames):
            array = np.full((240, 320, 3), (t * 3) % 255, np.uint8)
            array[:, (t * 4) % 320:] = 40
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return {
        "image 224 (JPEG 500x375)": dict(modality="image", config={}, path=photo),
        "audio 1 s, 128 frames (WAV 16 kHz)": dict(modality="audio", config={}, path=speech),
        "audio 10 s, 1024 frames (FLAC 44.1 kHz stereo)": dict(modality="audio", config={"target_frames": 1024},
                                                               path=music),
        f"video 16x224 reshape (MP4 320x240, {frames} frames)": dict(modality="video", config={}, path=clip),
    }


def rate(step: Callable[[], None], min_time: float, items: int = 1) -> float:
    """Items per second from the median of at least 3 timed calls lasting ``min_time`` seconds, after one warm-up."""
    return items / median_iteration_time(step, warmup=1, min_time=min_time, min_iters=3)


def training_rate(sample: torch.Tensor, batch: int, min_time: float) -> float:
    model = timm.create_model("unireplknet_a", in_chans=sample.shape[0], num_classes=10).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = sample.unsqueeze(0).repeat(batch, 1, 1, 1).contiguous()
    y = torch.arange(batch) % 10

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return rate(step, min_time, batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-time", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.min_time, args.batch_size = 0.1, 2
    default_threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = write_inputs(Path(tmp), args.quick)
        for name, case in cases.items():
            if args.quick and "video" in name:
                case["config"] = {"image_size": 64}
            adapter = create_adapter(case["modality"], **case["config"])
            torch.set_num_threads(1)
            eval_rate = rate(lambda: adapter.prepare(case["path"]), args.min_time)
            train_rate = rate(lambda: adapter.prepare(case["path"], train=True), args.min_time)
            sample = adapter.prepare(case["path"])
            torch.set_num_threads(default_threads)
            model_rate = training_rate(sample, args.batch_size, args.min_time)
            rows.append((name, tuple(sample.shape), eval_rate, train_rate, model_rate))
            print(f"{name}: map {tuple(sample.shape)}, preprocessing {eval_rate:.1f}/s eval, {train_rate:.1f}/s "
                  f"train (1 core); UniRepLKNet-A training {model_rate:.1f}/s ({default_threads} threads)", flush=True)

    header = ["input", "map (C, H, W)", "eval prep/s (1 core)", "train prep/s (1 core)",
              f"A train step img/s ({default_threads} threads)", "train prep / model", "target >= 2x"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, shape, eval_rate, train_rate, model_rate in rows:
        ratio = train_rate / model_rate
        lines.append(f"| {name} | {shape} | {eval_rate:.1f} | {train_rate:.1f} | {model_rate:.1f} | {ratio:.1f}x | "
                     f"{'met' if ratio >= 2 else 'NOT met'} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                   platform.processor())
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join([
            "## Preprocessing against training throughput", "",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Machine: {cpu}, {os.cpu_count()} logical cores; torch {torch.__version__}",
            f"- Command: `python benchmarks/preprocess.py {' '.join(sys.argv[1:])}`",
            f"- Training step: batch {args.batch_size}, float32, train form; preprocessing timed with one thread.",
            "", table, ""]))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
