"""Past one disk: train_audio.py reading its decode cache against train_audio.py --streaming reading parquet shards,
on one synthetic set of one-second 16 kHz clips (make_demo_audio.py's speech_commands layout, 6 classes; the shards
made from it by make_shards.py, 1,000 rows each). Per mode, one after the other:

- time to the first optimizer step: the whole command of a one-step run, from an empty cache (the cached path
  decodes every training clip before that step; streaming reads the label column and starts);
- samples/s per DataLoader worker: the training loader alone with one worker, in this process (the cache is warm);
- steady-state training samples/s with --workers 2: the step times TensorBoard logged, from step 10 to the last;
- peak memory of the whole process tree, workers included, as the sum of each process's proportional set size (PSS:
  a page shared by n processes counts 1/n in each, where summed RSS would count the forked workers' shared pages again
  and again), sampled every 0.1 s; and the disk the mode needs besides its input (the cache; none for streaming)."""

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import make_demo_audio
import make_shards
import psutil
import train_audio  # run.py puts scripts/ on the path
from accelerate import Accelerator
from audio_data import CachedClips, StreamedClips, load_audio_data, load_run_data
from audio_loaders import BATCH, rate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_runs import REPO, Runner, repo_relative

SAMPLE_RATE = 16000
WARM_STEPS = 10  # worker start-up, oneDNN kernel selection and the shuffle buffer's filling come before


def write_sets(root: Path, clips: int) -> tuple[Path, Path]:
    """The clips as audio files, and as shards; each written once and kept for later runs."""
    folder, shards = root / f"speech_{clips}", root / f"shards_{clips}"
    if not (folder / "validation_list.txt").exists():
        shutil.rmtree(folder, ignore_errors=True)
        make_demo_audio.main(["--output", str(folder), "--classes", "6", "--clips-per-class", str(clips // 6), "--seconds", "1"])
    if not (shards / "shards.json").exists():
        shutil.rmtree(shards, ignore_errors=True)
        make_shards.main(["audio", "--data", str(folder), "--output", str(shards), "--shard-size", "1000"])
    return folder, shards


def watched(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    """Run cmd to its end; its wall time and the peak of its process tree's summed PSS (bytes)."""
    started, peak = time.perf_counter(), 0
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        root, done = psutil.Process(proc.pid), threading.Event()

        def sample():
            nonlocal peak
            while not done.wait(0.1):
                try:
                    tree = [root, *root.children(recursive=True)]
                    peak = max(peak, sum(p.memory_full_info().pss for p in tree))
                except psutil.Error:  # a worker ended between the listing and the reading
                    continue

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}): see {log}")
    return time.perf_counter() - started, peak


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def steady_rate(run: Path) -> float:
    """Training samples/s between step WARM_STEPS and the last step, from the wall times of the steps' logged loss."""
    events = EventAccumulator(str(run / "logs" / "audio-classification"))
    events.Reload()
    steps = [e for e in events.Scalars("step/loss") if e.step >= WARM_STEPS]
    return (steps[-1].step - steps[0].step) * BATCH / (steps[-1].wall_time - steps[0].wall_time)


def loader_rate(mode: str, data: Path, cache: Path, clips: int) -> float:
    """Clips/s of the training loader with one worker: from the warm cache, or from the shards."""
    accelerator, num_samples = Accelerator(cpu=True), SAMPLE_RATE
    span = num_samples * train_audio.TRAIN_SPAN
    if mode == "streaming":
        split = load_run_data({"data": str(data), "streaming": True}).splits["train"]
        loader = StreamedClips(split, SAMPLE_RATE, num_samples, span, ("audio", "label")).loader(accelerator, BATCH, 1, 1000, 0)
    else:
        split = load_audio_data(str(data), clip_seconds=1.0).splits["train"]
        cached = CachedClips(split, SAMPLE_RATE, num_samples, cache, label="train", span=span)
        args = train_audio.parse_args(["--data", str(data), "--output-dir", "/nonexistent", "--workers", "1"])
        loader = train_audio.clip_loader(accelerator, cached, args, SimpleNamespace(batch_size=BATCH), shuffle=True)
    return rate(loader, clips)


def command(mode: str, data: Path, out: Path, cache: Path, *extra) -> list[str]:
    cmd = [sys.executable, str(REPO / "scripts" / "train_audio.py"), "--data", str(data), "--output-dir", str(out)]
    cmd += ["--cache-dir", str(cache), "--batch-size", str(BATCH), "--nominal-batch-size", str(BATCH), "--epochs", "1"]
    cmd += ["--sample-rate", str(SAMPLE_RATE), "--max-eval-samples", "64", *map(str, extra)]
    return cmd + (["--streaming"] if mode == "streaming" else [])


def benchmark(work: Path, clips: int, steps: int, loader_clips: int) -> dict:
    """Both modes in turn on the same clips (written first, not timed)."""
    print(f"streaming vs cached, {clips} clips ...", flush=True)
    folder, shards = write_sets(work / "data" / "streaming", clips)
    runner, root, rows, commands = Runner(work), work / "streaming", {}, []
    root.mkdir(parents=True, exist_ok=True)
    for mode, data in (("cached", folder), ("streaming", shards)):
        cache = root / f"cache_{mode}"
        shutil.rmtree(cache, ignore_errors=True)
        first = command(mode, data, root / f"{mode}_first", cache, "--max-train-steps", 1, "--overwrite")
        steady = command(mode, data, root / f"{mode}_steady", cache, "--max-train-steps", steps, "--log-every", 1, "--overwrite")
        first_seconds, first_pss = watched(first, runner.env, root / f"{mode}_first.log")
        disk = folder_bytes(cache) if cache.exists() else 0
        per_worker = loader_rate(mode, data, cache, loader_clips)
        steady_seconds, steady_pss = watched(steady, runner.env, root / f"{mode}_steady.log")
        rows[mode] = {
            "first_step_seconds": first_seconds,
            "loader_clips_per_second": per_worker,
            "train_clips_per_second": steady_rate(root / f"{mode}_steady"),
            "peak_pss_bytes": max(first_pss, steady_pss),
            "disk_bytes": disk,
            "steady_seconds": steady_seconds,
        }
        commands += [" ".join(repo_relative(c) for c in cmd) for cmd in (first, steady)]
        print(f"  {mode}: {rows[mode]}", flush=True)
    return {
        "clips": clips,
        "steps": steps,
        "loader_clips": loader_clips,
        "batch": BATCH,
        "warm_steps": WARM_STEPS,
        "input_bytes": {"files": folder_bytes(folder), "shards": folder_bytes(shards / "data")},
        "modes": rows,
        "loader_ratio": rows["streaming"]["loader_clips_per_second"] / rows["cached"]["loader_clips_per_second"],
        "train_ratio": rows["streaming"]["train_clips_per_second"] / rows["cached"]["train_clips_per_second"],
        "commands": commands,
    }
