"""Past one disk: each training script reading its decode cache against the same script with --streaming reading
parquet shards made from the same data by make_shards.py. Audio: one-second 16 kHz clips (make_demo_audio.py's
Speech Commands layout, 6 classes; shards of 1,000 rows). Detection: make_demo_detection.py's shapes at 320 px,
trained at the default 224 px (the image cache holds them scaled; shards of 500 rows). A third mode streams shards that
also hold the training samples decoded as the cache holds them (make_shards.py --pcm; --img-size 224).
Per mode, one after the other:

- time to the first optimizer step: the whole command of a one-step run, from an empty cache (the cached path
  decodes every training sample before that step; streaming reads the label or box columns and starts);
- samples/s per DataLoader worker: the training loader alone with one worker, in this process, after every mode has
  run: each mode once untimed (its data into the page cache: the worker's own work is measured, not the disk's), then
  the modes in turn, LOADER_RUNS times, the median of each (two shared cores vary by 20% from one run to the next);
- steady-state training samples/s with --workers 2: the step times TensorBoard logged, from step 10 to the last;
- peak memory of the whole process tree, workers included, as the sum of each process's proportional set size (PSS:
  a page shared by n processes counts 1/n in each, where summed RSS would count the forked workers' shared pages again
  and again), sampled every 0.1 s; and the disk the mode needs besides its input (the cache; none for streaming)."""

import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import detection_data  # run.py puts scripts/ on the path
import detection_model
import make_demo_audio
import make_demo_detection
import make_shards
import psutil
import train_detection
from accelerate import Accelerator
from audio_data import TRAIN_SPAN, StreamedClips, load_run_data
from audio_loaders import launchkit_rate, rate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_runs import REPO, Runner, repo_relative

SAMPLE_RATE = 16000
LOADER_RUNS = 5
WARM_STEPS = 10  # worker start-up, oneDNN kernel selection and the shuffle buffer's filling come before
BATCH = {"audio": 32, "detection": 16}


def audio_sets(root: Path, clips: int) -> tuple[Path, Path, Path]:
    """The clips as audio files, as shards, and as shards with the training clips decoded as the cache holds them;
    each written once and kept for later runs."""
    folder, shards = root / f"speech_{clips}", root / f"speech_{clips}_shards"
    if not (folder / "validation_list.txt").exists():
        shutil.rmtree(folder, ignore_errors=True)
        make_demo_audio.main(["--output", str(folder), "--classes", "6", "--clips-per-class", str(clips // 6), "--seconds", "1"])
    decoded = sharded("audio", folder, root / f"speech_{clips}_pcm", 1000, "--sample-rate", str(SAMPLE_RATE), "--pcm")
    return folder, sharded("audio", folder, shards, 1000), decoded


def detection_sets(root: Path, images: int) -> tuple[Path, Path, Path]:
    """The images in YOLO layout (2.5% more each for val and test), as shards, and as shards with the training images
    decoded at 224 px; each written once and kept."""
    folder, shards = root / f"shapes_{images}", root / f"shapes_{images}_shards"
    if not (folder / "data.yaml").exists():
        shutil.rmtree(folder, ignore_errors=True)
        held_out = str(max(8, images // 40))
        make_demo_detection.main(
            ["--output-dir", str(folder), "--train", str(images), "--val", held_out, "--test", held_out, "--size", "320"]
        )
    pixels = sharded("detection", folder / "data.yaml", root / f"shapes_{images}_pixels", 500, "--img-size", "224")
    return folder / "data.yaml", sharded("detection", folder / "data.yaml", shards, 500), pixels


def sharded(task: str, data: Path, shards: Path, rows: int, *extra: str) -> Path:
    if not (shards / "shards.json").exists():
        shutil.rmtree(shards, ignore_errors=True)
        make_shards.main([task, "--data", str(data), "--output", str(shards), "--shard-size", str(rows), *extra])
    return shards


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


def steady_rate(run: Path, task_name: str, batch: int) -> float:
    """Training samples/s between step WARM_STEPS and the last step, from the wall times of the steps' logged loss."""
    events = EventAccumulator(str(run / "logs" / task_name))
    events.Reload()
    steps = [e for e in events.Scalars("step/loss") if e.step >= WARM_STEPS]
    return (steps[-1].step - steps[0].step) * batch / (steps[-1].wall_time - steps[0].wall_time)


def audio_loader_rate(streaming: bool, data: Path, cache: Path, count: int) -> float:
    """Clips/s of the training loader with one worker: from the warm cache, or from the shards."""
    if not streaming:
        return launchkit_rate(data, 1.0, cache, count, fmt=None)
    split = load_run_data({"data": str(data), "streaming": True}).splits["train"]
    clips = StreamedClips(split, SAMPLE_RATE, SAMPLE_RATE, SAMPLE_RATE * TRAIN_SPAN, ("audio", "label"))
    return rate(clips.loader(Accelerator(cpu=True), BATCH["audio"], 1, 1000, 0), count)


def detection_loader_rate(streaming: bool, data: Path, cache: Path, count: int) -> float:
    """Images/s of the training loader (augmentation and mosaic on) with one worker: from the warm image cache, or
    from the shards."""
    argv = ["--data", str(data), "--output-dir", "/nonexistent", "--cache-dir", str(cache), "--workers", "1"]
    args = train_detection.parse_args(argv + (["--streaming"] if streaming else []))
    data = detection_data.load_data(args.data, args.val_fraction, args.format, args.max_pixels, args.streaming)
    recipe = {key: getattr(args, key) for key in train_detection.RECIPE}
    train = detection_data.detection_datasets(args, data, args.img_size, recipe)["train"]
    plan, config = SimpleNamespace(batch_size=BATCH["detection"]), {"img_size": args.img_size}
    return rate(detection_data.image_loader(Accelerator(cpu=True), train, args, plan, config, True), count)


TASKS = {
    "audio": ("train_audio.py", "audio-classification", audio_loader_rate, ["--sample-rate", SAMPLE_RATE]),
    "detection": ("train_detection.py", detection_model.TASK, detection_loader_rate, []),
}


def command(task: str, streaming: bool, data: Path, out: Path, cache: Path, *extra) -> list[str]:
    script, _, _, own = TASKS[task]
    cmd = [sys.executable, str(REPO / "scripts" / script), "--data", str(data), "--output-dir", str(out), "--epochs", "1"]
    cmd += ["--cache-dir", str(cache), "--batch-size", BATCH[task], "--nominal-batch-size", BATCH[task], *own]
    cmd += ["--max-eval-samples", 64, *extra, "--overwrite"] + (["--streaming"] if streaming else [])
    return [str(c) for c in cmd]


def compare(work: Path, task: str, files: Path, *shards: Path, steps: int, loader_samples: int) -> dict:
    """Every mode of one task in turn (cached, streaming, and decoded: the shards with decoded training samples): the
    measurements of the module's docstring."""
    runner, root, rows, commands = Runner(work), work / "streaming" / task, {}, []
    root.mkdir(parents=True, exist_ok=True)
    _, task_name, loader_rate, _ = TASKS[task]
    modes = dict(zip(("cached", "streaming", "decoded"), (files, *shards), strict=True))
    for mode, data in modes.items():
        cache, streaming = root / f"cache_{mode}", mode != "cached"
        shutil.rmtree(cache, ignore_errors=True)
        first = command(task, streaming, data, root / f"{mode}_first", cache, "--max-train-steps", 1)
        steady = command(task, streaming, data, root / f"{mode}_steady", cache, "--max-train-steps", steps, "--log-every", 1)
        first_seconds, first_pss = watched(first, runner.env, root / f"{mode}_first.log")
        disk = folder_bytes(cache) if cache.exists() else 0
        _, steady_pss = watched(steady, runner.env, root / f"{mode}_steady.log")
        rows[mode] = {
            "first_step_seconds": first_seconds,
            "train_samples_per_second": steady_rate(root / f"{mode}_steady", task_name, BATCH[task]),
            "peak_pss_bytes": max(first_pss, steady_pss),
            "disk_bytes": disk,
            "loader_runs": [],
        }
        commands += [" ".join(repo_relative(c) for c in cmd) for cmd in (first, steady)]
    for mode, data in modes.items():  # untimed: each mode's data into the page cache, where the cache's is after its build
        loader_rate(mode != "cached", data, root / f"cache_{mode}", loader_samples)
    for _ in range(LOADER_RUNS):  # the modes in turn, so that a slow spell of the machine touches each alike
        for mode, data in modes.items():
            rows[mode]["loader_runs"].append(loader_rate(mode != "cached", data, root / f"cache_{mode}", loader_samples))
    for mode, row in rows.items():
        row["loader_samples_per_second"] = statistics.median(row["loader_runs"])
        print(f"  {task} {mode}: {row}", flush=True)
    return {
        "batch": BATCH[task],
        "input_bytes": {"files": folder_bytes(files if files.is_dir() else files.parent)}
        | {mode: folder_bytes(data / "data") for mode, data in modes.items() if mode != "cached"},
        "modes": rows,
        "commands": commands,
    }


def benchmark(work: Path, clips: int, images: int, steps: int, loader_samples: int) -> dict:
    """Both tasks, each on its own data (written first, not timed)."""
    data = work / "data" / "streaming"
    print(f"streaming vs cached: audio, {clips} clips ...", flush=True)
    audio = compare(work, "audio", *audio_sets(data, clips), steps=steps, loader_samples=loader_samples)
    print(f"streaming vs cached: detection, {images} images ...", flush=True)
    detection = compare(work, "detection", *detection_sets(data, images), steps=steps, loader_samples=loader_samples)
    return {"steps": steps, "warm_steps": WARM_STEPS, "loader_samples": loader_samples, "loader_runs": LOADER_RUNS,
            "sizes": {"audio": clips, "detection": images}, "audio": audio, "detection": detection}  # fmt: skip
