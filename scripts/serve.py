#!/usr/bin/env python
"""Serve a trained model over HTTP (FastAPI + uvicorn): post files, get the JSON the predict scripts give for them.

    python scripts/serve.py --model-dir runs/kws/model --port 8000
    python scripts/serve.py --model-dir runs/det/model/model.onnx --max-batch 16 --threads 2

--model-dir is the model/ folder of a train_audio.py or train_detection.py run, loaded as predict_audio.py and
predict_detection.py load it, or an exported model.onnx with its config.json beside it, run with onnxruntime.

  GET  /health      {"status": "ok", "model_loaded": true, "task", "backend", "in_flight": requests being
                    answered, "forward_passes" and "inputs": model calls since start and the inputs they took}
  GET  /v1/model    task, labels, backend and the input contract: media types, sample rate and clip length
                    (audio) or image size and conf/iou defaults (detection), size limits
  POST /v1/predict  one file as the raw body with its media type as Content-Type (audio/wav, audio/flac,
                    audio/ogg, audio/mpeg, audio/aiff, ...; image/jpeg, image/png, image/webp, ...), or files as
                    multipart/form-data parts named `files` (curl -F files=@a.wav -F files=@b.wav)

A raw body is answered with one record, a multipart request with {"predictions": [record, ...]}: one record per
part, in the order sent, also for a single part. A record is what the predict script gives for the file:
  audio      predict_audio.py's JSON line {"path", "label", "probability", "top": [...], "windows": [...]}, sliding
             windows over recordings longer than the clip; query parameter top_k (default 3)
  detection  {"file_name", "width", "height", "detections": [...]}, detections being the predictions.json entries
             predict_detection.py writes for the image: {"image_id" (the file's position in the request),
             "file_name", "category_id" (0-based class, names in /v1/model), "bbox": [x, y, w, h] pixels, "score"};
             query parameters conf and iou (default: the model's)
path and file_name are the part's file name, or "body" for a raw body. The X-Batch-Size header is the largest
forward pass the request's inputs were part of.

Errors are {"error": kind, "detail": what was wrong}: 408 headers slower than --header-timeout or a body silent for
--body-timeout, 413 body over --max-body-mb (from Content-Length, or as a streamed body passes it), 415 media type not
accepted, 422 empty or undecodable file (named), too much audio, missing field, bad query parameter, 503 to a
connection past --max-connections as it opens. 408, 413 and 503 close the connection. One bad file fails its request;
no answer carries a traceback.

Concurrent requests share forward passes: decoded files queue for one worker, which takes the oldest, waits up to
--max-wait-ms for more until it holds --max-batch model inputs (audio windows or images), and runs the model in a
thread, so the server keeps accepting meanwhile. --max-batch 1 turns batching off. SIGTERM (or Ctrl-C) stops
accepting, answers every request already received (for up to --drain-seconds), and exits with status 0: a body
still arriving is read on, but one silent for 1 s gets 408 and half-sent heads are dropped, so stalled clients do not
hold up the exit."""

import argparse
import asyncio
import io
import json
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

import h11
import onnxruntime as ort
import torch
import uvicorn
from audio_data import AUDIO_EXTENSIONS, BadClip, read_audio
from audio_model import TASK as AUDIO_TASK
from audio_model import load_model as load_audio_model
from detection_data import IMAGE_EXTENSIONS, MAX_PIXELS, eval_transform, make_collate, open_rgb, to_original_coordinates
from detection_model import TASK as DETECTION_TASK
from detection_model import load_model as load_detection_model
from detection_model import set_postprocess
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from predict_audio import file_record, predict, window_starts, windows
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF
from uvicorn.protocols.http.h11_impl import H11Protocol

# What training reads (audio_data.AUDIO_EXTENSIONS, all decoded by soundfile), by media type.
AUDIO_MEDIA_TYPES = tuple(f"audio/{kind}" for kind in "wav x-wav wave flac x-flac ogg mpeg aiff x-aiff".split())
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")
MAX_FILES = 64  # parts per multipart request: each is held, decoded, until its request is answered
CLOSE = {"connection": "close"}  # for answers given before the body was read whole: the rest would not be waited for
DRAIN_STALL_SECONDS = 1.0  # during the drain, a body silent this long is given up on (a sending client gets its answer)
# The contract of export_model.py: input and output names of an exported model, per task.
ONNX_AUDIO = (["waveform"], ["logits"])
ONNX_DETECTION = (["images"], ["boxes", "scores", "labels", "num_detections"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model-dir",
        type=Path,
        required=True,
        help="the model/ folder of a training run, or a model.onnx with config.json beside it",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="most model inputs (audio windows or images) per forward pass; 1 turns batching off (default 32)",
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to share its forward pass (default 5)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="CPU threads for the model and for decoding (default min(4, cores))",
    )
    p.add_argument("--max-body-mb", type=float, default=25.0, help="larger request bodies are refused with 413 (default 25)")
    p.add_argument(
        "--max-audio-seconds", type=float, default=600.0, help="most audio in one request, all files together (default 600)"
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, how long requests in flight may take to finish (default 30)",
    )
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers, then 408 (default 10)")
    p.add_argument("--body-timeout", type=float, default=10.0, help="seconds a body may send nothing, then 408 (default 10)")
    p.add_argument("--max-connections", type=int, default=512, help="open connections past this get 503 (default 512)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = p.parse_args(argv)
    if min(args.max_batch, args.threads, args.max_connections) < 1:
        p.error("--max-batch, --threads and --max-connections must be at least 1")
    if min(args.header_timeout, args.body_timeout) <= 0:
        p.error("--header-timeout and --body-timeout must be above 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    task = load_task(args.model_dir, device, args)
    batcher = Batcher(task.forward, args.max_batch, args.max_wait_ms / 1000)
    max_body = round(args.max_body_mb * 2**20)
    app = BodyGuard(build_app(task, batcher, max_body, args.threads), max_body, args.body_timeout)
    print(
        f"serving {task.config['task']} model {task.config.get('model')} ({task.backend}, {device}, {args.threads} threads) from "
        f"{args.model_dir}; forward passes of up to {args.max_batch} inputs, gathered for up to {args.max_wait_ms:g} ms",
        flush=True,
    )
    protocol = partial(GuardedH11, args.max_connections, args.header_timeout, app.drain)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, http=protocol, timeout_graceful_shutdown=args.drain_seconds, log_level="info"
    )
    # uvicorn drains on SIGTERM and Ctrl-C, puts back the handlers it found and raises the signal again. These make a
    # completed drain end with status 0 (a clean stop, as orchestrators expect), not death by signal or a traceback.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, exit_at_once)
    uvicorn.Server(config).run()


def exit_at_once(*_):
    """Status 0 without the interpreter's teardown: after a drain nothing is left to tidy, and unloading torch took
    2 s on a busy machine."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- models: PyTorch or onnxruntime
def load_task(path: Path, device: str, args):
    """The task of the model at path (config.json says which), with a forward function for its backend."""
    onnx = path.suffix == ".onnx"
    config_file = path.parent / "config.json" if onnx else path / "config.json"
    if not config_file.is_file():
        raise SystemExit(
            f"{config_file} not found: --model-dir must be the model/ folder of a training run, or a model.onnx "
            "with the run's config.json beside it"
        )
    kind = json.loads(config_file.read_text()).get("task")
    if kind == AUDIO_TASK:
        forward, config = onnx_audio(path, args.threads) if onnx else torch_audio(path, device)
        return AudioTask(config, forward, "onnxruntime" if onnx else "pytorch", args.max_audio_seconds)
    if kind == DETECTION_TASK:
        forward, config = onnx_detection(path, args.threads) if onnx else torch_detection(path, device)
        return DetectionTask(config, forward, "onnxruntime" if onnx else "pytorch")
    raise SystemExit(f"{config_file}: task {kind!r} is neither {AUDIO_TASK!r} nor {DETECTION_TASK!r}")


def torch_audio(model_dir: Path, device: str):
    """Loaded as predict_audio.py loads it; forward gives softmax probabilities, one row per window."""
    model, config = load_audio_model(model_dir, device)

    def forward(segments: torch.Tensor, _options) -> list:
        return list(predict(model, segments.to(device), batch_size=len(segments)))

    return forward, config


def torch_detection(model_dir: Path, device: str):
    """Built and loaded as predict_detection.py does; conf and iou are set for each forward pass, since
    requests may ask for their own (one forward pass at a time, so setting them is safe)."""
    model, config = load_detection_model(model_dir, device)

    @torch.no_grad()
    def forward(images: torch.Tensor, options: tuple) -> list:
        set_postprocess(model, *options, config["max_det"])
        outputs = model(images.to(device).float().div_(255))
        return [(o["boxes"].float().cpu(), o["scores"].float().cpu(), (o["labels"] - 1).cpu()) for o in outputs]

    return forward, config


def onnx_audio(path: Path, threads: int):
    session, config = onnx_session(path, threads, *ONNX_AUDIO)

    def forward(segments: torch.Tensor, _options) -> list:
        (logits,) = session.run(["logits"], {"waveform": segments.numpy()})
        return list(torch.from_numpy(logits).float().softmax(dim=1))

    return forward, config


def onnx_detection(path: Path, threads: int):
    """Score threshold, NMS IoU and max_det are fixed at export; rows past num_detections are padding. A request's
    conf can only raise the threshold (DetectionTask.options refuses the rest)."""
    session, config = onnx_session(path, threads, *ONNX_DETECTION)

    def forward(images: torch.Tensor, options: tuple) -> list:
        conf, _ = options
        boxes, scores, labels, counts = session.run(ONNX_DETECTION[1], {"images": images.float().div_(255).numpy()})
        found = []
        for b, s, c, n in zip(boxes, scores, labels, counts, strict=True):
            keep = s[:n] > conf  # strictly above, as torchvision's detectors compare with score_thresh
            found.append(
                (torch.from_numpy(b[:n][keep]).float(), torch.from_numpy(s[:n][keep]).float(), torch.from_numpy(c[:n][keep]))
            )
        return found

    return forward, config


def onnx_session(path: Path, threads: int, inputs: list[str], outputs: list[str]):
    config = json.loads((path.parent / "config.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for missing, truncated or invalid files
        raise SystemExit(f"{path}: onnxruntime cannot load it: {err}") from None
    found_in, found_out = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if found_in != inputs or not set(outputs) <= set(found_out):
        raise SystemExit(
            f"{path}: has inputs {found_in} and outputs {found_out}; a {config['task']} model must take {inputs} and "
            f"give {outputs} (the contract of export_model.py)"
        )
    return session, config


# ----------------------------------------------------------------------------- tasks: decode files, answer records
class RequestError(Exception):
    """A bad request, answered with its status and {"error": kind, "detail": what was wrong}."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass
class AudioFile:
    name: str
    inputs: torch.Tensor  # the model's inputs: one row per window
    starts: list[int]
    length: int


class AudioTask:
    media_types, suffixes = AUDIO_MEDIA_TYPES, AUDIO_EXTENSIONS

    def __init__(self, config: dict, forward, backend: str, max_seconds: float):
        self.config, self.forward, self.backend = config, forward, backend
        self.rate = config["sample_rate"]
        # predict_audio.py's default windows: the training clip, every half clip (an ONNX model takes only that length)
        self.window = round(config["clip_seconds"] * self.rate)
        self.hop = max(1, self.window // 2)
        self.max_seconds = max_seconds

    def contract(self) -> dict:
        return {
            "media_types": list(self.media_types),
            "sample_rate": self.rate,
            "clip_seconds": self.config["clip_seconds"],
            "window_seconds": self.window / self.rate,
            "hop_seconds": self.hop / self.rate,
            "max_audio_seconds": self.max_seconds,
            "query": {"top_k": 3},
        }

    @staticmethod
    def options(top_k: Annotated[int, Query(ge=1, description="how many labels to list with their probabilities")] = 3) -> dict:
        return {"top_k": top_k}

    def batch_key(self, options: dict) -> tuple:
        return ()  # every window can share a forward pass

    def decode(self, files: list[tuple[str, bytes]]) -> list[AudioFile]:
        """Mono float32 at the model's rate, cut into windows. Reading stops where the request's audio would pass
        --max-audio-seconds, so a small compressed file cannot expand into hours of samples in memory."""
        decoded, budget = [], round(self.max_seconds * self.rate)
        for name, data in files:
            require_content(name, data)
            try:
                wave = read_audio(io.BytesIO(data), self.rate, budget + 1)
            except BadClip as err:
                raise RequestError(422, "undecodable_file", f"{name}: {err}") from None
            budget -= wave.numel()
            if budget < 0:
                raise RequestError(
                    422,
                    "too_much_audio",
                    f"{name}: the request holds more than {self.max_seconds:g} s of audio (--max-audio-seconds)",
                )
            starts = window_starts(wave.numel(), self.window, self.hop)
            decoded.append(AudioFile(name, windows(wave, starts, self.window), starts, wave.numel()))
        return decoded

    def record(self, file: AudioFile, outputs: list, options: dict) -> dict:
        probs = torch.stack(outputs)
        return file_record(
            file.name, probs, file.starts, file.length, self.window, self.rate, self.config["labels"], options["top_k"]
        )


@dataclass
class ImageFile:
    name: str
    index: int  # position in the request: the image_id of its detections
    inputs: torch.Tensor  # (1, 3, S, S) uint8, resized and padded as predict_detection.py's loader does
    target: dict  # orig_size and size, to map boxes back to the file's pixels


class DetectionTask:
    media_types, suffixes = IMAGE_MEDIA_TYPES, IMAGE_EXTENSIONS

    def __init__(self, config: dict, forward, backend: str):
        self.config, self.forward, self.backend = config, forward, backend
        self.transform, self.collate = eval_transform(config["img_size"]), make_collate(config["img_size"])
        self.fixed_at_export = backend == "onnxruntime"

    def contract(self) -> dict:
        return {
            "media_types": list(self.media_types),
            "img_size": self.config["img_size"],
            "max_pixels": MAX_PIXELS,
            "query": {"conf": self.config["conf"], "iou": self.config["iou"]},
            "max_det": self.config["max_det"],
            "postprocess_fixed_at_export": self.fixed_at_export,
        }

    def options(
        self,
        conf: Annotated[
            float | None, Query(ge=0, le=1, description="keep detections scoring above this (default: the model's)")
        ] = None,
        iou: Annotated[float | None, Query(ge=0, le=1, description="NMS IoU threshold (default: the model's)")] = None,
    ) -> dict:
        conf = self.config["conf"] if conf is None else conf
        iou = self.config["iou"] if iou is None else iou
        if self.fixed_at_export and (iou != self.config["iou"] or conf < self.config["conf"]):
            raise RequestError(
                422,
                "invalid_parameter",
                f"this ONNX model's NMS (iou {self.config['iou']}) and lowest score (conf {self.config['conf']}) were fixed "
                "at export: ask for the same iou and a conf at least as high, or serve the PyTorch model/ folder",
            )
        return {"conf": conf, "iou": iou}

    def batch_key(self, options: dict) -> tuple:
        return options["conf"], options["iou"]  # the model applies them to a whole forward pass

    def decode(self, files: list[tuple[str, bytes]]) -> list[ImageFile]:
        decoded = []
        for index, (name, data) in enumerate(files):
            image = decode_image(name, data)
            resized = self.transform(tv_tensors.Image(TF.pil_to_tensor(image)))
            inputs, _ = self.collate([(resized, None)])
            target = {"orig_size": (image.height, image.width), "size": tuple(resized.shape[-2:])}
            decoded.append(ImageFile(name, index, inputs, target))
        return decoded

    def record(self, file: ImageFile, outputs: list, options: dict) -> dict:
        ((boxes, scores, labels),) = outputs
        boxes = to_original_coordinates(boxes, file.target)
        detections = [
            {
                "image_id": file.index,
                "file_name": file.name,
                "category_id": int(c),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(s),
            }
            for (x0, y0, x1, y1), s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True)
        ]
        height, width = file.target["orig_size"]
        return {"file_name": file.name, "width": width, "height": height, "detections": detections}


def require_content(name: str, data: bytes):
    if not data:
        raise RequestError(422, "empty_file", f"{name}: empty file (0 bytes)")


def decode_image(name: str, data: bytes) -> Image.Image:
    """Upright 8-bit RGB, as predict_detection.py reads files. The pixel cap is checked from the header before
    anything is decoded (detection_data turns PIL's own decompression-bomb check off)."""
    require_content(name, data)
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # UnidentifiedImageError mostly; PIL raises other types for some broken headers
        raise RequestError(422, "undecodable_file", f"{name}: not an image in a format PIL reads") from None
    if image.width * image.height > MAX_PIXELS:
        raise RequestError(422, "too_large", f"{name}: {image.width} x {image.height} pixels, more than {MAX_PIXELS}")
    try:
        image.load()
        return open_rgb(image)[0]
    except Exception as err:  # truncated or corrupt data: PIL raises many types
        raise RequestError(422, "undecodable_file", f"{name}: corrupt image ({err})") from None


# ----------------------------------------------------------------------------- batching: one worker, one model
@dataclass
class Job:
    inputs: torch.Tensor  # one file's model inputs
    key: tuple  # settings its forward pass must have (detection conf and iou)
    future: asyncio.Future  # resolved with (its outputs, the size of the largest forward pass they were in)


class Batcher:
    def __init__(self, forward, max_batch: int, max_wait: float):
        self.forward, self.max_batch, self.max_wait = forward, max_batch, max_wait
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.forward_passes = self.inputs = 0

    async def predict(self, inputs: list[torch.Tensor], key: tuple) -> list[tuple[list, int]]:
        loop = asyncio.get_running_loop()
        jobs = [Job(x, key, loop.create_future()) for x in inputs]
        for job in jobs:
            self.queue.put_nowait(job)
        return await asyncio.gather(*(job.future for job in jobs))

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            groups = {}
            for job in await self.next_batch():
                groups.setdefault(job.key, []).append(job)
            for key, jobs in groups.items():
                try:
                    results = await loop.run_in_executor(self.model_thread, self.run_jobs, jobs, key)
                except Exception as err:  # those requests fail with 500; the worker goes on with the next ones
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(err)
                    continue
                for job, result in zip(jobs, results, strict=True):
                    if not job.future.done():  # done: its request was cancelled
                        job.future.set_result(result)

    async def next_batch(self) -> list[Job]:
        """The oldest job, then whatever arrives within max_wait, until the batch holds max_batch inputs."""
        jobs = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while sum(len(job.inputs) for job in jobs) < self.max_batch:
            if not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    jobs.append(await self.queue.get())
            except TimeoutError:
                break
        return jobs

    def run_jobs(self, jobs: list[Job], key: tuple) -> list[tuple[list, int]]:
        """In the model thread: every job's inputs in forward passes of at most max_batch, outputs split back per job."""
        inputs = torch.cat([job.inputs for job in jobs])
        outputs, pass_size = [], []
        for start in range(0, len(inputs), self.max_batch):
            chunk = inputs[start : start + self.max_batch]
            outputs += self.forward(chunk, key)
            pass_size += [len(chunk)] * len(chunk)
        self.forward_passes += len(range(0, len(inputs), self.max_batch))
        self.inputs += len(inputs)
        results, start = [], 0
        for job in jobs:
            end = start + len(job.inputs)
            results.append((outputs[start:end], max(pass_size[start:end])))
            start = end
        return results


# ----------------------------------------------------------------------------- the HTTP app
def build_app(task, batcher: Batcher, max_body: int, decode_threads: int) -> FastAPI:
    decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        yield
        # uvicorn gets here once every request in flight is answered (or --drain-seconds ran out): the queue is empty
        worker.cancel()
        decoder.shutdown(wait=False, cancel_futures=True)
        batcher.model_thread.shutdown(wait=False, cancel_futures=True)

    # No /docs pages: they load their scripts from a CDN.
    app = FastAPI(title="launchkit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.in_flight = 0

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model_loaded": True,  # loaded before the server listens: a server that answers has it
            "task": task.config["task"],
            "backend": task.backend,
            "in_flight": app.state.in_flight,
            "forward_passes": batcher.forward_passes,
            "inputs": batcher.inputs,
        }

    @app.get("/v1/model")
    async def model_info():
        return {
            "task": task.config["task"],
            "model": task.config.get("model"),
            "backend": task.backend,
            "labels": task.config["labels"],
            "input": {**task.contract(), "max_body_mb": max_body / 2**20, "multipart_field": "files", "max_files": MAX_FILES},
        }

    @app.post("/v1/predict")
    async def predict_files(request: Request, options: Annotated[dict, Depends(task.options)]):
        app.state.in_flight += 1
        try:
            files, multipart = await read_files(request, task)
            decoded = await asyncio.get_running_loop().run_in_executor(decoder, task.decode, files)
            results = await batcher.predict([f.inputs for f in decoded], task.batch_key(options))
        finally:
            app.state.in_flight -= 1
        records = [task.record(f, outputs, options) for f, (outputs, _) in zip(decoded, results, strict=True)]
        return JSONResponse(
            {"predictions": records} if multipart else records[0], headers={"X-Batch-Size": str(max(size for _, size in results))}
        )

    app.add_exception_handler(RequestError, bad_request)
    app.add_exception_handler(RequestValidationError, invalid_parameters)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(Exception, internal_error)
    return app


async def read_files(request: Request, task) -> tuple[list[tuple[str, bytes]], bool]:
    """(name, bytes) of each file sent, and whether they came as multipart (answered with a list)."""
    media_type = request.headers.get("content-type", "")
    if media_type.partition(";")[0].strip().lower() != "multipart/form-data":
        require_media_type(task, media_type, "body")
        return [("body", await request.body())], False
    async with request.form(max_files=MAX_FILES, max_fields=MAX_FILES) as form:
        parts = form.getlist("files")
        if not parts:
            raise RequestError(
                422,
                "missing_field",
                f"no multipart field named files (fields sent: {', '.join(form) or 'none'}); send each file as a files part",
            )
        files = []
        for part in parts:
            if not isinstance(part, UploadFile):
                raise RequestError(
                    422, "missing_field", "the files field holds text; send each file as a file part (with a filename)"
                )
            require_media_type(task, part.content_type, part.filename)
            files.append((part.filename, await part.read()))
    return files, True


def require_media_type(task, declared: str | None, name: str):
    media_type = (declared or "").partition(";")[0].strip().lower()
    if media_type in task.media_types:
        return
    # curl -F and many other clients label the files they do not know as application/octet-stream: then the name decides
    if media_type in ("", "application/octet-stream") and Path(name).suffix.lower() in task.suffixes:
        return
    raise RequestError(
        415,
        "unsupported_media_type",
        f"{name}: {media_type or 'no media type'} is not accepted by this {task.config['task']} model; send one of "
        f"{', '.join(task.media_types)}",
    )


class BodyGuard:
    """Request bodies read within limits. 413 for one over max_bytes: at once from its Content-Length, or as soon as a
    streamed (chunked) body passes it, so an oversized upload is never read whole. 408 when a body stalls: nothing of
    it arrives for `timeout` seconds, or for DRAIN_STALL_SECONDS once drain() is called."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.draining = False
        self.reads: set[asyncio.Timeout] = set()  # the deadlines of body reads under way

    def drain(self):
        """SIGTERM: from now on, a silent body only holds up the exit for DRAIN_STALL_SECONDS."""
        if self.draining:
            return
        self.draining = True
        soon = asyncio.get_running_loop().time() + DRAIN_STALL_SECONDS
        for read in self.reads:
            read.reschedule(min(read.when(), soon))

    def too_large(self) -> RequestError:
        return RequestError(
            413, "body_too_large", f"the request body is larger than {self.max_bytes / 2**20:g} MB (--max-body-mb)"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            err = self.too_large()
            return await error_response(err.status, err.error, err.detail, CLOSE)(scope, receive, send)
        received, complete = 0, False

        async def guarded_receive():
            # Raised from inside the endpoint, so its RequestError handler answers.
            nonlocal received, complete
            if complete:
                return await receive()  # after the body only a disconnect can come, whenever: nothing to time
            message = await self.next_part(receive)
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > self.max_bytes:
                raise self.too_large()
            return message

        await self.app(scope, guarded_receive, send)

    async def next_part(self, receive):
        try:
            async with asyncio.timeout(min(self.timeout, DRAIN_STALL_SECONDS) if self.draining else self.timeout) as read:
                self.reads.add(read)
                return await receive()
        except TimeoutError:
            stall = f"{DRAIN_STALL_SECONDS:g} s once shutting down" if self.draining else f"{self.timeout:g} s (--body-timeout)"
            detail = f"the body stopped arriving: nothing for {stall}"
            raise RequestError(408, "request_timeout", detail) from None
        finally:
            self.reads.discard(read)


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 connection with the guards an ASGI app cannot add, since they act before it is called:
    a cap on open connections, and a deadline for each request's head. on_drain is called as SIGTERM starts the drain."""

    def __init__(self, max_connections: int, head_timeout: float, on_drain, **uvicorn_args):
        super().__init__(**uvicorn_args)
        self.max_connections, self.head_timeout, self.on_drain = max_connections, head_timeout, on_drain
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.refuse(503, "too_many_connections", f"{self.max_connections} connections are open (--max-connections)")
        else:
            self.expect_head()

    def expect_head(self):
        detail = f"the request head did not arrive within {self.head_timeout:g} s (--header-timeout)"
        self.head_deadline = self.loop.call_later(self.head_timeout, self.refuse, 408, "request_timeout", detail)

    def data_received(self, data: bytes):
        if self.head_deadline is None and self.conn.their_state is h11.IDLE:
            self.expect_head()  # the next request on a kept-alive connection has begun
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in
            self.stop_head_clock()

    def stop_head_clock(self):
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def connection_lost(self, exc):
        self.stop_head_clock()
        super().connection_lost(exc)

    def shutdown(self):
        self.on_drain()  # uvicorn calls this on every connection as the drain begins
        super().shutdown()

    def refuse(self, status: int, error: str, detail: str):
        """Answer before any request was read, and close. Written raw: no request means no h11 cycle to answer in."""
        self.logger.warning("%s:%d - %d %s", *self.client, status, detail)
        body = json.dumps({"error": error, "detail": detail}).encode()
        head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        self.transport.write(f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()


def error_response(status: int, error: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


async def bad_request(request: Request, err: RequestError) -> JSONResponse:
    return error_response(err.status, err.error, err.detail, CLOSE if err.status in (408, 413) else None)


async def invalid_parameters(request: Request, err: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return error_response(422, "invalid_parameter", detail)


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    """Unknown paths (404), wrong methods (405), malformed multipart bodies (400)."""
    return error_response(
        err.status_code, HTTPStatus(err.status_code).phrase.lower().replace(" ", "_"), str(err.detail), err.headers
    )


async def client_disconnected(request: Request, err: ClientDisconnect) -> JSONResponse:
    return error_response(400, "client_disconnected", "the connection closed before the body was complete")


async def internal_error(request: Request, err: Exception) -> JSONResponse:
    # The traceback goes to the server's log (uvicorn prints it), never to the client.
    return error_response(500, "internal_error", "the server failed on this request and logged why")


if __name__ == "__main__":
    main()
