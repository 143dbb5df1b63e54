"""train_detection.py and predict_detection.py end to end on generated data: learning under real 2-process DDP,
exactly-once evaluation, 1 vs 2 process equivalence, mid-epoch resume after SIGTERM, refusal of a foreign
checkpoint, the COCO json files against pycocotools, prediction."""

import csv
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, run_script, script_env
from huggingface_hub import ModelCard
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import load_file
from torchvision.ops import box_iou

MAP_KEYS = ["map", "map50", "map75", "map_small", "map_medium", "map_large"]


def make_data(root, train, val, test, size=128, seed=0):
    run_script(
        "make_demo_detection.py", "--output-dir", root, "--train", train, "--val", val, "--test", test, "--size", size,
        "--seed", seed,
    )  # fmt: skip
    return root / "data.yaml"


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """4 epochs of fcos_tiny, 2 processes, fp32 (bf16 is emulated, 10x slower, on CPUs without AVX512-BF16);
    odd-sized val (21) and a test split smaller than the process count."""
    root = tmp_path_factory.mktemp("det_learn")
    data = make_data(root / "data", 256, 21, 1)
    (root / "data" / "images" / "train" / "broken.jpg").write_bytes(b"not an image")
    with (root / "data" / "labels" / "train" / "train_00000.txt").open("a") as f:
        f.write("9 0.5 0.5 0.1 0.1\n")
    out = root / "run"
    run_script(
        "train_detection.py", "--data", data, "--output-dir", out, "--epochs", 4, "--img-size", 128, "--batch-size", 8,
        "--nominal-batch-size", 16, "--mixed-precision", "no", "--workers", 1, nproc=2,
    )  # fmt: skip
    return root, data, out


def test_two_process_run_learns_and_writes_every_artifact(learned):
    _, _, out = learned
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "detection" and metrics["labels"] == ["square", "circle", "triangle"]
    for split in ("val", "test"):
        assert set(MAP_KEYS + ["per_class_ap"]) <= set(metrics[split])
    assert metrics["val"]["map50"] > 0.3, metrics["val"]  # chance is about 0
    for name in (
        "args.json", "results.csv", "data_report.json", "curves.png", "labels.png", "val_predictions.png",
        "model/model.safetensors", "model/config.json", "predictions_val.json", "ground_truth_val.json",
        "predictions_test.json", "ground_truth_test.json", "train_batch0.jpg", "pr_curves.png", "confusion_matrix.png",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    matrix = np.array(metrics["test"]["confusion_matrix"])  # classes and background: every test box lands in a row
    assert matrix.shape == (4, 4) and matrix[:3].sum() == len(
        json.loads((out / "ground_truth_test.json").read_text())["annotations"]
    )
    assert set(metrics["test"]["per_class_ap50"]) == set(metrics["labels"]) and "pr_curves" not in metrics["test"]
    assert any((out / "logs").rglob("events.out.tfevents*"))
    args = json.loads((out / "args.json").read_text())
    assert args["num_processes"] == 2 and args["accumulation_steps"] == 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"] and rows[-1]["step"] == "64"
    report = json.loads((out / "data_report.json").read_text())
    files = {k.split("/")[-1]: v for k, v in report["files"].items()}
    assert files["broken.jpg"] == {"corrupt_image": 1} and files["train_00000.txt"] == {"class_out_of_range": 1}
    card = (out / "model" / "README.md").read_text()
    hub = ModelCard.load(out / "model" / "README.md").data  # the Hub's reading of the front matter
    assert hub.pipeline_tag == "object-detection" and f"| test | {metrics['test']['map']:.4f} |" in card
    scores = {(r.dataset_split, r.metric_config): r.metric_value for r in hub.eval_results}
    assert scores[("test", "IoU=0.50:0.95")] == round(metrics["test"]["map"], 4) and str(out.parent) not in card


def test_saved_json_files_give_the_reported_map_with_pycocotools(learned):
    _, _, out = learned
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        gt = COCO(str(out / f"ground_truth_{split}.json"))
        e = COCOeval(gt, gt.loadRes(str(out / f"predictions_{split}.json")), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
        for key, value in zip(MAP_KEYS, e.stats, strict=False):
            assert metrics[split][key] == pytest.approx(value, abs=1e-9), (split, key)


def test_one_process_evaluates_the_same_model_to_the_same_metrics(learned, tmp_path):
    """--eval-only in one process scores the saved model as the 2-process run did: each image counts once in both,
    including the 1-image test split that DDP pads to 2."""
    _, data, out = learned
    run = tmp_path / "eval"
    run_script("train_detection.py", "--eval-only", "--weights", out / "model", "--data", data, "--output-dir", run,
               "--mixed-precision", "no", "--workers", 1)  # fmt: skip
    one = json.loads((run / "metrics.json").read_text())
    two = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in MAP_KEYS:
            assert one[split][key] == pytest.approx(two[split][key], abs=1e-3), (split, key)
    assert len(json.loads((run / "ground_truth_val.json").read_text())["images"]) == 21
    assert (run / "predictions_test.json").is_file() and not (run / "model").exists()


def test_checkpoint_of_other_labels_is_refused(learned, tmp_path):
    root, data, out = learned
    cfg = yaml.safe_load(data.read_text())
    cfg["names"] = {0: "cube", 1: "ball", 2: "cone"}
    cfg["path"] = str(data.parent)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(cfg))
    copy = tmp_path / "run"
    shutil.copytree(out, copy)  # a run folder handed to someone else
    proc = run_script(
        "train_detection.py", "--data", other, "--output-dir", copy, "--epochs", 4, "--img-size", 128, "--resume", check=False
    )
    assert proc.returncode != 0
    assert "--resume refused" in proc.stderr and '"cone"] now' in proc.stderr.split("labels: ")[1].splitlines()[0]


def test_predict_finds_the_objects(learned, tmp_path):
    root, _, out = learned
    images = root / "data" / "images" / "val"
    run_script("predict_detection.py", "--model-dir", out / "model", images, "--output-dir", tmp_path / "pred", "--conf", 0.3)
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    names = json.loads((out / "model" / "config.json").read_text())["labels"]
    assert results and all(r["label"] == names[r["category_id"]] for r in results)  # records carry the label's name
    files = sorted(images.glob("*.jpg"))
    assert len(list((tmp_path / "pred" / "drawn").glob("*.jpg"))) == len(files)
    found = total = 0
    for file in files:
        rows = np.loadtxt(tmp_path / "pred" / "labels" / f"{file.stem}.txt", ndmin=2).reshape(-1, 6)
        assert ((rows[:, 1:] >= 0) & (rows[:, 1:] <= 1)).all()
        truth = root / "data" / "labels" / "val" / f"{file.stem}.txt"
        if not truth.exists():
            continue
        gt = np.loadtxt(truth, ndmin=2)
        w, h = 128, 128
        mine = [r for r in results if r["file_name"] == str(file)]
        if mine:
            from PIL import Image

            w, h = Image.open(file).size
        gt_boxes = torch.tensor(
            [[(x - bw / 2) * w, (y - bh / 2) * h, (x + bw / 2) * w, (y + bh / 2) * h] for _, x, y, bw, bh in gt]
        )
        pred_boxes = torch.tensor(
            [[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]] for r in mine]
        ).reshape(-1, 4)
        iou = box_iou(gt_boxes, pred_boxes) if len(mine) else torch.zeros(len(gt), 0)
        same_class = torch.tensor(gt[:, 0])[:, None] == torch.tensor([r["category_id"] for r in mine])[None, :]
        found += int(((iou > 0.5) & same_class).any(1).sum())
        total += len(gt)
    assert found / total > 0.5, (found, total)


def training_args(data, out, *extra):
    return [
        "--data", data, "--output-dir", out, "--img-size", 64, "--batch-size", 8, "--nominal-batch-size", 16, "--workers",
        1, *extra,
    ]  # fmt: skip


def parameters(checkpoint_dir):
    return load_file(checkpoint_dir / "model.safetensors")


def test_one_and_two_processes_take_the_same_steps(tmp_path):
    """1 process x batch 8 x 2 accumulation steps == 2 processes x batch 8 x 1 step (augmentation off, same seed)."""
    data = make_data(tmp_path / "data", 32, 5, 0, size=64)
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"p{nproc}"
        # One thread in every process on both sides: CPU kernels round differently per thread count (on AMD EPYC
        # 2 threads vs 1 moved parameters by 4e-5 in 4 steps), and this test compares process counts, not threads.
        env = {"OMP_NUM_THREADS": "1"}
        run_script("train_detection.py", *training_args(data, out, "--epochs", 2, "--no-augment"), nproc=nproc, env=env)
        runs[nproc] = out
    one, two = (parameters(runs[n] / "checkpoints" / "step_00000004") for n in (1, 2))
    before = parameters(runs[1] / "checkpoints" / "step_00000002")
    names = [k for k in one if "running_" not in k and "num_batches" not in k]
    moved = max((one[k] - before[k]).abs().max().item() for k in names)
    diff = max((one[k] - two[k]).abs().max().item() for k in names)
    print(f"1 vs 2 processes: max parameter difference {diff:.2e} (parameters moved up to {moved:.2e} in the last epoch)")
    assert moved > 1e-4 and diff < 1e-5, (moved, diff)


def test_resume_after_sigterm_mid_epoch_matches_the_uninterrupted_run(tmp_path):
    data = make_data(tmp_path / "data", 64, 5, 0, size=64)
    common = ["--epochs", 2, "--multi-scale"]
    full = tmp_path / "full"
    run_script("train_detection.py", *training_args(data, full, *common))

    part = tmp_path / "part"
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "train_detection.py"),
        *map(str, training_args(data, part, *common, "--checkpoint-steps", 1)),
    ]
    proc = subprocess.Popen(cmd, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (part / "checkpoints" / "step_00000005").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped at epoch 2" in stdout, stdout[-2000:]
    last = sorted((part / "checkpoints").glob("step_*"))[-1]
    progress = json.loads((last / "progress.json").read_text())
    assert progress["epoch"] == 1 and 0 < progress["batch_in_epoch"] < 8
    run_script("train_detection.py", *training_args(data, part, *common, "--resume"))

    a, b = parameters(full / "checkpoints" / "step_00000008"), parameters(part / "checkpoints" / "step_00000008")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    ema_a, ema_b = load_file(full / "model" / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert max((ema_a[k].float() - ema_b[k].float()).abs().max().item() for k in ema_a) < 1e-6
    timing = {"seconds", "train_samples_per_second"}
    rows_a, rows_b = (list(csv.DictReader((d / "results.csv").open())) for d in (full, part))
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b, strict=False):
        assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}


def test_compile_trains_the_same_model(tmp_path):
    """--compile (the backbone, in place) takes the same steps as eager mode and saves the same parameter names."""
    data = make_data(tmp_path / "data", 16, 4, 0, size=64)
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        run_script("train_detection.py", *training_args(data, out, "--epochs", 1, "--no-augment", *extra))
        runs[name] = parameters(out / "model")
    eager, compiled = runs["eager"], runs["compiled"]
    assert eager.keys() == compiled.keys()
    diff = max((eager[k].float() - compiled[k].float()).abs().max().item() for k in eager)
    print(f"eager vs compiled: max parameter difference {diff:.2e}")
    assert diff < 1e-4, diff
