#!/usr/bin/env python
"""Train an audio classifier (log-mel + any torchvision network) on a CPU, one GPU or many, with Accelerate.

    python scripts/train_audio.py --data demo_data/speech_commands --output-dir runs/audio --epochs 4   # make demo-data
    accelerate launch --config_file accelerate_configs/gpu4_fp16.yaml scripts/train_audio.py \\
        --data /data/UrbanSound8K --fold 1 --output-dir runs/us8k_fold1
    python scripts/train_audio.py --data /data/ESC-50 --fold all --output-dir runs/esc50_cv      # 5-fold cross-validation
    python scripts/train_audio.py --data /data/speech_commands_v0.02 --output-dir runs/kws12 \\
        --wanted-words yes,no,up,down,left,right,on,off,stop,go                                 # the 12-class task

Data layouts are detected (see --format). Clips are decoded once with soundfile into an on-disk cache (--streaming:
read from shards while training, see scripts/make_shards.py); crops, time shift, gain, background noise, mel
spectrograms, SpecAugment and mixup run batched on the device. OUTPUT_DIR gets
args.json, data_report.json, results.csv, metrics.json, model/ (what predict_audio.py loads, with a model card),
checkpoints/, logs/ (TensorBoard; --report-to for others), curves.png and confusion_matrix.png. --eval-only --weights
RUN/model scores a saved model; --weights alone fine-tunes from it. --fold all: a run per fold in OUTPUT_DIR/fold_K/
and OUTPUT_DIR/cv_metrics.json (or one job per fold: accelerate_configs/slurm_folds_array.sbatch, then gather_folds.py).

To reuse this script in another project, copy these files, keeping their folders:
    scripts/train_audio.py scripts/audio_data.py scripts/audio_model.py scripts/audio_augment.py
    shared/__init__.py shared/cache.py shared/checkpoint.py shared/model_io.py shared/plots.py shared/preemption.py
    shared/runtime.py shared/training.py
    scripts/metrics/classification/classification.py
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory
from shared.preemption import end_with_the_launcher

end_with_the_launcher()  # first: a SIGTERM during the imports, data scan and decoding below ends the run too

import audio_data
import audio_model
import torch
import torch.nn.functional as F
from audio_augment import augment_waveforms, mixup_loss
from evaluate import load as load_metric

from shared.checkpoint import Checkpoints, GracefulStop, RunFolder
from shared.model_io import label_index, load_pretrained, load_weights, start_from
from shared.plots import log_pictures, plot_confusion_matrix, plot_curves
from shared.runtime import (
    SPELLINGS,
    add_common_args,
    add_recipe_args,
    familiar_spellings,
    files_fingerprint,
    flat_config,
    make_loader,
    print_summary,
    resolve_recipe,
    seed_per_process,
    setup_accelerator,
    stream_order,
    write_args_json,
    write_json,
)
from shared.training import (
    EpochLosses,
    ResultsLog,
    RunClock,
    RunState,
    agree,
    build_scheduler,
    capped_warmup,
    evaluation_bar,
    is_best,
    mid_epoch_progress,
    next_epoch,
    parameter_groups,
    progress_bar,
    stop_message,
    untrained_batches,
)

# The recipe: {key: (default, help)}. Each key is a flag (--warmup-epochs); --recipe FILE.yaml overrides the defaults.
RECIPE = {
    "lr": (1e-3, "peak AdamW learning rate"),
    "weight_decay": (0.01, "AdamW weight decay, not applied to biases and norms"),
    "warmup_epochs": (1.0, "linear LR warmup length in epochs"),
    "schedule": ("cosine", "LR decay after warmup, counted in optimizer steps: cosine or onecycle"),
    "label_smoothing": (0.1, "cross-entropy label smoothing"),
    "clip_grad": (0.0, "clip the gradient norm to this value (0: off)"),
    "patience": (0, "stop when validation has not improved for N epochs (0: never)"),
    "class_weights": (False, "weight the loss by inverse class frequency (for unbalanced data such as UrbanSound8K)"),
    "mixup": (0.0, "ALPHA: mix pairs of clips with a Beta(ALPHA, ALPHA) weight (0: off; 0.2-0.4 is typical)"),
    "time_shift": (0.1, "shift each training clip by up to +-this fraction of --clip-seconds, silence in the gap (0: off)"),
    # Kaldi's speed perturbation, a stand-in for other voices: on unseen speakers it raised test accuracy 0.755 -> 0.843.
    "speed": (0.1, "play each training clip at a random speed within 1 +-this fraction, pitch and tempo together (0: off)"),
    "gain_db": (6.0, "random gain of each clip within +-N dB (0: off)"),
    "noise_prob": (0.8, "Speech Commands: chance of mixing in _background_noise_"),
    "noise_volume": (0.1, "Speech Commands: largest background-noise amplitude"),
}
SCHEDULES = ("cosine", "onecycle")
# With the recipe, the arguments that fix what is trained and in which order: a resumed run must have the same ones.
ORDER_ARGS = ("model", "nominal_batch_size", "epochs", "seed", "fold", "val_fold", "val_fraction", "no_augment", "sync_bn")
METRIC = Path(__file__).resolve().parent / "metrics" / "classification"  # an evaluate module, loaded by path
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "per_class", "confusion_matrix")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=SPELLINGS, formatter_class=argparse.RawDescriptionHelpFormatter)
    audio_data.add_data_args(parser)
    m = parser.add_argument_group("model and features")
    m.add_argument("--model", default="resnet18", help="any torchvision classification model name (default resnet18)")
    m.add_argument("--pretrained", action="store_true", help="start from ImageNet weights cached in the torch hub folder")
    m.add_argument("--n-mels", type=int, default=64, help="mel bands (default 64)")
    m.add_argument("--no-tiny-map-convs", action="store_true", help="on a CPU, keep oneDNN's kernel for tiny maps (not a GEMM)")
    m.add_argument("--freq-mask", type=int, help="SpecAugment: widest frequency mask in mel bands (default n_mels/8; 0: off)")
    m.add_argument("--time-mask", type=int, help="SpecAugment: widest time mask in frames (default 1/10 of them; 0: off)")
    add_common_args(parser, epochs=30, batch_size=32, nominal_batch_size=64)
    add_recipe_args(parser, RECIPE)
    args = parser.parse_args(familiar_spellings(argv))
    resolve_recipe(args, RECIPE)
    if args.schedule not in SCHEDULES:
        parser.error(f"--schedule {args.schedule}: one of {', '.join(SCHEDULES)}")
    if not 0 <= args.time_shift < 1:
        parser.error(f"--time-shift {args.time_shift}: a fraction of the clip, at least 0 and below 1 (e.g. 0.1)")
    if not 0 <= args.speed < 1:
        parser.error(f"--speed {args.speed}: a fraction, at least 0 and below 1 (e.g. 0.1)")
    if args.streaming and (args.eval_only or args.fold is not None):
        parser.error("--streaming trains on shards made for one split of the data: without --eval-only and --fold")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.fold == audio_data.ALL_FOLDS:
        # One stop for all folds: a SIGTERM while one fold is tested stops the next at its first step, with a checkpoint.
        stop = GracefulStop()
        audio_data.cross_validate(args, lambda fold_args: train(fold_args, stop=stop, more_runs_follow=True))
    else:
        train(args)


def train(args, stop: GracefulStop | None = None, more_runs_follow: bool = False) -> bool:
    """One run in args.output_dir: train and test, or with --eval-only score a model. False when it was stopped
    (preempted) before the end; the same command plus --resume continues it. more_runs_follow keeps the process
    group of a DDP launch for the next run in this process (the folds of --fold all), which share one stop."""
    # ---- data and the model's config: new, or read from --weights
    audio_model.require_supported_model(args.model)  # before a large data set is decoded
    weights = load_weights(args.weights, need_config=args.eval_only) if args.weights else None
    if args.eval_only and weights is None:
        raise SystemExit("--eval-only needs --weights RUN/model: the model to evaluate")
    data = audio_data.load_run_data(vars(args), clip_seconds=weights[1]["clip_seconds"] if args.eval_only else None)
    for name, split in data.splits.items():
        data.splits[name] = split.spread(args.max_train_samples if name == "train" else args.max_eval_samples)
    if args.eval_only:
        config = weights[1]
        index = label_index(data.labels, config["labels"], args.data)  # the data's classes as the model's indices
        for split in data.splits.values():
            split.targets = index[split.targets]
        data.labels = config["labels"]
    else:
        args.clip_seconds = args.clip_seconds or audio_data.DEFAULT_CLIP_SECONDS[data.format]
        model_name = weights[1].get("model", args.model) if weights else args.model
        config = audio_model.model_config(model_name, data.labels, args.sample_rate, args.clip_seconds, args.n_mels)
    # Resolved here, as they follow the data: args.json, the fingerprint and the model card hold the values used.
    num_samples = audio_model.clip_samples(config)
    frames = num_samples // config["hop_length"] + 1
    args.freq_mask = 0 if args.no_augment else args.n_mels // 8 if args.freq_mask is None else args.freq_mask
    args.time_mask = 0 if args.no_augment else frames // 10 if args.time_mask is None else args.time_mask

    # ---- the hardware, the run folder and its identity, then the data decoded (once, cached)
    accelerator, plan = setup_accelerator(args, audio_model.probe_step(config))
    run = RunFolder(accelerator, args.output_dir, resume=args.resume, overwrite=args.overwrite, data=args.data)
    fingerprint = run_fingerprint(accelerator, args, plan, data, config)
    Checkpoints(accelerator, run, keep=1, fingerprint=fingerprint).find(args.resume)  # refused before decoding or writing
    accelerator.init_trackers(audio_model.TASK, config=flat_config(args))
    clips = decode_splits(args, data, config)
    use_noise = data.noise_files and not args.no_augment and not args.eval_only
    noise, noise_skipped = audio_data.load_noise(data.noise_files, config["sample_rate"]) if use_noise else (torch.zeros(0), [])
    noise = noise.to(accelerator.device)
    report, report_path = audio_data.data_report(args, data, clips, noise_skipped), args.output_dir / "data_report.json"
    if accelerator.is_main_process:
        write_json(report_path, report)
    if report["skipped"]:
        first = report["skipped"][0]
        accelerator.print(
            f"warning: skipped {report['skipped_count']} unreadable or empty clip(s), first {first['path']} "
            f"({first['reason']}); all listed in {report_path}"
        )
    audio_data.require_usable_splits(clips, report_path)
    metric = load_metric(str(METRIC))
    if args.eval_only:
        evaluate_saved_model(accelerator, args, plan, data, clips, config, weights, metric)
        return True
    audio_data.require_every_class(args.data, data.labels, clips["train"])

    # ---- model, loss, optimizer and loaders, prepared by Accelerate; the schedule in optimizer steps
    model = audio_model.build_model(config, pretrained=args.pretrained, freq_mask=args.freq_mask, time_mask=args.time_mask)
    initial = "ImageNet init" if args.pretrained else "from scratch"
    start_note = start_from(model, weights, config["labels"], audio_model.head_parameters(model), initial)
    model.frontend.fit_normalisation(audio_data.normalisation_sample(clips["train"]))
    if accelerator.device.type == "cpu" and not args.no_tiny_map_convs:
        audio_model.use_tiny_map_convs(model)
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model.backbone.compile()  # in place: parameter names (and so checkpoints and model/) stay the same
    # fused: one kernel for all tensors instead of a Python loop per tensor (about 2x faster steps on CPU and GPU)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, fused=True)
    weight = audio_data.class_weights(clips["train"], len(config["labels"])) if args.class_weights else None
    criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing).to(accelerator.device)
    loaders = {name: clip_loader(accelerator, c, args, plan, shuffle=name == "train") for name, c in clips.items()}
    # Streamed loaders come ready: each process already reads its own share.
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *([] if args.streaming else loaders.values()))
    loaders = dict(zip(loaders, prepared, strict=True)) if prepared else loaders
    train_dl = loaders["train"]
    seed_per_process(accelerator, args.seed)  # after the weights: each process now draws its own augmentation
    steps_per_epoch = math.ceil(len(train_dl) / plan.accumulation_steps)
    total_steps = min(steps_per_epoch * args.epochs, args.max_train_steps or math.inf)
    warmup_steps, warmup_note = capped_warmup(args.warmup_epochs, steps_per_epoch, total_steps)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup_steps, shape=args.schedule)

    # ---- checkpoints (model, optimizer, schedule, RNG and where the run stands) and a resume from one
    states = {"optimizer": optimizer, "scheduler": scheduler}
    checkpoints = Checkpoints(
        accelerator, run, keep=args.keep_checkpoints, fingerprint=fingerprint, modules={"model": model}, states=states
    )
    state = RunState(**(checkpoints.resume(args.resume) or {}))
    results = ResultsLog(accelerator, args.output_dir)
    results.keep_epochs_before(state.epoch)
    write_args_json(args, accelerator, plan, format=data.format, labels=config["labels"], data_notes=data.notes)
    schedule_note = f"{steps_per_epoch} per epoch, {total_steps} in total, {warmup_note}"
    audio_data.print_start(accelerator, args, plan, data, clips, config, model, schedule_note, start_note)

    # ---- the loop
    stop = stop or GracefulStop()  # SIGTERM / Ctrl-C ask for a checkpoint and a clean exit
    stopped = False
    clock = RunClock(state, args.epochs)  # the whole run's time left, on the epoch line
    for epoch in range(state.epoch, args.epochs):
        model.train()
        losses = EpochLosses(accelerator, state)
        bar = progress_bar(accelerator, train_dl, state, args.epochs)
        for waves, targets, lengths in untrained_batches(accelerator, train_dl, state):
            with accelerator.accumulate(model):
                waves = augment_waveforms(audio_model.pcm_to_float(waves), lengths, num_samples, noise, args)
                with accelerator.autocast():
                    loss = mixup_loss(model, criterion, waves, targets, args.mixup)
                accelerator.backward(loss)
                losses.add({"loss": loss}, len(targets))
                if accelerator.sync_gradients:  # the last micro-batch of an effective batch: one optimizer step
                    # All processes, every step: a NaN/inf loss on any of them stops the run before the step (raises);
                    # a stop asked of any of them is agreed here, so all save the same checkpoint and leave together.
                    stopped = agree(accelerator, stop, losses, epoch=epoch, step=state.step + 1)
                    # Clipped at --clip-grad, or measured only (at inf the gradients are multiplied by exactly 1).
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad or math.inf)  # unscales fp16 first
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if not accelerator.optimizer_step_was_skipped:  # an fp16 overflow skipped the step: so does the LR
                        scheduler.step()  # unprepared: a prepared one would step once per process per step
            state.batch_in_epoch += 1
            bar.update()
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if state.step % args.log_every == 0:
                scalars = losses.step_scalars(scheduler.get_last_lr()[0], grad_norm)
                bar.set_postfix(loss=f"{scalars['step/loss']:.3f}")
                accelerator.log(scalars, step=state.step)
            if stopped or (args.checkpoint_steps and state.step % args.checkpoint_steps == 0):
                checkpoints.save(mid_epoch_progress(state, losses))  # with the epoch's losses so far
            if stopped:
                accelerator.print(stop_message(f"at epoch {epoch + 1}", state.step))
            if stopped or state.step == args.max_train_steps:
                break
        bar.close()
        if stopped:
            break
        train_row = losses.summary()

        val = evaluate(model, loaders["val"], accelerator, metric, config["labels"])
        # Accuracy saturates on small validation sets: a tie goes to the epoch with the lower validation loss.
        fitness = [val["accuracy"], -val["loss"]]
        if is_best(state, fitness, {k: val[k] for k in CLASSIFICATION_METRICS}) and accelerator.is_main_process:
            audio_model.save_model(args.output_dir / "model", accelerator.unwrap_model(model, keep_torch_compile=False), config)
        accelerator.wait_for_everyone()
        row = {"epoch": epoch, "step": state.step, "lr": scheduler.get_last_lr()[0], **train_row}
        results.add({**row, **{f"val_{k}": val[k] for k in ("loss", "accuracy", "macro_f1")}}, step=state.step)
        accelerator.print(
            f"epoch {epoch + 1}: train loss {train_row['train_loss']:.4f}, val loss {val['loss']:.4f}, val accuracy "
            f"{val['accuracy']:.4f}, val macro-F1 {val['macro_f1']:.4f}, {train_row['train_samples_per_second']:.0f} clips/s, "
            f"lr {row['lr']:.2e}, {train_row['seconds']:.0f} s, {clock.left(epoch)}"
        )
        checkpoints.save(next_epoch(state))
        # Every process computed the same metrics, so all take this branch alike (no collective is skipped).
        if args.patience and state.stale_epochs >= args.patience:
            accelerator.print(f"early stop: no improvement for {args.patience} epochs (best epoch {state.best_epoch + 1})")
            break
        if state.step == args.max_train_steps:
            break
        if agree(accelerator, stop, None, epoch=epoch, step=state.step):  # a stop asked during the evaluation
            accelerator.print(stop_message(f"after epoch {epoch + 1}", state.step))
            stopped = True
            break

    if not stopped:
        finish(accelerator, args, state, model, loaders, results, data, config, metric)
    if more_runs_follow:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()
    return not stopped


# ==================================================================== helpers of train(), in the order it uses them
def run_fingerprint(accelerator, args, plan, data, config) -> dict:
    """Anything here that differs on --resume would train on other data, in another order or by another recipe."""
    return {
        "task": audio_model.TASK,
        "labels": config["labels"],
        "processes": plan.processes,
        "batch_size": plan.batch_size,  # what --batch-size auto found
        "mixed_precision": accelerator.mixed_precision,
        **files_fingerprint(
            {**{n: audio_data.clip_items(s) for n, s in data.splits.items()}, "noise": audio_data.noise_items(data.noise_files)}
        ),
        "protocol": data.protocol,
        **{k: config[k] for k in ("sample_rate", "clip_seconds", "n_mels")},
        **{k: getattr(args, k) for k in (*RECIPE, *ORDER_ARGS, "freq_mask", "time_mask")},
        **stream_order(args),
    }


def decode_splits(args, data, config) -> dict[str, audio_data.CachedClips]:
    """Decode once, cache, reuse. Every process asks for the cache; the first to take its file lock decodes,
    the others wait on the lock (not on a collective, which would time out while a large data set decodes).
    The training split keeps up to audio_data.TRAIN_SPAN clip lengths of each clip, for random crops."""
    num_samples, clips = audio_model.clip_samples(config), {}
    for name, split in data.splits.items():
        if args.eval_only and name == "train":
            continue
        span = num_samples * (audio_data.TRAIN_SPAN if name == "train" and not args.no_augment else 1)
        if args.streaming:
            clips[name] = audio_data.StreamedClips(
                split, config["sample_rate"], num_samples, span, (args.audio_column, args.label_column)
            )
        else:
            clips[name] = audio_data.CachedClips(
                split, config["sample_rate"], num_samples, args.cache_dir, args.workers, name, span=span
            )
    return clips


def clip_loader(accelerator, clips: audio_data.CachedClips | audio_data.StreamedClips, args, plan, shuffle: bool):
    if args.streaming:
        return clips.loader(accelerator, plan.batch_size, args.workers, args.shuffle_buffer if shuffle else None, args.seed)
    # Own generators: starting an epoch must not draw from the global RNG that augmentation uses, or a
    # run resumed mid-epoch would augment differently from an uninterrupted one.
    generator = torch.Generator().manual_seed(args.seed)
    return make_loader(clips, batch_size=plan.batch_size, shuffle=shuffle, workers=args.workers, generator=generator)


@torch.no_grad()
def evaluate(model, loader, accelerator, metric, labels: list[str]) -> dict:
    """Each process predicts its shard; gather_for_metrics drops the padding DDP adds, so each clip counts once.
    Every process computes the (identical) metrics, so all agree on which epoch is best without a broadcast."""
    model.eval()
    preds, refs, losses = [], [], []
    for waves, targets, _ in evaluation_bar(accelerator, loader):
        with accelerator.autocast():
            logits = model(waves)
        loss = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=audio_data.PADDING)
        pred, ref, loss = accelerator.gather_for_metrics((logits.argmax(dim=1), targets, loss))
        kept = ref != audio_data.PADDING  # --streaming: rows that only even out the processes' batches
        preds.append(pred[kept])
        refs.append(ref[kept])
        losses.append(loss[kept])
    result = metric.compute(predictions=torch.cat(preds).tolist(), references=torch.cat(refs).tolist(), labels=labels)
    result["loss"] = torch.cat(losses).mean().item()
    return result


def finish(accelerator, args, state, model, loaders, results, data, config, metric):
    """Test the best model, write metrics.json, the plots and the model card."""
    if state.best_epoch is None:
        raise SystemExit("no epoch was trained (--epochs 0?), so there is no model to test")
    model_dir = args.output_dir / "model"
    accelerator.unwrap_model(model).load_state_dict(load_pretrained(model_dir)[0])
    summary = {
        "task": audio_model.TASK,
        "best_epoch": state.best_epoch + 1,  # counted from 1, as the console, pictures and card count
        "labels": config["labels"],
        "train_samples_per_second": results.mean("train_samples_per_second"),
        "val": state.best_val,
    }
    if "test" in loaders:
        test = evaluate(model, loaders["test"], accelerator, metric, config["labels"])
        summary["test"] = {k: test[k] for k in CLASSIFICATION_METRICS}
    if accelerator.is_main_process:
        write_json(args.output_dir / "metrics.json", summary)
        plot_curves(results.path, args.output_dir / "curves.png")
        audio_model.write_card(args, model_dir, data, config, summary)
        write_confusion_matrix(args, summary, config["labels"], f"best epoch {state.best_epoch + 1}")
        log_pictures(accelerator, [args.output_dir / "curves.png", args.output_dir / "confusion_matrix.png"], state.step)
    shown = "test" if "test" in summary else "val"
    rows = {
        name: f"precision {c['precision']:.3f}  recall {c['recall']:.3f}  F1 {c['f1']:.3f}  clips {c['support']}"
        for name, c in summary[shown]["per_class"].items()
    }
    print_summary(accelerator, f"per class ({shown})", rows)
    line = f"best epoch {state.best_epoch + 1}: val accuracy {state.best_val['accuracy']:.4f}"
    if "test" in summary:
        line += f", test accuracy {summary['test']['accuracy']:.4f}, test macro-F1 {summary['test']['macro_f1']:.4f}"
    accelerator.print(f"{line}; model in {model_dir}")


def write_confusion_matrix(args, summary: dict, labels: list[str], what: str):
    shown = "test" if "test" in summary else "val"
    title = f"confusion matrix: {shown}, {what}"
    plot_confusion_matrix(summary[shown]["confusion_matrix"], labels, args.output_dir / "confusion_matrix.png", title)


def evaluate_saved_model(accelerator, args, plan, data, clips, config, weights, metric):
    """--eval-only: score the --weights model on every split but train (exactly once per clip under DDP)."""
    model = audio_model.build_model(config)
    model.load_state_dict(weights[0])
    if accelerator.device.type == "cpu" and not args.no_tiny_map_convs:
        audio_model.use_tiny_map_convs(model)
    loaders = {name: clip_loader(accelerator, c, args, plan, shuffle=False) for name, c in clips.items()}
    model, *prepared = accelerator.prepare(model, *loaders.values())
    summary = {"task": audio_model.TASK, "weights": str(args.weights), "labels": config["labels"]}
    for name, loader in zip(loaders, prepared, strict=True):
        metrics = evaluate(model, loader, accelerator, metric, config["labels"])
        summary[name] = {k: metrics[k] for k in CLASSIFICATION_METRICS}
        accelerator.print(
            f"{name}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} on {len(clips[name])} clips"
        )
    write_args_json(args, accelerator, plan, format=data.format, labels=config["labels"], data_notes=data.notes)
    if accelerator.is_main_process:
        write_json(args.output_dir / "metrics.json", summary)
        write_confusion_matrix(args, summary, config["labels"], f"model {args.weights}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
