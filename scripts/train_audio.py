#!/usr/bin/env python
"""Train an audio classifier (log-mel + any torchvision network) on a CPU, one GPU or many, with Accelerate.

    python scripts/train_audio.py --data demo_data/audio --output-dir runs/audio --epochs 8
    accelerate launch --config_file accelerate_configs/gpu4_fp16.yaml scripts/train_audio.py \\
        --data /data/UrbanSound8K --fold 1 --output-dir runs/us8k_fold1
    python scripts/train_audio.py --data /data/ESC-50 --fold all --output-dir runs/esc50_cv      # 5-fold cross-validation
    python scripts/train_audio.py --data /data/speech_commands_v0.02 --output-dir runs/kws12 \\
        --wanted-words yes,no,up,down,left,right,on,off,stop,go                                 # the 12-class task

Data layouts are detected (see --format). Clips are decoded once with soundfile into an on-disk cache;
random crops of longer clips, time shift, gain, background noise, mel spectrograms, SpecAugment and mixup run
batched on the device. The run directory gets run.json, args.json, data_report.json, results.csv, metrics.json,
model/ (what predict_audio.py loads, with a model card), checkpoints/, logs/ (TensorBoard), curves.png and
confusion_matrix.png. --eval-only --weights RUN/model scores a saved model on new labelled data; --weights alone
fine-tunes from it.

--fold all (UrbanSound8K, ESC-50) trains every official fold in turn as the test fold, each a complete run in
OUTPUT_DIR/fold_K/, then writes OUTPUT_DIR/cv_metrics.json (per-fold test accuracy and macro-F1, their mean and
sample std); with --resume, finished folds are kept and an interrupted one continues. One job per fold instead:
accelerate_configs/slurm_folds_array.sbatch, then scripts/gather_folds.py OUTPUT_DIR writes the same file.
--wanted-words (Speech Commands) keeps those words as classes and adds _unknown_ (the other words) and _silence_
(windows of _background_noise_), --unknown-percentage and --silence-percentage of the wanted clips per split.

To reuse this script in another project, copy these files, keeping their folders:
    scripts/train_audio.py scripts/audio_data.py scripts/audio_model.py scripts/gather_folds.py
    shared/__init__.py shared/cache.py shared/checkpoint.py shared/model_io.py shared/plots.py shared/preemption.py
    shared/results.py shared/runtime.py shared/schedule.py shared/training.py
    scripts/metrics/classification/classification.py
"""

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory
from shared.preemption import end_with_the_launcher

end_with_the_launcher()  # first: a SIGTERM during the imports, data scan and decoding below ends the run too

import numpy as np
import torch
import torch.nn.functional as F
from audio_data import (
    DEFAULT_CLIP_SECONDS,
    FORMATS,
    CachedClips,
    DataError,
    KeywordTask,
    default_cache_dir,
    load_audio_data,
    load_noise,
    official_folds,
    require_usable_splits,
)
from audio_model import (
    TASK,
    build_model,
    head_parameters,
    model_config,
    pcm_to_float,
    require_supported_model,
    save_model,
    use_tiny_map_convs,
)
from evaluate import load as load_metric
from gather_folds import CV_FILE, describe, fold_problem, write_cv_metrics

from shared.checkpoint import Checkpoints, GracefulStop, RunFolder, refuse_other_checkpoint
from shared.model_io import label_index, load_pretrained, load_weights, start_from, write_model_card
from shared.plots import plot_curves
from shared.results import ResultsLog
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
from shared.training import RunState, TrainingLoop, optimizer_step, parameter_groups

METRIC = Path(__file__).resolve().parent / "metrics" / "classification"  # an evaluate module, loaded by path
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "per_class", "confusion_matrix")
ALL_FOLDS = "all"
# Training clips keep up to TRAIN_SPAN x --clip-seconds of their audio in the cache, for random crops: enough
# places to vary a clip's window, while the training cache stays at most this many times the clip length per clip.
TRAIN_SPAN = 3

# The arguments that fix what is trained, in which order and by which recipe: a resumed run must have the same ones.
RECIPE_ARGS = (
    "model", "nominal_batch_size", "epochs", "seed", "lr", "weight_decay", "warmup_epochs", "schedule", "label_smoothing",
    "clip_grad", "mixup", "class_weights", "fold", "val_fold", "val_fraction", "no_augment", "freq_mask", "time_mask",
    "time_shift", "speed", "gain_db", "noise_prob", "noise_volume", "sync_bn",
)  # fmt: skip


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
        type=fold_choice,
        default=None,
        help="UrbanSound8K/ESC-50: the official fold used as the test set (default: the first fold); 'all' trains "
        "every fold in turn into OUTPUT_DIR/fold_K/ and writes OUTPUT_DIR/cv_metrics.json (cross-validation)",
    )
    d.add_argument(
        "--val-fold",
        type=int,
        default=None,
        help="UrbanSound8K/ESC-50: the fold used for validation (default: the fold before --fold, wrapping)",
    )
    d.add_argument(
        "--wanted-words",
        type=word_list,
        default=None,
        metavar="W1,W2,...",
        help="Speech Commands: classify these words plus _unknown_ (every other word) and _silence_ (windows of "
        "_background_noise_), e.g. yes,no,up,down,left,right,on,off,stop,go for the 12-class task "
        "(default: every word folder is a class)",
    )
    d.add_argument(
        "--unknown-percentage",
        type=float,
        default=10.0,
        help="with --wanted-words: _unknown_ clips per split, in percent of its wanted-word clips, drawn with a fixed "
        "seed (default 10; 0 drops the class)",
    )
    d.add_argument(
        "--silence-percentage",
        type=float,
        default=10.0,
        help="with --wanted-words: _silence_ clips per split (clip-long windows of the noise files at fixed-seed "
        "places), in percent of its wanted-word clips (default 10; 0 drops the class)",
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
        help="clips are cut or zero-padded to this length (default: 4 for UrbanSound8K, 5 for ESC-50, 1 otherwise). "
        f"Validation, test and predict take each clip's start; training takes a random window of the first "
        f"{TRAIN_SPAN} x this length of longer clips (a new place every epoch)",
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
    m.add_argument(
        "--no-tiny-map-convs",
        action="store_true",
        help="on a CPU, keep oneDNN's kernel for convolutions over tiny maps too (the GEMM path is faster for 1 s clips)",
    )

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
        "--time-shift",
        type=float,
        default=0.1,
        metavar="FRACTION",
        help="shift each training clip by a random amount up to +-FRACTION of --clip-seconds, filling the gap with "
        "silence (nothing wraps around) (default 0.1; 0 turns it off)",
    )
    a.add_argument(
        "--speed",
        type=float,
        default=0.1,
        metavar="FRACTION",
        help="play each training clip at a random speed within 1 +-FRACTION, pitch and tempo together (Kaldi's speed "
        "perturbation, a stand-in for other voices; on unseen speakers it raised test accuracy from 0.755 to 0.843) "
        "(default 0.1; 0 turns it off)",
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
    add_common_args(parser, epochs=30, batch_size=32, nominal_batch_size=64)
    args = parser.parse_args(argv)
    if not 0 <= args.time_shift < 1:
        parser.error(f"--time-shift {args.time_shift}: a fraction of the clip, at least 0 and below 1 (e.g. 0.1)")
    if not 0 <= args.speed < 1:
        parser.error(f"--speed {args.speed}: a fraction, at least 0 and below 1 (e.g. 0.1)")
    return args


def fold_choice(value: str):
    if value == ALL_FOLDS:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a fold number or '{ALL_FOLDS}'") from None


def word_list(value: str) -> list[str]:
    words = [w.strip() for w in value.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError(f"{value!r}: name the words to classify, comma-separated (e.g. yes,no)")
    return words


def main(argv=None):
    args = parse_args(argv)
    if args.fold == ALL_FOLDS:
        train_every_fold(args)
    else:
        train_one_run(args)


def train_one_run(args, more_runs_follow: bool = False, stop: GracefulStop | None = None) -> bool:
    """One run in args.output_dir: train and test, or with --eval-only score a model. False when it was stopped
    (preempted) before the end; the same command plus --resume continues it. more_runs_follow keeps the process
    group of a DDP launch for the next run in this process (the folds of --fold all), which share one stop."""
    data, config, weights = read_data_and_model_config(args)
    accelerator, plan = setup_accelerator(args, probe_step(args, config))
    run = RunFolder(accelerator, args.output_dir, resume=args.resume, overwrite=args.overwrite, data=args.data)
    fingerprint = run_fingerprint(accelerator, args, plan, data, config)
    refuse_other_checkpoint(run, args.resume, fingerprint)  # before anything is decoded or written
    accelerator.init_trackers(TASK, config=flat_config(args))
    clips, noise = decode_clips(accelerator, args, data, config)
    if args.eval_only:
        evaluate_saved_model(accelerator, args, plan, data, clips, config, weights)
        return True

    model, optimizer, scheduler, criterion, loaders, start_note = build_training(accelerator, args, plan, clips, config, weights)
    checkpoints = Checkpoints(
        accelerator,
        run,
        keep=args.keep_checkpoints,
        fingerprint=fingerprint,
        modules={"model": model},
        states={"optimizer": optimizer, "scheduler": scheduler},
    )
    state = RunState(**(checkpoints.resume(args.resume) or {}))
    results = ResultsLog(accelerator, args.output_dir)
    results.keep_epochs_before(state.epoch)
    write_args_json(args, accelerator, plan, format=data.format, labels=config["labels"], data_notes=data.notes)
    print_start(accelerator, args, plan, data, clips, config, model, loaders["train"], start_note)

    loop = TrainingLoop(accelerator, checkpoints, state, epochs=args.epochs, checkpoint_steps=args.checkpoint_steps, stop=stop)
    train(accelerator, args, loop, model, optimizer, scheduler, criterion, loaders, noise, results, config)
    if not loop.stopped:
        finish(accelerator, args, loop.state, model, loaders, results, data, config)
    if more_runs_follow:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()
    return not loop.stopped


# ==================================================================== phases of main()
def train_every_fold(args):
    """--fold all: each official fold in turn is the test fold (validation: the fold before it), each trained as
    `--fold K --output-dir OUTPUT_DIR/fold_K` would be; then OUTPUT_DIR/cv_metrics.json. With --resume a finished
    fold is kept and an interrupted one continues; the loop stops where a fold was stopped (preempted)."""
    refuse_with_all_folds(args)
    folds = official_folds(args.data, args.format)
    # Every process reads the same finished folds and agrees on stops, so all skip and stop alike; the launchers
    # set RANK, and no collective is needed to know the main process before the first fold's Accelerator exists.
    main_process = os.environ.get("RANK", "0") == "0"
    if args.overwrite and main_process:
        (args.output_dir / CV_FILE).unlink(missing_ok=True)
    # A SIGTERM while one fold is tested stops the next fold at its first step, with a checkpoint to resume from.
    stop, stopped = GracefulStop(), False
    for number, fold in enumerate(folds, start=1):
        fold_args = argparse.Namespace(**{**vars(args), "fold": fold, "output_dir": args.output_dir / f"fold_{fold}"})
        if args.resume and not args.overwrite and fold_problem(fold_args.output_dir) is None:
            if main_process:
                print(f"fold {fold}: finished earlier, kept ({fold_args.output_dir / 'metrics.json'})")
            continue
        if main_process:
            print(f"fold {fold} ({number} of {len(folds)}) as the test fold, into {fold_args.output_dir}")
        stopped = not train_one_run(fold_args, more_runs_follow=True, stop=stop)
        if stopped:
            break
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # end_training's last step, which the folds skipped
    if main_process and not stopped:
        print(describe(write_cv_metrics(args.output_dir, folds), args.output_dir / CV_FILE))


def refuse_with_all_folds(args):
    if args.val_fold is not None:
        raise SystemExit("--val-fold with --fold all: each fold's validation is the fold before it; drop --val-fold")
    if args.eval_only:
        raise SystemExit("--fold all trains a model per fold; to score one model, use --eval-only with --fold K")
    if args.resume not in (None, "latest"):
        raise SystemExit(
            f"--resume {args.resume} with --fold all: each fold resumes from its own newest checkpoint; use plain --resume"
        )


def read_data_and_model_config(args):
    """The data's splits and the config of the model to build: new, or read from --weights."""
    require_supported_model(args.model)  # before a large data set is decoded
    weights = load_weights(args.weights, need_config=args.eval_only) if args.weights else None
    data = load_audio_data(
        args.data,
        args.format,
        fold=args.fold,
        val_fold=args.val_fold,
        audio_column=args.audio_column,
        label_column=args.label_column,
        val_fraction=args.val_fraction,
        keywords=keyword_task(args),
        clip_seconds=weights[1]["clip_seconds"] if args.eval_only and weights else args.clip_seconds,
    )
    if args.eval_only:
        if weights is None:
            raise SystemExit("--eval-only needs --weights RUN/model: the model to evaluate")
        config = weights[1]
        relabel(data, config["labels"], args.data)
    else:
        args.clip_seconds = args.clip_seconds or DEFAULT_CLIP_SECONDS[data.format]
        model = weights[1].get("model", args.model) if weights else args.model
        config = model_config(model, data.labels, args.sample_rate, args.clip_seconds, args.n_mels)
    frames = round(config["clip_seconds"] * config["sample_rate"]) // config["hop_length"] + 1
    args.freq_mask = 0 if args.no_augment else args.n_mels // 8 if args.freq_mask is None else args.freq_mask
    args.time_mask = 0 if args.no_augment else frames // 10 if args.time_mask is None else args.time_mask
    return data, config, weights


def keyword_task(args) -> KeywordTask | None:
    if not args.wanted_words:
        return None
    return KeywordTask(tuple(args.wanted_words), args.unknown_percentage, args.silence_percentage)


def decode_clips(accelerator, args, data, config):
    """Decode once, cache, reuse. Every process asks for the cache; the first to take its file lock decodes,
    the others wait on the lock (not on a collective, which would time out while a large data set decodes).
    The training split keeps up to TRAIN_SPAN clip lengths of each clip, for random crops."""
    rate, num_samples = config["sample_rate"], clip_samples(config)
    splits = {name: split for name, split in data.splits.items() if not (args.eval_only and name == "train")}
    spans = {name: num_samples * (TRAIN_SPAN if name == "train" and not args.no_augment else 1) for name in splits}
    clips = {
        name: CachedClips(split, rate, num_samples, args.cache_dir, args.workers, name, span=spans[name])
        for name, split in splits.items()
    }
    use_noise = data.noise_files and not args.no_augment and not args.eval_only
    noise, noise_skipped = load_noise(data.noise_files, rate) if use_noise else (torch.zeros(0), [])
    write_data_report(accelerator, args, data, clips, noise_skipped)
    require_usable_splits(clips, args.output_dir / "data_report.json")
    if not args.eval_only:
        require_every_class(args.data, data.labels, clips["train"])
    return clips, noise.to(accelerator.device)


def build_training(accelerator, args, plan, clips, config, weights):
    """Model (from --weights when given), optimizer, schedule and loss, all prepared by Accelerate."""
    model = build_model(config, pretrained=args.pretrained, freq_mask=args.freq_mask, time_mask=args.time_mask)
    initial = "ImageNet init" if args.pretrained else "from scratch"
    start_note = start_from(model, weights, config["labels"], head_parameters(model), initial)
    model.frontend.fit_normalisation(normalisation_sample(clips["train"]))
    if accelerator.device.type == "cpu" and not args.no_tiny_map_convs:
        use_tiny_map_convs(model)
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model.backbone.compile()  # in place: parameter names (and so checkpoints and model/) stay the same
    # fused: one kernel for all tensors instead of a Python loop per tensor (about 2x faster steps on CPU and GPU)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, fused=True)
    criterion = torch.nn.CrossEntropyLoss(
        weight=class_weights(clips["train"], len(config["labels"])) if args.class_weights else None,
        label_smoothing=args.label_smoothing,
    ).to(accelerator.device)
    loaders = {name: clip_loader(c, args, plan, shuffle=name == "train") for name, c in clips.items()}
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared, strict=True))
    seed_per_process(accelerator, args.seed)
    steps_per_epoch = math.ceil(len(loaders["train"]) / plan.accumulation_steps)
    scheduler = build_scheduler(
        optimizer,
        total_steps=steps_per_epoch * args.epochs,
        warmup_steps=round(args.warmup_epochs * steps_per_epoch),
        shape=args.schedule,
    )
    return model, optimizer, scheduler, criterion, loaders, start_note


def run_fingerprint(accelerator, args, plan, data, config) -> dict:
    """Anything here that differs on --resume would train on other data, in another order or by another recipe."""
    return {
        "task": TASK,
        "labels": config["labels"],
        "processes": plan.processes,
        "batch_size": plan.batch_size,  # what --batch-size auto found
        "mixed_precision": accelerator.mixed_precision,
        **files_fingerprint({**{n: clip_items(s) for n, s in data.splits.items()}, "noise": list(map(Path, data.noise_files))}),
        "protocol": data.protocol,
        **{k: config[k] for k in ("sample_rate", "clip_seconds", "n_mels")},
        **{k: getattr(args, k) for k in RECIPE_ARGS},
    }


def clip_items(split) -> list[tuple]:
    """Each clip as files_fingerprint takes it: its file (by content) and window, or its row of a Hub dataset (by the
    dataset's fingerprint), and its class."""
    if hasattr(split.sources, "fingerprint"):  # a Hub dataset's HubAudio
        return [(split.sources.fingerprint(), i, t) for i, t in enumerate(split.targets.tolist())]
    where = [(Path(s),) if isinstance(s, str) else (Path(s.path), s.start, s.frames) for s in split.sources]
    return [(*w, t) for w, t in zip(where, split.targets.tolist(), strict=True)]


def print_start(accelerator, args, plan, data, clips, config, model, train_dl, start_note):
    labels, steps = config["labels"], math.ceil(len(train_dl) / plan.accumulation_steps)
    mels = f"{config['n_mels']} mels x {round(config['clip_seconds'] * config['sample_rate']) // config['hop_length'] + 1} frames"
    print_summary(
        accelerator,
        "audio classification",
        {
            "data": f"{args.data} ({data.format}); " + "; ".join(data.notes),
            "clips": ", ".join(f"{name} {len(c)}" for name, c in clips.items())
            + f" (skipped {sum(len(c.skipped) for c in clips.values())})",
            "classes": f"{len(labels)}: {', '.join(labels[:12])}{' ...' if len(labels) > 12 else ''}",
            "features": f"{config['sample_rate']} Hz, {config['clip_seconds']} s, {mels}",
            "model": f"{config['model']} ({start_note}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters",
            "processes": f"{accelerator.num_processes} on {accelerator.device} (mixed precision: {accelerator.mixed_precision})",
            "batch": plan.describe(),
            "optimizer steps": f"{steps} per epoch, {steps * args.epochs} in total",
        },
    )


def train(accelerator, args, loop, model, optimizer, scheduler, criterion, loaders, noise, results, config):
    model_dir, num_samples = args.output_dir / "model", clip_samples(config)
    for epoch in loop.epochs():
        model.train()
        for waves, targets, lengths in loop.batches(loaders["train"]):
            with accelerator.accumulate(model):
                waves = augment_waveforms(pcm_to_float(waves), lengths, num_samples, noise, args)
                with accelerator.autocast():
                    loss = mixup_loss(model, criterion, waves, targets, args.mixup)
                accelerator.backward(loss)
                loop.after_backward({"loss": loss}, len(targets))
                optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=args.clip_grad)
        if loop.stopped:
            return
        train_row = loop.epoch_summary()

        val = evaluate(model, loaders["val"], accelerator, config["labels"])
        # Accuracy saturates on small validation sets: a tie goes to the epoch with the lower validation loss.
        fitness = [val["accuracy"], -val["loss"]]
        if loop.end_epoch(fitness, {k: val[k] for k in CLASSIFICATION_METRICS}) and accelerator.is_main_process:
            save_model(model_dir, accelerator.unwrap_model(model, keep_torch_compile=False), config)
        accelerator.wait_for_everyone()
        results.add(
            {
                "epoch": epoch,
                "step": loop.state.step,
                "lr": scheduler.get_last_lr()[0],
                **train_row,
                **{f"val_{k}": val[k] for k in ("loss", "accuracy", "macro_f1")},
            },
            step=loop.state.step,
        )
        accelerator.print(
            f"epoch {epoch + 1}: train loss {train_row['train_loss']:.4f}, val loss {val['loss']:.4f}, "
            f"val accuracy {val['accuracy']:.4f}, val macro-F1 {val['macro_f1']:.4f}, "
            f"{train_row['train_samples_per_second']:.0f} clips/s"
        )
        loop.next_epoch()


def finish(accelerator, args, state, model, loaders, results, data, config):
    """Test the best model, write metrics.json, the plots and the model card."""
    if state.best_epoch is None:
        raise SystemExit("no epoch was trained (--epochs 0?), so there is no model to test")
    model_dir = args.output_dir / "model"
    accelerator.unwrap_model(model).load_state_dict(load_pretrained(model_dir)[0])
    summary = {
        "task": TASK,
        "best_epoch": state.best_epoch,
        "labels": config["labels"],
        "train_samples_per_second": results.mean("train_samples_per_second"),
        "val": state.best_val,
    }
    if "test" in loaders:
        test = evaluate(model, loaders["test"], accelerator, config["labels"])
        summary["test"] = {k: test[k] for k in CLASSIFICATION_METRICS}
    if accelerator.is_main_process:
        write_json(args.output_dir / "metrics.json", summary)
        plot_curves(results.path, args.output_dir / "curves.png")
        write_card(args, model_dir, data, config, summary)
    write_pictures(accelerator, args, summary, config["labels"], f"best epoch {state.best_epoch}")
    test_part = f", test accuracy {summary['test']['accuracy']:.4f}, test macro-F1 {summary['test']['macro_f1']:.4f}"
    accelerator.print(
        f"best epoch {state.best_epoch + 1}: val accuracy {state.best_val['accuracy']:.4f}"
        + (test_part if "test" in summary else "")
        + f"; model in {model_dir}"
    )


def evaluate_saved_model(accelerator, args, plan, data, clips, config, weights):
    """--eval-only: score the --weights model on every split but train (exactly once per clip under DDP)."""
    model = build_model(config)
    model.load_state_dict(weights[0])
    if accelerator.device.type == "cpu" and not args.no_tiny_map_convs:
        use_tiny_map_convs(model)
    loaders = {name: clip_loader(c, args, plan, shuffle=False) for name, c in clips.items() if name != "train"}
    model, *prepared = accelerator.prepare(model, *loaders.values())
    summary = {"task": TASK, "weights": str(args.weights), "labels": config["labels"]}
    for name, loader in zip(loaders, prepared, strict=True):
        metrics = evaluate(model, loader, accelerator, config["labels"])
        summary[name] = {k: metrics[k] for k in CLASSIFICATION_METRICS}
        accelerator.print(
            f"{name}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} on {len(clips[name])} clips"
        )
    write_args_json(args, accelerator, plan, format=data.format, labels=config["labels"], data_notes=data.notes)
    if accelerator.is_main_process:
        write_json(args.output_dir / "metrics.json", summary)
    write_pictures(accelerator, args, summary, config["labels"], f"model {args.weights}")
    accelerator.end_training()


# ==================================================================== training helpers
def relabel(data, labels: list[str], root):
    """Express every split's targets as indices into the model's labels."""
    index = label_index(data.labels, labels, root)
    for split in data.splits.values():
        split.targets = index[split.targets]
    data.labels = labels


def probe_step(args, config: dict):
    """One training step on random clips, for --batch-size auto."""

    def step(batch_size, device, dtype):
        model = build_model(config).to(device)
        samples = round(config["clip_seconds"] * config["sample_rate"])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(torch.randn(batch_size, samples, device=device)).float().logsumexp(1).mean()
        loss.backward()

    return step


def clip_loader(clips: CachedClips, args, plan, shuffle: bool):
    # Own generators: starting an epoch must not draw from the global RNG that augmentation uses, or a
    # run resumed mid-epoch would augment differently from an uninterrupted one.
    return make_loader(
        clips,
        batch_size=plan.batch_size,
        shuffle=shuffle,
        workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed),
    )


def clip_samples(config: dict) -> int:
    return round(config["clip_seconds"] * config["sample_rate"])


def normalisation_sample(train: CachedClips, count: int = 256) -> torch.Tensor:
    """Evenly spaced training clips for the log-mel mean/std: the same on every process, no randomness used. Each
    clip's first window, the one evaluation sees."""
    picks = torch.linspace(0, len(train) - 1, min(count, len(train))).long().unique()
    return torch.stack([train[int(i)][0][: train.num_samples] for i in picks])


def class_weights(train: CachedClips, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(torch.from_numpy(train.targets), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp_min(1))


def augment_waveforms(waves: torch.Tensor, lengths: torch.Tensor, num_samples: int, noise: torch.Tensor, args) -> torch.Tensor:
    """A random window of each clip's kept audio, speed, time shift, random gain and background noise, batched on the device
    (SpecAugment runs in the model's frontend). Drawn from the global RNG, which is seeded per process and saved
    in checkpoints, so a resumed run draws what an uninterrupted one does."""
    if args.no_augment:
        return waves[:, :num_samples]
    waves = time_shift(speed_perturb(random_windows(waves, lengths, num_samples), args.speed), args.time_shift)
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


def random_windows(waves: torch.Tensor, lengths: torch.Tensor, num_samples: int) -> torch.Tensor:
    """num_samples from a random start within each clip's first lengths[i] samples (the cache pads every clip to at
    least num_samples, so a clip no longer than that keeps its start)."""
    if waves.shape[1] == num_samples:  # no clip of the split is longer: nothing to draw
        return waves
    starts = (torch.rand(len(waves), device=waves.device) * (lengths.to(waves.device) - num_samples + 1)).long()
    return waves.gather(1, starts[:, None] + torch.arange(num_samples, device=waves.device))


def speed_perturb(waves: torch.Tensor, amount: float) -> torch.Tensor:
    """Each clip played at a random speed in [1 - amount, 1 + amount] by linear interpolation: sample t of the output
    is the input at t x speed, so pitch and tempo change together; a faster clip ends early, in silence."""
    if not amount:
        return waves
    batch, length = waves.shape
    speed = 1 + (torch.rand(batch, 1, device=waves.device) * 2 - 1) * amount
    where = torch.arange(length, device=waves.device) * speed
    left = where.floor().long().clamp(max=length - 1)
    frac = where - left
    right = (left + 1).clamp(max=length - 1)
    mixed = waves.gather(1, left) * (1 - frac) + waves.gather(1, right) * frac
    return mixed * (where <= length - 1)


def time_shift(waves: torch.Tensor, fraction: float) -> torch.Tensor:
    """Move each clip by a random whole number of samples up to +-fraction of its length, with silence in the gap:
    an event keeps its shape but not its place, and nothing from the end wraps round to the start."""
    batch, length = waves.shape
    limit = round(fraction * length)
    if not limit:
        return waves
    shifts = torch.randint(-limit, limit + 1, (batch, 1), device=waves.device)
    source = torch.arange(length, device=waves.device) - shifts  # positive shifts delay the clip
    inside = (source >= 0) & (source < length)
    return waves.gather(1, source.clamp(0, length - 1)) * inside


def mixup_loss(model, criterion, waves, targets, alpha: float) -> torch.Tensor:
    """Cross-entropy, or with --mixup the loss of a Beta-weighted blend of each clip with another one."""
    if not alpha or not model.training:
        return criterion(model(waves), targets)
    lam = torch.distributions.Beta(torch.tensor(alpha, device=waves.device), torch.tensor(alpha, device=waves.device)).sample()
    perm = torch.randperm(len(waves), device=waves.device)
    logits = model(lam * waves + (1 - lam) * waves[perm])
    return lam * criterion(logits, targets) + (1 - lam) * criterion(logits, targets[perm])


@torch.no_grad()
def evaluate(model, loader, accelerator, labels: list[str]) -> dict:
    """Each process predicts its shard; gather_for_metrics drops the padding DDP adds, so each clip counts once.
    Every process computes the (identical) metrics, so all agree on which epoch is best without a broadcast."""
    model.eval()
    preds, refs, losses = [], [], []
    for waves, targets, _ in loader:
        with accelerator.autocast():
            logits = model(waves)
        loss = F.cross_entropy(logits.float(), targets, reduction="none")
        pred, ref, loss = accelerator.gather_for_metrics((logits.argmax(dim=1), targets, loss))
        preds.append(pred)
        refs.append(ref)
        losses.append(loss)
    metric = load_metric(str(METRIC))
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
                "protocol": data.protocol,
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


def write_pictures(accelerator, args, summary: dict, labels: list[str], what: str):
    """confusion_matrix.png of the test split (or val, when there is no test split)."""
    if not accelerator.is_main_process:
        return
    shown = "test" if "test" in summary else "val"
    plot_confusion_matrix(
        summary[shown]["confusion_matrix"], labels, args.output_dir / "confusion_matrix.png", f"{shown}, {what}"
    )


def plot_confusion_matrix(matrix, labels: list[str], path: Path, title: str):
    """Rows are true classes, normalised to recall; the counts are written in the cells of small matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix: {title}")
    if len(labels) <= 30:
        for i, j in np.ndindex(matrix.shape):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_card(args, model_dir: Path, data, config: dict, summary: dict):
    metrics = {split: {k: summary[split][k] for k in ("accuracy", "macro_f1")} for split in ("val", "test") if split in summary}
    usage = f"""```bash
python scripts/predict_audio.py --model-dir {model_dir} recording.wav          # JSON lines, sliding windows
python scripts/train_audio.py --eval-only --weights {model_dir} --data OTHER --output-dir runs/eval
python scripts/export_model.py --model-dir {model_dir} --format onnx           # waveform -> logits, with a parity report
python scripts/serve.py --model-dir {model_dir} --port 8000                    # POST /v1/predict
```
Input: mono float waveforms at {config["sample_rate"]} Hz, {config["clip_seconds"]} s per window (the log-mel frontend is part
of the model)."""
    write_model_card(
        model_dir,
        pipeline_tag="audio-classification",
        title=f"{config['model']} audio classifier ({len(config['labels'])} classes)",
        labels=config["labels"],
        data=f"`{args.data}` ({data.format}): "
        + "; ".join(data.notes)
        + f". Best epoch {summary['best_epoch']} of {args.epochs}.",
        metrics=metrics,
        arguments={k: v for k, v in vars(args).items() if k not in ("output_dir", "cache_dir")},
        usage=usage,
    )


def require_every_class(root: str, labels: list[str], train: CachedClips):
    counts = torch.bincount(torch.from_numpy(train.targets), minlength=len(labels))
    empty = [labels[i] for i in range(len(labels)) if counts[i] == 0]
    if empty:
        raise DataError(
            f"{root}: class(es) {empty} have no usable training clips; add clips or remove the class "
            "(data_report.json lists skipped files)"
        )


if __name__ == "__main__":
    main()
