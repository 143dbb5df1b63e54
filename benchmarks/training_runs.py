"""The training runs of `make bench`: scripts/train_*.py and the baselines in benchmarks/ as subprocesses, one
at a time, their steady-state throughput, and launchkit's decode-once audio cache timed in this process.

`import audio_data` below resolves because benchmarks/run.py puts scripts/ on sys.path."""

import contextlib
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable

PIPELINES = ("baseline_fp32", "launchkit_fp32", "launchkit_bf16")
TARGET_PAIR = ("baseline_fp32", "launchkit_bf16")  # the pair the speed-up targets compare


def repo_relative(arg: str) -> str:
    """Commands in the report use repository-relative paths, so they can be pasted into a fresh clone."""
    for base, shown in ((str(REPO) + "/", ""), (PY, ".venv/bin/python")):
        arg = arg.replace(base, shown)
    return arg


def timed(cmd: list[str], env: dict, log: Path) -> float:
    """Run a command to the end with its output in log; its wall time in seconds."""
    started = time.perf_counter()
    with log.open("w") as f:
        subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    return time.perf_counter() - started


def _csv_value(value: str):
    try:
        return float(value)
    except ValueError:
        return value


class Runner:
    """Runs training scripts as subprocesses and keeps the exact commands for the report."""

    def __init__(self, work: Path):
        self.work = work
        self.commands: list[str] = []
        self.env = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            TQDM_DISABLE="1",
        )

    def run(self, name: str, script: Path, *args) -> dict:
        """Run a script that writes OUTPUT_DIR/results.csv and metrics.json; return its rows, metrics and wall time."""
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [PY, str(script), *map(str, args), "--output-dir", str(out)]
        self.commands.append(" ".join(repo_relative(c) for c in cmd))
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        with (out / "results.csv").open(newline="") as f:
            rows = [{k: _csv_value(v) for k, v in r.items()} for r in csv.DictReader(f)]
        print(
            f"  {name}: {wall:.0f} s, samples/s per epoch {[round(r['train_samples_per_second'], 1) for r in rows]}", flush=True
        )
        return {"rows": rows, "metrics": json.loads((out / "metrics.json").read_text()), "wall": wall}


def steady_throughput(runs: list[dict]) -> dict | None:
    """Median train samples/s over every epoch after the first (warm-up) of every run, and the spread."""
    if not runs:
        return None
    values = [r["train_samples_per_second"] for run in runs for r in run["rows"][1:]] or [
        r["train_samples_per_second"] for run in runs for r in run["rows"]
    ]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def flags(**options) -> list:
    """`--option value` pairs in the order given; underscores in option names become dashes."""
    return [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", value)]


def training_jobs(work: Path, data: dict, cfg: dict, workers: int) -> tuple[list, list]:
    """(first round, extra repetitions) as groups of jobs (workload, pipeline, script, args) for run_jobs.

    First round per audio workload: launchkit bf16 from an empty cache (cold: it decodes and caches every
    clip), the baseline, launchkit fp32, launchkit bf16 again (warm: the cache is reused). Extra rounds
    repeat the pair the targets are about, baseline then launchkit bf16, for each workload in turn while
    the time budget allows. A --quick run completes the first round for the 1 s clips only."""
    train_audio, base_audio = REPO / "scripts" / "train_audio.py", HERE / "baseline_audio.py"
    train_det, base_det = REPO / "scripts" / "train_detection.py", HERE / "baseline_detection.py"
    smoke = cfg.get("only_s1_complete", False)
    audio_round = ("launchkit_bf16", "baseline_fp32", "launchkit_fp32", "launchkit_bf16")  # bf16 cold, then warm
    pair_only = ("launchkit_bf16", "baseline_fp32")  # a --quick run's first round beyond the 1 s clips
    first, pairs = [], []

    def queue(key: str, jobs: dict, order: tuple):
        first.extend((key, pipeline, *jobs[pipeline]) for pipeline in order)
        pairs.append([(key, pipeline, *jobs[pipeline]) for pipeline in TARGET_PAIR])

    for key, clip_seconds in (("s1", 1.0), ("us8k", 4.0)):
        cache = work / "cache" / key
        shutil.rmtree(cache, ignore_errors=True)
        common = flags(
            data=data[key], epochs=cfg["audio_epochs"][key], batch_size=32, workers=workers, seed=0, clip_seconds=clip_seconds
        )
        # --nominal-batch-size 32: one optimizer step per batch of 32, as the baseline takes.
        launchkit = [*common, *flags(nominal_batch_size=32, cache_dir=cache)]
        jobs = {
            "baseline_fp32": (base_audio, common),
            "launchkit_fp32": (train_audio, [*launchkit, "--mixed-precision", "no"]),
            "launchkit_bf16": (train_audio, [*launchkit, "--mixed-precision", "bf16"]),
        }
        queue(key, jobs, pair_only if smoke and key != "s1" else audio_round)
    common = flags(
        data=data["det"], epochs=cfg["det_epochs"], batch_size=16, workers=workers, seed=0, model="fcos_tiny", img_size=224
    )
    jobs = {
        "baseline_fp32": (base_det, common),
        "launchkit_fp32": (train_det, [*common, "--mixed-precision", "no"]),
        "launchkit_bf16": (train_det, [*common, "--mixed-precision", "bf16"]),
    }
    queue("det", jobs, pair_only if smoke else ("launchkit_bf16", "baseline_fp32", "launchkit_fp32"))
    return [[job] for job in first], [pair for _ in range(1, cfg["reps"]) for pair in pairs]


def run_jobs(runner: Runner, groups: list[list], runs: dict, deadline: float | None = None) -> int:
    """Run groups of jobs in order; with a deadline, skip a whole group (a baseline / launchkit pair stays
    together) when its jobs' first runs took longer than the time left. Returns the number of jobs skipped."""
    skipped = 0
    for group in groups:
        needed = sum(runs[key][pipeline][0]["wall"] for key, pipeline, *_ in group if runs[key][pipeline])
        if deadline is not None and time.perf_counter() + needed > deadline:
            skipped += len(group)
            continue
        for key, pipeline, script, args in group:
            done = runs[key][pipeline]
            done.append(runner.run(f"{key}_{pipeline}_{len(done)}", script, *args))
    return skipped


def summarise_training(runs: dict) -> dict:
    """Per workload: every run, the steady throughput per pipeline and, for audio, the wall time of launchkit's
    bf16 run with an empty cache (its first) and with the cache reused (its second; NaN if there was none)."""
    out = {}
    for key, by_pipeline in runs.items():
        out[key] = {"runs": by_pipeline, "steady": {p: steady_throughput(v) for p, v in by_pipeline.items()}}
        if key != "det":
            bf16 = by_pipeline["launchkit_bf16"]
            out[key].update(cold_wall=bf16[0]["wall"], warm_wall=bf16[1]["wall"] if len(bf16) > 1 else float("nan"))
    return out


def cache_timing(data: Path, clip_seconds: float, work: Path, workers: int) -> dict:
    """launchkit's decode-once cache, timed in this process: building it (cold) and opening it again (warm)."""
    import audio_data

    splits = audio_data.load_audio_data(str(data)).splits
    cache = work / "cache" / f"timing_{data.name}"
    shutil.rmtree(cache, ignore_errors=True)
    num_samples = round(clip_seconds * 16000)
    out = {}
    for label in ("cold", "warm"):
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            for split in splits.values():
                audio_data.CachedClips(split, 16000, num_samples, cache, workers)
        out[label] = time.perf_counter() - start
    out["clips"] = sum(len(s.targets) for s in splits.values())
    return out
