#!/usr/bin/env python
"""kill -9 at any moment stays harmless: a training run SIGKILLed again and again, and started again with --resume
after each kill, ends with the weights, results.csv rows and metrics of the same run left alone.

    .venv/bin/python benchmarks/chaos.py --kills 20                      # one audio run, 20 kills, a few minutes
    .venv/bin/python benchmarks/run.py --only chaos --output /tmp/RESULTS_chaos.md

A kill aims at a point of the run's progress, not at a clock time, so that it lands in the same phase on a slow or
busy machine: the decode cache being written, the checkpoint of optimizer step k written, the last epoch's
checkpoint written (the final test runs), each plus a delay. A start that resumes beyond its kill's point is
killed that delay after its "resumed from" line. The first start is the user's command, every later one the same
command plus --resume. tests/test_chaos.py aims 3 kills per task at chosen phases; this module draws 20 moments
over the uninterrupted run's timeline, from the start of its decoding to its writing of metrics.json, one in each
twentieth of it."""

import argparse
import contextlib
import csv
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TIMING_COLUMNS = {"seconds", "train_samples_per_second"}
# Progress levels: 0 starting, DECODE decoding (or past it), 2 + k the checkpoint of step k written, FINAL training
# done (the final test runs), METRICS metrics.json written (plots, model card and exit follow).
DECODE, FINAL, METRICS = 1, 10**9, 10**9 + 1
POLL_SECONDS = 0.002  # the tests' decode takes a few hundred ms, their final test about 50 ms


@dataclass
class Kill:
    level: int
    delay: float = 0.0

    def describe(self) -> str:
        named = {0: "start", DECODE: "decode", FINAL: "final test", METRICS: "metrics.json"}
        where = named.get(self.level, f"step {self.level - 2} saved")
        return f"{where} + {self.delay:.2f} s"


def after_step(step: int, delay: float = 0.0) -> Kill:
    return Kill(2 + step, delay)


def newest_checkpoint(out: Path) -> dict | None:
    """progress.json of the newest complete checkpoint, with its path."""
    for path in sorted((out / "checkpoints").glob("step_*"), reverse=True):
        try:
            return json.loads((path / "progress.json").read_text()) | {"path": path}
        except (OSError, ValueError):  # being written, renamed or pruned
            continue
    return None


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


class Attempt:
    """One start of a training command in its own process group, watched through the files it writes; its output
    goes to OUTPUT_DIR_<name>.log beside the output folder."""

    def __init__(self, command: list[str], env: dict, name: str):
        self.out, self.cache = Path(option(command, "--output-dir")), Path(option(command, "--cache-dir"))
        self.epochs, self.started = int(option(command, "--epochs")), time.time()
        self.log, self.resumed = self.out.parent / f"{self.out.name}_{name}.log", ""
        env = {**env, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}  # the "resumed from" line is read while the run lives
        with self.log.open("w") as sink:
            self.proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

    def fresh(self, path: Path) -> bool:
        try:
            return path.stat().st_mtime >= self.started
        except OSError:
            return False

    def decoding(self) -> bool:
        """A cache file of this start still under its temporary (hidden) name."""
        return any(self.fresh(p) for p in self.cache.rglob(".*") if p.is_file())

    def resume_note(self) -> str:
        if not self.resumed:  # read until the start has said how it resumed
            text = self.log.read_text(errors="replace")
            if step := re.search(r"resumed from \S*?(step_\d+)", text):
                self.resumed = f"resumed {step[1]}"
            elif "starting from scratch" in text:
                self.resumed = "from scratch (no checkpoint yet)"
        return self.resumed

    def level(self) -> int:
        if self.fresh(self.out / "metrics.json"):
            return METRICS
        newest = newest_checkpoint(self.out)
        if newest and (self.fresh(newest["path"] / "progress.json") or self.resume_note().startswith("resumed")):
            return FINAL if newest["epoch"] >= self.epochs else 2 + newest["step"]
        return DECODE if self.decoding() or self.fresh(self.out / "args.json") else 0

    def kill_when(self, kill: Kill, timeout: float) -> bool:
        """SIGKILL the process group kill.delay s after the run reached kill.level; False if it ended first."""
        deadline, reached = time.monotonic() + timeout, None
        while self.proc.poll() is None:
            now = time.monotonic()
            if reached is None and self.level() >= kill.level:
                reached = now
            if reached is not None and now >= reached + kill.delay:
                self.kill()
            elif now > deadline:
                self.kill()
                raise TimeoutError(f"{self.log}: no {kill.describe()} within {timeout:.0f} s")
            time.sleep(POLL_SECONDS)
        return self.proc.returncode == -signal.SIGKILL

    def wait(self, timeout: float) -> int:
        """The exit code; a start still running after timeout is killed."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        """The whole process group (DataLoader workers too), and reap it."""
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def landing(self) -> str:
        """Where the kill landed, read from what the run left behind."""
        if self.decoding():
            return "decode"
        if not self.fresh(self.out / "args.json"):  # written once the data and the checkpoint are loaded
            return "resume" if self.resume_note().startswith("resumed") else "start-up"
        newest = newest_checkpoint(self.out)
        if newest is None:
            return "epoch 1, before step 1 saved"
        if newest["epoch"] < self.epochs:
            return f"epoch {newest['epoch'] + 1}, after step {newest['step']} saved"
        return "after metrics.json" if self.fresh(self.out / "metrics.json") else "final test"


def chaos_run(command: list[str], kills: list[Kill], env: dict, timeout: float = 900) -> list[dict]:
    """Start command and SIGKILL it as each of kills says, starting it again with --resume after each; the last start
    runs to its end. One record per start."""
    records = []
    for number, kill in enumerate([*kills, None]):
        started = time.perf_counter()
        attempt = Attempt(command + (["--resume"] if number else []), env, f"start_{number}")
        killed = kill is not None and attempt.kill_when(kill, timeout)
        if not killed:
            attempt.wait(timeout)
        records.append(
            {
                "aimed": kill.describe() if kill else "-",
                "killed": killed,
                "landed": attempt.landing() if killed else f"exited {attempt.proc.returncode}",
                "resume": "first start" if number == 0 else attempt.resume_note() or "killed before it resumed",
                "seconds": time.perf_counter() - started,
                "log": str(attempt.log),
            }
        )
        if not killed and attempt.proc.returncode != 0:
            break
    return records


def describe(records: list[dict]) -> str:
    return "\n".join(
        f"{n:2d}  aimed {r['aimed']:<22} landed {r['landed']:<32} {r['resume']:<32} {r['seconds']:5.1f} s"
        for n, r in enumerate(records)
    )


def timeline(command: list[str], env: dict) -> tuple[dict[int, float], float]:
    """The uninterrupted run, watched: when it first reached each progress level (seconds from its start), its wall."""
    attempt, started, reached = Attempt(command, env, "uninterrupted"), time.monotonic(), {}
    while attempt.proc.poll() is None:
        reached.setdefault(attempt.level(), time.monotonic() - started)
        time.sleep(POLL_SECONDS)
    if attempt.proc.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed: see {attempt.log}")
    return reached, time.monotonic() - started


def random_kills(reached: dict[int, float], count: int, rng: random.Random) -> list[Kill]:
    """count moments of the uninterrupted run from the start of its decoding to its writing of metrics.json (after it,
    a kill can only cost the plots), one drawn uniformly in each of count equal slices of that span, so that no
    phase longer than a slice goes without a kill; each as the last level reached before it plus the time since."""
    levels = sorted(reached.items(), key=lambda item: item[1])
    start, width = reached[DECODE], (reached[METRICS] - reached[DECODE]) / count
    moments = [start + (i + rng.random()) * width for i in range(count)]
    return [Kill(*[(level, t - at) for level, at in levels if at <= t][-1]) for t in moments]


def weight_files(out: Path) -> dict[str, Path]:
    last = newest_checkpoint(out)["path"]
    return {f"model/{p.name}": p for p in (out / "model").glob("*.safetensors")} | {
        f"{last.name}/{p.name}": p for p in last.glob("*.safetensors")
    }


def max_weight_difference(a: Path, b: Path) -> float:
    """Over model/ and the last checkpoint's safetensors files; inf when the files or tensor names differ."""
    files_a, files_b = weight_files(a), weight_files(b)
    if files_a.keys() != files_b.keys():
        return math.inf
    worst = 0.0
    for name in files_a:
        x, y = load_file(files_a[name]), load_file(files_b[name])
        if x.keys() != y.keys():
            return math.inf
        worst = max([worst] + [(x[k].double() - y[k].double()).abs().max().item() for k in x if x[k].numel()])
    return worst


def results_without_timing(out: Path) -> list[dict]:
    with (out / "results.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def metrics_without_timing(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if k != "train_samples_per_second"}


def run_env() -> dict:
    # One thread in every start and in the reference: kernels round differently per thread count.
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


def audio_command(data: Path, root: Path, name: str, workers: int) -> list[str]:
    return [
        sys.executable, str(REPO / "scripts" / "train_audio.py"), "--data", str(data), "--output-dir", str(root / name),
        "--fold", "1", "--epochs", "3", "--clip-seconds", "1", "--batch-size", "16", "--nominal-batch-size", "16",
        "--mixup", "0.2", "--mixed-precision", "no", "--checkpoint-steps", "1", "--workers", str(workers),
        "--cache-dir", str(root / f"cache_{name}"),
    ]  # fmt: skip


def benchmark(work: Path, kills: int, seed: int = 0, workers: int = 1) -> dict:
    """One audio run (UrbanSound8K layout, resnet18, 3 epochs) uninterrupted, then killed `kills` times."""
    root, data = work / "chaos", work / "chaos" / "us8k"
    if not (data / "metadata").is_dir():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_audio.py"), "--layout", "urbansound8k",
                        "--folds", "3", "--classes", "4", "--clips-per-class", "36", "--seconds", "2", "--output", str(data)],
                       check=True, capture_output=True)  # fmt: skip
    for name in ("reference", "killed", "cache_reference", "cache_killed"):
        shutil.rmtree(root / name, ignore_errors=True)
    env = run_env()
    print(f"chaos: the uninterrupted run, then {kills} kills ...", flush=True)
    reached, reference_wall = timeline(audio_command(data, root, "reference", workers), env)
    plan = random_kills(reached, kills, random.Random(seed))
    started = time.perf_counter()
    command = audio_command(data, root, "killed", workers)
    records = chaos_run(command, plan, env)
    finished = records[-1]["landed"] == "exited 0"
    return {
        "command": " ".join(command[1:]).replace(str(REPO) + "/", ""),
        "kills": sum(r["killed"] for r in records),
        "records": records,
        "landed": Counter(r["landed"].split(",")[0] for r in records if r["killed"]),
        "reference_wall": reference_wall,
        "reference_timeline": {
            "decoding": reached[DECODE],
            "first checkpoint": min(at for level, at in reached.items() if DECODE < level < FINAL),
            "training done": reached[FINAL],
            "metrics.json": reached[METRICS],
        },
        "killed_wall": time.perf_counter() - started,
        "finished": finished,
        "max_weight_difference": max_weight_difference(root / "reference", root / "killed") if finished else None,
        "results_equal": finished and results_without_timing(root / "reference") == results_without_timing(root / "killed"),
        "metrics_equal": finished and metrics_without_timing(root / "reference") == metrics_without_timing(root / "killed"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers: a kill takes the process group")
    p.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / ".work" / "full")
    args = p.parse_args(argv)
    result = benchmark(args.work_dir, args.kills, args.seed, args.workers)
    print(describe(result["records"]))
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))


if __name__ == "__main__":
    main()
