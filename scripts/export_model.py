#!/usr/bin/env python
"""Export a trained model/ to ONNX and/or torch.export's ExportedProgram, and prove on real inputs that every
export computes what the PyTorch model computes before calling it done.

    python scripts/export_model.py --model-dir runs/audio/model --format onnx
    python scripts/export_model.py --model-dir runs/det/model --format all --output-dir exported/det
    python scripts/export_model.py --model-dir runs/det/model --inputs photos/ --verify-only

--format onnx writes model.onnx, exported_program writes model.pt2 (torch.export.save; run it with
torch.export.load(path).module()), all writes both; then export_report.json with the parity figures and CPU
latency. They go beside the model, or into --output-dir, which then also gets config.json so the folder is
self-contained. The inputs are the validation split of the run (RUN/args.json names the data; RUN is the
folder holding model/), or the files and folders given with --inputs. Exits non-zero when parity fails.
model.pt2 holds no pickle (the example inputs are left out); one that holds a pickle, or a shape expression that
is more than arithmetic, is refused before torch reads it, since torch.export.load would run it.

Contract of the exported models. The batch axis is dynamic; model.pt2 takes the same tensor positionally and
returns the same outputs as a tuple.

  audio (config task "audio-classification")
    input   waveform        float32 [batch, num_samples]   raw mono audio at config sample_rate in [-1, 1],
                                                           num_samples = round(clip_seconds * sample_rate);
                                                           the log-mel frontend is inside the model
    output  logits          float32 [batch, num_classes]   class i is config labels[i]; softmax gives the
                                                           probabilities predict_audio.py prints

  detection (config task "detection")
    input   images          float32 [batch, 3, S, S]       RGB in [0, 1], S = config img_size: each image
                                                           resized so its long side is S (aspect kept) and
                                                           padded bottom-right with grey 114/255, as
                                                           predict_detection.py does
    outputs boxes           float32 [batch, D, 4]          x0, y0, x1, y1 in pixels of the S x S input (times
                                                           the image's long side / S in its own pixels, as
                                                           detection_data.to_original_coordinates does)
            scores          float32 [batch, D]             highest first, each above config conf
            labels          int64   [batch, D]             0-based index into config labels
            num_detections  int64   [batch]                rows past it in boxes/scores/labels are zero
    D = config max_det. Post-processing is inside: box decoding, score > conf, per-class NMS at IoU config
    iou, the best D per image.

Parity, per export (export_report.json "parity"; any failure exits 1):
  audio      max |logit difference| <= --atol (default 1e-3) and the same top-1 class on every clip
  detection  every detection matched one-to-one to a PyTorch detection of the same class with IoU > 0.99 and
             |score difference| < 1e-3 (a detection within 1e-3 of the conf threshold or of the max_det cut may
             fall on either side of it from rounding alone: counted as at_cut), and on the validation split the
             same COCO mAP to within 1e-4
"""

import argparse
import ast
import copy
import json
import re
import shutil
import statistics
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

import numpy as np
import onnx
import onnxruntime
import sympy
import torch
import torch.utils._sympy.functions
import torchvision
from audio_data import BadClip, KeywordTask, fix_length, load_audio_data, read_audio, within_full_scale
from audio_model import TASK as AUDIO_TASK
from audio_model import load_model as load_audio_model
from detection_data import (
    MAX_PIXELS,
    PAD_VALUE,
    DetectionDataset,
    Sample,
    eval_transform,
    load_data,
    make_collate,
    probe_all,
    to_original_coordinates,
)
from detection_model import TASK as DETECTION_TASK
from detection_model import load_model as load_detection_model
from evaluate import load as load_metric
from predict_audio import find_audio, window_starts, windows
from predict_detection import find_images
from torch import nn
from torch.export.pt2_archive import PT2ArchiveReader
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList

from shared.model_io import load_pretrained
from shared.runtime import write_json

FILES = {"onnx": "model.onnx", "exported_program": "model.pt2"}
LATENCY_BATCHES = (1, 32)
MIN_IOU, MAX_SCORE_DIFF, MAX_MAP_DIFF, MAX_CORNER_DIFF = 0.99, 1e-3, 1e-4, 1e-3  # corners in pixels
# The entries of a model.pt2 that torch.export.save writes without pickles (inside the archive's one folder).
PT2_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/(version|serialization_id)|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/(weight_\d+|model_weights_config\.json)|data/constants/(tensor_\d+|model_constants_config\.json)"
)
PT2_CONFIGS = ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json")
SYMPY_CLASSES = {n for n, v in vars(sympy).items() if isinstance(v, type) and issubclass(v, sympy.Basic)}
SHAPE_FUNCTIONS = SYMPY_CLASSES | set(torch.utils._sympy.functions.__all__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="the model/ folder of a training run")
    p.add_argument("--format", choices=[*FILES, "all"], default="onnx", help="what to export (default onnx)")
    p.add_argument("--output-dir", type=Path, default=None, help="where the exports go (default: --model-dir)")
    p.add_argument(
        "--inputs", nargs="+", type=Path, default=None, help="audio or image files/folders to check on (default: the val split)"
    )
    p.add_argument("--limit", type=int, default=None, help="check on the first N inputs only (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass in the parity check (default 16)")
    p.add_argument("--atol", type=float, default=1e-3, help="audio: largest allowed |logit difference| (default 1e-3)")
    p.add_argument("--latency-runs", type=int, default=10, help="timed runs per latency figure, the median is kept (default 10)")
    p.add_argument("--verify-only", action="store_true", help="check the exports already in the output folder, export nothing")
    args = p.parse_args(argv)
    if args.latency_runs < 1 or args.batch_size < 1:
        p.error("--latency-runs and --batch-size must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    task = load_task(args)
    out = args.output_dir or args.model_dir
    out.mkdir(parents=True, exist_ok=True)
    formats = list(FILES) if args.format == "all" else [args.format]
    paths = {fmt: out / FILES[fmt] for fmt in formats}
    if args.verify_only:
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise SystemExit(f"--verify-only: {', '.join(missing)} not found; export first (drop --verify-only)")
    else:
        export(task, paths)
    if out.resolve() != args.model_dir.resolve():
        shutil.copy2(args.model_dir / "config.json", out / "config.json")

    # The files on disk are what gets checked, not the objects still in memory.
    runtimes = {fmt: LOADERS[fmt](path, task) for fmt, path in paths.items()}
    source, batches = task.inputs(args.model_dir.parent, args.inputs, args.batch_size, args.limit)
    parity, sample = check_parity(task, runtimes, batches)
    report = {
        "task": task.config["task"],
        "model_dir": str(args.model_dir),
        "files": {fmt: path.name for fmt, path in paths.items()},
        "inputs": source,
        "parity": parity,
        "passed": all(p["passed"] for p in parity.values()),
        "latency": latency(task, runtimes, sample, args.latency_runs),
        "onnx": onnx_facts(paths["onnx"]) if "onnx" in paths else None,
        "versions": {m.__name__: m.__version__ for m in (torch, torchvision, onnx, onnxruntime)},
    }
    write_json(out / "export_report.json", report)
    print(json.dumps({"parity": parity, "latency": report["latency"]["milliseconds"]}, indent=2))
    if not report["passed"]:
        failed = ", ".join(f"{fmt} ({p['problem']})" for fmt, p in parity.items() if not p["passed"])
        raise SystemExit(
            f"parity FAILED for {failed}; the exported files do not compute what the PyTorch model does, do not serve them. "
            f"Details in {out / 'export_report.json'}"
        )
    done = "checked" if args.verify_only else "exported"
    print(f"{done} {', '.join(str(p) for p in paths.values())}; parity passed on {source['count']} inputs")


def load_task(args):
    _, config = load_pretrained(args.model_dir)
    if config.get("task") == AUDIO_TASK:
        return AudioTask(args.model_dir, args.atol)
    if config.get("task") == DETECTION_TASK:
        return DetectionTask(args.model_dir)
    raise SystemExit(
        f"{args.model_dir}: config.json task {config.get('task')!r} is neither {AUDIO_TASK!r} nor {DETECTION_TASK!r}"
    )


# ==================================================================== export
def export(task, paths: dict[str, Path]):
    """torch.export traces once; the ONNX file is translated from that same ExportedProgram. A batch of two
    traces the batch axis as symbolic (torch.export treats sizes 0 and 1 as constants)."""
    try:
        program = torch.export.export(
            task.exportable, (task.example(2),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        )
    except Exception as err:  # torch.export raises many types; all mean the model's Python does not trace as it is
        raise SystemExit(
            f"torch.export of the {task.name} model failed ({type(err).__name__}: {err}). Code that computes Python numbers "
            "from tensor shapes fixes them (as TinyMapConv2d's len(x) fixed the batch size, so the exported copy uses "
            "stock convolutions); replace such modules in the exported copy with stock ones of the same parameters"
        ) from err
    program.example_inputs = None  # torch.export.save would pickle them, and the loader refuses pickles
    if "exported_program" in paths:
        torch.export.save(program, paths["exported_program"])
    if "onnx" in paths:
        try:
            onnx_program = torch.onnx.export(
                program,
                input_names=[task.input_name],
                output_names=task.output_names,
                dynamic_shapes=({0: "batch"},),  # only names the axis torch.export made dynamic (else "s58")
                dynamo=True,
                verbose=False,
            )
        except Exception as err:  # the translator raises many types; the message names the op it could not translate
            raise SystemExit(
                f"ONNX translation of the {task.name} model failed ({type(err).__name__}: {err}). For an op without an "
                "ONNX translation: give one with torch.onnx.export(custom_translation_table=...), or compute it in the "
                "exported copy with ops that have one (an STFT, say, as a conv1d over a fixed DFT basis); "
                "--format exported_program does not need ONNX"
            ) from err
        onnx_program.save(paths["onnx"])


def load_onnx(path: Path, task):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as PyTorch, so latencies compare
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types; all mean the file is not a model it can run
        raise SystemExit(f"{path} is not an ONNX model onnxruntime can load ({err}); export it again") from None
    if [i.name for i in session.get_inputs()] != [task.input_name]:
        raise SystemExit(f"{path}: inputs {[i.name for i in session.get_inputs()]}, expected [{task.input_name!r}]")

    def run(inputs: torch.Tensor) -> tuple:
        return tuple(torch.from_numpy(o) for o in session.run(task.output_names, {task.input_name: inputs.numpy()}))

    return run


def load_exported_program(path: Path, task):
    problem = pt2_problem(path)
    if problem:
        raise SystemExit(
            f"{path} is refused before torch reads it: {problem}. Only a model.pt2 as this script writes it is loaded "
            "(torch.export.load can run code hidden in others); export it again from the model/ folder, without --verify-only"
        )
    try:
        module = torch.export.load(path).module()
    except Exception as err:  # torch.export raises many types; all mean the archive holds no program it can run
        raise SystemExit(f"{path}: torch.export.load failed ({type(err).__name__}: {err}); export it again") from None

    @torch.no_grad()
    def run(inputs: torch.Tensor) -> tuple:
        out = module(inputs)
        return out if isinstance(out, tuple) else (out,)

    return run


LOADERS = {"onnx": load_onnx, "exported_program": load_exported_program}


def pt2_problem(path: Path) -> str | None:
    """Why torch.export.load must not read this archive, or None. It unpickles entries (pickled weights and
    constants, sample inputs, archives of torch < 2.8) and hands shape expressions to sympy, which evals them. Both
    zip readers torch uses list the entries (its own, and Python's for the old archives), so neither hides one."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.partition("/")[2] for name in archive.namelist()}
        with PT2ArchiveReader(str(path)) as archive:
            names |= set(archive.get_file_names())
            sample_inputs = archive.read_bytes("data/sample_inputs/model.pt")
            configs = [json.loads(archive.read_string(config))["config"] for config in PT2_CONFIGS]
            pickled = [name for config in configs for name, entry in config.items() if entry["use_pickle"] is not False]
            program = json.loads(archive.read_string("models/model.json"))
    except Exception as err:  # a damaged or foreign file: whatever the reader says, it is not a model.pt2 of this script
        return f"not a torch.export archive ({type(err).__name__}: {err})"
    unexpected = sorted(name for name in names if not PT2_ENTRIES.fullmatch(name))
    unsafe = [text for text in shape_expressions(program) if not is_shape_arithmetic(text)]
    if unexpected:
        return f"entry {unexpected[0]!r} is not one torch.export.save writes as JSON or raw tensor bytes"
    if sample_inputs or pickled:
        return f"tensor {pickled[0]!r} is pickled" if pickled else "its sample inputs are pickled"
    return f"shape expression {unsafe[0][:80]!r} is more than arithmetic on shapes" if unsafe else None


def shape_expressions(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from [value] if key == "expr_str" else shape_expressions(value)
    elif isinstance(node, list):
        for value in node:
            yield from shape_expressions(value)


def is_shape_arithmetic(text) -> bool:
    """sympy's srepr of a shape: calls of its classes and torch's shape functions on numbers, symbol names and
    assumptions, as in Mul(Integer(4000), Symbol('s58', positive=True, integer=True)). Parsed, never evaluated."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, TypeError, ValueError):
        return False
    return all(
        isinstance(node, (ast.Expression, ast.Call, ast.keyword, ast.Load, ast.UnaryOp, ast.USub))
        or (isinstance(node, ast.Name) and node.id in SHAPE_FUNCTIONS)
        or (isinstance(node, ast.Constant) and (not isinstance(node.value, str) or node.value.isalnum()))
        for node in ast.walk(tree)
    )


def onnx_facts(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    return {
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": {v.name: onnx_shape(v) for v in model.graph.input},
        "outputs": {v.name: onnx_shape(v) for v in model.graph.output},
    }


def onnx_shape(value) -> list:
    """Named (dynamic) and fixed dimensions of a graph input or output."""
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# ==================================================================== parity and latency
def check_parity(task, runtimes: dict, batches) -> tuple[dict, torch.Tensor]:
    """Every runtime on every batch against the PyTorch model; returns the figures per runtime and the first
    inputs (up to the largest latency batch) for timing."""
    checks = {fmt: task.parity() for fmt in runtimes}
    kept = []
    for inputs, meta in batches:
        reference = task.run_reference(inputs)
        for fmt, run in runtimes.items():
            checks[fmt].add(meta, reference, task.unpack(run(inputs)))
        if sum(map(len, kept)) < max(LATENCY_BATCHES):
            kept.append(inputs)
    if not kept:
        raise SystemExit("no usable inputs to check the export on")
    return {fmt: check.result() for fmt, check in checks.items()}, torch.cat(kept)


def latency(task, runtimes: dict, sample: torch.Tensor, runs: int) -> dict:
    """Median wall time of one forward call, per runtime and batch size, on real inputs (repeated to fill the batch)."""
    timed = {"pytorch_eager": task.run_reference, **{RUNTIME_NAMES[fmt]: run for fmt, run in runtimes.items()}}
    figures = {}
    for size in LATENCY_BATCHES:
        inputs = sample[torch.arange(size) % len(sample)].contiguous()
        figures[f"batch_{size}"] = {name: median_ms(run, inputs, runs) for name, run in timed.items()}
    return {
        "measured": f"median of {runs} timed calls (time.perf_counter around one forward pass, inputs prepared "
        f"beforehand, after one warm-up call), CPU, {torch.get_num_threads()} threads for PyTorch and onnxruntime; "
        "pytorch_eager is the model as the predict scripts run it, post-processing included",
        "milliseconds": figures,
    }


RUNTIME_NAMES = {"onnx": "onnxruntime", "exported_program": "exported_program"}


def median_ms(run, inputs: torch.Tensor, runs: int) -> float:
    run(inputs)  # the first call allocates and picks kernels
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


# ==================================================================== audio
class AudioTask:
    """Waveforms in, logits out: the saved AudioClassifier, log-mel frontend included."""

    name, input_name, output_names = "audio", "waveform", ["logits"]

    def __init__(self, model_dir: Path, atol: float):
        self.reference, self.config = load_audio_model(model_dir)  # as predict_audio.py loads it
        self.num_samples = round(self.config["clip_seconds"] * self.config["sample_rate"])
        self.atol = atol
        self.exportable = with_stock_convolutions(self.reference)

    def example(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.num_samples)

    @torch.no_grad()
    def run_reference(self, waves: torch.Tensor) -> torch.Tensor:
        return self.reference(waves)

    def unpack(self, outputs: tuple) -> torch.Tensor:
        return outputs[0]

    def parity(self):
        return LogitParity(self.atol)

    def inputs(self, run_dir: Path, files: list[Path] | None, batch_size: int, limit: int | None):
        """Clips of the val split, or every window predict_audio.py would score in the given files."""
        rate = self.config["sample_rate"]
        if files:
            named = [
                (f"{path}@{start / rate:.3f}s", window)
                for path, wave in read_files(find_audio(files), rate)
                for start, window in split_windows(wave, self.num_samples)
            ][:limit]
            source = {"source": "files", "paths": [str(f) for f in files]}
        else:
            named = val_clips(run_dir, rate, self.num_samples, limit)
            source = {"source": f"val split of {read_run_args(run_dir)['data']}"}
        source["count"] = len(named)
        batches = (
            (torch.stack([w for _, w in named[i : i + batch_size]]), [n for n, _ in named[i : i + batch_size]])
            for i in range(0, len(named), batch_size)
        )
        return source, batches


def with_stock_convolutions(model: nn.Module) -> nn.Module:
    """A copy with every TinyMapConv2d turned back into nn.Conv2d (same parameters and results). The tiny-map path,
    a CPU speed-up for PyTorch, computes with Python numbers from the input's shape (len(x)), which makes torch.export
    fix the batch size; ONNX runtimes bring their own convolution kernels anyway."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.__class__ = nn.Conv2d
    return model


def read_run_args(run_dir: Path) -> dict:
    path = run_dir / "args.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: without the run's args.json the val split is unknown; pass --inputs FILE...")
    return json.loads(path.read_text())


def val_clips(run_dir: Path, rate: int, num_samples: int, limit: int | None) -> list[tuple[str, torch.Tensor]]:
    """Decoded as training decodes them (first num_samples, padded, within full scale); unreadable clips are left out."""
    run = read_run_args(run_dir)
    data = load_audio_data(
        run["data"],
        run.get("format"),
        fold=run.get("fold"),
        val_fold=run.get("val_fold"),
        audio_column=run.get("audio_column", "audio"),
        label_column=run.get("label_column", "label"),
        val_fraction=run.get("val_fraction", 0.1),
        keywords=keyword_task_of(run),
        clip_seconds=run.get("clip_seconds"),
    )
    split = data.splits["val"]
    clips = []
    for name, source in zip(split.names[:limit], split.sources, strict=False):
        try:
            clips.append((name, within_full_scale(fix_length(read_audio(source, rate, num_samples), num_samples))))
        except BadClip as err:
            print(f"skipped {name}: {err}", file=sys.stderr)
    return clips


def keyword_task_of(run: dict) -> KeywordTask | None:
    """The 12-class Speech Commands task of a run with --wanted-words: its val split has _unknown_ and _silence_."""
    if not run.get("wanted_words"):
        return None
    return KeywordTask(tuple(run["wanted_words"]), run["unknown_percentage"], run["silence_percentage"])


def read_files(paths, rate: int):
    for path in paths:
        try:
            yield path, read_audio(str(path), rate)
        except BadClip as err:
            print(f"skipped {path}: {err}", file=sys.stderr)


def split_windows(wave: torch.Tensor, window: int):
    starts = window_starts(wave.numel(), window, max(1, window // 2))
    return zip(starts, windows(wave, starts, window), strict=True)


class LogitParity:
    def __init__(self, atol: float):
        self.atol, self.clips, self.max_diff, self.top1_differs = atol, 0, 0.0, []

    def add(self, names: list[str], reference: torch.Tensor, exported: torch.Tensor):
        self.clips += len(names)
        self.max_diff = max(self.max_diff, float((exported - reference).abs().max()))
        differs = (exported.argmax(1) != reference.argmax(1)).nonzero().flatten().tolist()
        self.top1_differs += [names[i] for i in differs]

    def result(self) -> dict:
        problems = []
        if self.max_diff > self.atol:
            problems.append(f"max |logit difference| {self.max_diff:.3g} > {self.atol:g}")
        if self.top1_differs:
            problems.append(f"top-1 differs on {len(self.top1_differs)} of {self.clips} clips")
        return {
            "clips": self.clips,
            "max_abs_logit_diff": self.max_diff,
            "atol": self.atol,
            "top1_identical": not self.top1_differs,
            "top1_differs": self.top1_differs[:20],
            "passed": not problems,
            "problem": "; ".join(problems) or None,
        }


# ==================================================================== detection
class DetectionTask:
    """Images in; boxes, scores, labels and counts out, post-processing included."""

    name, input_name = "detection", "images"
    output_names = ["boxes", "scores", "labels", "num_detections"]

    def __init__(self, model_dir: Path):
        self.reference, self.config = load_detection_model(model_dir)  # as predict_detection.py loads it
        self.size = self.config["img_size"]
        if not isinstance(self.reference, FCOS):
            raise SystemExit(
                f"{self.config['model']} is a {type(self.reference).__name__}; export reimplements the post-processing "
                "of FCOS detectors only (fcos_tiny, fcos_resnet50_fpn)"
            )
        self.exportable = FCOSWithPostprocess(self.reference, self.size).eval()
        self.metric = load_metric(str(Path(__file__).resolve().parent / "metrics" / "coco_map"))

    def example(self, batch: int) -> torch.Tensor:
        return torch.full((batch, 3, self.size, self.size), PAD_VALUE / 255)

    @torch.no_grad()
    def run_reference(self, images: torch.Tensor) -> list[dict]:
        """torchvision's own forward; its labels count background as 0, the contract's labels do not. FCOS scores
        the background class too: its (rare, low) detections are dropped, as the exported model never makes them."""
        results = []
        for out in self.reference(images):
            keep = out["labels"] > 0
            results.append({"boxes": out["boxes"][keep], "scores": out["scores"][keep], "labels": out["labels"][keep] - 1})
        return results

    def unpack(self, outputs: tuple) -> list[dict]:
        boxes, scores, labels, counts = outputs
        return [{"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]} for i, n in enumerate(counts.tolist())]

    def parity(self):
        return DetectionParity(self.metric, self.config)

    def inputs(self, run_dir: Path, files: list[Path] | None, batch_size: int, limit: int | None):
        """Val images (with their boxes, for mAP) or the given images, resized and padded as predict_detection.py does."""
        if files:
            samples, hub = image_samples(files), None
            source = {"source": "files", "paths": [str(f) for f in files]}
        else:
            run = read_run_args(run_dir)
            data = load_data(
                run["data"], run.get("val_fraction", 0.1), fmt=run.get("format"), max_pixels=run.get("max_pixels", MAX_PIXELS)
            )
            samples, hub = data.splits["val"], data.hub.get("val")
            source = {"source": f"val split of {run['data']}"}
        samples = samples[:limit]
        source["count"] = len(samples)
        loader = torch.utils.data.DataLoader(
            DetectionDataset(samples, eval_transform(self.size), hub), batch_size=batch_size, collate_fn=make_collate(self.size)
        )
        by_id = {s.image_id: s for s in samples}
        batches = ((images.float() / 255, [(by_id[t["image_id"]], t) for t in targets]) for images, targets in loader)
        return source, batches


def image_samples(files: list[Path]) -> list[Sample]:
    """Readable images as samples without ground truth (unreadable ones are said and skipped)."""
    samples, found = [], list(find_images(files))
    for file, (size, problems) in zip(found, probe_all(found), strict=True):
        if size is None:
            print(f"skipped {file}: {problems[0]}", file=sys.stderr)
            continue
        empty = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        samples.append(Sample(len(samples), str(file), str(file), size[0], size[1], *empty))
    return samples


class FCOSWithPostprocess(nn.Module):
    """torchvision's FCOS inference on a batch of S x S images, with exportable ops instead of its per-image
    Python loops and data-dependent lists: same normalisation, backbone, head and anchors, then for all images at
    once per-level top-k candidates, decoding, score threshold, batched NMS and the best max_det, padded.

    torchvision's eval transform would resize an S x S image to S x S, which is the identity, so it is left out."""

    def __init__(self, fcos: FCOS, size: int):
        super().__init__()
        self.backbone, self.head, self.box_coder = fcos.backbone, fcos.head, fcos.box_coder
        self.size, self.conf, self.iou, self.max_det = size, fcos.score_thresh, fcos.nms_thresh, fcos.detections_per_img
        self.topk, divisible = fcos.topk_candidates, fcos.transform.size_divisible
        self.padded = -(-size // divisible) * divisible  # torchvision pads batches to a multiple of this (with zeros)
        self.register_buffer("mean", torch.tensor(fcos.transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(fcos.transform.image_std).view(1, 3, 1, 1))
        # Anchors depend only on the feature map sizes, which S fixes: computed once, stored as a constant.
        with torch.no_grad():
            padded = torch.zeros(1, 3, self.padded, self.padded)
            features = list(self.backbone(padded).values())
            self.register_buffer("anchors", fcos.anchor_generator(ImageList(padded, [(size, size)]), features)[0])
        self.level_sizes = [f.shape[-2] * f.shape[-1] * self.head.classification_head.num_anchors for f in features]

    def forward(self, images: torch.Tensor):
        scores, boxes = self.dense_predictions(images)
        image, score, label, box = self.candidates(scores, boxes)
        # NMS per image and class in one call: groups are moved apart (x by class, y by image) so boxes of different
        # groups never overlap; 2-D offsets keep the coordinates, and so float32 IoUs, small.
        group = torch.stack([label, image, label, image], dim=1).to(box.dtype) * (self.size + 1)
        keep = torchvision.ops.nms(box + group, score, self.iou)  # indices by decreasing score
        return self.best_per_image(images.shape[0], image[keep], score[keep], label[keep], box[keep])

    def dense_predictions(self, images: torch.Tensor):
        """Scores (B, anchors, classes) without the background class, and decoded boxes (B, anchors, 4) in input pixels."""
        x = (images - self.mean) / self.std
        x = nn.functional.pad(x, (0, self.padded - self.size, 0, self.padded - self.size))
        out = self.head(list(self.backbone(x).values()))
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"][..., 1:]) * torch.sigmoid(out["bbox_ctrness"]))
        anchors = self.anchors.expand(images.shape[0], -1, -1)
        return scores, self.box_coder.decode(out["bbox_regression"], anchors).clamp(0, self.size)

    def candidates(self, scores: torch.Tensor, boxes: torch.Tensor):
        """As torchvision: per level the topk_candidates best (anchor, class) pairs, of those the ones above conf.
        Top-k of all then thresholding keeps the same set as thresholding then top-k, with a fixed k."""
        classes = scores.shape[-1]
        best_scores, best_indices, start = [], [], 0
        for level in self.level_sizes:
            s, i = scores[:, start : start + level].flatten(1).topk(min(self.topk, level * classes), dim=1)
            best_scores.append(s)
            best_indices.append(i + start * classes)
            start += level
        best_scores, best_indices = torch.cat(best_scores, dim=1), torch.cat(best_indices, dim=1)
        image, slot = torch.nonzero(best_scores > self.conf, as_tuple=True)
        index = best_indices[image, slot]
        return image, best_scores[image, slot], index % classes, boxes[image, index // classes]

    def best_per_image(self, batch, image, score, label, box):
        """The first max_det detections of each image (already by decreasing score) into zero-padded outputs."""
        one_hot = (image[:, None] == torch.arange(batch, device=image.device)[None]).long()
        rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # position of each detection within its image
        keep = rank < self.max_det
        at = (image[keep], rank[keep])
        boxes = box.new_zeros(batch, self.max_det, 4).index_put(at, box[keep])
        scores = score.new_zeros(batch, self.max_det).index_put(at, score[keep])
        labels = label.new_zeros(batch, self.max_det).index_put(at, label[keep])
        return boxes, scores, labels, one_hot.sum(0).clamp(max=self.max_det)


class DetectionParity:
    """One-to-one matching of the export's detections to PyTorch's, image by image, and mAP of both.

    A detection whose score is within MAX_SCORE_DIFF of a cut (the conf threshold, or the lowest score of an image
    holding max_det detections) may fall on either side of it from float rounding alone; left without a partner, it
    is counted as at_cut, not as a failure. Every other detection must have its partner."""

    def __init__(self, metric, config: dict):
        self.metric, self.names, self.conf, self.max_det = metric, config["labels"], config["conf"], config["max_det"]
        self.counts = dict.fromkeys(
            ("images", "reference_detections", "exported_detections", "matched", "at_cut", "unmatched"), 0
        )
        self.min_iou, self.max_score_diff, self.max_box_diff = 1.0, 0.0, 0.0
        self.predictions = {"reference": [], "exported": []}
        self.references = []

    def add(self, meta: list, reference: list[dict], exported: list[dict]):
        for (sample, target), ref, exp in zip(meta, reference, exported, strict=True):
            self.counts["images"] += 1
            self.counts["reference_detections"] += len(ref["scores"])
            self.counts["exported_detections"] += len(exp["scores"])
            for detections, partnered in zip((ref, exp), self.match(ref, exp), strict=True):
                for score in detections["scores"][~partnered].tolist():
                    self.counts["at_cut" if self.at_cut(score, detections) else "unmatched"] += 1
            for key, out in (("reference", ref), ("exported", exp)):
                self.predictions[key].append(coco_prediction(sample, target, out))
            self.references.append(
                {"image_id": sample.image_id, "boxes": sample.boxes.tolist(), "labels": sample.labels.tolist()}
                | {"width": sample.width, "height": sample.height}
            )

    def match(self, ref: dict, exp: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy by PyTorch's score order: each reference detection takes the free exported detection of its class
        that overlaps it most; the pair holds when IoU and score agree within the tolerances. Returns which
        reference and which exported detections have a partner."""
        iou = torchvision.ops.box_iou(ref["boxes"], exp["boxes"])
        # Boxes clipped to zero area at the border have no IoU (0 / 0): they agree when their corners do.
        same_corners = (ref["boxes"][:, None] - exp["boxes"][None]).abs().amax(dim=-1) < MAX_CORNER_DIFF
        iou = torch.where(iou.isnan(), same_corners.to(iou.dtype), iou)
        iou[ref["labels"][:, None] != exp["labels"][None, :]] = -1
        partnered = torch.zeros(len(ref["scores"]), dtype=torch.bool), torch.zeros(len(exp["scores"]), dtype=torch.bool)
        for i in range(len(iou) if iou.shape[1] else 0):
            j = int(iou[i].argmax())
            if iou[i, j] < 0:
                continue
            pair_iou, score_diff = float(iou[i, j]), abs(float(ref["scores"][i] - exp["scores"][j]))
            iou[:, j] = -1
            self.min_iou = min(self.min_iou, pair_iou)
            self.max_score_diff = max(self.max_score_diff, score_diff)
            self.max_box_diff = max(self.max_box_diff, float((ref["boxes"][i] - exp["boxes"][j]).abs().max()))
            if pair_iou > MIN_IOU and score_diff < MAX_SCORE_DIFF:
                partnered[0][i] = partnered[1][j] = True
                self.counts["matched"] += 1
        return partnered

    def at_cut(self, score: float, detections: dict) -> bool:
        full = len(detections["scores"]) == self.max_det
        return score - self.conf < MAX_SCORE_DIFF or (full and score - float(detections["scores"].min()) < MAX_SCORE_DIFF)

    def result(self) -> dict:
        c = self.counts
        problems = [f"{c['unmatched']} detections without a partner"] if c["unmatched"] else []
        figures = {
            **c,
            "min_iou": round(self.min_iou, 6),
            "max_abs_score_diff": self.max_score_diff,
            "max_abs_box_diff_pixels": self.max_box_diff,
            "tolerances": {"iou_above": MIN_IOU, "score_diff_below": MAX_SCORE_DIFF, "map_diff_at_most": MAX_MAP_DIFF},
        }
        if self.has_ground_truth():
            maps = {key: self.mean_ap(predictions) for key, predictions in self.predictions.items()}
            figures |= {f"{stat}_{key}": maps[key][stat] for stat in ("map", "map50") for key in maps}
            if abs(maps["reference"]["map"] - maps["exported"]["map"]) > MAX_MAP_DIFF:
                problems.append(f"mAP {maps['exported']['map']:.6f} exported vs {maps['reference']['map']:.6f} PyTorch")
        return {**figures, "passed": not problems, "problem": "; ".join(problems) or None}

    def has_ground_truth(self) -> bool:
        return any(r["boxes"] for r in self.references)

    def mean_ap(self, predictions: list[dict]) -> dict:
        """COCO mAP in the pixels of the image files, computed as train_detection.py's evaluate computes it."""
        return self.metric.compute(predictions=predictions, references=self.references, label_names=self.names)


def coco_prediction(sample: Sample, target: dict, out: dict) -> dict:
    return {
        "image_id": sample.image_id,
        "boxes": to_original_coordinates(out["boxes"].float(), target).tolist(),
        "scores": out["scores"].tolist(),
        "labels": out["labels"].tolist(),
    }


if __name__ == "__main__":
    main()
