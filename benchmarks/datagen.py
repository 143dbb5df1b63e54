"""Benchmark data, written once: labelled tone clips in class folders, and a YOLO-layout image set.

Each audio class is a harmonic tone at its own pitch with a random onset, amplitude and background
noise, so both pipelines can learn it and accuracies after the same epochs can be compared."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def write_audio_set(
    root: Path, *, classes: int, train: int, val: int, seconds: float, rates, channels: int, subtype: str, seed: int = 0
) -> Path:
    """DIR/{train,val}/<label>/*.wav; clip i takes its sample rate from `rates` in turn."""
    settings = f"{classes} {train} {val} {seconds} {list(rates)} {channels} {subtype} {seed}"
    if not needs_writing(root, settings):
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            label = i % classes
            rate = rates[i % len(rates)]
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            sf.write(folder / f"{split}{i:05d}.wav", _tone(rng, label, rate, seconds, channels), rate, subtype=subtype)
    (root / ".complete").write_text(settings)
    return root


def needs_writing(root: Path, settings: str) -> bool:
    """True (after clearing the folder) unless it holds a complete set written with these settings."""
    done = root / ".complete"
    if done.exists() and done.read_text() == settings:
        return False
    shutil.rmtree(root, ignore_errors=True)
    return True


def _tone(rng, label: int, rate: int, seconds: float, channels: int) -> np.ndarray:
    n = int(rate * seconds)
    t = np.arange(n) / rate
    pitch = 220.0 * 2 ** (label / 6) * rng.uniform(0.98, 1.02)
    signal = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in (1, 2, 3))
    envelope = np.zeros(n)
    start = rng.integers(0, n // 3)
    envelope[start : start + rng.integers(n // 3, n // 2)] = 1.0
    mono = rng.uniform(0.2, 0.5) * signal * envelope + rng.normal(0, 0.15, n)
    stereo = np.stack([mono * rng.uniform(0.7, 1.0) for _ in range(channels)], axis=1)
    return np.clip(stereo, -1, 1).astype(np.float32)


def write_detection_set(root: Path, *, train: int, val: int, size: int) -> Path:
    """scripts/make_demo_detection.py's shapes (data.yaml + images/ + labels/)."""
    settings = f"{train} {val} {size}"
    if needs_writing(root, settings):
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "make_demo_detection.py"),
                "--output-dir",
                str(root),
                "--train",
                str(train),
                "--val",
                str(val),
                "--test",
                "0",
                "--size",
                str(size),
            ],
            check=True,
        )
        (root / ".complete").write_text(settings)
    return root / "data.yaml"
