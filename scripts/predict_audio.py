#!/usr/bin/env python
"""Label audio files with a model trained by train_audio.py: one JSON line per file.

    python scripts/predict_audio.py --model-dir runs/audio/model recordings/ street.wav --top-k 3

Recordings longer than the window are scored by sliding windows; the file's label is the mean of the
window probabilities. Each line: {"path", "label", "probability", "top": [{"label", "probability"}, ...],
"windows": [{"start", "end", "label", "probability", "top": [...]}, ...]}, times in seconds."""

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

import torch
from audio_data import AUDIO_EXTENSIONS, BadClip, fix_length, read_audio, within_full_scale
from audio_model import load_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="audio files, or folders searched recursively for them")
    parser.add_argument("--model-dir", type=Path, required=True, help="the model/ folder of a training run")
    parser.add_argument("--window", type=float, default=None, help="window length in seconds (default: the training clip length)")
    parser.add_argument("--hop", type=float, default=None, help="step between windows in seconds (default: half a window)")
    parser.add_argument("--top-k", type=int, default=3, help="how many labels to list with their probabilities (default 3)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default 32)")
    parser.add_argument(
        "--output", type=Path, default=None, help="write the JSON lines to this file (replaced whole) instead of stdout"
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model, config = load_model(args.model_dir, device)
    rate, labels = config["sample_rate"], config["labels"]
    window = round((args.window or config["clip_seconds"]) * rate)
    hop = round(args.hop * rate) if args.hop else max(1, window // 2)
    files = list(find_audio(args.paths))
    failed = []
    with output_stream(args.output) as out:
        for path in files:
            try:
                wave = read_audio(str(path), rate)
            except BadClip as err:
                failed.append(f"{path}: {err}")
                continue
            starts = window_starts(wave.numel(), window, hop)
            probs = predict(model, windows(wave, starts, window).to(device), args.batch_size)
            out.write(json.dumps(file_record(path, probs, starts, wave.numel(), window, rate, labels, args.top_k)) + "\n")
            out.flush()
    if failed:
        print(f"skipped {len(failed)} unreadable file(s):\n  " + "\n  ".join(failed), file=sys.stderr)
        sys.exit(1)


@contextmanager
def output_stream(path: Path | None):
    """stdout, or a temporary file beside PATH that replaces it whole at the end: an existing PATH is never
    appended to, and a run that stops half-way leaves it as it was."""
    if path is None:
        yield sys.stdout
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as out:
            yield out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def find_audio(paths):
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        elif path.is_file():
            yield path
        else:
            raise SystemExit(f"{path}: no such file or folder")


def window_starts(length: int, window: int, hop: int) -> list[int]:
    """Windows every hop samples; a last one ends at the end of the file so no tail goes unheard."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, hop))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def windows(wave: torch.Tensor, starts: list[int], window: int) -> torch.Tensor:
    """The model's inputs: one fixed-length window per start, each brought within full scale as training clips are."""
    return within_full_scale(torch.stack([fix_length(wave[s : s + window], window) for s in starts]))


@torch.no_grad()
def predict(model, segments: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [model(segments[i : i + batch_size]).float().softmax(dim=1).cpu() for i in range(0, len(segments), batch_size)]
    )


def file_record(path, probs, starts, length, window, rate, labels, k) -> dict:
    def top(p):
        values, indices = p.topk(min(k, len(labels)))
        return [{"label": labels[i], "probability": round(v, 4)} for v, i in zip(values.tolist(), indices.tolist(), strict=True)]

    mean = probs.mean(dim=0)
    best = int(mean.argmax())
    windows = [
        {
            "start": round(s / rate, 3),
            "end": round(min(s + window, length) / rate, 3),
            "label": labels[int(p.argmax())],
            "probability": round(float(p.max()), 4),
            "top": top(p),
        }
        for s, p in zip(starts, probs, strict=True)
    ]
    return {
        "path": str(path),
        "label": labels[best],
        "probability": round(float(mean[best]), 4),
        "top": top(mean),
        "windows": windows,
    }


if __name__ == "__main__":
    main()
