"""The `model/` directory: model.safetensors + config.json, all a predict script needs."""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
    directory = Path(directory)
    weights, config = directory / "model.safetensors", directory / "config.json"
    for f in (weights, config):
        if not f.is_file():
            raise SystemExit(
                f"{f} not found: --model-dir must be the model/ folder of a training run "
                "(it holds model.safetensors and config.json)."
            )
    return load_file(weights), json.loads(config.read_text())
