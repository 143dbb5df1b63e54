"""The audio task after training, written once for every script that uses a model/: predict_audio.py prints its
records, serve.py answers with them, export_model.py exports the model and checks the export against it.

  load          model/ run by PyTorch, or an exported model (waveform -> logits) given as a run function
  pre-process   decoded to mono at the model's rate, cut into windows of the training clip length every half window
                (a last one ends at the end of the file), each brought within full scale as training clips are
  forward       softmax probabilities, one row per window
  record        the file's label is the mean of its windows' probabilities; the record lists both"""

import copy
import io
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from audio_data import AUDIO_EXTENSIONS, BadClip, fix_length, load_run_data, read_audio, within_full_scale
from audio_model import TASK, AudioClassifier, build_model, use_tiny_map_convs
from torch import nn

from shared.model_io import BadInput, load_pretrained, run_args

# What training reads (AUDIO_EXTENSIONS, all decoded by soundfile), by media type.
MEDIA_TYPES = tuple(f"audio/{kind}" for kind in "wav x-wav wave flac x-flac ogg mpeg aiff x-aiff".split())


def load_model(directory: Path, device="cpu") -> tuple[AudioClassifier, dict]:
    """A saved model/ ready for inference; on a CPU with the tiny-map convolutions (the same results, faster)."""
    state, config = load_pretrained(directory)
    if config.get("task") != TASK:
        raise SystemExit(f"{directory}: holds a {config.get('task')!r} model, not an audio classifier")
    model = build_model(config)
    model.load_state_dict(state)
    if torch.device(device).type == "cpu":
        use_tiny_map_convs(model)
    return model.to(device).eval(), config


def find_audio(paths):
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        elif path.is_file():
            yield path
        else:
            raise SystemExit(f"{path}: no such file or folder")


def window_starts(length: int, window: int, hop: int) -> list[int]:
    """Windows every hop samples; a last one ends at the end of the file so no tail goes unheard."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, hop))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def windows(wave: torch.Tensor, starts: list[int], window: int) -> torch.Tensor:
    """The model's inputs: one fixed-length window per start, each brought within full scale as training clips are."""
    return within_full_scale(torch.stack([fix_length(wave[s : s + window], window) for s in starts]))


@torch.no_grad()
def predict(model, segments: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [model(segments[i : i + batch_size]).float().softmax(dim=1).cpu() for i in range(0, len(segments), batch_size)]
    )


def file_record(path, probs, starts, length, window, rate, labels, k) -> dict:
    def top(p):
        values, indices = p.topk(min(k, len(labels)))
        return [{"label": labels[i], "probability": round(v, 4)} for v, i in zip(values.tolist(), indices.tolist(), strict=True)]

    mean = probs.mean(dim=0)
    best = int(mean.argmax())
    windows = [
        {
            "start": round(s / rate, 3),
            "end": round(min(s + window, length) / rate, 3),
            "label": labels[int(p.argmax())],
            "probability": round(float(p.max()), 4),
            "top": top(p),
        }
        for s, p in zip(starts, probs, strict=True)
    ]
    return {
        "path": str(path),
        "label": labels[best],
        "probability": round(float(mean[best]), 4),
        "top": top(mean),
        "windows": windows,
    }


@dataclass
class Windows:
    name: str
    inputs: torch.Tensor  # the model's inputs: one row per window
    starts: list[int]
    length: int  # samples in the file


class AudioPredictor:
    """A model and the windows it scores. flags are the calling script's parsed arguments: serve.py's decode reads
    --max-audio-seconds, export_model.py's parity --atol."""

    task, name, input_name, output_names = TASK, "audio", "waveform", ["logits"]  # the contract of an export
    media_types, suffixes = MEDIA_TYPES, AUDIO_EXTENSIONS

    def __init__(self, config: dict, model=None, run=None, flags=None, device="cpu", window_seconds=None, hop_seconds=None):
        self.config, self.model, self.run, self.flags, self.device = config, model, run, flags, device
        self.backend = "pytorch" if run is None else "onnxruntime"
        self.rate, self.labels = config["sample_rate"], config["labels"]
        self.window = round((window_seconds or config["clip_seconds"]) * self.rate)
        self.hop = round(hop_seconds * self.rate) if hop_seconds else max(1, self.window // 2)

    @classmethod
    def load(cls, model_dir: Path, device="cpu", flags=None) -> "AudioPredictor":
        model, config = load_model(model_dir, device)
        return cls(config, model, flags=flags, device=device)

    def prepare(self, name: str, wave: torch.Tensor) -> Windows:
        starts = window_starts(wave.numel(), self.window, self.hop)
        return Windows(name, windows(wave, starts, self.window), starts, wave.numel())

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.run is None:
            return predict(self.model, inputs.to(self.device), len(inputs))
        return self.unpack(self.run(inputs)).float().softmax(dim=1)

    def record(self, clip: Windows, probs: torch.Tensor, top_k: int) -> dict:
        return file_record(clip.name, probs, clip.starts, clip.length, self.window, self.rate, self.labels, top_k)

    # ------------------------------------------------------------------ serve.py
    def contract(self) -> dict:
        return {
            "media_types": list(self.media_types),
            "sample_rate": self.rate,
            "clip_seconds": self.config["clip_seconds"],
            "window_seconds": self.window / self.rate,
            "hop_seconds": self.hop / self.rate,
            "max_audio_seconds": self.flags.max_audio_seconds,
            "query": {"top_k": 3},
        }

    @staticmethod
    def options(top_k: int = 3) -> dict:
        """The query parameters of a request (serve.py hands this signature to FastAPI)."""
        if top_k < 1:
            raise BadInput("invalid_parameter", f"top_k: {top_k} labels asked for, at least 1 is needed")
        return {"top_k": top_k}

    def batch_key(self, options: dict) -> tuple:
        return ()  # every window can share a forward pass

    def decode(self, files: list[tuple[str, bytes]]) -> list[Windows]:
        """Reading stops where the request's audio would pass --max-audio-seconds, so a small compressed file cannot
        expand into hours of samples in memory."""
        decoded, budget = [], round(self.flags.max_audio_seconds * self.rate)
        for name, data in files:
            try:
                wave = read_audio(io.BytesIO(data), self.rate, budget + 1)
            except BadClip as err:
                raise BadInput("undecodable_file", f"{name}: {err}") from None
            budget -= wave.numel()
            if budget < 0:
                seconds = f"{self.flags.max_audio_seconds:g} s"
                raise BadInput("too_much_audio", f"{name}: the request holds more than {seconds} of audio (--max-audio-seconds)")
            decoded.append(self.prepare(name, wave))
        return decoded

    def forward(self, inputs: torch.Tensor, _key: tuple) -> list:
        return list(self.probabilities(inputs))

    def answer(self, clip: Windows, outputs: list, options: dict) -> dict:
        return self.record(clip, torch.stack(outputs), options["top_k"])

    # ------------------------------------------------------------------ export_model.py
    @cached_property
    def exportable(self) -> nn.Module:
        """A copy with every TinyMapConv2d turned back into nn.Conv2d (same parameters and results). The tiny-map path,
        a CPU speed-up for PyTorch, computes with Python numbers from the input's shape (len(x)), which makes
        torch.export fix the batch size; ONNX runtimes bring their own convolution kernels anyway."""
        model = copy.deepcopy(self.model)
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.__class__ = nn.Conv2d
        return model

    def example(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.window)

    @torch.no_grad()
    def run_reference(self, waves: torch.Tensor) -> torch.Tensor:
        return self.model(waves)

    def unpack(self, outputs: tuple) -> torch.Tensor:
        return outputs[0]

    def parity(self):
        return LogitParity(self.flags.atol)

    def inputs(self, run_dir: Path, files: list[Path] | None, batch_size: int, limit: int | None):
        """Clips of the val split, or every window predict_audio.py would score in the given files."""
        if files:
            named = [
                (f"{clip.name}@{start / self.rate:.3f}s", window)
                for clip in self.read_files(find_audio(files))
                for start, window in zip(clip.starts, clip.inputs, strict=True)
            ][:limit]
            source = {"source": "files", "paths": [str(f) for f in files]}
        else:
            run = run_args(run_dir)
            named = val_clips(run, self.rate, self.window, limit)
            source = {"source": f"val split of {run['data']}"}
        source["count"] = len(named)
        batches = (
            (torch.stack([w for _, w in named[i : i + batch_size]]), [n for n, _ in named[i : i + batch_size]])
            for i in range(0, len(named), batch_size)
        )
        return source, batches

    def read_files(self, paths):
        for path in paths:
            try:
                yield self.prepare(str(path), read_audio(str(path), self.rate))
            except BadClip as err:
                print(f"skipped {path}: {err}", file=sys.stderr)


def val_clips(run: dict, rate: int, window: int, limit: int | None) -> list[tuple[str, torch.Tensor]]:
    """The run's val split (from its args.json: a --wanted-words run's _unknown_ and _silence_ included), decoded as
    training decodes it (first window samples, padded, within full scale); unreadable clips are left out."""
    split, clips = load_run_data(run).splits["val"], []
    for name, source in zip(split.names[:limit], split.sources, strict=False):
        try:
            clips.append((name, within_full_scale(fix_length(read_audio(source, rate, window), window))))
        except BadClip as err:
            print(f"skipped {name}: {err}", file=sys.stderr)
    return clips


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
