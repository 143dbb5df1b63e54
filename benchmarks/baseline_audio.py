"""BASELINE, not launchkit: the plain per-clip audio pipeline, written the way the usual tutorial does it.

This script exists only so `make bench` can measure launchkit's scripts/train_audio.py against the
common recipe on the same data, model, batch size and worker count. It follows the pipeline of the
"PyTorch audio classification on UrbanSound8K" walk-through that launchkit's design notes start from:

- every epoch, every clip is decoded again from its file (soundfile here, because torchaudio.load
  needs torchcodec/FFmpeg on this machine), mixed to mono and resampled on its own;
- MelSpectrogram -> AmplitudeToDB -> FrequencyMasking/TimeMasking run per clip inside the DataLoader
  workers, in float32;
- a torchvision ResNet-18 with a 1-channel stem, wrapped in nn.DataParallel when several GPUs exist,
  trained in float32 by a plain loop (loss.item() every step for the running loss).

Nothing here is made slow on purpose: resamplers are built once per source rate and reused, the
DataLoader uses the same number of workers as the launchkit run, and the model, optimizer, batch
size, clip length and mel settings match launchkit's defaults.

Data: class folders with train/ and val/ subfolders (DIR/train/<label>/*.wav, DIR/val/<label>/*.wav), and
optionally test/, on which the model of the last epoch is scored at the end, as the walk-through does.
Writes OUTPUT_DIR/results.csv (a row per epoch) and OUTPUT_DIR/metrics.json.
"""

import argparse
import csv
import json
import time
from pathlib import Path

import soundfile as sf
import torch
import torchaudio
import torchvision
from torch import nn

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with train/<label>/ and val/<label>/ audio files")
    p.add_argument("--output-dir", type=Path, required=True, help="where results.csv and metrics.json go")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--batch-size", type=int, default=32, help="clips per step")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    p.add_argument("--sample-rate", type=int, default=16000, help="rate every clip is resampled to")
    p.add_argument("--clip-seconds", type=float, default=1.0, help="clips are padded or cut to this length")
    p.add_argument("--n-mels", type=int, default=64, help="mel bands")
    p.add_argument("--n-fft", type=int, default=512, help="FFT size")
    p.add_argument("--win-length", type=int, default=400, help="STFT window (25 ms at 16 kHz)")
    p.add_argument("--hop-length", type=int, default=160, help="STFT hop (10 ms at 16 kHz)")
    p.add_argument("--freq-mask", type=int, default=8, help="SpecAugment: widest frequency mask in mel bands")
    p.add_argument(
        "--time-mask", type=int, default=None, help="SpecAugment: widest time mask in frames (default 1/10 of the frames)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p.parse_args(argv)


def list_clips(split_dir: Path):
    labels = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    items = [
        (f, i)
        for i, label in enumerate(labels)
        for f in sorted((split_dir / label).iterdir())
        if f.suffix.lower() in AUDIO_SUFFIXES
    ]
    return items, labels


class ClipDataset(torch.utils.data.Dataset):
    """Decode, resample and featurise one clip per __getitem__, every time it is asked for."""

    def __init__(self, items, args, train: bool):
        self.items = items
        self.sample_rate = args.sample_rate
        self.length = int(round(args.clip_seconds * args.sample_rate))
        self.resamplers = {}
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=args.sample_rate,
            n_fft=args.n_fft,
            win_length=args.win_length,
            hop_length=args.hop_length,
            n_mels=args.n_mels,
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB()
        time_mask = self.length // args.hop_length // 10 if args.time_mask is None else args.time_mask
        self.augment = (
            nn.Sequential(
                torchaudio.transforms.FrequencyMasking(args.freq_mask),
                torchaudio.transforms.TimeMasking(time_mask),
            )
            if train
            else nn.Identity()
        )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        waveform = torch.from_numpy(data.T).mean(dim=0, keepdim=True)
        if sr != self.sample_rate:
            if sr not in self.resamplers:
                self.resamplers[sr] = torchaudio.transforms.Resample(sr, self.sample_rate)
            waveform = self.resamplers[sr](waveform)
        if waveform.shape[1] < self.length:
            waveform = nn.functional.pad(waveform, (0, self.length - waveform.shape[1]))
        waveform = waveform[:, : self.length]
        features = self.augment(self.to_db(self.mel(waveform)))
        return features, label


def build_model(num_classes: int) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def evaluate(model, loader, device):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for features, labels in loader:
            features, labels = features.to(device), labels.to(device)
            correct += (model(features).argmax(dim=1) == labels).sum().item()
            total += labels.numel()
    return correct / max(total, 1)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    train_items, labels = list_clips(args.data / "train")
    val_items, _ = list_clips(args.data / "val")
    train_dl = torch.utils.data.DataLoader(
        ClipDataset(train_items, args, train=True), batch_size=args.batch_size, shuffle=True, num_workers=args.workers
    )
    val_dl = torch.utils.data.DataLoader(
        ClipDataset(val_items, args, train=False), batch_size=args.batch_size, shuffle=False, num_workers=args.workers
    )

    model = build_model(len(labels))
    if torch.cuda.device_count() > 1:
        model = nn.DataParallel(model)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    criterion = nn.CrossEntropyLoss()

    rows = []
    for epoch in range(args.epochs):
        model.train()
        running_loss, seen = 0.0, 0
        start = time.perf_counter()
        for features, targets in train_dl:
            features, targets = features.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = criterion(model(features), targets)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * targets.size(0)
            seen += targets.size(0)
        seconds = time.perf_counter() - start
        val_accuracy = evaluate(model, val_dl, device)
        rows.append(
            {
                "epoch": epoch,
                "train_loss": running_loss / seen,
                "val_accuracy": val_accuracy,
                "seconds": seconds,
                "train_samples_per_second": seen / seconds,
            }
        )
        print(
            f"epoch {epoch}: loss {running_loss / seen:.4f}  val acc {val_accuracy:.4f}  {seen / seconds:.1f} clips/s", flush=True
        )

    with (args.output_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = {
        "task": "audio-baseline",
        "labels": labels,
        "train_samples_per_second": rows[-1]["train_samples_per_second"],
        "val": {"accuracy": rows[-1]["val_accuracy"]},
    }
    if (args.data / "test").is_dir():
        test_items, _ = list_clips(args.data / "test")
        test_dl = torch.utils.data.DataLoader(
            ClipDataset(test_items, args, train=False), batch_size=args.batch_size, shuffle=False, num_workers=args.workers
        )
        metrics["test"] = {"accuracy": evaluate(model, test_dl, device)}
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
