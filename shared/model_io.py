"""The `model/` directory: model.safetensors + config.json, all a predict script needs."""

import json
import os
import pickle
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PLUMBING = ("output_dir", "cache_dir", "resume", "overwrite", "workers", "report_to", "log_every", "checkpoint_steps",
            "keep_checkpoints", "recipe", "eval_only", "cpu", "compile")  # fmt: skip
FRAMEWORKS = ("torch", "torchvision", "torchaudio", "accelerate", "safetensors")


def save_pretrained(directory: Path, model: torch.nn.Module, config: dict):
    """Write weights and config to a temporary folder, then swap it in: a crash keeps the old model."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_pretrained(directory: Path):
    """Return (state_dict, config) or stop with a message naming what is missing."""
    weights, config = Path(directory) / "model.safetensors", Path(directory) / "config.json"
    for f in (weights, config):
        if not f.is_file():
            raise SystemExit(
                f"{f} not found: --model-dir must be the model/ folder of a training run (model.safetensors, config.json)."
            )
    return _read_safetensors(weights), json.loads(config.read_text())


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(path)
    except SafetensorError as err:
        raise SystemExit(
            f"{path} is not a safetensors file ({err}): damaged, truncated, or another format renamed. "
            "Copy it again from the model/ folder of the training run that wrote it"
        ) from None


def load_hub_weights(path: Path, url: str) -> dict:
    """--pretrained: a state dict from the torch hub cache, read with weights_only=True: a tampered or planted file
    in the cache cannot run code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        problem = None if isinstance(state, dict) else f"it holds a {type(state).__name__}, not a state dict"
    except pickle.UnpicklingError:
        problem = "it holds objects other than tensors, which are never unpickled"
    except Exception as err:  # whatever else is wrong with the file, the fix is the same
        problem = f"damaged or truncated: {type(err).__name__}"
    if problem:
        raise SystemExit(f"--pretrained: {path} is not a plain weights file ({problem}); delete it and download {url} again")
    return state


def load_weights(path: Path, *, need_config: bool = False) -> tuple[dict, dict]:
    """--weights: a model/ folder, or a .safetensors file (its config.json, when beside it, tells the labels;
    without one the labels are unknown and only the features are reused)."""
    path = Path(path)
    if path.is_dir():
        return load_pretrained(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise SystemExit(f"--weights {path}: not a model/ folder or a .safetensors file")
    beside = path.with_name("config.json")
    if need_config and not beside.is_file():
        raise SystemExit(f"--weights {path}: no config.json beside it, so the model and its labels are unknown")
    return _read_safetensors(path), json.loads(beside.read_text()) if beside.is_file() else {}


def start_from(
    model: torch.nn.Module, weights: tuple[dict, dict] | None, labels: list[str], head: list[str], otherwise: str
) -> str:
    """--weights: the whole model when its labels are these; otherwise every tensor but the class layer (`head`),
    which starts fresh. Returns what was done, for the start-up summary (`otherwise` without weights)."""
    if weights is None:
        return otherwise
    state, source = weights
    if source.get("labels") == labels:
        model.load_state_dict(state)
        return f"from {source['model']} weights, same labels"
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k not in set(head) and k in own and own[k].shape == v.shape}
    model.load_state_dict(kept, strict=False)
    return f"from weights of other labels: {len(kept)}/{len(own)} tensors reused, new class layer"


def label_index(data_labels: list[str], model_labels: list[str], data: str) -> np.ndarray:
    """For each class of the data, its index among the model's classes (matched by name); unknown ones stop."""
    unknown = sorted(set(data_labels) - set(model_labels))
    if unknown:
        raise SystemExit(f"{data}: label(s) {unknown} are not among the model's labels {model_labels}; use data of its classes")
    return np.array([model_labels.index(name) for name in data_labels], dtype=np.int64)


def write_model_card(
    directory: Path,
    *,
    pipeline_tag: str,
    title: str,
    labels: list[str],
    data: str,
    metrics: dict,
    arguments: dict,
    usage: str,
    dataset: str | None = None,
    metric_ids: dict | None = None,
):
    """model/README.md as the Hugging Face Hub reads it: front matter with a model-index of the measured values (by
    huggingface_hub), then labels, data, results, use from Python and the shell, the arguments that matter and the
    framework versions. metrics: {split: {name: value}}; metric_ids: {name: (Hub metric type, config)}; dataset: a
    Hub id, when the data came from the Hub."""
    ids = metric_ids or {}
    # What fixed the model, not where this machine kept things: paths by their last part, the run's plumbing left out.
    arguments = {k: Path(str(v)).name if k in ("data", "weights") else v for k, v in arguments.items() if v is not None}
    arguments = {k: v for k, v in arguments.items() if k not in PLUMBING}
    results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=dataset or "local",
            dataset_name=dataset or arguments.get("data", "data"),
            dataset_split=split,
            metric_type=ids.get(name, (name, None))[0],
            metric_config=ids.get(name, (name, None))[1],
            metric_name=name,
            metric_value=round(float(value), 4),
        )
        for split, values in metrics.items()
        for name, value in values.items()
    ]
    card_data = ModelCardData(
        model_name=title,
        pipeline_tag=pipeline_tag,
        library_name="pytorch",
        tags=[pipeline_tag, "torchvision", "safetensors", "accelerate"],
        datasets=[dataset] if dataset else None,
        eval_results=results or None,
    )
    names = sorted({k for split in metrics.values() for k in split})
    table = ["| split | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    table += [f"| {split} | " + " | ".join(f"{v.get(k, float('nan')):.4f}" for k in names) + " |" for split, v in metrics.items()]
    versions = {"python": platform.python_version()} | {n: sys.modules[n].__version__ for n in FRAMEWORKS if n in sys.modules}
    template = f"""---
{{{{ card_data }}}}
---

# {title}

## Labels

{len(labels)} classes, in the order of the model's outputs: {", ".join(f"`{label}`" for label in labels)}

## Data

{data}

## Results

{chr(10).join(table)}

## How to use

{usage}

## Training arguments

| argument | value |
|---|---|
{chr(10).join(f"| `{k}` | `{v}` |" for k, v in arguments.items())}

## Framework versions

{chr(10).join(f"- {name} {version}" for name, version in versions.items())}
"""
    ModelCard.from_template(card_data, template_str=template).save(Path(directory) / "README.md")


class BadInput(ValueError):
    """A file or setting a model/ cannot take at prediction; kind names the problem for a client (serve.py: 422)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def run_args(run_dir: Path) -> dict:
    """The args.json of the run that wrote a model/ (its data and splits, for checks on the run's own val split)."""
    path = run_dir / "args.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: without the run's args.json the val split is unknown; pass --inputs FILE...")
    return json.loads(path.read_text())
