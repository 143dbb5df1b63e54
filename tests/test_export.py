"""export_model.py: ONNX and ExportedProgram exports of both tasks agree with PyTorch on real inputs, take any batch
size, and an export that does not agree is reported with a non-zero exit."""

import gc
import json
import shutil

import export_model
import make_demo_audio
import make_demo_detection
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from audio_data import fix_length, load_audio_data, read_audio
from audio_model import build_model as build_audio_model
from audio_model import model_config as audio_config
from audio_model import save_model as save_audio_model
from audio_predictor import AudioPredictor
from detection_data import Sample
from detection_model import build_model as build_detector
from detection_model import model_config as detection_config
from detection_model import save_model as save_detector
from detection_predictor import DetectionParity, DetectionPredictor

RATE, SECONDS, SAMPLES = 16000, 0.25, 4000
IMG_SIZE, MAX_DET = 96, 20


@pytest.fixture(scope="module", autouse=True)
def collect_garbage_after_the_module():
    """onnxruntime sessions left for the garbage collector are freed in this process, not in the DataLoader workers
    that later tests fork: a forked worker that collected them hung in pthread_cond_destroy (their threads do not
    exist in the child). Torn down after the module's other fixtures, so their sessions are collected too."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def collect_garbage_after_each_test():
    yield
    gc.collect()


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """A run folder as train_audio.py leaves it (model/ and args.json), for a SqueezeNet 1.1 (it exports in half the
    time of the default ResNet-18) trained for a few steps on 3 classes of 0.25 s demo clips: normalisation and
    BatchNorm statistics are real, as after training, and its last maps are small enough for the tiny-map path."""
    root = tmp_path_factory.mktemp("audio")
    make_demo_audio.main(["--output", str(root / "data"), "--classes", "3", "--clips-per-class", "20", "--seconds", str(SECONDS)])
    data = load_audio_data(str(root / "data"))
    config = audio_config("squeezenet1_1", data.labels, RATE, SECONDS, n_mels=32)
    torch.manual_seed(0)
    model = build_audio_model(config)
    train = data.splits["train"]
    waves = torch.stack([fix_length(read_audio(s, RATE, SAMPLES), SAMPLES) for s in train.sources])
    model.frontend.fit_normalisation(waves)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(waves), torch.from_numpy(train.targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_audio_model(root / "run" / "model", model.eval(), config)
    (root / "run" / "args.json").write_text(json.dumps({"data": str(root / "data"), "format": data.format}))
    return root / "run"


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    """A run folder as train_detection.py leaves it, for an untrained fcos_tiny at 96 px. Untrained, FCOS scores
    every location near its prior (about 0.07), so with conf 0.05 hundreds of candidates pass the threshold: the
    per-level top-k, per-class NMS and the max_det cut all have work to do."""
    root = tmp_path_factory.mktemp("detection")
    make_demo_detection.main(["--output-dir", str(root / "data"), "--train", "2", "--val", "6", "--test", "0", "--size", "96"])
    config = detection_config("fcos_tiny", make_demo_detection.CLASSES, IMG_SIZE, {"eval_iou": 0.6, "max_det": MAX_DET})
    config["conf"] = 0.05
    torch.manual_seed(0)
    model = build_detector(config).eval()
    with torch.no_grad():  # training drives the background column (class 0, never a target) far down; so here
        model.head.classification_head.cls_logits.bias[0] = -20
    save_detector(root / "run" / "model", model, config)
    (root / "run" / "args.json").write_text(json.dumps({"data": str(root / "data" / "data.yaml"), "format": None}))
    return root / "run"


def export(run, output_dir, *extra) -> dict:
    export_model.main(
        ["--model-dir", str(run / "model"), "--output-dir", str(output_dir), "--latency-runs", "1", "--batch-size", "4", *extra]
    )
    return json.loads((output_dir / "export_report.json").read_text())


@pytest.fixture(scope="module")
def audio_export(audio_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("audio_export")
    return out, export(audio_run, out, "--format", "all")


@pytest.fixture(scope="module")
def detection_export(detection_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("detection_export")
    return out, export(detection_run, out, "--format", "all")


def test_audio_exports_match_pytorch_on_the_val_split(audio_export):
    out, report = audio_export
    assert report["passed"] and report["inputs"]["count"] == 6  # 2 val clips per class
    for fmt in ("onnx", "exported_program"):
        parity = report["parity"][fmt]
        assert parity["clips"] == 6 and parity["max_abs_logit_diff"] < 1e-3 and parity["top1_identical"], parity
    assert report["onnx"]["inputs"] == {"waveform": ["batch", SAMPLES]}
    assert report["onnx"]["outputs"] == {"logits": ["batch", 3]}
    assert set(report["latency"]["milliseconds"]["batch_32"]) == {"pytorch_eager", "onnxruntime", "exported_program"}
    # --output-dir is self-contained: the config a server needs is beside the files.
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt2", "config.json", "export_report.json"}


def test_detection_exports_match_pytorch_box_for_box_and_in_map(detection_export):
    out, report = detection_export
    assert report["passed"] and report["inputs"]["count"] == 6
    for fmt in ("onnx", "exported_program"):
        p = report["parity"][fmt]
        assert p["images"] == 6 and p["reference_detections"] == 6 * MAX_DET, p  # every image filled up to max_det
        assert p["matched"] == p["reference_detections"] == p["exported_detections"], p
        assert p["min_iou"] > 0.99 and p["max_abs_score_diff"] < 1e-3, p
        assert abs(p["map_exported"] - p["map_reference"]) <= 1e-4, p
    assert report["onnx"]["inputs"] == {"images": ["batch", 3, IMG_SIZE, IMG_SIZE]}
    assert report["onnx"]["outputs"] == {
        "boxes": ["batch", MAX_DET, 4],
        "scores": ["batch", MAX_DET],
        "labels": ["batch", MAX_DET],
        "num_detections": ["batch"],
    }


def test_onnx_takes_any_batch_size(audio_export, detection_export, audio_run, detection_run):
    """Batch 3 gives what three batches of 1 give. (The parity check already ran batches of 4 and 2, and the
    latency figures batches of 1 and 32, through both runtimes.)"""
    cases = [
        (audio_export[0], AudioPredictor.load(audio_run / "model"), audio_run),
        (detection_export[0], DetectionPredictor.load(detection_run / "model"), detection_run),
    ]
    for out, task, run in cases:
        _, batches = task.inputs(run, None, 3, None)
        inputs, _ = next(batches)
        onnx_model = export_model.load_onnx(out / "model.onnx", task)
        together = onnx_model(inputs)
        one_by_one = [torch.cat(parts) for parts in zip(*(onnx_model(inputs[i : i + 1]) for i in range(3)), strict=True)]
        assert [t.shape[0] for t in together] == [3] * len(task.output_names)
        for a, b in zip(together, one_by_one, strict=True):
            assert a.dtype == b.dtype and torch.allclose(a.double(), b.double(), atol=1e-4), task.name
    assert [o.type for o in onnxruntime.InferenceSession(str(detection_export[0] / "model.onnx")).get_outputs()] == [
        "tensor(float)",
        "tensor(float)",
        "tensor(int64)",
        "tensor(int64)",
    ]


def test_a_perturbed_export_fails_parity_with_a_non_zero_exit(audio_export, audio_run, tmp_path):
    """A model.onnx whose log-mel normalisation moved by 10 dB is caught by --verify-only: exit 1, the report says why."""
    out, _ = audio_export
    for name in ("model.onnx", "config.json"):
        shutil.copy(out / name, tmp_path / name)
    model = onnx.load(str(tmp_path / "model.onnx"))
    (mean,) = [t for t in model.graph.initializer if t.name == "frontend.mean"]
    mean.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(mean) + np.float32(10), mean.name))
    onnx.save(model, str(tmp_path / "model.onnx"))

    with pytest.raises(SystemExit) as stopped:
        export(audio_run, tmp_path, "--format", "onnx", "--verify-only")
    assert "parity FAILED for onnx" in str(stopped.value.code)  # a message: Python exits with status 1
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert not report["passed"] and not report["parity"]["onnx"]["passed"]
    assert report["parity"]["onnx"]["max_abs_logit_diff"] > 1e-2
    assert report["parity"]["onnx"]["problem"].startswith("max |logit difference|")


def test_verify_on_given_images_without_labels(detection_export, detection_run):
    """--inputs: image files without ground truth, so detections are matched but no mAP is computed."""
    out, _ = detection_export
    images = detection_run.parent / "data" / "images" / "val"
    report = export(detection_run, out, "--format", "onnx", "--verify-only", "--inputs", str(images), "--limit", "4")
    assert report["passed"] and report["inputs"]["source"] == "files" and report["inputs"]["count"] == 4
    parity = report["parity"]["onnx"]
    assert parity["matched"] == parity["reference_detections"] == 4 * MAX_DET and "map_reference" not in parity


def test_only_a_detection_at_the_score_threshold_may_lack_a_partner():
    """Rounding can move a score of conf + 1e-7 below conf; a detection missing anywhere else is a failure."""
    config = {"labels": ["a", "b"], "conf": 0.25, "max_det": 100}
    no_boxes = Sample(0, "x.jpg", "x.jpg", 100, 100, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    meta = [(no_boxes, {"orig_size": (100, 100), "size": (100, 100)})]
    pytorch = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]),
        "scores": torch.tensor([0.9, 0.2500001]),
        "labels": torch.tensor([0, 1]),
    }
    first_only = {k: v[:1] for k, v in pytorch.items()}
    at_threshold = DetectionParity(None, config)
    at_threshold.add(meta, [pytorch], [first_only])
    assert at_threshold.result()["passed"] and at_threshold.counts["at_cut"] == 1

    pytorch["scores"][1] = 0.6
    missing = DetectionParity(None, config)
    missing.add(meta, [pytorch], [first_only])
    result = missing.result()
    assert not result["passed"] and result["unmatched"] == 1 and result["problem"] == "1 detections without a partner"
