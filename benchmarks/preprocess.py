"""Can data loading keep up? Preprocessing throughput of each modality adapter on one core, beside the training
throughput of UniRepLKNet-A on the maps it produces.

For each adapter the script writes a real file with the usual tool (a JPEG with Pillow, WAV clips with soundfile, an
MP4 with PyAV, a PLY cloud and an OFF mesh with open3d, an hourly CSV with pandas), then measures, in one process:

* samples/s of ``adapter.prepare(path, train=...)`` (decode + preprocess [+ augment]) with ``torch.set_num_threads(1)``,
  for evaluation and training; for a forecasting series, windows/s of reading the file and cutting every look-back
  window (``forecasting_windows``);
* samples/s of a training step (the adapter's learnable part -- the point-cloud projection, the time-series
  embedding -- then UniRepLKNet-A, cross-entropy, backward, AdamW) on batches of those samples, with torch's default
  thread count;
* the ratio: how many times faster one preprocessing core is than the model. The target is at least 2x;
* for point clouds and time series, the learnable (or parameter-free) projection alone: clouds/s and windows/s of its
  forward pass, beside the backbone's forward on the maps it makes.

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
import open3d as o3d  # noqa: E402
import pandas as pd  # noqa: E402
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
    torus = o3d.geometry.TriangleMesh.create_torus(radial_resolution=60, tubular_resolution=40)
    mesh = folder / "torus.off"
    o3d.io.write_triangle_mesh(str(mesh), torus)
    scan = folder / "scan_20k.ply"
    o3d.utility.random.seed(0)
    o3d.io.write_point_cloud(str(scan), torus.sample_points_uniformly(20000), write_ascii=False)
    series = folder / "hourly_7var.csv"
    hours = 2000 if quick else 8760
    index = pd.date_range("2024-01-01", periods=hours, freq="h")
    daily = np.sin(2 * np.pi * np.arange(hours) / 24)[:, None]
    values = daily * rng.uniform(0.5, 2, 7) + rng.standard_normal((hours, 7)) * 0.1
    pd.DataFrame(values, index=index, columns=[f"sensor_{i}" for i in range(7)]).rename_axis("time").to_csv(series)
    cloud = {"num_points": 256, "image_size": 64} if quick else {}
    return {
        "image 224 (JPEG 500x375)": dict(modality="image", config={}, path=photo),
        "audio 1 s, 128 frames (WAV 16 kHz)": dict(modality="audio", config={}, path=speech),
        "audio 10 s, 1024 frames (FLAC 44.1 kHz stereo)": dict(modality="audio", config={"target_frames": 1024},
                                                               path=music),
        f"video 16x224 reshape (MP4 320x240, {frames} frames)": dict(modality="video", config={}, path=clip),
        "point cloud p2p, 4 views (PLY, 20k points)": dict(modality="point_cloud", config=dict(cloud), path=scan),
        "point cloud depth, 4 views (OFF mesh)": dict(modality="point_cloud", config=dict(cloud, projection="depth"),
                                                      path=mesh),
        f"time series L=96, 7 variables (CSV, {hours} hours)": dict(
            modality="time_series", config=dict(num_variables=7, task="forecasting", length=96, horizon=24),
            path=series, windows=True),
    }


def rate(step: Callable[[], None], min_time: float, items: int = 1) -> float:
    """Items per second from the median of at least 3 timed calls lasting ``min_time`` seconds, after one warm-up."""
    return items / median_iteration_time(step, warmup=1, min_time=min_time, min_iters=3)


def training_rate(adapter, samples: torch.Tensor, min_time: float) -> float:
    """Samples/s of a training step: the adapter's learnable part, UniRepLKNet-A, cross-entropy, backward, AdamW."""
    adapter.train()
    maps = adapter(samples[:1])
    model = timm.create_model("unireplknet_a", in_chans=maps.shape[1], num_classes=10).train()
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(adapter.parameters()), lr=1e-4)
    per_sample = adapter.maps_per_sample
    y = torch.arange(samples.shape[0] * per_sample) % 10

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(adapter(samples)), y).backward()
        optimizer.step()

    return rate(step, min_time, samples.shape[0])


def projection_rates(adapter, samples: torch.Tensor, min_time: float):
    """Samples/s of the adapter's forward alone and of UniRepLKNet-A's forward on the maps it makes (no grad)."""
    adapter.eval()
    with torch.no_grad():
        maps = adapter(samples)
        model = timm.create_model("unireplknet_a", in_chans=maps.shape[1], num_classes=0).eval()
        projection = rate(lambda: adapter(samples), min_time, samples.shape[0])
        backbone_rate = rate(lambda: model(maps), min_time, samples.shape[0])
    return projection, backbone_rate, tuple(maps.shape[1:])


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
    rows, projections = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cases = write_inputs(Path(tmp), args.quick)
        for name, case in cases.items():
            if args.quick and "video" in name:
                case["config"] = {"image_size": 64}
            adapter = create_adapter(case["modality"], **case["config"])
            torch.set_num_threads(1)
            if case.get("windows"):  # a long series: read it and cut every look-back window
                count = adapter.forecasting_windows(adapter.load(case["path"]))[0].shape[0]
                eval_rate = rate(lambda: adapter.forecasting_windows(adapter.load(case["path"])), args.min_time,
                                 count)
                train_rate = rate(lambda: [adapter.augment(w) for w in
                                           adapter.forecasting_windows(adapter.load(case["path"]))[0]],
                                  args.min_time, count)
                samples = adapter.forecasting_windows(adapter.load(case["path"]))[0][: args.batch_size]
            else:
                eval_rate = rate(lambda: adapter.prepare(case["path"]), args.min_time)
                train_rate = rate(lambda: adapter.prepare(case["path"], train=True), args.min_time)
                samples = adapter.collate([adapter.prepare(case["path"])] * args.batch_size)
            torch.set_num_threads(default_threads)
            model_rate = training_rate(adapter, samples, args.min_time)
            with torch.no_grad():
                map_shape = tuple(adapter.eval()(samples[:1]).shape[1:])
            per_sample = f"{adapter.maps_per_sample} x " if adapter.maps_per_sample > 1 else ""
            rows.append((name, f"{per_sample}{map_shape}", eval_rate, train_rate, model_rate))
            print(f"{name}: map {per_sample}{map_shape}, preprocessing {eval_rate:.1f}/s eval, {train_rate:.1f}/s "
                  f"train (1 core); training step with UniRepLKNet-A {model_rate:.1f}/s ({default_threads} threads)",
                  flush=True)
            if case["modality"] in ("point_cloud", "time_series"):
                projection, backbone_rate, _ = projection_rates(adapter, samples, args.min_time)
                projections.append((name, projection, backbone_rate))
                print(f"  forward: adapter {projection:.1f}/s, UniRepLKNet-A on its maps {backbone_rate:.1f}/s",
                      flush=True)

    header = ["input", "map (C, H, W) per sample", "eval prep/s (1 core)", "train prep/s (1 core)",
              f"train step with A, samples/s ({default_threads} threads)", "train prep / model", "target >= 2x"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, shape, eval_rate, train_rate, model_rate in rows:
        ratio = train_rate / model_rate
        lines.append(f"| {name} | {shape} | {eval_rate:.1f} | {train_rate:.1f} | {model_rate:.1f} | {ratio:.1f}x | "
                     f"{'met' if ratio >= 2 else 'NOT met'} |")
    lines += ["", f"Forward passes (no grad, batch {args.batch_size}, {default_threads} threads), samples/s:", "",
              "| input | adapter forward (projection / embedding) | UniRepLKNet-A forward on its maps | adapter share |",
              "|---|---|---|---|"]
    for name, projection, backbone_rate in projections:
        share = (1 / projection) / (1 / projection + 1 / backbone_rate)
        lines.append(f"| {name} | {projection:.1f} | {backbone_rate:.1f} | {share:.0%} |")
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
            f"- Training step: batch {args.batch_size} samples, float32, train form; preprocessing timed with one "
            "thread; windows/s for the series counts every look-back window cut from the file.",
            "", table, ""]))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
