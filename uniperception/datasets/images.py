"""``digits`` (images), ``moving_digits`` and ``digit_clips`` (video), all from scikit-learn's handwritten digits.

The digits are split once, per class, 70/15/15 into train/val/test with a fixed seed; the videos take their digits
from the same split, so no handwritten digit of a test clip was ever seen in training. ``moving_digits`` is labelled
by the motion, ``digit_clips`` by the digit (classes "0" ... "9", the same as ``digits`` and ``spoken_digits``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import SPLITS, quiet

DIGITS_SOURCE = ("scikit-learn's load_digits: the test part of the UCI 'Optical Recognition of Handwritten Digits' "
                 "set (E. Alpaydin, C. Kaynak, 1998), 1797 images of 8x8 pixels with 17 grey levels written by 43 "
                 "people")
DIGITS_LICENCE = "CC BY 4.0 (UCI Machine Learning Repository); shipped by scikit-learn (BSD-3-Clause)"
SEED = 20240917
MOTIONS = ["left", "right", "up", "down", "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out"]


def _digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _split_indices(labels: np.ndarray, fractions=(0.7, 0.15, 0.15), seed: int = SEED) -> Dict[str, List[int]]:
    """Per class: a seeded permutation cut at the fractions, so every split holds every class in proportion."""
    rng = np.random.default_rng(seed)
    parts: Dict[str, List[int]] = {split: [] for split in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut1 = round(len(members) * fractions[0])
        cut2 = cut1 + round(len(members) * fractions[1])
        for split, chunk in zip(SPLITS, (members[:cut1], members[cut1:cut2], members[cut2:]), strict=True):
            parts[split] += sorted(chunk.tolist())
    return parts


def _as_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(image * (255 / 16)).astype(np.uint8)  # 17 grey levels 0..16 -> 0..255


def build_digits(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    images, labels = _digits()
    parts = _split_indices(labels)
    classes = [str(d) for d in range(10)]
    counts = {}
    for split in SPLITS:
        for name in classes:
            (target / split / name).mkdir(parents=True)
        for index in tqdm(parts[split], desc=f"digits {split}", disable=quiet(progress), leave=False):
            Image.fromarray(_as_uint8(images[index])).save(
                target / split / str(labels[index]) / f"{index:04d}.png")
        counts[split] = len(parts[split])
    return dict(source=DIGITS_SOURCE, licence=DIGITS_LICENCE, classes=classes, counts=counts,
                description="8x8 greyscale PNG files (the original pixels, grey levels scaled to 0-255), split per "
                            f"class 70/15/15 with seed {SEED}")


# ---------------------------------------------------------------------------------------------------------------------
# moving digits


def _frames(digit: np.ndarray, motion: str, rng: np.random.Generator, frames: int = 16, canvas: int = 32,
            size: int = 12) -> np.ndarray:
    """``(frames, canvas, canvas)`` uint8: one digit in ``motion`` over a faintly noisy background."""
    glyph = Image.fromarray(_as_uint8(digit)).resize((size, size), Image.BILINEAR)
    steps = np.linspace(0.0, 1.0, frames)
    free = canvas - size
    x0, y0 = rng.uniform(0, free, 2)
    travel = rng.uniform(0.7, 1.0) * free
    start = rng.uniform(0, free - travel)
    angle_total = rng.uniform(120, 200)
    zoom_low, zoom_high = rng.uniform(0.5, 0.7), rng.uniform(1.3, 1.6)
    background = rng.normal(12, 4, (frames, canvas, canvas))
    out = np.empty((frames, canvas, canvas), dtype=np.uint8)
    for i, t in enumerate(steps):
        x, y, angle, scale = x0, y0, 0.0, 1.0
        if motion in ("left", "right"):
            x = start + (travel * t if motion == "right" else travel * (1 - t))
        elif motion in ("up", "down"):
            y = start + (travel * t if motion == "down" else travel * (1 - t))
        elif motion in ("rotate_cw", "rotate_ccw"):
            angle = angle_total * t * (-1 if motion == "rotate_cw" else 1)  # PIL turns counter-clockwise
            x = y = free / 2
        else:
            scale = zoom_low + (zoom_high - zoom_low) * (t if motion == "zoom_in" else 1 - t)
            x = y = free / 2
        patch = glyph
        if scale != 1.0:
            side = max(2, round(size * scale))
            patch = glyph.resize((side, side), Image.BILINEAR)
        if angle:
            patch = patch.rotate(angle, resample=Image.BILINEAR)
        frame = Image.new("L", (canvas, canvas))
        left = round(x + (size - patch.size[0]) / 2)
        top = round(y + (size - patch.size[1]) / 2)
        frame.paste(patch, (left, top))
        out[i] = np.clip(np.maximum(np.asarray(frame, dtype=np.float64), background[i]), 0, 255).astype(np.uint8)
    return out


# with x264's macroblock-tree rate control, frames this small can encode to different bytes from run to run;
# without it the same frames always give the same file
REPRODUCIBLE_X264 = "mbtree=0"


def _write_mp4(path: Path, frames: np.ndarray, fps: int = 8, x264_params: str = "") -> None:
    import av

    options = {"crf": "12", "preset": "veryfast"}
    if x264_params:
        options["x264-params"] = x264_params
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for grey in frames:
            rgb = np.repeat(grey[:, :, None], 3, axis=2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_moving_digits(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    images, labels = _digits()
    parts = _split_indices(labels)
    per_class = {"train": 70, "val": 15, "test": 30}
    rng = np.random.default_rng(SEED + 1)
    counts = {}
    for split in SPLITS:
        pool = parts[split]
        jobs = [(motion, pool[int(rng.integers(len(pool)))]) for motion in MOTIONS for _ in range(per_class[split])]
        for motion in MOTIONS:
            (target / split / motion).mkdir(parents=True)
        for number, (motion, index) in enumerate(tqdm(jobs, desc=f"moving digits {split}", disable=quiet(progress),
                                                      leave=False)):
            _write_mp4(target / split / motion / f"{number:04d}_digit{index:04d}.mp4", _frames(images[index], motion,
                                                                                              rng))
        counts[split] = len(jobs)
    return dict(
        source=DIGITS_SOURCE + "; motions rendered with Pillow and encoded with PyAV (libx264)",
        licence=DIGITS_LICENCE, classes=sorted(MOTIONS), counts=counts,
        description="16 frames of 32x32 pixels at 8 fps, H.264 MP4 (crf 12). A 12x12 digit moves left, right, up "
                    "or down across 70-100% of the free canvas, turns 120-200 degrees clockwise or "
                    "counter-clockwise, or zooms in (0.5-0.7x to 1.3-1.6x) or out, over faint noise. Left and right, "
                    "up and down, zoom in and out are each other played backwards: only the frame order tells them "
                    "apart. "
                    "Digits come from the digits split (no test digit is seen in training).",
    )


# ---------------------------------------------------------------------------------------------------------------------
# digit clips


def build_digit_clips(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    """Per class and split, ``per_class[split]`` clips of that class's digits of the split in random motions. A
    class's digits are taken in a seeded random order, each once before any is taken again."""
    images, labels = _digits()
    parts = _split_indices(labels)
    per_class = {"train": 70, "val": 15, "test": 30}
    classes = [str(d) for d in range(10)]
    rng = np.random.default_rng(SEED + 2)
    counts = {}
    for split in SPLITS:
        members = np.asarray(parts[split])
        jobs = []  # (class, motion, digit index)
        for digit, name in enumerate(classes):
            pool = members[labels[members] == digit]
            order = np.concatenate([rng.permutation(pool) for _ in range(-(-per_class[split] // len(pool)))])
            jobs += [(name, MOTIONS[int(rng.integers(len(MOTIONS)))], int(index))
                     for index in order[:per_class[split]]]
        for name in classes:
            (target / split / name).mkdir(parents=True)
        for number, (name, motion, index) in enumerate(tqdm(jobs, desc=f"digit clips {split}",
                                                            disable=quiet(progress), leave=False)):
            _write_mp4(target / split / name / f"{number:04d}_{motion}_digit{index:04d}.mp4",
                       _frames(images[index], motion, rng), x264_params=REPRODUCIBLE_X264)
        counts[split] = len(jobs)
    return dict(
        source=DIGITS_SOURCE + "; motions rendered with Pillow and encoded with PyAV (libx264)",
        licence=DIGITS_LICENCE, classes=classes, counts=counts, clips_per_class=per_class,
        description="16 frames of 32x32 pixels at 8 fps, H.264 MP4 (crf 12, no macroblock tree: reproducible "
                    "bytes), labelled by the digit shown. A 12x12 digit makes one of the motions of moving_digits, "
                    "drawn at random (named in the file name). "
                    f"{per_class['train']}/{per_class['val']}/{per_class['test']} clips per class in train/val/test; "
                    "digits come from the digits split (no test digit is seen in training).",
    )
