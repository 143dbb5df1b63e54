"""Write a small, learnable audio dataset in one of the real layouts, for the demo and the tests.

Each class is a kind of sound with its own frequency content (a low harmonic tone, a high tone, a rising
sweep, hiss, a pulse train, a two-note chord), with random pitch, loudness, onset, length and background
noise, so a model has something to learn but cannot read the class off one number.

    python scripts/make_demo_audio.py --layout speech_commands --output demo_data/audio
    python scripts/make_demo_audio.py --layout urbansound8k --clips-per-class 40 --output /tmp/us8k
    python scripts/make_demo_audio.py --layout urbansound8k --folds 3 --clips-per-class 6 --output /tmp/us8k_3folds
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf

CLASSES = ["low_hum", "high_tone", "sweep", "hiss", "pulses", "chord"]


def synthesize(kind: str, seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of class `kind`: an event somewhere in the clip over quiet noise, float32 in [-1, 1]."""
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    if kind == "low_hum":
        f0 = rng.uniform(120, 300)
        event = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6)) / h for h in (1, 2, 3))
    elif kind == "high_tone":
        event = np.sin(2 * np.pi * rng.uniform(1800, min(3500, 0.4 * sample_rate)) * t)
    elif kind == "sweep":
        f0, f1 = rng.uniform(200, 500), rng.uniform(2000, min(4000, 0.45 * sample_rate))
        event = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * max(seconds, 1e-3))))
    elif kind == "hiss":
        white = rng.standard_normal(n)
        event = np.diff(white, prepend=0) * 0.5  # first difference tilts the noise towards high frequencies
    elif kind == "pulses":
        rate, carrier = rng.uniform(4, 10), rng.uniform(600, 1000)
        event = np.sin(2 * np.pi * carrier * t) * (np.sin(2 * np.pi * rate * t) > 0.6)
    elif kind == "chord":
        f0 = rng.uniform(400, 600)
        event = np.sin(2 * np.pi * f0 * t) + np.sin(2 * np.pi * f0 * 1.25 * t) + np.sin(2 * np.pi * f0 * 1.5 * t)
    else:
        raise ValueError(kind)
    start = int(rng.uniform(0, 0.3) * n)
    length = int(rng.uniform(0.5, 1.0) * (n - start))
    envelope = np.zeros(n)
    envelope[start : start + length] = np.hanning(length) ** 0.3 if length > 1 else 1
    event = event * envelope / (np.abs(event).max() + 1e-9)
    clip = rng.uniform(0.2, 0.8) * event + rng.uniform(0.002, 0.02) * rng.standard_normal(n)
    return np.clip(clip, -1, 1).astype(np.float32)


def long_recording(kinds: list[str], seconds_each: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Clips of the given classes one after another: a recording whose windows have known labels."""
    rng = np.random.default_rng(seed)
    return np.concatenate([synthesize(k, seconds_each, sample_rate, rng) for k in kinds])


def write(path: Path, wave: np.ndarray, sample_rate: int, channels: int = 1, subtype: str = "PCM_16"):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.stack([wave * (1 - 0.1 * c) for c in range(channels)], axis=1) if channels > 1 else wave
    sf.write(path, data, sample_rate, subtype=subtype)


def speech_commands(out: Path, classes, per_class, seconds, rng):
    """<label>/<speaker>_nohash_<n>.wav, 16 kHz mono 16-bit; about 10% of speakers each in the
    validation and testing lists; two recordings in _background_noise_/."""
    val, test = [], []
    for label in classes:
        for i in range(per_class):
            speaker = f"{rng.integers(16**8):08x}"
            rel = f"{label}/{speaker}_nohash_0.wav"
            write(out / rel, synthesize(label, seconds, 16000, rng), 16000)
            (val if i % 10 == 1 else test if i % 10 == 2 else []).append(rel)
    (out / "validation_list.txt").write_text("".join(f"{r}\n" for r in val))
    (out / "testing_list.txt").write_text("".join(f"{r}\n" for r in test))
    t = np.arange(10 * 16000) / 16000
    write(out / "_background_noise_" / "white_noise.wav", (0.1 * rng.standard_normal(t.size)).astype(np.float32), 16000)
    write(out / "_background_noise_" / "mains_hum.wav", (0.1 * np.sin(2 * np.pi * 50 * t)).astype(np.float32), 16000)


def urbansound8k(out: Path, classes, per_class, seconds, rng, folds=10):
    """metadata/UrbanSound8K.csv + audio/fold<k>/<fsID>-<classID>-0-<slice>.wav; slices of one source
    recording share a fold; mixed rates (22.05/44.1/48 kHz), channels and bit depths, as in the real set."""
    rows = []
    formats = [(44100, 2, "PCM_24"), (48000, 2, "PCM_16"), (44100, 1, "PCM_16"), (22050, 1, "FLOAT"), (48000, 1, "PCM_24")]
    fs_id = 100000
    for class_id, label in enumerate(classes):
        for i in range(per_class):
            if i % 2 == 0:  # a new source recording every two slices
                fs_id += int(rng.integers(1, 50))
                fold = int(rng.integers(1, folds + 1)) if i >= 2 * folds else i // 2 % folds + 1
            rate, channels, subtype = formats[int(rng.integers(len(formats)))]
            name = f"{fs_id}-{class_id}-0-{i % 2}.wav"
            write(out / "audio" / f"fold{fold}" / name, synthesize(label, seconds, rate, rng), rate, channels, subtype)
            rows.append([name, fs_id, 0.5 * (i % 2), 0.5 * (i % 2) + seconds, 1, fold, class_id, label])
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    with (out / "metadata" / "UrbanSound8K.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"])
        w.writerows(rows)


def esc50(out: Path, classes, per_class, seconds, rng, folds=5):
    """meta/esc50.csv + audio/<fold>-<source>-<take>-<target>.wav, 44.1 kHz mono 16-bit, 5 folds."""
    rows = []
    for target, label in enumerate(classes):
        for i in range(per_class):
            fold, src = i % folds + 1, int(rng.integers(10000, 999999))
            name = f"{fold}-{src}-A-{target}.wav"
            write(out / "audio" / name, synthesize(label, seconds, 44100, rng), 44100)
            rows.append([name, fold, target, label, False, src, "A"])
    (out / "meta").mkdir(parents=True, exist_ok=True)
    with (out / "meta" / "esc50.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(rows)


def folders(out: Path, classes, per_class, seconds, rng):
    """<label>/<n>.wav, 16 kHz mono."""
    for label in classes:
        for i in range(per_class):
            write(out / label / f"{i:04d}.wav", synthesize(label, seconds, 16000, rng), 16000)


LAYOUTS = {
    "speech_commands": (speech_commands, 1.0),
    "urbansound8k": (urbansound8k, 4.0),
    "esc50": (esc50, 5.0),
    "folders": (folders, 1.0),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder to create (must not hold a dataset yet)")
    parser.add_argument(
        "--layout", choices=list(LAYOUTS), default="speech_commands", help="dataset layout (default speech_commands)"
    )
    parser.add_argument("--classes", type=int, default=4, help=f"number of classes, at most {len(CLASSES)} (default 4)")
    parser.add_argument("--clips-per-class", type=int, default=60, help="clips per class over all splits (default 60)")
    parser.add_argument("--seconds", type=float, default=None, help="clip length (default: the layout's, 1 s / 4 s / 5 s)")
    parser.add_argument(
        "--long-recording",
        type=float,
        default=0,
        metavar="SECONDS_EACH",
        help="also write long_recording.wav: one event of every class in turn, SECONDS_EACH apart, "
        "with long_recording.json listing the segments (for trying predict_audio.py)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help="urbansound8k/esc50: number of folds (default: the real data set's, 10 / 5); fewer make a tiny "
        "cross-validation quick",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.folds is not None and (args.layout not in ("urbansound8k", "esc50") or args.folds < 3):
        parser.error("--folds applies to --layout urbansound8k or esc50 and needs at least 3 (test, validation, training)")
    if not 2 <= args.classes <= len(CLASSES):
        parser.error(f"--classes must be between 2 and {len(CLASSES)}")
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"{args.output} exists and is not empty; pick a new folder")
    writer, default_seconds = LAYOUTS[args.layout]
    seconds = args.seconds or default_seconds
    classes = CLASSES[: args.classes]
    folds = {"folds": args.folds} if args.folds else {}
    writer(args.output, classes, args.clips_per_class, seconds, np.random.default_rng(args.seed), **folds)
    if args.long_recording:
        kinds = classes * 2
        sf.write(args.output / "long_recording.wav", long_recording(kinds, args.long_recording, 16000, args.seed + 1), 16000)
        segments = [
            {"start": i * args.long_recording, "end": (i + 1) * args.long_recording, "label": k} for i, k in enumerate(kinds)
        ]
        (args.output / "long_recording.json").write_text(json.dumps(segments, indent=1) + "\n")
    print(f"wrote {args.layout} layout, {len(classes)} classes x {args.clips_per_class} clips of {seconds} s, to {args.output}")


if __name__ == "__main__":
    main()
