#!/usr/bin/env python
"""Train an object detector (any torchvision detection model, or the small fcos_tiny) with the YOLO recipe,
on a CPU, one GPU or many, with Accelerate.

    python scripts/train_detection.py --data demo_data/shapes/data.yaml --output-dir runs/det --epochs 8   # make demo-data
    accelerate launch --config_file accelerate_configs/gpu4_fp16.yaml scripts/train_detection.py \\
        --data my_data/data.yaml --model fcos_resnet50_fpn --pretrained --img-size 640 --output-dir runs/det

--data is a YOLO data.yaml, a COCO instances .json or (with --format hub) a Hub dataset id (objects{bbox, category}).
The recipe (RECIPE below; --recipe FILE.yaml or any --<key> flag overrides it): nominal batch 16 per optimizer step
(FCOS's, for SGD at lr 0.01), warmup of LR and momentum, cosine decay, EMA weights for evaluation and saving,
box-aware augmentation (flip, scale jitter and crop; YOLO's 4-image mosaic with --mosaic 1), optional multi-scale,
gradient clipping, COCO mAP every epoch, best model by 0.1 mAP50 + 0.9 mAP50-95, early stop. OUTPUT_DIR gets
args.json, data_report.json, results.csv, metrics.json, model/ (what predict_detection.py loads), checkpoints/,
logs/ (TensorBoard; --report-to for others), predictions_{split}.json + ground_truth_{split}.json (COCO, for
re-checking with pycocotools), curves.png, labels.png and val_predictions.png. --eval-only --weights RUN/model scores
a saved model on new labelled data; --weights alone fine-tunes from it.

To reuse this script in another project, copy these files, keeping their folders:
    scripts/train_detection.py scripts/detection_data.py scripts/detection_model.py
    shared/__init__.py shared/cache.py shared/checkpoint.py shared/model_io.py shared/plots.py shared/preemption.py
    shared/runtime.py shared/training.py
    scripts/metrics/coco_map/coco_map.py
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory
from shared.preemption import end_with_the_launcher

end_with_the_launcher()  # first: a SIGTERM during the imports, data scan and decoding below ends the run too

import detection_data
import detection_model
import numpy as np
import torch
from evaluate import load as load_metric

from shared.checkpoint import Checkpoints, GracefulStop, RunFolder
from shared.model_io import load_pretrained, load_weights, start_from
from shared.plots import log_pictures, plot_confusion_matrix, plot_curves
from shared.runtime import (
    SPELLINGS,
    add_common_args,
    add_recipe_args,
    add_streaming_args,
    familiar_spellings,
    files_fingerprint,
    flat_config,
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
    warmup_momentum,
)

METRIC = Path(__file__).resolve().parent / "metrics" / "coco_map"  # an evaluate module, loaded by path
MAP_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")

# The recipe in one place: {key: (default, help)}. Each key is a flag (--warmup-epochs); --recipe FILE.yaml (alias
# --hyp) overrides the defaults and a flag overrides both.
RECIPE = {
    "optimizer": ("SGD", "SGD (Nesterov) or AdamW"),
    "lr": (0.01, "peak learning rate at the nominal batch"),
    "final_lr_ratio": (0.01, "final LR as a fraction of lr"),
    "schedule": ("cosine", "cosine or linear decay after warmup"),
    "momentum": (0.937, "SGD momentum / Adam beta1"),
    "weight_decay": (5e-4, "on conv/linear weights only, scaled by effective / nominal batch"),
    "warmup_epochs": (3.0, "LR ramps from 0 and momentum from warmup_momentum over this many epochs"),
    "warmup_momentum": (0.8, "momentum at the start of the warmup"),
    "ema_decay": (0.9999, "EMA decay, ramped as decay * (1 - exp(-updates / ema_tau))"),
    "ema_tau": (2000, "updates over which the EMA decay ramps up"),
    "clip_grad": (10.0, "max gradient norm (0: off)"),
    "fliplr": (0.5, "horizontal flip probability"),
    "scale": (0.5, "scale jitter: 1 +- scale (of the image, or of the mosaic's view)"),
    # Off by default: on held-out data it cost short and long runs alike (test mAP50-95 0.008 with it, 0.011 without
    # at 20 epochs; 0.023 and 0.046 at 50, nominal batch 64).
    "mosaic": (0.0, "probability that a training image is YOLO's 4-image mosaic"),
    # YOLO's 10 is a tenth of its 100 default epochs; unscaled it would leave a 10-epoch run no mosaic at all, so a
    # short run closes its last fifth instead (2 of 8 epochs). Training ends on whole images, as evaluation sees them.
    "close_mosaic": (10, "mosaic is off for the last min(close_mosaic, max(1, round(epochs / 5))) epochs (0: never off)"),
    "translate": (0.1, "mosaic: random shift of the view, as a fraction of the image size"),
    "photometric": (0.5, "probability of brightness/contrast/saturation jitter"),
    "colour": (0.4, "jitter factors in 1 +- colour"),
    "min_box_size": (2.0, "boxes cropped below this many pixels are dropped"),
    "multi_scale": (False, "train each batch at a random size in 0.5-1.5 x --img-size (multiples of 32)"),
    "freeze": (0, "freeze the first N blocks of the backbone"),
    "patience": (30, "stop when fitness has not improved for N epochs (0: never)"),
    "eval_conf": (0.001, "score threshold for mAP (low, as COCO evaluation expects)"),
    "eval_iou": (0.6, "NMS IoU"),
    "max_det": (100, "detections per image"),
}
RENAMED = {"lr0": "lr", "lrf": "final_lr_ratio"}  # old --hyp keys, still read
# With the recipe, what fixes what is trained and in which order: a resumed run must have the same.
RUN_IDENTITY = ("model", "nominal_batch_size", "epochs", "seed", "val_fraction", "no_augment", "sync_bn")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=SPELLINGS, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = parser.add_argument_group("data")
    d.add_argument("--data", required=True, help="YOLO data.yaml, COCO instances .json, or a Hub dataset id (with --format hub)")
    d.add_argument(
        "--format",
        choices=detection_data.FORMATS,
        help="layout of --data (default: told from the path; a Hub id needs --format hub)",
    )
    d.add_argument(
        "--max-pixels", type=int, default=detection_data.MAX_PIXELS, help="larger images are skipped unread (default %(default)s)"
    )
    d.add_argument(
        "--cache-dir", type=Path, default=detection_data.default_cache_dir(), help="decoded training images (default %(default)s)"
    )
    d.add_argument("--no-cache", action="store_true", help="decode every training image from its file every time it is used")
    d.add_argument("--val-fraction", type=float, default=0.1, help="COCO/Hub data without a val split: the share held out")
    add_streaming_args(d, "images")
    m = parser.add_argument_group("model")
    m.add_argument(
        "--model", default="fcos_tiny", help=f"detector name (default fcos_tiny): {', '.join(detection_model.available_models())}"
    )
    m.add_argument("--img-size", type=int, default=224, help="long side of the images in pixels (default 224; ssd*: their own)")
    m.add_argument("--pretrained", action="store_true", help="start from the COCO weights cached in the torch hub folder")
    m.add_argument("--map-backend", choices=["pycocotools", "faster_coco_eval"], default="pycocotools", help="COCO mAP code")
    add_recipe_args(parser, RECIPE)
    # 16, not YOLO's 64: four times the optimizer steps per epoch (400 images: 25 instead of 7). On the held-out
    # set at 50 epochs: validation mAP50-95 0.517 with 16 and 0.163 with 64, test 0.182 and 0.046 (yolov8n: 0.098).
    add_common_args(parser, epochs=30, batch_size=16, nominal_batch_size=16)
    args = parser.parse_args(familiar_spellings(argv))
    resolve_recipe(args, RECIPE, RENAMED)
    if args.streaming and args.eval_only:
        parser.error("--streaming reads shards while training; to score a model on them drop --streaming (with --format hub)")
    return args


def main(argv=None):
    train(parse_args(argv))


def train(args):
    """One run in args.output_dir: train and test, or with --eval-only score a model."""
    recipe = {key: getattr(args, key) for key in RECIPE}
    data = detection_data.load_data(args.data, args.val_fraction, args.format, args.max_pixels, args.streaming)
    for split, samples in data.splits.items():
        data.splits[split] = detection_data.spread(samples, args.max_train_samples if split == "train" else args.max_eval_samples)
    weights = load_weights(args.weights, need_config=args.eval_only) if args.weights else None
    config = model_config_for(args, data, weights, recipe)
    accelerator, plan = setup_accelerator(args, detection_model.probe_step(config, args.multi_scale))
    run = RunFolder(accelerator, args.output_dir, resume=args.resume, overwrite=args.overwrite, data=args.data)
    fingerprint = run_fingerprint(accelerator, args, plan, data, config, recipe)
    Checkpoints(accelerator, run, keep=1, fingerprint=fingerprint).find(args.resume)  # refused before anything is written
    accelerator.init_trackers(detection_model.TASK, config=flat_config(args))
    report_path = args.output_dir / "data_report.json"
    if accelerator.is_main_process:
        write_json(report_path, {"data": args.data, "names": data.names, **data.report.to_dict(data)})
        if not args.eval_only:
            detection_data.plot_label_statistics(data.splits["train"], data.names, args.output_dir / "labels.png")
    detection_data.require_boxes(data, report_path)  # a split without boxes: nothing to learn, or an mAP of -1
    metric = load_metric(str(METRIC))
    about = {"labels": config["labels"], "img_size": config["img_size"], "data_description": data.description}  # args.json

    if args.eval_only:  # score the --weights model on val and test, exactly once per image under DDP
        model = detection_model.build_model(config)
        model.load_state_dict(weights[0])
        detection_model.set_postprocess(model, args.eval_conf, args.eval_iou, args.max_det)
        datasets = detection_data.detection_datasets(args, data, config["img_size"], recipe)
        loaders = {s: detection_data.image_loader(accelerator, d, args, plan, config, False) for s, d in datasets.items()}
        model, *prepared = accelerator.prepare(model, *loaders.values())
        loaders = dict(zip(loaders, prepared, strict=True))
        summary = {"task": detection_model.TASK, "weights": str(args.weights), "labels": config["labels"]}
        summary |= score_splits(accelerator, args, accelerator.unwrap_model(model), datasets, loaders, config, metric)
        write_args_json(args, accelerator, plan, **about)
        if accelerator.is_main_process:
            write_json(args.output_dir / "metrics.json", summary)
        for split in loaders:
            scores = summary[split]
            accelerator.print(
                f"{split}: mAP50 {scores['map50']:.4f}, mAP50-95 {scores['map']:.4f} on {len(datasets[split])} images"
            )
        accelerator.end_training()
        return

    model = detection_model.build_model(config, pretrained=args.pretrained)
    initial = "COCO init" if args.pretrained else "from scratch"
    start_note = start_from(model, weights, config["labels"], detection_model.head_parameters(model), initial)
    frozen = detection_model.freeze_backbone(model, args.freeze)
    start_note += f", frozen: {', '.join(frozen)}" if frozen else ""
    detection_model.set_postprocess(model, args.eval_conf, args.eval_iou, args.max_det)
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model.backbone.compile()  # in place, so parameter names (checkpoints, model/) stay the same
    datasets = detection_data.detection_datasets(args, data, config["img_size"], recipe)
    loaders = {s: detection_data.image_loader(accelerator, d, args, plan, config, s == "train") for s, d in datasets.items()}
    # Weight decay as YOLO scales it: proportional to the effective batch relative to the nominal one.
    decay = args.weight_decay * plan.effective_batch_size / args.nominal_batch_size
    optimizer = detection_model.make_optimizer(parameter_groups(model, decay), args)
    # Streamed loaders come ready: each process already reads its own share.
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *([] if args.streaming else loaders.values()))
    loaders = dict(zip(loaders, prepared, strict=True)) if prepared else loaders
    train_dl = loaders["train"]
    steps_per_epoch = math.ceil(len(train_dl) / plan.accumulation_steps)
    total_steps = min(steps_per_epoch * args.epochs, args.max_train_steps or math.inf)
    warmup_steps, warmup_note = capped_warmup(args.warmup_epochs, steps_per_epoch, total_steps)
    schedule = {"shape": args.schedule, "final_lr_ratio": args.final_lr_ratio}
    scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup_steps, **schedule)
    # The EMA averages the unwrapped model: DDP's wrapper and a compiled module have other parameter names.
    ema = detection_model.make_ema(accelerator.unwrap_model(model, keep_torch_compile=False), args.ema_decay, args.ema_tau)
    seed_per_process(accelerator, args.seed)  # weights are drawn alike everywhere; augmentation differs per process

    checkpoints = Checkpoints(
        accelerator,
        run,
        keep=args.keep_checkpoints,
        fingerprint=fingerprint,
        modules={"model": model, "ema": ema},
        states={"optimizer": optimizer, "scheduler": scheduler},
    )
    state = RunState(**(checkpoints.resume(args.resume) or {}))
    results = ResultsLog(accelerator, args.output_dir)
    results.keep_epochs_before(state.epoch)
    write_args_json(args, accelerator, plan, **about)
    schedule_note = f"{steps_per_epoch} per epoch, {total_steps} in total, {warmup_note}"
    detection_data.print_start(accelerator, args, plan, data, config, model, datasets["train"].cache, schedule_note, start_note)

    model_dir = args.output_dir / "model"
    stop = GracefulStop()  # from here SIGTERM / Ctrl-C ask for a checkpoint and a clean exit
    stopped = False
    batch_picture = args.output_dir / "train_batch0.jpg"
    clock = RunClock(state, args.epochs)  # the whole run's time left, on the epoch line
    for epoch in range(state.epoch, args.epochs):
        model.train()
        datasets["train"].set_epoch(epoch)  # augmentation seeded by (seed, epoch, image)
        losses = EpochLosses(accelerator, state)
        bar = progress_bar(accelerator, train_dl, state, args.epochs)
        for images, targets in untrained_batches(accelerator, train_dl, state):
            images, targets = detection_data.to_training_batch(accelerator, args, images, targets, config["img_size"], state)
            if state.step == state.batch_in_epoch == 0 and accelerator.is_main_process:  # what the model is shown
                detection_data.draw_batch(images, targets, config["labels"], batch_picture)
            with accelerator.accumulate(model):
                warmup_momentum(optimizer, state.step, warmup_steps, args.warmup_momentum, args.momentum)
                with accelerator.autocast():
                    loss_parts = model(images, targets)
                loss = sum(loss_parts.values())
                accelerator.backward(loss)
                losses.add({"loss": loss, **loss_parts}, len(targets))
                if accelerator.sync_gradients:  # the last micro-batch of an effective batch: one optimizer step
                    # Every process, every step: a non-finite loss anywhere raises before the step is taken.
                    stopped = agree(accelerator, stop, losses, epoch=epoch, step=state.step + 1)
                    # Clipped at --clip-grad, or measured only (at inf the gradients are multiplied by exactly 1).
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.clip_grad or math.inf)  # unscales fp16 first
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule stays
                        scheduler.step()
                    ema.update_parameters(accelerator.unwrap_model(model))
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
                checkpoints.save(mid_epoch_progress(state, losses))
            if stopped:
                accelerator.print(stop_message(f"at epoch {epoch + 1}", state.step))
            if stopped or state.step == args.max_train_steps:  # a stream's epochs may run a step over their estimate
                break
        bar.close()
        if stopped:
            break
        train_row = losses.summary()

        val_samples = datasets["val"].samples
        val, _ = evaluate(ema.module, loaders["val"], accelerator, val_samples, config["labels"], metric, args.map_backend)
        fitness = 0.1 * val["map50"] + 0.9 * val["map"]
        improved = is_best(state, fitness, {k: val[k] for k in MAP_KEYS})
        if improved and accelerator.is_main_process:
            detection_model.save_model(model_dir, accelerator.unwrap_model(ema.module, keep_torch_compile=False), config)
        accelerator.wait_for_everyone()  # model/ is complete before any process reads it
        row = {"epoch": epoch, "step": state.step, "lr": scheduler.get_last_lr()[0], **train_row}
        results.add({**row, **{f"val_{k}": val[k] for k in MAP_KEYS}, "fitness": fitness}, step=state.step)
        accelerator.print(
            f"epoch {epoch + 1}: loss {train_row['train_loss']:.4f}, val mAP50 {val['map50']:.4f}, mAP50-95 {val['map']:.4f}"
            f"{' (best)' if improved else ''}, {train_row['train_samples_per_second']:.1f} images/s, lr {row['lr']:.2e}, "
            f"{train_row['seconds']:.0f} s, {clock.left(epoch)}"
        )
        checkpoints.save(next_epoch(state))
        # Before the stop check, as every process sees the same fitness: all leave here together.
        if args.patience and state.stale_epochs >= args.patience:
            accelerator.print(f"early stop: no improvement for {args.patience} epochs (best epoch {state.best_epoch + 1})")
            break
        if state.step == args.max_train_steps:
            break
        if agree(accelerator, stop, None, epoch=epoch, step=state.step):  # a stop asked for during evaluation
            stopped = True
            accelerator.print(stop_message(f"after epoch {epoch + 1}", state.step))
            break
    if stopped:
        accelerator.end_training()
        return

    # The best (EMA) model on val and test: metrics.json, COCO json files, pictures and the model card.
    if state.best_epoch is None:
        raise SystemExit("no epoch was trained (--epochs 0?), so there is no model to evaluate")
    ema.module.load_state_dict(load_pretrained(model_dir)[0])
    summary = {
        "task": detection_model.TASK,
        "best_epoch": state.best_epoch + 1,  # counted from 1, as the console, pictures and card count
        "labels": config["labels"],
        "train_samples_per_second": results.mean("train_samples_per_second"),
        **score_splits(accelerator, args, ema.module, datasets, loaders, config, metric),
    }
    shown = "test" if "test" in summary else "val"
    best = summary[shown]
    if accelerator.is_main_process:
        write_json(args.output_dir / "metrics.json", summary)
        plot_curves(results.path, args.output_dir / "curves.png")
        detection_model.write_card(args, model_dir, data.description, config, summary)
        pictures = ("curves", "pr_curves", "confusion_matrix", "labels", "val_predictions")
        log_pictures(accelerator, [args.output_dir / f"{name}.png" for name in pictures] + [batch_picture], state.step)
    per_class = {name: f"AP50 {best['per_class_ap50'][name]:.3f}  AP50-95 {ap:.3f}" for name, ap in best["per_class_ap"].items()}
    print_summary(accelerator, f"per class ({shown})", per_class)
    accelerator.print(
        f"best epoch {state.best_epoch + 1}: {shown} mAP50 {best['map50']:.4f}, mAP50-95 {best['map']:.4f}; model in {model_dir}"
    )
    accelerator.end_training()


# ==================================================================== helpers of train(), in the order it uses them
def model_config_for(args, data, weights, recipe: dict) -> dict:
    """The config of the model to build: new, or read from --weights (whose labels --eval-only data is matched to)."""
    if args.eval_only:
        if weights is None:
            raise SystemExit("--eval-only needs --weights RUN/model: the model to evaluate")
        detection_data.relabel(data, weights[1]["labels"], args.data)
        return weights[1]
    name = weights[1].get("model", args.model) if weights else args.model
    config = detection_model.model_config(name, data.names, args.img_size, recipe)
    config["img_size"] = detection_model.input_size(detection_model.build_model(config), args.img_size)  # SSD: its own size
    return config


def run_fingerprint(accelerator, args, plan, data, config, recipe: dict) -> dict:
    """Anything here that differs on --resume would train on other data, in another order or by another recipe: each
    image counts by its file's content (or its Hub dataset's fingerprint and row) and by its boxes and classes."""
    return {
        "task": detection_model.TASK,
        "labels": config["labels"],
        "processes": plan.processes,
        "batch_size": plan.batch_size,  # what --batch-size auto found
        "mixed_precision": accelerator.mixed_precision,
        "img_size": config["img_size"],
        **recipe,
        **files_fingerprint(detection_data.image_identities(data)),
        **{k: getattr(args, k) for k in RUN_IDENTITY},
        **stream_order(args),
    }


@torch.no_grad()
def evaluate(model, loader, accelerator, samples, names, metric, backend) -> tuple[dict, list[dict]]:
    """Each process predicts its shard; gather_for_metrics(use_gather_object=True) drops the padding added for
    even batches, so each image counts once. Every process computes the (identical) mAP, so all agree on the best
    epoch without a broadcast. Boxes are mapped back to the pixels of the original image files."""
    model.eval()
    predictions = []
    for images, targets in evaluation_bar(accelerator, loader):
        with accelerator.autocast():
            outputs = model(images.float().div_(255))
        batch = [
            {
                "image_id": t["image_id"],
                "boxes": detection_data.to_original_coordinates(out["boxes"].float(), t).cpu().numpy(),
                "scores": out["scores"].float().cpu().numpy(),
                "labels": (out["labels"] - 1).cpu().numpy(),
            }
            for out, t in zip(outputs, targets, strict=False)
        ]
        # Per batch: on the last one, accelerate knows how many gathered entries are padding and drops them.
        predictions += accelerator.gather_for_metrics(batch, use_gather_object=True)
    predictions = [p for p in predictions if p["image_id"] != detection_data.PADDING]  # --streaming: batch fillers
    by_id = {p["image_id"]: p for p in predictions}
    if len(by_id) != len(predictions) or set(by_id) != {s.image_id for s in samples}:
        raise RuntimeError(f"evaluation saw {len(predictions)} predictions for {len(by_id)} distinct of {len(samples)} images")
    ordered = [by_id[s.image_id] for s in samples]
    references = [
        {"image_id": s.image_id, "boxes": s.boxes.tolist(), "labels": s.labels.tolist(), "width": s.width, "height": s.height}
        for s in samples
    ]
    result = metric.compute(
        predictions=[{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in p.items()} for p in ordered],
        references=references,
        label_names=names,
        backend=backend,
    )
    return result, ordered


def score_splits(accelerator, args, model, datasets, loaders, config, metric) -> dict:
    """mAP on val and test; the predictions as COCO results beside a COCO ground truth, so anyone can re-check; the
    pictures of the last split (test when there is one): PR curves and confusion matrix."""
    scores, labels = {}, config["labels"]
    splits = [s for s in ("val", "test") if s in loaders]
    for split in splits:
        samples = datasets[split].samples
        scores[split], predictions = evaluate(model, loaders[split], accelerator, samples, labels, metric, args.map_backend)
        curves = scores[split].pop("pr_curves")  # drawn, not kept: metrics.json holds numbers
        if accelerator.is_main_process:
            write_json(args.output_dir / f"predictions_{split}.json", detection_data.coco_results(predictions))
            write_json(args.output_dir / f"ground_truth_{split}.json", detection_data.to_coco(samples, labels))
            if split == "val":
                detection_data.draw_grid(datasets["val"], predictions, labels, args.output_dir / "val_predictions.png")
            if split == splits[-1]:
                detection_data.plot_pr_curves(curves, args.output_dir / "pr_curves.png", split)
                title = f"confusion matrix: {split} (score >= 0.25, IoU >= 0.5)"
                matrix = scores[split]["confusion_matrix"]
                plot_confusion_matrix(matrix, [*labels, "background"], args.output_dir / "confusion_matrix.png", title)
    return scores


if __name__ == "__main__":
    main()
