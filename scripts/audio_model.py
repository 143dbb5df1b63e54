"""The audio classifier: a log-mel frontend that runs on the device in float32, then any torchvision
classification network with a 1-channel stem. The frontend is part of the saved model, so inference
takes raw waveforms."""

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio.transforms as T
import torchvision
from torch import nn

from shared.model_io import load_hub_weights, save_pretrained, write_model_card

TASK = "audio-classification"


def frontend_config(sample_rate: int, clip_seconds: float, n_mels: int) -> dict:
    """25 ms windows and a 10 ms hop, the usual choice for speech and environmental sound."""
    win = round(0.025 * sample_rate)
    return {
        "sample_rate": sample_rate,
        "clip_seconds": clip_seconds,
        "n_mels": n_mels,
        "n_fft": 1 << (win - 1).bit_length(),
        "win_length": win,
        "hop_length": round(0.010 * sample_rate),
        "f_min": 0.0,
        "f_max": sample_rate / 2,
    }


def clip_samples(config: dict) -> int:
    return round(config["clip_seconds"] * config["sample_rate"])


def pcm_to_float(waves: torch.Tensor) -> torch.Tensor:
    """int16 PCM (how the cache stores clips, half the bytes to move) or float waveforms to float32 in [-1, 1]."""
    return waves.float() / 32768 if waves.dtype == torch.int16 else waves.float()


class LogMelFrontend(nn.Module):
    """waveforms (B, samples) -> normalised log-mel (B, 1, n_mels, frames), with SpecAugment in training. Runs in
    float32 even under autocast: a half-precision STFT and dB conversion lose the quiet parts."""

    def __init__(self, config: dict, freq_mask: int = 0, time_mask: int = 0):
        super().__init__()
        keys = ("n_fft", "win_length", "hop_length", "f_min", "f_max", "n_mels")
        self.mel = T.MelSpectrogram(config["sample_rate"], **{k: config[k] for k in keys})
        # torch's periodic window is a view into a longer tensor; safetensors (checkpoints) wants it whole.
        self.mel.spectrogram.window = self.mel.spectrogram.window.clone()
        self.to_db = T.AmplitudeToDB(stype="power", top_db=80)
        # Dataset statistics of the log-mels, set once from training clips and saved with the model.
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))
        masks = {T.FrequencyMasking: freq_mask, T.TimeMasking: time_mask}
        self.spec_augment = nn.Sequential(*(mask(width, iid_masks=True) for mask, width in masks.items() if width))

    def log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=waves.device.type, enabled=False):
            # (B, 1, samples) keeps AmplitudeToDB's top_db clamp per clip rather than per batch.
            return self.to_db(self.mel(pcm_to_float(waves).unsqueeze(1)))

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        x = (self.log_mel(waves) - self.mean) / self.std  # float32: autocast leaves elementwise arithmetic alone
        return self.spec_augment(x) if self.training else x

    @torch.no_grad()
    def fit_normalisation(self, waves: torch.Tensor):
        x = self.log_mel(waves)
        self.mean.fill_(x.mean())
        self.std.fill_(x.std().clamp_min(1e-3))


# ----------------------------------------------------------------------------- the network: change it here

# Families that cannot take a log-mel (each checked with a forward pass on a 1x64x101 log-mel): the vision
# transformers and MaxViT are built for one fixed image size, Inception v3 needs at least 75x75 pixels, and
# GoogLeNet and Inception v3 return auxiliary outputs in training. Swin pads to its windows and works.
UNSUPPORTED_FAMILIES = ("vit_", "maxvit", "inception", "googlenet")


def supported_models() -> list[str]:
    return [n for n in torchvision.models.list_models(module=torchvision.models) if not n.startswith(UNSUPPORTED_FAMILIES)]


def require_supported_model(name: str):
    supported = supported_models()
    if name not in supported:
        why = (
            "needs a fixed image size or returns auxiliary outputs in training, so it cannot take a log-mel"
            if name in torchvision.models.list_models(module=torchvision.models)
            else "not a torchvision classification model"
        )
        raise SystemExit(f"--model {name}: {why}; choose one of {', '.join(supported)}")


def build_backbone(name: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """Any torchvision classification model by name, with a 1-channel first convolution; pretrained: ImageNet
    weights from the local torch hub cache, with a new last linear layer for num_classes."""
    require_supported_model(name)
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not cached.is_file():
            raise SystemExit(
                f"--pretrained: no cached ImageNet weights for {name}; expected {cached}. Download "
                f"{weights.url} to that path on a machine with internet (or set TORCH_HOME), "
                "or train from scratch without --pretrained."
            )
        # Built empty and filled from the file here, not by torchvision, whose loader unpickles without weights_only.
        model = torchvision.models.get_model(name, weights=None, num_classes=len(weights.meta["categories"]))
        state = load_hub_weights(cached, weights.url)
        # DenseNet's files predate a module rename ('norm.1' -> 'norm1'); torchvision renames the keys the same way.
        model.load_state_dict(
            {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", k): v for k, v in state.items()}
        )
        head = _last_linear(model)
        parent, _, attr = head.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Linear(model.get_submodule(head).in_features, num_classes))
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    # The first 3-channel convolution takes one channel, its RGB filters summed; changed in place, so the parameter
    # names (and a saved model) stay torchvision's.
    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if stem is None:
        raise SystemExit(f"{type(model).__name__}: found no 3-channel first convolution to turn into a 1-channel stem")
    stem.in_channels = 1
    stem.weight = nn.Parameter(stem.weight.detach().sum(dim=1, keepdim=True))
    return model


def _last_linear(model: nn.Module) -> str:
    """The name of the class layer (the last linear layer), new when starting from weights of other labels."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise SystemExit(f"{type(model).__name__}: no linear classifier head to replace; pick another --model")
    return names[-1]


class TinyMapConv2d(nn.Conv2d):
    """A Conv2d that, on CPUs, computes at most MAX_POSITIONS output positions as one GEMM: the last ResNet stage sees 2x4
    of them for a 1 s clip, where oneDNN's image-tuned kernels are slowest (bf16 weight gradients take over twice the
    GEMM's time). Same parameters and results; GPUs and larger maps keep the stock kernel."""

    MAX_POSITIONS = 8  # measured: faster at 2x4 (64 mels x 1 s), slower from 2x13 (64 mels x 4 s) on

    def _conv_forward(self, x, weight, bias):
        if isinstance(self.padding, str) or self.padding_mode != "zeros" or self.groups != 1 or x.device.type != "cpu":
            return super()._conv_forward(x, weight, bias)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        h, w = x.shape[-2:]
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh * ow > self.MAX_POSITIONS:
            return super()._conv_forward(x, weight, bias)
        padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (N, H, W, C)
        # One strided slice of the input per kernel tap, stacked: the backward pass is then plain adds, which
        # beat unfold's scatter kernel. Taps go where the weight's memory order wants them (channels_last
        # models keep it as (O, kh, kw, C)), so that reading the weight as a matrix needs no copy of it.
        taps = [
            padded[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
            for i in range(kh)
            for j in range(kw)
        ]
        if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
            rows, weight = torch.stack(taps, dim=3), weight.permute(0, 2, 3, 1)  # (N, oh, ow, kh*kw, C)
        else:
            rows = torch.stack(taps, dim=4)  # (N, oh, ow, C, kh*kw)
        out = F.linear(rows.reshape(len(x) * oh * ow, -1), weight.reshape(len(weight), -1), bias)
        return out.view(len(x), oh, ow, -1).permute(0, 3, 1, 2)  # a channels_last tensor, as the next layers want


def use_tiny_map_convs(model: nn.Module) -> nn.Module:
    """A CPU speed-up only: parameters and results stay those of nn.Conv2d, so a saved model is plain torchvision."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = TinyMapConv2d
    return model


class AudioClassifier(nn.Module):
    def __init__(self, config: dict, pretrained: bool = False, freq_mask: int = 0, time_mask: int = 0):
        super().__init__()
        self.frontend = LogMelFrontend(config, freq_mask, time_mask)
        self.backbone = build_backbone(config["model"], len(config["labels"]), pretrained)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.frontend(waves).contiguous(memory_format=torch.channels_last))


# ============================================================================ the model: replace this to change it
def build_model(config: dict, *, pretrained: bool = False, freq_mask: int = 0, time_mask: int = 0) -> AudioClassifier:
    model = AudioClassifier(config, pretrained=pretrained, freq_mask=freq_mask, time_mask=time_mask)
    return model.to(memory_format=torch.channels_last)  # faster convolutions on GPUs and on CPUs with oneDNN


def model_config(model: str, labels: list[str], sample_rate: int, clip_seconds: float, n_mels: int) -> dict:
    """Everything build_model and a predict script need, saved as model/config.json."""
    return {"task": TASK, "model": model, "labels": labels, **frontend_config(sample_rate, clip_seconds, n_mels)}


def head_parameters(model: AudioClassifier) -> list[str]:
    name = _last_linear(model)
    return [f"{name}.weight", f"{name}.bias"]


save_model = save_pretrained


def probe_step(config: dict):
    """One training step on random clips, for --batch-size auto."""

    def step(batch_size, device, dtype):
        model = build_model(config).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(torch.randn(batch_size, clip_samples(config), device=device)).float().logsumexp(1).mean()
        loss.backward()

    return step


def write_card(args, model_dir: Path, data, config: dict, summary: dict):
    """model/README.md: what the model is, what it was trained on, how well it did and how to use it."""
    metrics = {split: {k: summary[split][k] for k in ("accuracy", "macro_f1")} for split in ("val", "test") if split in summary}
    usage = f"""From the launchkit folder, with this folder as `model/`:

```python
import sys

sys.path[:0] = ["scripts", "."]
from audio_data import read_audio
from audio_predictor import AudioPredictor

predictor = AudioPredictor.load("model")
clip = predictor.prepare("recording.wav", read_audio("recording.wav", predictor.rate))
print(predictor.record(clip, predictor.probabilities(clip.inputs), top_k=3))
```

```bash
python scripts/predict_audio.py --model-dir model recording.wav          # JSON lines, sliding windows
python scripts/train_audio.py --eval-only --weights model --data OTHER --output-dir runs/eval
python scripts/export_model.py --model-dir model --format onnx           # waveform -> logits, with a parity report
python scripts/serve.py --model-dir model --port 8000                    # POST /v1/predict
```
Input: mono float waveforms at {config["sample_rate"]} Hz, {config["clip_seconds"]} s per window (the log-mel frontend is part
of the model)."""
    write_model_card(
        model_dir,
        pipeline_tag="audio-classification",
        title=f"{config['model']} audio classifier ({len(config['labels'])} classes)",
        labels=config["labels"],
        data=f"`{Path(args.data).name}` ({data.format}): "
        + "; ".join(data.notes)
        + f". Best epoch {summary['best_epoch']} of {args.epochs}.",
        metrics=metrics,
        arguments=vars(args),
        usage=usage,
        dataset=args.data if data.format == "hub" else None,
        metric_ids={"macro_f1": ("f1", "macro")},
    )
