"""``spoken_commands`` and ``spoken_digits``: words spoken by espeak-ng voices, with whole voices held out for testing.

``spoken_commands`` holds ten command words (yes, no, up, ...), each in a class folder of its own name.
``spoken_digits`` holds the ten digits spoken ("zero" ... "nine") in class folders "0" ... "9", the class names of
the ``digits`` images and ``digit_clips`` videos, so a spoken digit and a picture of it share one label.

Speakers are espeak-ng's English accents combined with its voice variants (``en-us+m3``, ``en-gb-scotland+f2``,
...). espeak-ng silently falls back to a plain voice for a name it does not understand (``en-gb+m3`` is plain
``en-gb``), and some variants only rename another, so every accent, every variant and every accent+variant pair is
first checked by synthesising a probe word: an accent or variant whose samples equal the default voice's or an
earlier one's is dropped, and a pair that sounds like its plain accent is never used (the dropped names and the
number of refused pairs are recorded in ``info.json``). Variants with at least three usable accents are then split
65/15/20 into train/val/test by the first draw of a generator seeded with ``SEED``: no variant heard in validation
or testing speaks in training, and every spoken set shares this split, so a voice held out of one set is held out of
all. The same generator then draws each clip: a variant says each word ``repeats`` times (3 for commands, 2 for
digits), each time with another accent, a speed drawn from 120-220 words per minute and a pitch from 20-80. Clips are
resampled to 16 kHz with torchaudio, silence at either end is trimmed, and the word is placed at a random offset in
a 1 s clip written as 16-bit PCM WAV.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from . import SPLITS, DatasetBuildError, quiet

COMMAND_WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# "en" is British English; "en-gb+variant" would silently fall back to the plain voice, "en+variant" does not
ACCENTS = ["en", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc"]
SEED = 20240920
RATE = 16000
MIN_ACCENTS = 3  # a variant speaks only if at least this many accents sound different with it


def _espeak(name: str = "a spoken dataset") -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise DatasetBuildError(f"{name} needs the espeak-ng program, which is not on PATH: install it (Debian/Ubuntu: "
                                "apt-get install espeak-ng; macOS: brew install espeak-ng)")
    return binary


def _synthesise(binary: str, voice: str, word: str, speed: int = 175, pitch: int = 50) -> Tuple[np.ndarray, int]:
    import soundfile

    result = subprocess.run([binary, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                            capture_output=True, timeout=60)
    if result.returncode != 0 or not result.stdout:
        raise DatasetBuildError(f"espeak-ng failed for voice {voice!r}, word {word!r}: "
                                f"{result.stderr.decode(errors='replace').strip() or 'no audio'}")
    wave, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    return wave, rate


def _variants(binary: str) -> List[str]:
    listing = subprocess.run([binary, "--voices=variant"], capture_output=True, text=True, timeout=60).stdout
    return sorted(set(re.findall(r"!v/(\S+)", listing)))


def _distinct(binary: str, voices: List[str], default: str) -> Tuple[List[str], List[str]]:
    """Voices whose probe word differs from the default voice's and from every earlier voice's; and the others."""
    seen = {_synthesise(binary, default, "seven")[0].tobytes()}
    kept, dropped = [], []
    for voice in voices:
        samples = _synthesise(binary, voice, "seven")[0].tobytes()
        if samples in seen:
            dropped.append(voice)
        else:
            seen.add(samples)
            kept.append(voice)
    return kept, dropped


def _clip(wave: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """16 kHz, trimmed of silence at both ends, placed at a random offset in one second (centre-cropped if longer)."""
    import torch
    import torchaudio.functional as AF

    if rate != RATE:
        wave = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), rate, RATE).numpy()
    loud = np.flatnonzero(np.abs(wave) > 0.02 * max(np.abs(wave).max(), 1e-9))
    if loud.size:
        wave = wave[loud[0]: loud[-1] + 1]
    out = np.zeros(RATE, dtype=np.float32)
    if len(wave) >= RATE:
        start = (len(wave) - RATE) // 2
        out[:] = wave[start: start + RATE]
    else:
        offset = int(rng.integers(0, RATE - len(wave) + 1))
        out[offset: offset + len(wave)] = wave
    return out


def build_spoken_commands(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    return _build_spoken(target, "spoken_commands", COMMAND_WORDS, COMMAND_WORDS, repeats=3, progress=progress)


def build_spoken_digits(target: Path, progress: Optional[bool] = None) -> Dict[str, Any]:
    return _build_spoken(target, "spoken_digits", DIGIT_WORDS, [str(d) for d in range(10)], repeats=2,
                         progress=progress)


def _build_spoken(target: Path, name: str, words: List[str], classes: List[str], repeats: int,
                  progress: Optional[bool] = None) -> Dict[str, Any]:
    """``words[k]`` spoken by every voice of its split, ``repeats`` times each, into ``target/<split>/classes[k]``."""
    import soundfile

    if len(classes) != len(words) or len(set(classes)) != len(classes) or not 1 <= repeats <= MIN_ACCENTS:
        raise ValueError(f"{name}: one distinct class name per word and 1-{MIN_ACCENTS} repeats are needed")
    binary = _espeak(name)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    accents, dropped_accents = _distinct(binary, ACCENTS[1:], ACCENTS[0])
    accents = [ACCENTS[0]] + accents
    variants, dropped_variants = _distinct(binary, [f"{ACCENTS[0]}+{v}" for v in _variants(binary)], ACCENTS[0])
    variants = [v.split("+", 1)[1] for v in variants]
    dropped_variants = [v.split("+", 1)[1] for v in dropped_variants]
    if len(variants) < 10 or len(accents) < MIN_ACCENTS:
        raise DatasetBuildError(f"{name}: espeak-ng ({version}) offers only {len(accents)} distinct English accents "
                                f"and {len(variants)} distinct voice variants; at least {MIN_ACCENTS} and 10 are "
                                "needed")

    workers = max(2, os.cpu_count() or 2)
    plain = {accent: _synthesise(binary, accent, "seven")[0].tobytes() for accent in accents}
    pairs = [(accent, variant) for variant in variants for accent in accents]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        probes = list(pool.map(lambda pair: _synthesise(binary, "+".join(pair), "seven")[0].tobytes(), pairs))
    usable: Dict[str, List[str]] = {variant: [] for variant in variants}
    for (accent, variant), samples in zip(pairs, probes, strict=True):
        if samples != plain[accent]:
            usable[variant].append(accent)
    refused = len(pairs) - sum(len(a) for a in usable.values())
    variants = [v for v in variants if len(usable[v]) >= MIN_ACCENTS]

    rng = np.random.default_rng(SEED)
    order = rng.permutation(variants).tolist()  # the first draw: the same voice split for every spoken set
    n_test, n_val = round(0.2 * len(order)), round(0.15 * len(order))
    speakers = {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
                "train": sorted(order[n_test + n_val:])}
    jobs = []  # (split, class folder, word, variant, accent, speed, pitch, offset seed)
    for split in SPLITS:
        for variant in speakers[split]:
            for folder, word in zip(classes, words, strict=True):
                for accent in rng.choice(usable[variant], size=repeats, replace=False):
                    jobs.append((split, folder, word, variant, str(accent), int(rng.integers(120, 221)),
                                 int(rng.integers(20, 81)), int(rng.integers(2**31 - 1))))
    for split in SPLITS:
        for folder in classes:
            (target / split / folder).mkdir(parents=True)

    def make(job) -> None:
        split, folder, word, variant, accent, speed, pitch, seed = job
        wave, rate = _synthesise(binary, f"{accent}+{variant}", word, speed, pitch)
        clip = _clip(wave, rate, np.random.default_rng(seed))
        file_name = f"{variant}_{accent}_s{speed}_p{pitch}.wav"
        soundfile.write(target / split / folder / file_name, clip, RATE, subtype="PCM_16")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in tqdm(pool.map(make, jobs), total=len(jobs), desc=name.replace("_", " "),
                      disable=quiet(progress), leave=False):
            pass
    counts = {split: sum(1 for job in jobs if job[0] == split) for split in SPLITS}
    info = dict(
        source=f"synthesised here by {version} (formant synthesis, no recorded data)",
        licence="generated here; espeak-ng is GPL-3.0 (only its output is stored)",
        classes=sorted(classes), counts=counts, accents=accents, speakers=speakers,
        dropped_voices={"accents": dropped_accents, "variants": dropped_variants, "refused_pairs": refused},
        description=f"1 s 16 kHz 16-bit WAV clips. {len(accents)} accents x {len(variants)} voice variants; each "
                    f"variant says each word {repeats} times in different accents at 120-220 wpm and pitch 20-80. "
                    f"Variants split 65/15/20 (seed {SEED}): {len(speakers['train'])} train, "
                    f"{len(speakers['val'])} val, {len(speakers['test'])} test, never shared.",
    )
    if classes != words:
        info["words"] = dict(zip(classes, words, strict=True))  # class folder -> the word spoken
    return info
