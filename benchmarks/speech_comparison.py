"""launchkit's default audio command against the plain per-clip pipeline (baseline_audio.py) on spoken commands
whose test speakers neither saw in training (heldout_speech.py): test accuracy and wall time at equal epochs.

Each side is run the way its user would: launchkit with data, output and epochs only; the baseline with its
defaults (the walk-through's recipe). launchkit reports the test accuracy of its best validation epoch, the
baseline that of its last epoch, as each of them does by default."""

import json
import shutil
import sys
from pathlib import Path

from training_runs import repo_relative, timed

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run(cmd: list[str], out: Path, log: Path, env: dict) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    return timed(cmd, env, log), json.loads((out / "metrics.json").read_text())


def comparison(work: Path, data: Path, epochs: int, workers: int, env: dict) -> dict:
    runs, commands = {}, []
    (work / "runs").mkdir(parents=True, exist_ok=True)
    pipelines = {
        "baseline": [HERE / "baseline_audio.py", "--workers", str(workers)],
        "launchkit": [
            REPO / "scripts" / "train_audio.py",
            "--workers",
            str(workers),
            "--cache-dir",
            str(work / "cache" / "speech"),
        ],
    }
    for name, (script, *extra) in pipelines.items():
        out = work / "runs" / f"speech_{name}_{epochs}ep"
        cmd = [
            sys.executable,
            str(script),
            "--data",
            str(data),
            "--output-dir",
            str(out),
            "--epochs",
            str(epochs),
            *map(str, extra),
        ]
        commands.append(" ".join(repo_relative(str(a)) for a in cmd))
        print(f"  {name} {epochs} epochs ...", flush=True)
        wall, metrics = run(cmd, out, work / "runs" / f"speech_{name}_{epochs}ep.log", env)
        runs[name] = {"wall": wall, "test_accuracy": metrics["test"]["accuracy"], "val_accuracy": metrics["val"]["accuracy"]}
    return {"epochs": epochs, "runs": runs, "commands": commands, "data": str(data)}
