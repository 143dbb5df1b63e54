#!/usr/bin/env python
"""Train an audio classifier (log-mel + any torchvision network) on a CPU, one GPU or many, with Accelerate.

    python scripts/train_audio.py --data demo_data/audio --output-dir runs/audio --epochs 8
    accelerate launch --config_file accelerate_configs/gpu4_fp16.yaml scripts/train_audio.py \\
        --data /data/UrbanSound8K --fold 1 --output-dir runs/us8k_fold1

Data layouts are detected (see --format). Clips are decoded once with soundfile into an on-disk cache;
mel spectrograms, SpecAugment, mixup and background noise run batched on the device. The run directory
gets args.json, results.csv, metrics.json, model/ (what predict_audio.py loads), checkpoints/, logs/
(TensorBoard), curves.png and confusion_matrix.png."""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

import torch
import torch.nn.functional as F
from audio_data import (
    DEFAULT_CLIP_SECONDS,
    FORMATS,
    CachedClips,
    DataError,
    default_cache_dir,
    load_audio_data,
    load_noise,
    require_usable_splits,
)
from audio_model import TASK, AudioClassifier, frontend_config, pcm_to_float, require_supported_model, save_classifier

from shared.checkpoint import Checkpoints, GracefulStop, RunFolder
from shared.metrics import load_metric
from shared.model_io import load_pretrained
from shared.plots import plot_confusion_matrix, plot_curves
from shared.results import ResultsLog, write_metrics
from shared.runtime import (
    add_common_args,
    files_fingerprint,
    flat_config,
    make_loader,
    print_summary,
    seed_per_process,
    setup_accelerator,
    write_args_json,
    write_json,
)
from shared.schedule import build_scheduler
from shared.training import (
    StepGuard,
    epoch_bar,
    largest_batch_size,
    optimizer_step,
    throughput,
    unwrap_for_saving,
)

# The arguments that fix the sample order and the schedule: a resumed run must have the same ones.
ORDER_AND_SCHEDULE_ARGS = (
    "model",
    "batch_size",
    "nominal_batch_size",
    "epochs",
    "seed",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "schedule",
    "label_smoothing",
    "clip_grad",
    "mixup",
    "class_weights",
    "fold",
    "val_fold",
    "val_fraction",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = parser.add_argument_group("data")
    d.add_argument(
        "--data", required=True, help="dataset folder, a folder written by datasets' save_to_disk, or a Hugging Face dataset id"
    )
    d.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="layout of --data (default: detected). urbansound8k: metadata/UrbanSound8K.csv + audio/fold*/; "
        "esc50: meta/esc50.csv + audio/; speech_commands: <label>/ + validation_list.txt + testing_list.txt "
        "(+ _background_noise_/); folders: <label>/*.wav, optionally under train/ val/ test/; hub: a Hub dataset",
    )
    d.add_argument(
        "--fold",
        type=int,
        default=None,
        help="UrbanSound8K/ESC-50: the official fold used as the test set (default: the first fold)",
    )
    d.add_argument(
        "--val-fold",
        type=int,
        default=None,
        help="UrbanSound8K/ESC-50: the fold used for validation (default: the fold before --fold, wrapping)",
    )
    d.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="folders/Hub data without a validation split: fraction of each class held out for it, with a fixed seed "
        "(plain class folders also hold out the same fraction as test) (default 0.1)",
    )
    d.add_argument("--audio-column", default="audio", help="Hub data: column holding the audio (default audio)")
    d.add_argument("--label-column", default="label", help="Hub data: column holding the class (default label)")
    d.add_argument("--sample-rate", type=int, default=16000, help="clips are resampled to this rate in Hz (default 16000)")
    d.add_argument(
        "--clip-seconds",
        type=float,
        default=None,
        help="clips are cut or zero-padded to this length from their start "
        "(default: 4 for UrbanSound8K, 5 for ESC-50, 1 otherwise)",
    )
    d.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help=f"where decoded waveforms are cached, keyed by file list, rate and length (default {default_cache_dir()})",
    )

    m = parser.add_argument_group("model and features")
    m.add_argument("--model", default="resnet18", help="any torchvision classification model name (default resnet18)")
    m.add_argument(
        "--pretrained",
        action="store_true",
        help="start from ImageNet weights cached in the torch hub folder (stops if none are cached)",
    )
    m.add_argument("--n-mels", type=int, default=64, help="mel bands (default 64)")

    a = parser.add_argument_group("augmentation (all off with --no-augment)")
    a.add_argument(
        "--freq-mask",
        type=int,
        default=None,
        help="SpecAugment: widest frequency mask in mel bands (default n_mels/8; 0 turns it off)",
    )
    a.add_argument(
        "--time-mask",
        type=int,
        default=None,
        help="SpecAugment: widest time mask in frames (default 1/10 of the frames; 0 turns it off)",
    )
    a.add_argument(
        "--mixup",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="mix pairs of clips with a Beta(ALPHA, ALPHA) weight (default 0: off; 0.2-0.4 is typical)",
    )
    a.add_argument(
        "--gain-db", type=float, default=6.0, help="random gain of each clip within +-N dB (default 6; 0 turns it off)"
    )
    a.add_argument(
        "--noise-prob", type=float, default=0.8, help="Speech Commands: chance of mixing in _background_noise_ (default 0.8)"
    )
    a.add_argument(
        "--noise-volume", type=float, default=0.1, help="Speech Commands: largest background-noise amplitude (default 0.1)"
    )

    o = parser.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    o.add_argument(
        "--weight-decay", type=float, default=0.01, help="AdamW weight decay, not applied to biases and norms (default 0.01)"
    )
    o.add_argument("--warmup-epochs", type=float, default=1.0, help="linear LR warmup length in epochs (default 1)")
    o.add_argument(
        "--schedule",
        choices=["cosine", "onecycle"],
        default="cosine",
        help="LR decay after warmup, counted in optimizer steps (default cosine)",
    )
    o.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing (default 0.1)")
    o.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this value (default 0: off)")
    o.add_argument(
        "--class-weights",
        action="store_true",
        help="weight the loss by inverse class frequency (for unbalanced data such as UrbanSound8K)",
    )
    o.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="update the progress bar every N optimizer steps (default 10)",
    )
    add_common_args(parser, epochs=30, batch_size=32, nominal_batch_size=64)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    require_supported_model(args.model)  # before a large data set is decoded
    data = load_audio_data(
        args.data,
        args.format,
        fold=args.fold,
        val_fold=args.val_fold,
        audio_column=args.audio_column,
        label_column=args.label_column,
        val_fraction=args.val_fraction,
    )
    args.clip_seconds = args.clip_seconds or DEFAULT_CLIP_SECONDS[data.format]
    config = {"model": args.model, "labels": data.labels, **frontend_config(args.sample_rate, args.clip_seconds, args.n_mels)}
    num_samples = round(args.clip_seconds * args.sample_rate)
    frames = num_samples // config["hop_length"] + 1
    args.freq_mask = 0 if args.no_augment else args.n_mels // 8 if args.freq_mask is None else args.freq_mask
    args.time_mask = 0 if args.no_augment else frames // 10 if args.time_mask is None else args.time_mask
    if args.batch_size == "auto":
        args.batch_size = largest_batch_size(args, probe_step(args, config, num_samples))
    accelerator = setup_accelerator(args)
    run = RunFolder(accelerator, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    accelerator.init_trackers("audio", config=flat_config(args))

    # ---------------------------------------------------------------- data: decode once, cache, reuse
    # Every process asks for the cache; the first to take its file lock decodes, the others wait on the lock
    # (not on a collective, which would time out while a large data set is decoded).
    clips = {
        name: CachedClips(split, args.sample_rate, num_samples, args.cache_dir, args.workers, name)
        for name, split in data.splits.items()
    }
    noise, noise_skipped = (
        load_noise(data.noise_files, args.sample_rate) if data.noise_files and not args.no_augment else (torch.zeros(0), [])
    )
    write_data_report(accelerator, args, data, clips, noise_skipped)
    require_usable_splits(clips, args.output_dir / "data_report.json")
    require_every_class(args.data, data.labels, clips["train"])
    train_dl, val_dl = (clip_loader(clips[name], args, shuffle=name == "train") for name in ("train", "val"))
    test_dl = clip_loader(clips["test"], args, shuffle=False) if "test" in clips else None

    # ---------------------------------------------------------------- model and optimizer
    model = build_model(args, config)
    model.frontend.fit_normalisation(normalisation_sample(clips["train"]))
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model.backbone.compile()  # in place: parameter names (and so checkpoints and model/) stay the same
    # fused: one kernel for all tensors instead of a Python loop per tensor (about 2x faster steps on CPU and GPU)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, fused=True)
    criterion = torch.nn.CrossEntropyLoss(
        weight=class_weights(clips["train"], len(data.labels)) if args.class_weights else None,
        label_smoothing=args.label_smoothing,
    ).to(accelerator.device)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    test_dl = accelerator.prepare(test_dl) if test_dl is not None else None
    noise = noise.to(accelerator.device)
    seed_per_process(accelerator, args.seed)
    steps_per_epoch = math.ceil(len(train_dl) / args.accumulation_steps)
    scheduler = build_scheduler(
        optimizer,
        total_steps=steps_per_epoch * args.epochs,
        warmup_steps=round(args.warmup_epochs * steps_per_epoch),
        shape=args.schedule,
    )

    # Anything here that differs on --resume would skip the wrong samples or jump the schedule.
    fingerprint = {
        "task": TASK,
        "labels": data.labels,
        "processes": accelerator.num_processes,
        "files": files_fingerprint({name: split.names for name, split in data.splits.items()}),
        **{k: config[k] for k in ("sample_rate", "clip_seconds", "n_mels")},
        **{k: getattr(args, k) for k in ORDER_AND_SCHEDULE_ARGS},
    }
    checkpoints = Checkpoints(
        accelerator,
        run,
        keep=args.keep_checkpoints,
        fingerprint=fingerprint,
        modules={"model": model},
        states={"optimizer": optimizer, "scheduler": scheduler},
    )
    progress = checkpoints.resume(args.resume) or {
        "epoch": 0,
        "batch_in_epoch": 0,
        "step": 0,
        "loss_sum": 0.0,
        "seen": 0,
        "best": None,
    }
    results = ResultsLog(accelerator, args.output_dir)
    results.keep_epochs_before(progress["epoch"])
    write_args_json(args, accelerator, format=data.format, labels=data.labels, data_notes=data.notes)
    print_summary(
        accelerator,
        "audio classification",
        {
            "data": f"{args.data} ({data.format}); " + "; ".join(data.notes),
            "clips": ", ".join(f"{name} {len(c)}" for name, c in clips.items())
            + f" (skipped {sum(len(c.skipped) for c in clips.values())})",
            "classes": f"{len(data.labels)}: {', '.join(data.labels[:12])}{' ...' if len(data.labels) > 12 else ''}",
            "features": f"{args.sample_rate} Hz, {args.clip_seconds} s, {args.n_mels} mels x {frames} frames",
            "model": f"{args.model}{' (ImageNet init)' if args.pretrained else ''}, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters",
            "processes": f"{accelerator.num_processes} on {accelerator.device} (mixed precision: {accelerator.mixed_precision})",
            "batch": f"{args.batch_size} per device x {accelerator.num_processes} processes x {args.accumulation_steps} "
            f"accumulation steps = {args.effective_batch_size} per optimizer step",
            "optimizer steps": f"{steps_per_epoch} per epoch, {steps_per_epoch * args.epochs} in total",
        },
    )

    # ---------------------------------------------------------------- training loop
    guard = StepGuard(accelerator, GracefulStop())
    model_dir = args.output_dir / "model"
    step, best = progress["step"], progress["best"]
    for epoch in range(progress["epoch"], args.epochs):
        resumed_here = epoch == progress["epoch"] and progress["batch_in_epoch"] > 0
        skip = progress["batch_in_epoch"] if resumed_here else 0
        model.train()
        train_dl.set_epoch(epoch)  # seeded by (seed, epoch): the same order for any process count and after a resume
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        # Running sums stay on the device (no host sync per step); a resumed epoch starts from the saved totals.
        carried = accelerator.is_main_process and resumed_here
        loss_sum = torch.tensor(progress["loss_sum"] if carried else 0.0, dtype=torch.float64, device=accelerator.device)
        seen = torch.tensor(progress["seen"] if carried else 0, dtype=torch.float64, device=accelerator.device)
        start, batch_in_epoch = time.perf_counter(), skip
        bar = epoch_bar(accelerator, epoch=epoch, epochs=args.epochs, total=len(train_dl), done=skip)
        for waves, targets in loader:
            with accelerator.accumulate(model):
                waves = augment_waveforms(pcm_to_float(waves), noise, args)
                with accelerator.autocast():
                    loss = mixup_loss(model, criterion, waves, targets, args.mixup)
                accelerator.backward(loss)
                guard.add(loss)
                stopping = accelerator.sync_gradients and guard.stop_agreed(epoch=epoch, step=step + 1)
                stepped = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=args.clip_grad)
            loss_sum += loss.detach().double() * len(targets)
            seen += len(targets)
            batch_in_epoch += 1
            bar.update(1)
            if not stepped:
                continue
            step += 1
            checkpoint_due = bool(args.checkpoint_steps) and step % args.checkpoint_steps == 0
            if step % args.log_every == 0:
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    clips_per_s=f"{seen.item() * accelerator.num_processes / (time.perf_counter() - start):.0f}",
                    lr=f"{scheduler.get_last_lr()[0]:.2e}",
                )
            if checkpoint_due or stopping:
                save_checkpoint(accelerator, checkpoints, epoch, batch_in_epoch, step, loss_sum, seen, best)
            if stopping:
                bar.close()
                accelerator.print(
                    f"stopped at epoch {epoch + 1}, optimizer step {step}; checkpoint saved. "
                    "Continue with the same command plus --resume."
                )
                accelerator.end_training()
                return
        bar.close()
        seconds = time.perf_counter() - start
        train_loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(seen, "sum")).item()
        train_clips = len(clips["train"]) * (len(train_dl) - skip) / len(train_dl)

        # ------------------------------------------------------------ evaluation on the validation split
        val = evaluate(model, val_dl, accelerator, data.labels)
        results.add(
            {
                "epoch": epoch,
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "train_loss": train_loss,
                "val_loss": val["loss"],
                "val_accuracy": val["accuracy"],
                "val_macro_f1": val["macro_f1"],
                "seconds": seconds,
                "train_samples_per_second": throughput(train_clips, seconds),
            },
            step=step,
        )
        accelerator.print(
            f"epoch {epoch + 1}: train loss {train_loss:.4f}, val loss {val['loss']:.4f}, "
            f"val accuracy {val['accuracy']:.4f}, val macro-F1 {val['macro_f1']:.4f}, "
            f"{throughput(train_clips, seconds):.0f} clips/s"
        )
        if best is None or val["accuracy"] > best["val"]["accuracy"]:
            best = {"epoch": epoch, "val": {k: val[k] for k in ("accuracy", "macro_f1", "per_class", "confusion_matrix")}}
            if accelerator.is_main_process:
                save_classifier(model_dir, unwrap_for_saving(accelerator, model), config)
        accelerator.wait_for_everyone()
        save_checkpoint(accelerator, checkpoints, epoch + 1, 0, step, torch.zeros(()), torch.zeros(()), best)
        if guard.stop_agreed(epoch=epoch, step=step):
            accelerator.print(f"stopped after epoch {epoch + 1}; checkpoint saved. Continue with the same command plus --resume.")
            accelerator.end_training()
            return

    # ---------------------------------------------------------------- test with the best model, artifacts
    if best is None:
        raise SystemExit("no epoch was trained (--epochs 0?), so there is no model to test")
    state, _ = load_pretrained(model_dir)
    accelerator.unwrap_model(model).load_state_dict(state)
    summary = {
        "task": TASK,
        "best_epoch": best["epoch"],
        "labels": data.labels,
        "train_samples_per_second": mean_throughput(results),
        "val": best["val"],
    }
    if test_dl is not None:
        test = evaluate(model, test_dl, accelerator, data.labels)
        summary["test"] = {k: test[k] for k in ("accuracy", "macro_f1", "per_class", "confusion_matrix")}
    write_metrics(accelerator, args.output_dir, summary)
    if accelerator.is_main_process:
        plot_curves(results.path, args.output_dir / "curves.png")
        shown = "test" if "test" in summary else "val"
        plot_confusion_matrix(
            summary[shown]["confusion_matrix"],
            data.labels,
            args.output_dir / "confusion_matrix.png",
            title=f"{shown} confusion matrix (best epoch {best['epoch']})",
        )
    accelerator.print(
        f"best epoch {best['epoch'] + 1}: val accuracy {best['val']['accuracy']:.4f}"
        + (
            f", test accuracy {summary['test']['accuracy']:.4f}, test macro-F1 {summary['test']['macro_f1']:.4f}"
            if "test" in summary
            else ""
        )
        + f"; model in {model_dir}"
    )
    accelerator.end_training()


# ==================================================================== the model: replace this to change it
def build_model(args, config: dict) -> AudioClassifier:
    """Log-mel frontend (with SpecAugment) + a torchvision classifier named by --model, 1-channel stem."""
    model = AudioClassifier(config, pretrained=args.pretrained, freq_mask=args.freq_mask, time_mask=args.time_mask)
    return model.to(memory_format=torch.channels_last)  # faster convolutions on GPUs and on CPUs with oneDNN


def parameter_groups(model, weight_decay: float):
    """No weight decay on biases and normalisation weights (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def probe_step(args, config: dict, num_samples: int):
    """One training step on random clips, for --batch-size auto."""

    def step(batch_size, device, dtype):
        model = build_model(args, config).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(torch.randn(batch_size, num_samples, device=device)).float().logsumexp(1).mean()
        loss.backward()

    return step


def clip_loader(clips: CachedClips, args, shuffle: bool):
    # Own generators: starting an epoch must not draw from the global RNG that augmentation uses, or a
    # run resumed mid-epoch would augment differently from an uninterrupted one.
    return make_loader(
        clips,
        batch_size=args.batch_size,
        shuffle=shuffle,
        workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed),
    )


def normalisation_sample(train: CachedClips, count: int = 256) -> torch.Tensor:
    """Evenly spaced training clips for the log-mel mean/std: the same on every process, no randomness used."""
    picks = torch.linspace(0, len(train) - 1, min(count, len(train))).long().unique()
    return torch.stack([train[int(i)][0] for i in picks])


def class_weights(train: CachedClips, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(torch.from_numpy(train.targets), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp_min(1))


def augment_waveforms(waves: torch.Tensor, noise: torch.Tensor, args) -> torch.Tensor:
    """Random gain and background noise, batched on the device (SpecAugment runs in the model's frontend)."""
    if args.no_augment:
        return waves
    batch, length = waves.shape
    if args.gain_db:
        waves = waves * 10 ** ((torch.rand(batch, 1, device=waves.device) * 2 - 1) * args.gain_db / 20)
    if noise.numel() and args.noise_prob:
        if noise.numel() <= length:
            noise = noise.repeat(length // noise.numel() + 2)
        starts = torch.randint(0, noise.numel() - length, (batch, 1), device=waves.device)
        segments = noise[starts + torch.arange(length, device=waves.device)]
        volume = (
            torch.rand(batch, 1, device=waves.device)
            * args.noise_volume
            * (torch.rand(batch, 1, device=waves.device) < args.noise_prob)
        )
        waves = waves + volume * segments
    return waves


def mixup_loss(model, criterion, waves, targets, alpha: float) -> torch.Tensor:
    """Cross-entropy, or with --mixup the loss of a Beta-weighted blend of each clip with another one."""
    if not alpha or not model.training:
        return criterion(model(waves), targets)
    lam = torch.distributions.Beta(torch.tensor(alpha, device=waves.device), torch.tensor(alpha, device=waves.device)).sample()
    perm = torch.randperm(len(waves), device=waves.device)
    logits = model(lam * waves + (1 - lam) * waves[perm])
    return lam * criterion(logits, targets) + (1 - lam) * criterion(logits, targets[perm])


def save_checkpoint(accelerator, checkpoints, epoch, batch_in_epoch, step, loss_sum, seen, best):
    """Everything the loop needs to continue exactly: position, the epoch's running loss, the best so far."""
    checkpoints.save(
        {
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "step": step,
            "loss_sum": accelerator.reduce(loss_sum.to(accelerator.device), "sum").item(),
            "seen": int(accelerator.reduce(seen.to(accelerator.device), "sum").item()),
            "best": best,
        }
    )


@torch.no_grad()
def evaluate(model, loader, accelerator, labels: list[str]) -> dict:
    """Each process predicts its shard; gather_for_metrics drops the padding DDP adds, so each clip counts once.
    Every process computes the (identical) metrics, so all agree on which epoch is best without a broadcast."""
    model.eval()
    preds, refs, losses = [], [], []
    for waves, targets in loader:
        with accelerator.autocast():
            logits = model(waves)
        loss = F.cross_entropy(logits.float(), targets, reduction="none")
        pred, ref, loss = accelerator.gather_for_metrics((logits.argmax(dim=1), targets, loss))
        preds.append(pred)
        refs.append(ref)
        losses.append(loss)
    metric = load_metric("classification")
    result = metric.compute(predictions=torch.cat(preds).tolist(), references=torch.cat(refs).tolist(), labels=labels)
    result["loss"] = torch.cat(losses).mean().item()
    return result


def write_data_report(accelerator, args, data, clips, noise_skipped):
    """OUTPUT_DIR/data_report.json: what was used, and every clip skipped with the reason."""
    skipped = [{"split": name, **s} for name, c in clips.items() for s in c.skipped] + [
        {"split": "background_noise", **s} for s in noise_skipped
    ]
    if accelerator.is_main_process:
        write_json(
            args.output_dir / "data_report.json",
            {
                "data": str(args.data),
                "format": data.format,
                "notes": data.notes,
                "labels": data.labels,
                "clips": {name: len(c) for name, c in clips.items()},
                "skipped_count": len(skipped),
                "skipped": skipped,
                "cache_dir": str(args.cache_dir),
            },
        )
    if skipped:
        accelerator.print(
            f"warning: skipped {len(skipped)} unreadable or empty clip(s), first {skipped[0]['path']} "
            f"({skipped[0]['reason']}); all listed in {args.output_dir / 'data_report.json'}"
        )


def require_every_class(root: str, labels: list[str], train: CachedClips):
    counts = torch.bincount(torch.from_numpy(train.targets), minlength=len(labels))
    empty = [labels[i] for i in range(len(labels)) if counts[i] == 0]
    if empty:
        raise DataError(
            f"{root}: class(es) {empty} have no usable training clips; add clips or remove the class "
            "(data_report.json lists skipped files)"
        )


def mean_throughput(results: ResultsLog) -> float:
    rows = results.rows()
    return sum(float(r["train_samples_per_second"]) for r in rows) / len(rows) if rows else 0.0


if __name__ == "__main__":
    main()
