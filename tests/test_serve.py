"""scripts/serve.py as a user runs it: real uvicorn processes on 127.0.0.1, spoken to over HTTP. Answers equal what
predict_audio.py and predict_detection.py give for the same files, concurrent requests share forward passes, bad
requests get JSON 4xx errors and leave the server working, exported ONNX models are served, SIGTERM lets the
requests in flight finish before the process exits 0, and stalled clients are cut off: heads and bodies by timeouts,
connections past the cap at once, and on SIGTERM without holding up the exit."""

import asyncio
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import audio_predictor
import httpx
import numpy as np
import predict_audio
import predict_detection
import pytest
import soundfile as sf
import torch
from audio_data import read_audio
from audio_model import build_model as build_audio_model
from audio_model import frontend_config
from audio_model import model_config as audio_config
from audio_model import save_model as save_audio_model
from conftest import REPO, free_port, script_env
from detection_model import build_model as build_detector
from detection_model import model_config as detection_config_for
from detection_model import save_model as save_detector
from PIL import Image

from benchmarks.serve_load import Stallers, load_test

RATE = 8000  # the test models' sample rate; clips are 1 s, so windows are 8000 samples every 4000
LABELS = ["dog", "siren", "drill"]
IMG_SIZE = 96  # the PyTorch detector's input size
ONNX_IMG_SIZE = 32  # the ONNX stand-in detector's
SERVE = REPO / "scripts/serve.py"


# ----------------------------------------------------------------------------- models and files, made here
class StandInAudio(torch.nn.Module):
    """export_model.py's audio contract: waveform (batch, samples) -> logits (batch, classes), from loudness."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.tensor([[4.0, -2.0, 0.5], [1.0, 3.0, -1.0], [-2.0, 0.5, 2.0]]))

    def forward(self, waveform):
        return torch.stack([waveform.abs().mean(1), waveform.std(1), waveform.amax(1)], dim=1) @ self.weight


class StandInDetector(torch.nn.Module):
    """export_model.py's detection contract: images (batch, 3, S, S) in [0, 1] -> boxes (xyxy input pixels), scores,
    0-based labels and num_detections. Three rows per image, the first two detections scoring the image's mean
    brightness and half of it; the third is padding past num_detections (scoring 0.99, so serving it would show)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("boxes", torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 16.0, 24.0, 30.0], [0.0, 0.0, 32.0, 32.0]]))
        self.register_buffer("labels", torch.tensor([2, 0, 1]))

    def forward(self, images):
        brightness = images.mean(dim=(1, 2, 3))
        scores = torch.stack([brightness, brightness / 2, torch.full_like(brightness, 0.99)], dim=1)
        per_image = torch.zeros_like(brightness)[:, None]  # broadcasts the constants over the batch as traced, not fixed
        boxes, labels = self.boxes + per_image[..., None], self.labels + per_image.long()
        return boxes, scores, labels, torch.full_like(brightness, 2).long()


def export_onnx(module, example, path: Path, input_name: str, output_names: list[str], config: dict):
    path.parent.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; the torch.export one takes 10 s here
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes={input_name: {0: "batch"}},
            dynamo=False,
        )
    (path.parent / "config.json").write_text(json.dumps(config))


@dataclass
class Models:
    audio: Path
    detection: Path
    audio_onnx: Path
    detection_onnx: Path
    wav: Path  # 2.5 s: four sliding windows
    flac: Path  # 0.6 s: one window, padded
    jpg: Path
    png: Path
    grey: Path  # uniform grey 64 x 48 PNG, for the ONNX stand-in's known answer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # Saved the way train_audio.py and train_detection.py save model/: no training needed to serve one.
    config = audio_config("resnet18", LABELS, RATE, 1.0, 32)
    audio = build_audio_model(config)
    audio.frontend.fit_normalisation(torch.randn(4, RATE) * 0.1)
    save_audio_model(root / "audio", audio, config)
    detection_config = detection_config_for("fcos_tiny", LABELS, IMG_SIZE, {"eval_iou": 0.6, "max_det": 100})
    detector = build_detector(detection_config)
    with torch.no_grad():
        # Untrained, FCOS scores every place about 0.07. Sharper class logits (not the unused background's) and larger
        # boxes give scores from 0.25 to above 0.5 and overlapping boxes, so that conf and NMS IoU change the answer.
        classes = detector.head.classification_head.cls_logits
        classes.weight[1:] *= 10
        classes.bias[1:] = -3.0
        detector.head.regression_head.bbox_reg.bias.fill_(1.0)
    save_detector(root / "detection", detector, detection_config)
    onnx_audio_config = {"task": "audio-classification", "model": "stand-in", "labels": LABELS, **frontend_config(RATE, 1.0, 32)}
    export_onnx(StandInAudio(), torch.zeros(2, RATE), root / "audio_onnx/model.onnx", "waveform", ["logits"], onnx_audio_config)
    export_onnx(
        StandInDetector(),
        torch.zeros(2, 3, ONNX_IMG_SIZE, ONNX_IMG_SIZE),
        root / "detection_onnx/model.onnx",
        "images",
        ["boxes", "scores", "labels", "num_detections"],
        {**detection_config, "model": "stand-in", "img_size": ONNX_IMG_SIZE, "conf": 0.25, "iou": 0.6, "max_det": 3},
    )
    t = np.arange(round(2.5 * RATE)) / RATE
    sf.write(root / "long.wav", 0.4 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t)), RATE, subtype="PCM_16")
    sf.write(root / "short.flac", 0.3 * rng.standard_normal(round(0.6 * RATE)), RATE)
    picture = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    picture[20:60, 30:80] = (240, 30, 30)
    Image.fromarray(picture).save(root / "photo.jpg", quality=90)
    Image.fromarray(picture[:70, :50]).save(root / "crop.png")
    Image.new("RGB", (64, 48), (200, 200, 200)).save(root / "grey.png")
    return Models(
        root / "audio", root / "detection", root / "audio_onnx/model.onnx", root / "detection_onnx/model.onnx",
        root / "long.wav", root / "short.flac", root / "photo.jpg", root / "crop.png", root / "grey.png",
    )  # fmt: skip


# ----------------------------------------------------------------------------- servers: real processes, real HTTP
class Server:
    def __init__(self, model: Path, log: Path, *flags):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.predict = self.url + "/v1/predict"
        self.log = log
        command = [sys.executable, str(SERVE), "--model-dir", str(model), "--port", str(port), "--threads", "1"]
        # Output to a file: a pipe nobody reads would fill up with access-log lines and stall the server.
        with log.open("w") as out:
            self.proc = subprocess.Popen([*command, *flags], env=script_env(), stdout=out, stderr=subprocess.STDOUT)
        self.ready = False

    def wait_ready(self, timeout: float = 180) -> "Server":
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve.py did not come up (exit {self.proc.poll()}):\n{self.log.read_text()[-4000:]}")
            try:
                self.ready = httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                time.sleep(0.2)
        return self

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    """All four start at once (their imports overlap); each test waits only for the ones it talks to."""
    logs = tmp_path_factory.mktemp("serve_logs")
    started = {
        "audio": Server(
            models.audio, logs / "audio.log", "--max-wait-ms", "50", "--max-body-mb", "1", "--max-audio-seconds", "4"
        ),
        "detection": Server(models.detection, logs / "detection.log", "--max-body-mb", "1"),
        "audio_onnx": Server(models.audio_onnx, logs / "audio_onnx.log", "--max-wait-ms", "200"),
        "detection_onnx": Server(
            models.detection_onnx, logs / "detection_onnx.log", "--header-timeout", "1", "--body-timeout", "1"
        ),
        # Stalls are cut only by the cap and by SIGTERM here; a request waits up to 2 s for company in its forward pass.
        "guarded": Server(
            models.audio_onnx,
            logs / "guarded.log",
            *"--max-connections 10 --max-wait-ms 2000 --header-timeout 60 --body-timeout 60 --drain-seconds 30".split(),
        ),
    }
    yield started
    for server in started.values():  # SIGTERM to all first, so that they shut down side by side
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in started.values():
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()


def close_to(expected, tolerance: float = 2e-4):
    """expected with every float compared approximately: a file batched with others may differ in the last bits,
    and a probability rounded to 4 decimals by one step."""
    if isinstance(expected, dict):
        return {k: close_to(v, tolerance) for k, v in expected.items()}
    if isinstance(expected, list):
        return [close_to(v, tolerance) for v in expected]
    return pytest.approx(expected, rel=1e-5, abs=tolerance) if isinstance(expected, float) else expected


def raw(path: Path, media_type: str) -> dict:
    return {"content": path.read_bytes(), "headers": {"content-type": media_type}}


def parts(*files: tuple[Path, str]) -> dict:
    """A multipart body, each part named by its full path, as the predict scripts name files they were given."""
    return {"files": [("files", (str(path), path.read_bytes(), media_type)) for path, media_type in files]}


# ----------------------------------------------------------------------------- the answers
def test_health_and_model_describe_the_model_and_its_input(servers):
    audio, detection = servers["audio"].wait_ready(), servers["detection"].wait_ready()
    health = audio.health()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert (health["task"], health["backend"]) == ("audio-classification", "pytorch")
    model = httpx.get(audio.url + "/v1/model").json()
    assert model["labels"] == LABELS and model["model"] == "resnet18"
    assert {k: model["input"][k] for k in ("sample_rate", "clip_seconds", "hop_seconds", "max_body_mb")} == {
        "sample_rate": RATE,
        "clip_seconds": 1.0,
        "hop_seconds": 0.5,
        "max_body_mb": 1.0,
    }
    assert {"audio/wav", "audio/x-wav", "audio/flac", "audio/ogg"} <= set(model["input"]["media_types"])
    model = httpx.get(detection.url + "/v1/model").json()
    assert model["task"] == "detection" and model["labels"] == LABELS
    assert model["input"]["img_size"] == IMG_SIZE and model["input"]["query"] == {"conf": 0.25, "iou": 0.6}
    assert {"image/jpeg", "image/png", "image/webp"} <= set(model["input"]["media_types"])


def test_audio_answers_are_the_records_predict_audio_prints(servers, models, tmp_path):
    out = tmp_path / "predictions.jsonl"
    predict_audio.main([str(models.wav), str(models.flac), "--model-dir", str(models.audio), "--output", str(out), "--cpu"])
    long, short = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["start"] for w in long["windows"]] == [0.0, 0.5, 1.0, 1.5]  # sliding windows over the 2.5 s file
    server = servers["audio"].wait_ready()

    answer = httpx.post(server.predict, **raw(models.wav, "audio/wav"))
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json() == close_to({**long, "path": "body"})
    assert httpx.post(server.predict, **raw(models.flac, "audio/flac")).json() == close_to({**short, "path": "body"})
    # Several files, one labelled as curl -F labels a .flac it does not know: in order, under "predictions".
    answer = httpx.post(server.predict, **parts((models.wav, "audio/x-wav"), (models.flac, "application/octet-stream")))
    assert answer.json() == close_to({"predictions": [long, short]})
    top1 = httpx.post(server.predict, params={"top_k": 1}, **raw(models.wav, "audio/wav")).json()
    assert top1["top"] == close_to(long["top"][:1]) and all(len(w["top"]) == 1 for w in top1["windows"])


def test_detection_answers_hold_the_entries_predict_detection_writes(servers, models, tmp_path):
    predict_detection.main(
        ["--model-dir", str(models.detection), str(models.jpg), str(models.png), "--output-dir", str(tmp_path)]
    )
    entries = json.loads((tmp_path / "predictions.json").read_text())
    photo, crop = ([e for e in entries if e["image_id"] == i] for i in (0, 1))
    assert len(photo) > 5 and crop  # the comparison below is about real boxes, not two empty lists
    server = servers["detection"].wait_ready()

    answer = httpx.post(server.predict, **parts((models.jpg, "image/jpeg"), (models.png, "image/png")))
    assert answer.status_code == 200
    assert answer.json() == close_to(
        {
            "predictions": [
                {"file_name": str(models.jpg), "width": 120, "height": 90, "detections": photo},
                {"file_name": str(models.png), "width": 50, "height": 70, "detections": crop},
            ]
        }
    )
    single = httpx.post(server.predict, **raw(models.jpg, "image/jpeg")).json()
    assert single["detections"] == close_to([{**e, "file_name": "body"} for e in photo])
    # conf and iou reach the model: a higher conf keeps the stronger detections, a lower NMS IoU suppresses more boxes.
    strict = httpx.post(server.predict, params={"conf": 0.5}, **raw(models.jpg, "image/jpeg")).json()["detections"]
    assert 0 < len(strict) < len(photo)
    assert strict == close_to([{**e, "file_name": "body"} for e in photo if e["score"] > 0.5])
    counts = [
        len(httpx.post(server.predict, params={"iou": iou}, **raw(models.jpg, "image/jpeg")).json()["detections"])
        for iou in (0.1, 0.9)
    ]
    assert counts[0] < counts[1]


def test_onnx_detector_answers_by_the_export_contract(servers, models):
    server = servers["detection_onnx"].wait_ready()
    assert httpx.get(server.url + "/v1/model").json()["input"]["postprocess_fixed_at_export"] is True
    # grey.png is 64 x 48 at grey 200: resized to 32 x 24 and padded with grey 114 to 32 x 32, it has mean brightness
    # (0.75 * 200 + 0.25 * 114) / 255 = 0.7. Boxes come back at twice the input's scale, clipped to the image.
    expected = [
        {"image_id": 0, "file_name": "body", "category_id": 2, "bbox": [0.0, 0.0, 32.0, 32.0], "score": 0.7, "label": LABELS[2]},
        {
            "image_id": 0,
            "file_name": "body",
            "category_id": 0,
            "bbox": [16.0, 32.0, 32.0, 16.0],
            "score": 0.35,
            "label": LABELS[0],
        },
    ]  # label: the name of category_id
    answer = httpx.post(server.predict, **raw(models.grey, "image/png")).json()
    assert answer == close_to({"file_name": "body", "width": 64, "height": 48, "detections": expected}, 1e-5)
    strict = httpx.post(server.predict, params={"conf": 0.5}, **raw(models.grey, "image/png")).json()
    assert strict["detections"] == close_to(expected[:1], 1e-5)
    for params in ({"conf": 0.1}, {"iou": 0.3}):  # below the export's score threshold, or another NMS: cannot be honoured
        refused = httpx.post(server.predict, params=params, **raw(models.grey, "image/png"))
        assert refused.status_code == 422 and refused.json()["error"] == "invalid_parameter"


def test_concurrent_requests_share_forward_passes(servers, models):
    server = servers["audio"].wait_ready()
    before = server.health()

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(server.predict, **raw(models.flac, "audio/flac")) for _ in range(16)))

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * 16
    assert max(int(a.headers["x-batch-size"]) for a in answers) > 1
    after = server.health()
    assert after["inputs"] - before["inputs"] == 16  # one window each
    assert after["forward_passes"] - before["forward_passes"] < 16
    assert all(a.json() == close_to(answers[0].json()) for a in answers)  # batched with others, each gets its own answer


# ----------------------------------------------------------------------------- bad requests
def streamed(size: int):
    """A chunked body without Content-Length: the limit must be enforced while reading."""
    for _ in range(size // 65536):
        yield b"\0" * 65536


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def bad_requests(models: Models) -> list[tuple[str, str, dict, int, str]]:
    """(server, method and path, request, status, error) for every way a request can be wrong."""
    wav, jpg = models.wav.read_bytes(), models.jpg.read_bytes()
    big = b"\0" * (2 * 2**20)
    return [
        ("audio", "POST /v1/predict", {"content": big, "headers": {"content-type": "audio/wav"}}, 413, "body_too_large"),
        (
            "audio",
            "POST /v1/predict",
            {"content": streamed(len(big)), "headers": {"content-type": "audio/wav"}},
            413,
            "body_too_large",
        ),
        ("audio", "POST /v1/predict", {"files": [("files", ("big.wav", big, "audio/wav"))]}, 413, "body_too_large"),
        ("audio", "POST /v1/predict", {"content": wav, "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ("audio", "POST /v1/predict", {"content": wav}, 415, "unsupported_media_type"),
        ("audio", "POST /v1/predict", {"content": jpg, "headers": {"content-type": "image/jpeg"}}, 415, "unsupported_media_type"),
        ("audio", "POST /v1/predict", {"files": [("files", ("a.mp4", wav, "video/mp4"))]}, 415, "unsupported_media_type"),
        ("audio", "POST /v1/predict", {"content": b"", "headers": {"content-type": "audio/wav"}}, 422, "empty_file"),
        ("audio", "POST /v1/predict", {"files": [("files", ("empty.wav", b"", "audio/wav"))]}, 422, "empty_file"),
        ("audio", "POST /v1/predict", {"content": jpg, "headers": {"content-type": "audio/wav"}}, 422, "undecodable_file"),
        (
            "audio",
            "POST /v1/predict",
            {"content": b"OggS" + bytes(200), "headers": {"content-type": "audio/ogg"}},
            422,
            "undecodable_file",
        ),
        ("audio", "POST /v1/predict", {"files": [("file", ("a.wav", wav, "audio/wav"))]}, 422, "missing_field"),
        (
            "audio",
            "POST /v1/predict",
            {"data": {"files": "a.wav"}, "files": [("x", ("a.wav", wav, "audio/wav"))]},
            422,
            "missing_field",
        ),
        (
            "audio",
            "POST /v1/predict",
            {"files": [("files", ("a.wav", wav, "audio/wav"))] * 2},
            422,
            "too_much_audio",
        ),  # 5 s > 4 s
        (
            "audio",
            "POST /v1/predict?top_k=0",
            {"content": wav, "headers": {"content-type": "audio/wav"}},
            422,
            "invalid_parameter",
        ),
        (
            "audio",
            "POST /v1/predict?top_k=two",
            {"content": wav, "headers": {"content-type": "audio/wav"}},
            422,
            "invalid_parameter",
        ),
        ("audio", "POST /v1/predict", {"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400, "bad_request"),
        ("audio", "GET /v1/predict", {}, 405, "method_not_allowed"),
        ("audio", "GET /v2/predict", {}, 404, "not_found"),
        (
            "detection",
            "POST /v1/predict",
            {"content": jpg[: len(jpg) // 2], "headers": {"content-type": "image/jpeg"}},
            422,
            "undecodable_file",
        ),
        (
            "detection",
            "POST /v1/predict",
            {"content": b"not a picture", "headers": {"content-type": "image/png"}},
            422,
            "undecodable_file",
        ),
        (
            "detection",
            "POST /v1/predict",
            {"content": png_header(9000, 9000), "headers": {"content-type": "image/png"}},
            422,
            "too_large",
        ),
        (
            "detection",
            "POST /v1/predict",
            {"content": wav, "headers": {"content-type": "audio/wav"}},
            415,
            "unsupported_media_type",
        ),
        (
            "detection",
            "POST /v1/predict?conf=2",
            {"content": jpg, "headers": {"content-type": "image/jpeg"}},
            422,
            "invalid_parameter",
        ),
    ]


def test_bad_requests_get_json_errors_and_the_server_keeps_answering(servers, models):
    for name, request, kwargs, status, error in bad_requests(models):
        server = servers[name].wait_ready()
        method, path = request.split()
        answer = httpx.request(method, server.url + path, timeout=30, **kwargs)
        context = f"{name} {request} {sorted(kwargs)}: {answer.status_code} {answer.text[:300]}"
        assert (answer.status_code, answer.headers["content-type"]) == (status, "application/json"), context
        body = answer.json()
        assert set(body) == {"error", "detail"} and body["error"] == error and body["detail"], context
        assert "Traceback" not in answer.text and 'File "' not in answer.text, context
    for name, path, media_type in (("audio", models.wav, "audio/wav"), ("detection", models.jpg, "image/jpeg")):
        assert httpx.post(servers[name].predict, **raw(path, media_type)).status_code == 200
        assert "Traceback" not in servers[name].log.read_text()  # nothing escaped as an exception, even server-side
    named = httpx.post(
        servers["detection"].predict, files=[("files", ("half.jpg", models.jpg.read_bytes()[:3000], "image/jpeg"))]
    )
    assert named.status_code == 422 and named.json()["detail"].startswith("half.jpg: corrupt image")


# ----------------------------------------------------------------------------- ONNX audio, and the drain on SIGTERM
def test_sigterm_finishes_requests_in_flight_then_exits_0(servers, models):
    """The ONNX audio server (--max-wait-ms 200) gets SIGTERM while a request's body is still arriving: the body is
    read, the file queued and batched after the signal, the answer comes back 200, and then the process exits 0."""
    server = servers["audio_onnx"].wait_ready()
    assert httpx.get(server.url + "/v1/model").json()["backend"] == "onnxruntime"
    wave = read_audio(str(models.wav), RATE)
    starts = audio_predictor.window_starts(len(wave), RATE, RATE // 2)
    probs = StandInAudio()(audio_predictor.windows(wave, starts, RATE)).softmax(dim=1)
    expected = audio_predictor.file_record("body", probs, starts, len(wave), RATE, RATE, LABELS, 3)

    data, answers = models.wav.read_bytes(), []

    def slow_body():
        for start in range(0, len(data), len(data) // 4 + 1):
            yield data[start : start + len(data) // 4 + 1]
            time.sleep(0.4)

    client = threading.Thread(
        target=lambda: answers.append(
            httpx.post(server.predict, content=slow_body(), headers={"content-type": "audio/wav"}, timeout=60)
        )
    )
    client.start()
    deadline = time.monotonic() + 20
    while server.health()["in_flight"] == 0:
        assert time.monotonic() < deadline, "the slow request never reached the server"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    client.join(timeout=60)
    assert answers and answers[0].status_code == 200
    assert answers[0].json() == close_to(expected)
    assert server.proc.wait(timeout=60) == 0
    log = server.log.read_text()
    assert "Finished server process" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")


# ----------------------------------------------------------------------------- odd files
def wav_claiming(rate: int, path: Path) -> bytes:
    """path's 16-bit WAV with its header's sample rate (and byte rate) rewritten to rate."""
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"fmt " and data[24:28] == struct.pack("<I", RATE)
    data[24:32] = struct.pack("<II", rate, 2 * rate)
    return bytes(data)


@pytest.mark.parametrize("rate", [100, 10**9])
def test_a_wav_claiming_an_impossible_sample_rate_gets_422(servers, models, tmp_path, rate):
    server = servers["audio"].wait_ready()
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(200, dtype=np.float32), RATE, subtype="PCM_16")  # 2 s at 100 Hz, 0.2 us at 1 GHz
    answer = httpx.post(server.predict, content=wav_claiming(rate, short), headers={"content-type": "audio/wav"}, timeout=60)
    assert answer.status_code == 422 and answer.json()["error"] == "undecodable_file", answer.text
    assert str(rate) in answer.json()["detail"]


def test_a_wav_at_an_odd_but_possible_rate_is_answered_at_once(servers, models):
    """16001 Hz to the model's 8000 Hz: an exact resampler would build a 8000 x 16001 kernel (seconds, 0.5 GB)."""
    server = servers["audio"].wait_ready()
    began = time.monotonic()
    answer = httpx.post(server.predict, content=wav_claiming(16001, models.wav), headers={"content-type": "audio/wav"})
    assert answer.status_code in (200, 422) and time.monotonic() - began < 5, answer.text


def test_audio_files_of_every_suffix_training_reads_are_accepted(servers, models, tmp_path):
    server = servers["audio"].wait_ready()
    aiff = tmp_path / "clip.aiff"
    sf.write(aiff, 0.3 * np.sin(np.arange(RATE) / 5), RATE, format="AIFF")
    answer = httpx.post(server.predict, files=[("files", (aiff.name, aiff.read_bytes(), "application/octet-stream"))])
    assert answer.status_code == 200 and answer.json()["predictions"][0]["path"] == "clip.aiff", answer.text
    assert httpx.post(server.predict, **raw(aiff, "audio/aiff")).status_code == 200


# ----------------------------------------------------------------------------- stalled clients
HALF_HEAD = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"


def half_body(data: bytes, media_type: str) -> bytes:
    head = f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {media_type}\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data[: len(data) // 2]


def stall(server: Server, sent: bytes) -> socket.socket:
    """A connection that sends `sent`, then nothing."""
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=10)
    sock.sendall(sent)
    return sock


def until_closed(sock: socket.socket, seconds: float) -> bytes:
    """All the server sends until it closes the connection; socket.timeout if it has not within `seconds`."""
    sock.settimeout(seconds)
    with sock:
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


def test_a_stalled_head_or_body_gets_408_and_is_closed(servers, models):
    server = servers["detection_onnx"].wait_ready()  # --header-timeout 1 --body-timeout 1
    began = time.monotonic()
    head, body = stall(server, HALF_HEAD), stall(server, half_body(models.grey.read_bytes(), "image/png"))
    for sock, flag in ((head, "--header-timeout"), (body, "--body-timeout")):
        status, answer = status_and_json(until_closed(sock, 10))
        assert (status, answer["error"]) == (408, "request_timeout") and flag in answer["detail"], answer
    assert time.monotonic() - began < 4  # 1 s, and the time to notice on a busy machine
    assert httpx.post(server.predict, **raw(models.grey, "image/png")).status_code == 200
    assert "Traceback" not in server.log.read_text()


def test_connections_past_the_cap_get_503_at_once(servers, models):
    server = servers["guarded"].wait_ready()  # --max-connections 10
    idle = [stall(server, b"") for _ in range(10)]
    time.sleep(0.5)  # for the server to accept them all
    status, answer = status_and_json(until_closed(stall(server, b""), 2))  # answered without sending a thing
    assert (status, answer["error"]) == (503, "too_many_connections"), answer
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").status_code != 200:
        assert time.monotonic() < deadline, "the closed connections still count"
        time.sleep(0.1)


def test_sigterm_with_stalled_clients_answers_what_was_received_and_exits_at_once(servers, models):
    """SIGTERM with 3 half-sent heads, 3 half-sent bodies and a whole request waiting for company in its forward
    pass: the whole one is answered, the stalled ones dropped (408 for a body), and the process exits 0 within
    seconds of --drain-seconds 30, with no traceback in its log."""
    server = servers["guarded"].wait_ready()
    heads = [stall(server, HALF_HEAD) for _ in range(3)]
    bodies = [stall(server, half_body(models.wav.read_bytes(), "audio/wav")) for _ in range(3)]
    answers = []
    client = threading.Thread(target=lambda: answers.append(httpx.post(server.predict, **raw(models.wav, "audio/wav"))))
    client.start()
    deadline = time.monotonic() + 20
    while server.health()["in_flight"] < 4:  # 3 bodies being read, the whole request being answered
        assert time.monotonic() < deadline, "the requests never reached the server"
        time.sleep(0.05)
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - began < 6
    client.join(timeout=10)
    assert answers and answers[0].status_code == 200
    for sock in bodies:
        assert status_and_json(until_closed(sock, 5))[0] == 408
    for sock in heads:
        assert until_closed(sock, 5) == b""
    log = server.log.read_text()
    assert "Finished server process" in log and "Traceback" not in log and "Cancel" not in log


def test_load_test_helper_is_bounded_and_counts_errors(servers, models):
    server = servers["detection"].wait_ready()
    report = load_test(server.url, [models.jpg, models.grey], clients=4, requests=12, processes=2)
    assert report["requests"] == 12 and report["errors"] == 0 and report["p50_ms"] <= report["p99_ms"]
    refused = load_test(server.url, [models.wav], clients=2, requests=4, processes=1)  # audio sent to a detector
    assert (refused["errors"], refused["error_kinds"]) == (4, {"415": 4})
    with pytest.raises(ValueError, match="loopback"):
        load_test("http://example.com:8000", [models.jpg])


def test_stalled_connections_of_the_load_test_are_replaced_and_counted(servers, models):
    server = servers["detection_onnx"].wait_ready()  # --header-timeout 1 --body-timeout 1
    with Stallers(server.url, models.grey.read_bytes(), "image/png", 4) as stallers:
        report = load_test(server.url, [models.grey], clients=2, requests=8, processes=1)
        time.sleep(2.5)  # every stalled connection cut at least once, then its replacement
    cut = stallers.report(time.perf_counter())
    assert report["errors"] == 0 and stallers.opened >= 8
    assert cut["stalled_cut"] >= 4 and cut["stalled_statuses"].keys() == {"408"} and 0.8 < cut["stalled_held_s"] < 3
    with pytest.raises(ValueError, match="loopback"):
        Stallers("http://example.com:8000", b"", "image/png", 1)
