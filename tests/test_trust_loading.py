"""Nothing a model/ folder or the torch hub cache holds runs code when it is loaded: a crafted model.pt2 (pickled
weights or sample inputs, a shape expression sympy would evaluate) is refused before torch reads it, and so is a
pickle planted in the --pretrained cache; a file that is not what its name says stops with one message naming it."""

import io
import os
import re
import zipfile
from pathlib import Path

import export_model
import pytest
import torch
import torchvision
from detection_model import build_model

from shared.model_io import load_pretrained, load_weights


class TinyTask:
    """What export_model needs of a task, for a model that exports in a second."""

    name, input_name, output_names = "tiny", "x", ["y"]
    exportable = torch.nn.Linear(4, 3).eval()

    def example(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.pt2"
    export_model.export(TinyTask(), {"exported_program": path})
    return path


def pickle_running(command: str) -> bytes:
    class Payload:
        def __reduce__(self):
            return os.system, (command,)

    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    return buffer.getvalue()


def pickled_weight(entries: dict, marker: Path):
    config = entries["data/weights/model_weights_config.json"].decode()
    name = re.search(r'"path_name": "(weight_\d+)"', config)[1]
    entries["data/weights/model_weights_config.json"] = config.replace('"use_pickle": false', '"use_pickle": true', 1).encode()
    entries[f"data/weights/{name}"] = pickle_running(f"touch {marker}")


def pickled_sample_inputs(entries: dict, marker: Path):
    entries["data/sample_inputs/model.pt"] = pickle_running(f"touch {marker}")


def evaluated_shape(entries: dict, marker: Path):
    program = entries["models/model.json"].decode()
    payload = f"__import__('os').system('touch {marker}') or Symbol('s"
    entries["models/model.json"] = program.replace("Symbol('s", payload).encode()
    assert payload in entries["models/model.json"].decode()


def tampered(exported: Path, path: Path, change) -> Path:
    """The archive rewritten with `change` applied to its entries (named without the archive's folder)."""
    with zipfile.ZipFile(exported) as source, zipfile.ZipFile(path, "w") as target:
        folder = source.namelist()[0].split("/")[0]
        entries = {name.split("/", 1)[1]: source.read(name) for name in source.namelist()}
        change(entries)
        for name, data in entries.items():
            target.writestr(f"{folder}/{name}", data)
    return path


def test_an_export_of_this_script_holds_no_pickle_and_loads(exported):
    assert export_model.pt2_problem(exported) is None
    run = export_model.load_exported_program(exported, TinyTask())
    x = torch.rand(3, 4)
    assert torch.allclose(run(x)[0], TinyTask.exportable(x))


@pytest.mark.parametrize("change", [pickled_weight, pickled_sample_inputs, evaluated_shape])
def test_a_crafted_model_pt2_is_refused_before_torch_reads_it(exported, tmp_path, change):
    """Each of these runs the payload in torch.export.load (it unpickles with weights_only=False, or sympy evals)."""
    marker = tmp_path / "payload_ran"
    path = tampered(exported, tmp_path / "model.pt2", lambda entries: change(entries, marker))
    with pytest.raises(SystemExit, match=rf"{re.escape(str(path))} is refused before torch reads it: .*export it again"):
        export_model.load_exported_program(path, TinyTask())
    assert not marker.exists()


@pytest.mark.parametrize("content", [bytes(range(256)), b"not an export\n"])
def test_an_export_that_is_no_model_stops_with_a_message_naming_it(tmp_path, content):
    pt2, onnx = tmp_path / "model.pt2", tmp_path / "model.onnx"
    pt2.write_bytes(content)
    onnx.write_bytes(content)
    with pytest.raises(SystemExit, match=rf"{re.escape(str(pt2))} is refused before torch reads it: not a torch.export archive"):
        export_model.load_exported_program(pt2, TinyTask())
    with pytest.raises(SystemExit, match=rf"{re.escape(str(onnx))} is not an ONNX model onnxruntime can load"):
        export_model.load_onnx(onnx, TinyTask())


@pytest.mark.parametrize("content", [bytes(range(256)), b"model weights\n"])
def test_a_model_safetensors_that_is_not_one_stops_with_a_message_naming_it(tmp_path, content):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(content)
    (model / "config.json").write_text("{}")
    message = rf"{re.escape(str(model / 'model.safetensors'))} is not a safetensors file .*Copy it again"
    for load, path in ((load_pretrained, model), (load_weights, model), (load_weights, model / "model.safetensors")):
        with pytest.raises(SystemExit, match=message):
            load(path)


def test_a_pickle_planted_in_the_pretrained_cache_is_refused_and_never_run(tmp_path, monkeypatch):
    name = "ssdlite320_mobilenet_v3_large"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / Path(torchvision.models.get_model_weights(name).DEFAULT.url).name
    cached.parent.mkdir()
    marker = tmp_path / "payload_ran"
    cached.write_bytes(pickle_running(f"touch {marker}"))
    with pytest.raises(SystemExit, match=rf"--pretrained: {re.escape(str(cached))} is not a plain weights file") as stopped:
        build_model({"model": name, "labels": ["a", "b"], "img_size": 320}, pretrained=True)
    assert "never unpickled" in str(stopped.value) and "weights_only" not in str(stopped.value)
    assert not marker.exists()
