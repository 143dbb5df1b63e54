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
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

import torch
from audio_data import BadClip, read_audio
from audio_predictor import AudioPredictor, file_record, find_audio, load_model, predict
from tqdm.auto import tqdm


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
    # The model is run here, not by the predictor, so that --batch-size splits a long file's windows.
    model, config = load_model(args.model_dir, device)
    predictor = AudioPredictor(config, window_seconds=args.window, hop_seconds=args.hop)
    files, started = list(find_audio(args.paths)), time.perf_counter()
    failed = []
    with output_stream(args.output) as out:
        # On stderr, so the JSON lines on stdout stay clean; TQDM_DISABLE=1 silences it.
        for path in tqdm(files, desc="predicting", unit="file", file=sys.stderr, dynamic_ncols=True):
            try:
                clip = predictor.prepare(str(path), read_audio(str(path), predictor.rate))
            except BadClip as err:
                failed.append(f"{path}: {err}")
                continue
            probs = predict(model, clip.inputs.to(device), args.batch_size)
            record = file_record(
                path, probs, clip.starts, clip.length, predictor.window, predictor.rate, predictor.labels, args.top_k
            )
            out.write(json.dumps(record) + "\n")
            out.flush()
    seconds = time.perf_counter() - started
    print(f"{len(files) - len(failed)} of {len(files)} files labelled, {len(failed)} skipped, {seconds:.1f} s", file=sys.stderr)
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


if __name__ == "__main__":
    main()
