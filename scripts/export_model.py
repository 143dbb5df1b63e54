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
import json
import re
import shutil
import statistics
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

import onnx
import onnxruntime
import sympy
import torch
import torch.utils._sympy.functions
import torchvision
from audio_predictor import AudioPredictor
from detection_predictor import DetectionPredictor
from torch.export.pt2_archive import PT2ArchiveReader

from shared.model_io import load_pretrained
from shared.runtime import write_json

PREDICTORS = {predictor.task: predictor for predictor in (AudioPredictor, DetectionPredictor)}
FILES = {"onnx": "model.onnx", "exported_program": "model.pt2"}
LATENCY_BATCHES = (1, 32)
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
    """The predictor of the task config.json names, holding the PyTorch model the exports are checked against."""
    _, config = load_pretrained(args.model_dir)
    if config.get("task") not in PREDICTORS:
        raise SystemExit(
            f"{args.model_dir}: config.json task {config.get('task')!r} is not one of {', '.join(map(repr, PREDICTORS))}"
        )
    return PREDICTORS[config["task"]].load(args.model_dir, flags=args)


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


if __name__ == "__main__":
    main()
