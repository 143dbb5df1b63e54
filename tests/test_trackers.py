"""--report-to: what the trackers receive, read back from TensorBoard's event files and MLflow's local file store;
the smoke-test limits and the warmup cap, seen in the same small run."""

import csv
import json
import re

import make_demo_audio
import mlflow
import pytest
from conftest import run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shared.training import capped_warmup


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    make_demo_audio.main(["--output", str(root / "data"), "--classes", "3", "--clips-per-class", "12", "--seconds", "0.5"])
    store = f"file://{root / 'mlruns'}"
    proc = run_script(
        "train_audio.py", "--data", root / "data", "--output-dir", root / "run", "--sample-rate", 8000, "--n-mels", 32,
        "--clip-seconds", 0.5, "--cache-dir", root / "cache", "--epochs", 3, "--batch-size", 4, "--nominal-batch-size", 4,
        "--workers", 0, "--report-to", "tensorboard,mlflow", "--log-every", 1, "--warmup-epochs", 5,
        "--max-train-samples", 20, "--max-train-steps", 12,
        env={"MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    with (root / "run" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    return root, proc, rows, store


def test_tensorboard_gets_every_step_the_epoch_metrics_and_the_pictures(tracked_run):
    root, _, rows, _ = tracked_run
    events = EventAccumulator(str(root / "run" / "logs" / "audio-classification"), size_guidance={"images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for name in ("step/loss", "step/lr", "step/grad_norm", "step/samples_per_second"):
        assert [e.step for e in events.Scalars(name)] == list(range(1, 13)), name
    lrs = [e.value for e in events.Scalars("step/lr")]
    assert lrs[5] == pytest.approx(max(lrs)) and lrs[-1] < lrs[5]  # warmup capped at half of the 12 steps, then decay
    assert all(e.value > 0 for e in events.Scalars("step/grad_norm"))
    assert "val_accuracy" in scalars and "train_loss" in scalars
    logged = [(e.step, round(e.value, 4)) for e in events.Scalars("val_accuracy")]
    assert logged == [(int(r["step"]), round(float(r["val_accuracy"]), 4)) for r in rows]
    assert {"curves", "confusion_matrix"} <= set(events.Tags()["images"])


def test_mlflow_gets_the_same_values_the_arguments_and_the_pictures(tracked_run, monkeypatch):
    root, _, rows, store = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for those who ask
    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [(m.step, round(m.value, 4)) for m in history] == [(int(r["step"]), round(float(r["val_loss"]), 4)) for r in rows]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "step/lr")] == list(range(1, 13))
    assert run.data.params["lr"] == "0.001" and run.data.params["max_train_steps"] == "12"
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert pictures == {"pictures/curves.png", "pictures/confusion_matrix.png"}


def test_smoke_limits_and_the_warmup_cap_are_kept_and_said(tracked_run):
    root, proc, rows, _ = tracked_run
    assert rows[-1]["step"] == "12" and len(rows) == 3  # 20 clips at 4 per step: 5 steps per epoch, stopped at 12
    args = json.loads((root / "run" / "args.json").read_text())
    assert (args["max_train_samples"], args["max_train_steps"]) == (20, 12)
    assert re.search(r"clips +train 20,", proc.stdout)
    assert "12 in total, 6 warmup (--warmup-epochs asked 25: capped at half the run)" in proc.stdout
    assert capped_warmup(1.0, 10, 100) == (10, "10 warmup")


def test_report_to_none_means_no_tracker_and_a_misspelt_one_is_refused(tmp_path):
    import train_audio

    assert train_audio.parse_args(["--data", "d", "--output-dir", tmp_path, "--report-to", "none"]).report_to is None
    with pytest.raises(SystemExit):
        train_audio.parse_args(["--data", "d", "--output-dir", tmp_path, "--report-to", "tensorbord"])
