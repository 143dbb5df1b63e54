"""train_audio.py and predict_audio.py run as a user runs them: learning, 1 vs 2 processes, resume, prediction."""

import ast
import csv
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import make_demo_audio
import pytest
import soundfile as sf
import torch
from audio_data import CachedClips, load_audio_data
from audio_predictor import load_model
from conftest import REPO, load_metric, run_script, script_env
from huggingface_hub import ModelCard
from safetensors.torch import load_file

FAST = ["--sample-rate", 8000, "--n-mels", 32, "--workers", 0]
NOT_COMPARABLE = {"seconds", "train_samples_per_second"}
# One thread per process: two busy-waiting OpenMP threads per process crawl when the cores are shared.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("audio_cache")


# ----------------------------------------------------------------------------- learning end to end


@pytest.fixture(scope="module")
def us8k_run(tmp_path_factory, cache):
    """UrbanSound8K layout (mixed rates, stereo, 24-bit, float) plus one corrupt clip listed in the metadata."""
    root = tmp_path_factory.mktemp("us8k") / "UrbanSound8K"
    make_demo_audio.main(
        [
            "--layout", "urbansound8k", "--output", str(root), "--classes", "4", "--clips-per-class", "40", "--seconds",
            "1", "--seed", "3",
        ]
    )  # fmt: skip
    (root / "audio" / "fold5" / "999-0-0-0.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    with (root / "metadata" / "UrbanSound8K.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["999-0-0-0.wav", 999, 0, 1, 1, 5, 0, "low_hum"])
    out = tmp_path_factory.mktemp("runs") / "us8k"
    started = time.perf_counter()
    proc = run_script(
        "train_audio.py", "--data", root, "--output-dir", out, "--fold", 1, "--clip-seconds", 1, "--epochs", 6,
        "--batch-size", 16, "--nominal-batch-size", 16, "--mixed-precision", "no", "--mixup", 0.2, "--cache-dir", cache,
        *FAST, env=ONE_THREAD,
    )  # fmt: skip
    return root, out, proc, time.perf_counter() - started


def test_learns_well_above_chance_on_the_official_fold(us8k_run):
    root, out, proc, seconds = us8k_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"task", "best_epoch", "labels", "train_samples_per_second", "val", "test"}
    assert metrics["labels"] == ["low_hum", "high_tone", "sweep", "hiss"]
    for split in ("val", "test"):
        assert set(metrics[split]) == {"accuracy", "macro_f1", "per_class", "confusion_matrix"}
    assert metrics["test"]["accuracy"] >= 0.75, metrics["test"]  # chance is 0.25
    test_clips = sum(1 for r in csv.DictReader((root / "metadata" / "UrbanSound8K.csv").open()) if r["fold"] == "1")
    assert sum(c["support"] for c in metrics["test"]["per_class"].values()) == test_clips
    assert "accumulation steps" in proc.stdout and "optimizer steps" in proc.stdout
    assert re.search(r"epoch 5: .*, \d+ (s|min) left\n", proc.stdout) and re.search(r"epoch 6: .*, 0 s left\n", proc.stdout)
    sweep, table = metrics["test"]["per_class"]["sweep"], proc.stdout.split("per class (test)")[1]
    assert re.search(rf"\n  sweep +precision {sweep['precision']:.3f}  recall {sweep['recall']:.3f}  F1 {sweep['f1']:.3f}", table)
    assert 1 <= metrics["best_epoch"] <= 6 and f"best epoch {metrics['best_epoch']}:" in proc.stdout  # one count, from 1
    print(
        f"\nUS8K-layout test accuracy {metrics['test']['accuracy']:.3f}, "
        f"{metrics['train_samples_per_second']:.0f} clips/s, {seconds:.0f} s wall"
    )


def test_run_directory_contract(us8k_run):
    _, out, _, _ = us8k_run
    for name in (
        "args.json", "results.csv", "metrics.json", "data_report.json", "curves.png", "confusion_matrix.png",
        "model/model.safetensors", "model/config.json",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    assert list((out / "checkpoints").glob("step_*")) and list((out / "logs").rglob("events.out.tfevents*"))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["epoch"] for r in rows] == [str(e) for e in range(6)]
    assert {
        "epoch",
        "step",
        "lr",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_macro_f1",
        "seconds",
        "train_samples_per_second",
    } == set(rows[0])
    args = json.loads((out / "args.json").read_text())
    assert args["accumulation_steps"] == 1 and args["num_processes"] == 1 and args["format"] == "urbansound8k"
    card = (out / "model" / "README.md").read_text()
    test_accuracy = json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
    assert f"| test | {test_accuracy:.4f} |" in card and "scripts/predict_audio.py --model-dir" in card and "`sweep`" in card
    hub = ModelCard.load(out / "model" / "README.md").data  # the Hub's reading of the front matter
    assert hub.pipeline_tag == "audio-classification" and str(out.parent) not in card and "cache_dir" not in card
    assert {(r.dataset_split, r.metric_type): r.metric_value for r in hub.eval_results}[("test", "accuracy")] == round(
        test_accuracy, 4
    )
    assert {r.metric_type for r in hub.eval_results} == {"accuracy", "f1"} and "- torch " in card


def test_the_model_cards_python_snippet_predicts(us8k_run, tmp_path):
    root, out, _, _ = us8k_run
    snippet = (out / "model" / "README.md").read_text().split("```python\n")[1].split("```")[0]
    for name, target in (("scripts", REPO / "scripts"), ("shared", REPO / "shared"), ("model", out / "model")):
        (tmp_path / name).symlink_to(target)
    shutil.copy(next((root / "audio" / "fold1").glob("*.wav")), tmp_path / "recording.wav")
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, env=script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = ast.literal_eval(proc.stdout)
    assert record["path"] == "recording.wav" and record["label"] in json.loads((out / "metrics.json").read_text())["labels"]


def test_corrupt_clip_is_skipped_and_reported(us8k_run):
    _, out, proc, _ = us8k_run
    report = json.loads((out / "data_report.json").read_text())
    assert report["skipped_count"] == 1
    assert report["skipped"][0]["path"].endswith("fold5/999-0-0-0.wav") and report["skipped"][0]["split"] == "train"
    assert "skipped 1 unreadable" in proc.stdout


def test_predict_labels_a_long_recording(us8k_run, tmp_path):
    _, out, _, _ = us8k_run
    kinds = ["sweep", "low_hum", "hiss", "high_tone", "low_hum", "sweep"]
    sf.write(tmp_path / "long.wav", make_demo_audio.long_recording(kinds, 1.0, 22050, seed=7), 22050, subtype="PCM_24")
    proc = run_script(
        "predict_audio.py", "--model-dir", out / "model", tmp_path, "--hop", 1.0, "--top-k", 2, "--output",
        tmp_path / "pred.jsonl",
    )  # fmt: skip
    lines = (tmp_path / "pred.jsonl").read_text().splitlines()
    assert proc.stdout == "" and len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == {"path", "label", "probability", "top", "windows"} and len(record["top"]) == 2
    assert [(w["start"], w["end"]) for w in record["windows"]] == [(float(i), float(i + 1)) for i in range(6)]
    correct = sum(w["label"] == k for w, k in zip(record["windows"], kinds, strict=True))
    assert correct >= 5, record["windows"]
    assert set(record["windows"][0]["top"][0]) == {"label", "probability"}


# ----------------------------------------------------------------------------- 1 vs 2 processes, exactly once, resume


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """Speech Commands layout: 64 training clips (a multiple of 16), 7 validation clips (odd) and a single
    test clip (fewer than the processes)."""
    root = tmp_path_factory.mktemp("sc") / "speech_commands"
    make_demo_audio.main(["--output", str(root), "--classes", "4", "--clips-per-class", "20", "--seconds", "0.5"])
    val = (root / "validation_list.txt").read_text().splitlines()
    (root / val[0]).unlink()
    (root / "validation_list.txt").write_text("".join(f"{v}\n" for v in val[1:]))
    test = (root / "testing_list.txt").read_text().splitlines()
    for t in test[1:]:
        (root / t).unlink()
    (root / "testing_list.txt").write_text(test[0] + "\n")
    return root


def equivalence_args(data, out, cache):
    return [
        "--data", data, "--output-dir", out, "--epochs", 2, "--batch-size", 8, "--nominal-batch-size", 16, "--no-augment",
        "--seed", 1, "--clip-seconds", 0.5, "--cache-dir", cache, *FAST,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def one_and_two_processes(commands, tmp_path_factory, cache):
    runs = tmp_path_factory.mktemp("equivalence")
    one = run_script("train_audio.py", *equivalence_args(commands, runs / "one", cache), env=ONE_THREAD)
    two = run_script("train_audio.py", *equivalence_args(commands, runs / "two", cache), nproc=2)
    return runs / "one", runs / "two", one, two


def parameters(run_dir):
    """Weights at the end of training (the last checkpoint), without BatchNorm's running statistics."""
    state = load_file(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model.safetensors")
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k}


def test_two_processes_take_the_same_steps_as_one_with_accumulation(one_and_two_processes):
    one, two, proc_one, proc_two = one_and_two_processes
    assert "8 per device x 1 processes x 2 accumulation steps = 16" in proc_one.stdout
    assert "8 per device x 2 processes x 1 accumulation steps = 16" in proc_two.stdout
    a, b = parameters(one), parameters(two)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"\nmax parameter difference 1 process x 2 accumulation vs 2 processes: {worst:.2e}")
    assert worst < 1e-4
    rows = [list(csv.DictReader((d / "results.csv").open())) for d in (one, two)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == ["4", "8"]
    assert [r["lr"] for r in rows[0]] == [r["lr"] for r in rows[1]]
    for r1, r2 in zip(*rows, strict=True):
        assert float(r1["train_loss"]) == pytest.approx(float(r2["train_loss"]), rel=1e-4)


def test_evaluation_counts_every_clip_once(one_and_two_processes, commands, cache):
    """Metrics of each run equal a single-process evaluation of its saved model (BatchNorm statistics of
    the two runs differ, so each run is checked against its own model), on 7 and on 1 clip(s)."""
    metric = load_metric("classification")
    data = load_audio_data(str(commands))
    for run_dir in one_and_two_processes[:2]:
        model, config = load_model(run_dir / "model")
        reported = json.loads((run_dir / "metrics.json").read_text())
        for split, size in (("val", 7), ("test", 1)):
            clips = CachedClips(data.splits[split], 8000, 4000, cache)
            with torch.no_grad():
                preds = model(torch.stack([clips[i][0] for i in range(len(clips))])).argmax(dim=1)
            expected = metric.compute(predictions=preds.tolist(), references=clips.targets.tolist(), labels=config["labels"])
            assert sum(c["support"] for c in reported[split]["per_class"].values()) == size
            assert reported[split]["confusion_matrix"] == expected["confusion_matrix"], (run_dir.name, split)
            assert reported[split]["accuracy"] == pytest.approx(expected["accuracy"])


def results_without_timing(run_dir):
    return [{k: v for k, v in row.items() if k not in NOT_COMPARABLE} for row in csv.DictReader((run_dir / "results.csv").open())]


def stopped_at_first_checkpoint(args, out, script="train_audio.py"):
    """Start the training script, SIGTERM it once its first checkpoint is written; the checkpoint it stopped with."""
    cmd = [sys.executable, str(REPO / "scripts" / script), *map(str, args)]
    proc = subprocess.Popen(cmd, env=script_env(**ONE_THREAD), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "checkpoint saved" in stdout and not (out / "metrics.json").exists()
    return sorted((out / "checkpoints").glob("step_*"))[-1]


def test_mid_epoch_stop_and_resume_match_the_uninterrupted_run(commands, tmp_path, cache):
    """With every augmentation on (SpecAugment, gain, background noise, mixup): the RNG state is restored too."""

    def with_augmentation(out):
        return [a for a in equivalence_args(commands, out, cache) if a != "--no-augment"] + ["--mixup", 0.2]

    one = tmp_path / "uninterrupted"
    run_script("train_audio.py", *with_augmentation(one), env=ONE_THREAD)
    out = tmp_path / "resumed"
    args = with_augmentation(out) + ["--checkpoint-steps", 1]
    latest = stopped_at_first_checkpoint(args, out)
    progress = json.loads((latest / "progress.json").read_text())
    assert progress["epoch"] == 0 and 0 < progress["batch_in_epoch"] < 8, progress  # stopped inside the first epoch

    resumed = run_script("train_audio.py", *args, "--resume", env=ONE_THREAD)
    assert f"resumed from {latest}" in resumed.stdout
    a, b = parameters(one), parameters(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert results_without_timing(out) == results_without_timing(one)
    assert json.loads((out / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text()) | {
        "train_samples_per_second": json.loads((out / "metrics.json").read_text())["train_samples_per_second"]
    }
    assert len(list((out / "checkpoints").glob("step_*"))) == 2  # --keep-checkpoints default

    changed = [a if a != 8 else 4 for a in args]  # --batch-size 8 -> 4 changes the sample order
    foreign = run_script("train_audio.py", *changed, "--resume", "--model", "mobilenet_v3_small", check=False, env=ONE_THREAD)
    assert foreign.returncode != 0
    assert "--resume refused" in foreign.stderr
    assert "batch_size: 8 in the checkpoint, 4 now" in foreign.stderr
    assert 'model: "resnet18" in the checkpoint, "mobilenet_v3_small" now' in foreign.stderr


def test_a_non_finite_loss_stops_within_the_step_and_keeps_the_last_good_checkpoint(commands, tmp_path, cache):
    """--lr 1e30 blows the weights up after the first step; the next loss is not finite."""
    out = tmp_path / "blown_up"
    args = [*equivalence_args(commands, out, cache), "--lr", "1e30", "--checkpoint-steps", 1]
    proc = run_script("train_audio.py", *args, check=False, env=ONE_THREAD)
    assert proc.returncode != 0
    found = re.search(r"the training loss became NaN or infinite at epoch 1, optimizer step (\d+)", proc.stderr)
    assert found, proc.stderr[-3000:]
    kept = sorted((out / "checkpoints").glob("step_*"))
    assert json.loads((kept[-1] / "progress.json").read_text())["step"] == int(found.group(1)) - 1
    assert all(torch.isfinite(v).all() for v in load_file(kept[-1] / "model.safetensors").values())


# ----------------------------------------------------------------------------- after training: evaluate, fine-tune


def test_eval_only_scores_a_saved_model_on_other_data_with_labels_matched_by_name(us8k_run, commands, tmp_path, cache):
    """The US8K-layout model on Speech Commands-layout data: the same classes in another order and clip length."""
    _, out, _, _ = us8k_run
    run = tmp_path / "eval"
    run_script("train_audio.py", "--eval-only", "--weights", out / "model", "--data", commands, "--output-dir", run,
               "--cache-dir", cache, "--workers", 0, env=ONE_THREAD)  # fmt: skip
    reported = json.loads((run / "metrics.json").read_text())
    model, config = load_model(out / "model")
    data = load_audio_data(str(commands))
    assert data.labels != config["labels"] and sorted(data.labels) == sorted(config["labels"])
    for split in ("val", "test"):
        clips = CachedClips(data.splits[split], config["sample_rate"], config["sample_rate"], cache)
        truth = [config["labels"].index(data.labels[t]) for t in clips.targets]
        with torch.no_grad():
            preds = model(torch.stack([clips[i][0] for i in range(len(clips))])).argmax(dim=1)
        expected = load_metric("classification").compute(predictions=preds.tolist(), references=truth, labels=config["labels"])
        assert reported[split]["confusion_matrix"] == expected["confusion_matrix"], split
    assert (run / "confusion_matrix.png").is_file() and not (run / "model").exists() and not (run / "checkpoints").exists()

    other = tmp_path / "five_classes"
    make_demo_audio.main(["--output", str(other), "--classes", "5", "--clips-per-class", "6", "--seconds", "0.5"])
    refused = run_script("train_audio.py", "--eval-only", "--weights", out / "model", "--data", other, "--output-dir",
                         tmp_path / "refused", check=False, env=ONE_THREAD)  # fmt: skip
    assert refused.returncode != 0 and "label(s) ['pulses'] are not among the model's labels" in refused.stderr


@pytest.mark.parametrize("source", ["model folder", "bare safetensors file"])
def test_weights_of_other_labels_start_a_run_with_the_features_and_a_new_class_layer(us8k_run, tmp_path, cache, source):
    """--lr 0 keeps every weight where it started: the convolutions are the earlier run's, the class layer is new."""
    _, out, _, _ = us8k_run
    data = tmp_path / "three"
    make_demo_audio.main(["--output", str(data), "--classes", "3", "--clips-per-class", "12", "--seconds", "1"])
    weights = out / "model"
    if source == "bare safetensors file":  # no config.json beside it: the labels are unknown, the features are reused
        weights = tmp_path / "weights.safetensors"
        shutil.copy(out / "model" / "model.safetensors", weights)
    run = tmp_path / "finetune"
    proc = run_script("train_audio.py", "--weights", weights, "--data", data, "--output-dir", run, "--epochs", 1,
                      "--lr", 0, "--cache-dir", cache, *FAST, env=ONE_THREAD)  # fmt: skip
    assert "from weights of other labels" in proc.stdout and "new class layer" in proc.stdout
    before, after = load_file(out / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert torch.equal(before["backbone.layer3.0.conv1.weight"], after["backbone.layer3.0.conv1.weight"])
    assert before["backbone.fc.weight"].shape == (4, 512) and after["backbone.fc.weight"].shape == (3, 512)
