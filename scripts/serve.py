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
part, in the order sent, also for a single part. A record is what the predict script gives for the file (the
predictor module of the task describes it): predict_audio.py's JSON line (query parameter top_k, default 3), or
{"file_name", "width", "height", "detections"} holding predict_detection.py's predictions.json entries, image_id
being the file's position in the request (query parameters conf and iou, default: the model's).
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

import onnxruntime as ort
import torch
import uvicorn
from audio_predictor import AudioPredictor
from detection_predictor import DetectionPredictor
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from http_guards import CLOSE, BodyGuard, GuardedH11, RequestError, error_response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from shared.model_io import BadInput

PREDICTORS = {predictor.task: predictor for predictor in (AudioPredictor, DetectionPredictor)}
MAX_FILES = 64  # parts per multipart request: each is held, decoded, until its request is answered


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a run's model/, or a model.onnx with config.json beside it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--max-batch", type=int, default=32, help="most model inputs per forward pass; 1: no batching (default 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits to share a forward pass (default 5)")
    p.add_argument(
        "--threads", type=int, default=min(4, os.cpu_count() or 1), help="for model and decoding (default: cores, 4 at most)"
    )
    p.add_argument("--max-body-mb", type=float, default=25.0, help="larger request bodies are refused with 413 (default 25)")
    p.add_argument(
        "--max-audio-seconds", type=float, default=600.0, help="most audio in a request, all files together (default 600)"
    )
    p.add_argument("--drain-seconds", type=float, default=30.0, help="on SIGTERM, time given to requests in flight (default 30)")
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
    predictor = load_predictor(args.model_dir, device, args)
    batcher = Batcher(predictor.forward, args.max_batch, args.max_wait_ms / 1000)
    max_body = round(args.max_body_mb * 2**20)
    app = BodyGuard(build_app(predictor, batcher, max_body, args.threads), max_body, args.body_timeout)
    print(
        f"serving {predictor.task} model {predictor.config.get('model')} ({predictor.backend}, {device}, {args.threads} "
        f"threads) from {args.model_dir}; forward passes of up to {args.max_batch} inputs, gathered for up to "
        f"{args.max_wait_ms:g} ms",
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


# ----------------------------------------------------------------------------- the model: PyTorch or onnxruntime
def load_predictor(path: Path, device: str, args):
    """The predictor of the task config.json names, running model/ with PyTorch or model.onnx with onnxruntime."""
    onnx = path.suffix == ".onnx"
    config_file = path.parent / "config.json" if onnx else path / "config.json"
    if not config_file.is_file():
        raise SystemExit(
            f"{config_file} not found: --model-dir must be the model/ folder of a training run, or a model.onnx "
            "with the run's config.json beside it"
        )
    config = json.loads(config_file.read_text())
    if config.get("task") not in PREDICTORS:
        raise SystemExit(f"{config_file}: task {config.get('task')!r} is not one of {', '.join(map(repr, PREDICTORS))}")
    predictor = PREDICTORS[config["task"]]
    if not onnx:
        return predictor.load(path, device, flags=args)
    return predictor(config, run=onnx_run(path, config, args.threads, predictor), flags=args)


def onnx_run(path: Path, config: dict, threads: int, predictor):
    """The exported model as a function of its input tensor, checked against the contract of export_model.py."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types for missing, truncated or invalid files
        raise SystemExit(f"{path}: onnxruntime cannot load it: {err}") from None
    found_in, found_out = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if found_in != [predictor.input_name] or not set(predictor.output_names) <= set(found_out):
        raise SystemExit(
            f"{path}: has inputs {found_in} and outputs {found_out}; a {config['task']} model must take "
            f"{[predictor.input_name]} and give {predictor.output_names} (the contract of export_model.py)"
        )

    def run(inputs: torch.Tensor) -> tuple:
        outputs = session.run(predictor.output_names, {predictor.input_name: inputs.numpy()})
        return tuple(torch.from_numpy(o) for o in outputs)

    return run


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
def build_app(predictor, batcher: Batcher, max_body: int, decode_threads: int) -> FastAPI:
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
            "task": predictor.task,
            "backend": predictor.backend,
            "in_flight": app.state.in_flight,
            "forward_passes": batcher.forward_passes,
            "inputs": batcher.inputs,
        }

    @app.get("/v1/model")
    async def model_info():
        return {
            "task": predictor.task,
            "model": predictor.config.get("model"),
            "backend": predictor.backend,
            "labels": predictor.config["labels"],
            "input": predictor.contract() | {"max_body_mb": max_body / 2**20, "multipart_field": "files", "max_files": MAX_FILES},
        }

    @app.post("/v1/predict")
    async def predict_files(request: Request, options: Annotated[dict, Depends(predictor.options)]):
        app.state.in_flight += 1
        try:
            files, multipart = await read_files(request, predictor)
            decoded = await asyncio.get_running_loop().run_in_executor(decoder, predictor.decode, files)
            results = await batcher.predict([f.inputs for f in decoded], predictor.batch_key(options))
        finally:
            app.state.in_flight -= 1
        records = [predictor.answer(f, outputs, options) for f, (outputs, _) in zip(decoded, results, strict=True)]
        return JSONResponse(
            {"predictions": records} if multipart else records[0], headers={"X-Batch-Size": str(max(size for _, size in results))}
        )

    app.add_exception_handler(RequestError, bad_request)
    app.add_exception_handler(BadInput, bad_input)
    app.add_exception_handler(RequestValidationError, invalid_parameters)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(Exception, internal_error)
    return app


async def read_files(request: Request, predictor) -> tuple[list[tuple[str, bytes]], bool]:
    """(name, bytes) of each file sent, and whether they came as multipart (answered with a list)."""
    media_type = request.headers.get("content-type", "")
    if media_type.partition(";")[0].strip().lower() != "multipart/form-data":
        require_media_type(predictor, media_type, "body")
        return [require_content("body", await request.body())], False
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
            require_media_type(predictor, part.content_type, part.filename)
            files.append(require_content(part.filename, await part.read()))
    return files, True


def require_media_type(predictor, declared: str | None, name: str):
    media_type = (declared or "").partition(";")[0].strip().lower()
    if media_type in predictor.media_types:
        return
    # curl -F and many other clients label the files they do not know as application/octet-stream: then the name decides
    if media_type in ("", "application/octet-stream") and Path(name).suffix.lower() in predictor.suffixes:
        return
    raise RequestError(
        415,
        "unsupported_media_type",
        f"{name}: {media_type or 'no media type'} is not accepted by this {predictor.task} model; send one of "
        f"{', '.join(predictor.media_types)}",
    )


def require_content(name: str, data: bytes) -> tuple[str, bytes]:
    if not data:
        raise RequestError(422, "empty_file", f"{name}: empty file (0 bytes)")
    return name, data


async def bad_request(request: Request, err: RequestError) -> JSONResponse:
    return error_response(err.status, err.error, err.detail, CLOSE if err.status in (408, 413) else None)


async def bad_input(request: Request, err: ValueError) -> JSONResponse:
    """A file or query parameter the model cannot take, as its predictor named it."""
    return error_response(422, err.kind, str(err))


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
