"""Clips/s that one DataLoader worker delivers: launchkit's training loader (waveforms from the decode cache; its
log-mel features are computed on the device, in the model) against the walk-through pipeline's (baseline_audio.py:
each clip decoded, resampled and turned into features in the worker, every epoch), on the bench's 1 s 16 kHz clips
and its 4 s 44.1/48 kHz stereo 24-bit clips (UrbanSound8K's kind), at 16 kHz as both train."""

import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import baseline_audio
import torch
import train_audio  # run.py puts scripts/ on the path
from audio_data import TRAIN_SPAN, CachedClips, load_audio_data

BATCH = 32


def launchkit_rate(data: Path, clip_seconds: float, cache_dir: Path, clips: int, fmt: str | None = "folders") -> float:
    """The cache is built before the clock starts: once per data set and clip length, for every later run. fmt: the
    data's layout (None: told from the folder, as training tells it)."""
    argv = ["--data", str(data), "--output-dir", "/nonexistent", "--clip-seconds", str(clip_seconds), "--workers", "1"]
    args = train_audio.parse_args(argv)
    split = load_audio_data(str(data), fmt, clip_seconds=clip_seconds).splits["train"]
    num_samples = round(clip_seconds * args.sample_rate)
    cached = CachedClips(split, args.sample_rate, num_samples, cache_dir, label="train", span=num_samples * TRAIN_SPAN)
    loader = train_audio.clip_loader(None, cached, args, SimpleNamespace(batch_size=BATCH), shuffle=True)  # no --streaming
    return rate(loader, clips)


def baseline_rate(data: Path, clip_seconds: float, clips: int) -> float:
    args = baseline_audio.parse_args(["--data", str(data), "--output-dir", "/nonexistent", "--clip-seconds", str(clip_seconds)])
    items, _ = baseline_audio.list_clips(data / "train")
    dataset = baseline_audio.ClipDataset(items, args, train=True)
    return rate(torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=1), clips)


def rate(loader, clips: int) -> float:
    """Samples/s after the first batch (its time is the worker's start); also the detection loader's timer. The clock
    stops at the last batch counted, before the loop is left: leaving it shuts the workers down, which is no part of
    delivering batches (a `datasets` stream's worker pauses 5 s on its way out)."""
    seen, started = 0, None
    while started is None or seen < clips:
        for batch in loader:
            if started is None:  # the first batch pays for starting the worker
                started = time.perf_counter()
                continue
            seen += len(batch[0])
            if seen >= clips:
                ended = time.perf_counter()
                break
    return seen / (ended - started)


def audio_loader_table(data: dict[str, Path], work: Path, clips: int, reps: int) -> dict:
    """data: "s1" (1 s clips) and "us8k" (4 s clips) folders. Both pipelines in turn, median of the repetitions."""
    table = {}
    for key, seconds in (("s1", 1.0), ("us8k", 4.0)):
        rates = {"launchkit": [], "walk-through": []}
        for _ in range(reps):
            rates["walk-through"].append(baseline_rate(data[key], seconds, clips))
            rates["launchkit"].append(launchkit_rate(data[key], seconds, work / "cache" / f"loader_{key}", clips))
        medians = {tool: statistics.median(r) for tool, r in rates.items()}
        table[key] = {"clip_seconds": seconds, "rates": rates, "median": medians,
                      "ratio": medians["launchkit"] / medians["walk-through"]}  # fmt: skip
    return {"clips": clips, "batch": BATCH, "workloads": table}
