#!/usr/bin/env python
"""Train an object detector (any torchvision detection model, or the small fcos_tiny) with the YOLO recipe,
on a CPU, one GPU or many, with Accelerate.

    python scripts/train_detection.py --data data/demo_detection/data.yaml --output-dir runs/det --epochs 30
    accelerate launch --config_file accelerate_configs/gpu4_fp16.yaml scripts/train_detection.py \\
        --data my_data/data.yaml --model fcos_resnet50_fpn --pretrained --img-size 640 --output-dir runs/det

--data is a YOLO data.yaml, a COCO instances .json or (with --format hub) a Hub dataset id (objects{bbox, category}).
The recipe: nominal batch 16 per optimizer step (FCOS's, for SGD at lr 0.01; by gradient accumulation when the batch
per step is smaller), warmup of LR and momentum, cosine decay, EMA weights for evaluation and saving, box-aware
augmentation (flip, scale jitter and crop; YOLO's 4-image mosaic with a random scale and shift, off for the last
epochs, with `--hyp` mosaic: 1), optional multi-scale, gradient clipping, COCO mAP every epoch, best model by
fitness 0.1 mAP50 + 0.9 mAP50-95, early stop. The run directory gets args.json, data_report.json, results.csv,
metrics.json, model/ (what predict_detection.py loads), checkpoints/, logs/ (TensorBoard), predictions_{split}.json +
ground_truth_{split}.json (COCO, for re-checking with pycocotools), curves.png, labels.png and val_predictions.png.
--eval-only --weights RUN/model scores a saved model on new labelled data; --weights alone fine-tunes from it.

To reuse this script in another project, copy these files, keeping their folders:
    scripts/train_detection.py scripts/detection_data.py scripts/detection_model.py
    shared/__init__.py shared/cache.py shared/checkpoint.py shared/model_io.py shared/plots.py shared/preemption.py
    shared/results.py shared/runtime.py shared/schedule.py shared/training.py
    scripts/metrics/coco_map/coco_map.py
"""

import argparse
import math
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory
from shared.preemption import end_with_the_launcher

end_with_the_launcher()  # first: a SIGTERM during the imports, data scan and decoding below ends the run too

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from detection_data import (
    MAX_PIXELS,
    ColourJitter,
    DetectionDataset,
    ImageCache,
    Mosaic,
    coco_results,
    default_cache_dir,
    draw_detections,
    eval_transform,
    image_cache_bytes,
    label_statistics,
    load_data,
    make_collate,
    require_boxes,
    targets_to_model,
    to_coco,
    to_original_coordinates,
    train_transform,
)
from detection_model import (
    TASK,
    available_models,
    build_model,
    freeze_backbone,
    head_parameters,
    input_size,
    make_ema,
    model_config,
    save_model,
    set_postprocess,
)
from evaluate import load as load_metric
from torchvision.transforms.v2 import functional as TF

from shared.checkpoint import Checkpoints, RunFolder, refuse_other_checkpoint
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

METRIC = Path(__file__).resolve().parent / "metrics" / "coco_map"  # an evaluate module, loaded by path
MAP_KEYS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")

# The recipe in one place; --hyp FILE.yaml overrides any of these keys.
HYP = {
    "optimizer": "SGD",  # SGD (Nesterov) or AdamW
    "lr0": 0.01,  # peak learning rate at the nominal batch
    "lrf": 0.01,  # final LR as a fraction of lr0
    "schedule": "cosine",  # cosine or linear decay after warmup
    "momentum": 0.937,  # SGD momentum / Adam beta1
    "weight_decay": 5e-4,  # on conv/linear weights only, scaled by effective / nominal batch
    "warmup_epochs": 3.0,  # LR ramps from 0 and momentum from warmup_momentum over this many epochs
    "warmup_momentum": 0.8,
    "ema_decay": 0.9999,  # EMA decay, ramped as decay * (1 - exp(-updates / ema_tau))
    "ema_tau": 2000,
    "clip_grad": 10.0,  # max gradient norm (0: off)
    "fliplr": 0.5,  # horizontal flip probability
    "scale": 0.5,  # scale jitter: 1 +- scale (of the image, or of the mosaic's view)
    # Probability that a training image is YOLO's 4-image mosaic. Off by default: on held-out data it cost short and
    # long runs alike (test mAP50-95 0.008 with it, 0.011 without at 20 epochs; 0.023 and 0.046 at 50, nominal batch
    # 64). --hyp with `mosaic: 1.0` turns it on.
    "mosaic": 0.0,
    # Mosaic is off for the last min(close_mosaic, max(1, round(epochs / 5))) epochs, so training ends on whole images
    # as evaluation sees them (0: never off). YOLO's 10 is a tenth of its 100 default epochs; unscaled it would leave
    # a 10-epoch run no mosaic at all, so a short run closes its last fifth instead (2 of 8 epochs).
    "close_mosaic": 10,
    "translate": 0.1,  # mosaic: random shift of the view, as a fraction of the image size
    "photometric": 0.5,  # probability of brightness/contrast/saturation jitter
    "colour": 0.4,  # jitter factors in 1 +- colour
    "min_box_size": 2.0,  # boxes cropped below this many pixels are dropped
    "eval_conf": 0.001,  # score threshold for mAP (low, as COCO evaluation expects)
    "eval_iou": 0.6,  # NMS IoU
    "max_det": 100,  # detections per image
}

# The arguments that fix what is trained, in which order and by which recipe (with HYP): a resumed run must have the same.
RECIPE_ARGS = ("model", "nominal_batch_size", "epochs", "seed", "multi_scale", "val_fraction", "freeze", "no_augment", "sync_bn")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = parser.add_argument_group("data")
    d.add_argument(
        "--data",
        required=True,
        help="YOLO data.yaml, COCO instances .json (images beside it or in images/), or a Hub dataset id (with --format hub)",
    )
    d.add_argument(
        "--format",
        choices=["yolo", "coco", "hub"],
        default=None,
        help="layout of --data (default: from the path: .yaml is YOLO, .json is COCO, a save_to_disk folder is Hub); "
        "a Hugging Face dataset id needs --format hub",
    )
    d.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"images with more pixels are skipped without decoding, and counted in data_report.json (default {MAX_PIXELS})",
    )
    d.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help="where the training images are cached decoded, scaled to --img-size, keyed by file list and size "
        f"(default {default_cache_dir()})",
    )
    d.add_argument("--no-cache", action="store_true", help="decode every training image from its file every time it is used")
    d.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="COCO json / Hub data without a validation split: fraction held out for it, fixed seed (default 0.1)",
    )
    m = parser.add_argument_group("model")
    m.add_argument("--model", default="fcos_tiny", help=f"detector name (default fcos_tiny): {', '.join(available_models())}")
    m.add_argument(
        "--img-size",
        type=int,
        default=224,
        help="long side of training and evaluation images in pixels (default 224; ssd* models use their fixed size)",
    )
    m.add_argument(
        "--pretrained",
        action="store_true",
        help="start from the COCO weights cached in the torch hub folder (stops if they are not cached)",
    )
    m.add_argument("--freeze", type=int, default=0, metavar="N", help="freeze the first N blocks of the backbone (default 0)")
    r = parser.add_argument_group("recipe")
    r.add_argument("--hyp", type=Path, default=None, help=f"YAML file overriding hyperparameters: {', '.join(HYP)}")
    r.add_argument(
        "--multi-scale", action="store_true", help="train each batch at a random size in 0.5-1.5 x --img-size (multiples of 32)"
    )
    r.add_argument(
        "--patience", type=int, default=30, help="stop when fitness has not improved for N epochs (default 30; 0: never)"
    )
    r.add_argument(
        "--map-backend",
        choices=["pycocotools", "faster_coco_eval"],
        default="pycocotools",
        help="COCO mAP implementation (default pycocotools)",
    )
    # 16, not YOLO's 64: four times the optimizer steps per epoch (400 images: 25 instead of 7). On the held-out
    # set at 50 epochs: validation mAP50-95 0.517 with 16 and 0.163 with 64, test 0.182 and 0.046 (yolov8n: 0.098).
    add_common_args(parser, epochs=30, batch_size=16, nominal_batch_size=16)
    return parser.parse_args(argv)


def load_hyp(path: Path | None) -> dict:
    hyp = dict(HYP)
    if path is not None:
        override = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(override) - set(HYP))
        if unknown:
            raise SystemExit(f"--hyp {path}: unknown keys {unknown}; valid keys are {', '.join(HYP)}")
        hyp.update(override)
    return hyp


def main(argv=None):
    args = parse_args(argv)
    hyp = load_hyp(args.hyp)
    data = load_data(args.data, args.val_fraction, fmt=args.format, max_pixels=args.max_pixels)
    config, weights = model_config_for(args, data, hyp)
    accelerator, plan = setup_accelerator(args, probe_step(args, config))
    run = RunFolder(accelerator, args.output_dir, resume=args.resume, overwrite=args.overwrite, data=args.data)
    fingerprint = run_fingerprint(accelerator, args, plan, data, config, hyp)
    refuse_other_checkpoint(run, args.resume, fingerprint)  # before anything is written
    accelerator.init_trackers(TASK, config=flat_config(args))
    report_data(accelerator, args, data, config)
    if args.eval_only:
        return evaluate_saved_model(accelerator, args, plan, data, config, weights, hyp)

    model, ema, optimizer, scheduler, datasets, loaders, start_note = build_training(
        accelerator, args, plan, data, config, weights, hyp
    )
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
    write_args_json(
        args, accelerator, plan, hyp=hyp, labels=config["labels"], img_size=config["img_size"], data_description=data.description
    )
    print_start(accelerator, args, plan, data, config, model, loaders["train"], hyp, start_note)

    loop = TrainingLoop(accelerator, checkpoints, state, epochs=args.epochs, checkpoint_steps=args.checkpoint_steps)
    train(accelerator, args, loop, model, ema, optimizer, scheduler, datasets, loaders, results, config, hyp)
    if not loop.stopped:
        finish(accelerator, args, loop.state, ema.module, datasets, loaders, results, data, config)
    accelerator.end_training()


# ==================================================================== phases of main()
def model_config_for(args, data, hyp):
    """The config of the model to build: new, or read from --weights (whose labels --eval-only data is matched to)."""
    weights = load_weights(args.weights, need_config=args.eval_only) if args.weights else None
    if args.eval_only:
        if weights is None:
            raise SystemExit("--eval-only needs --weights RUN/model: the model to evaluate")
        relabel(data, weights[1]["labels"], args.data)
        return weights[1], weights
    name = weights[1].get("model", args.model) if weights else args.model
    config = model_config(name, data.names, args.img_size, hyp)
    config["img_size"] = input_size(build_model(config), args.img_size)  # SSD models have their own fixed size
    return config, weights


def report_data(accelerator, args, data, config):
    """data_report.json, then stop before training if a split has no boxes to learn or score."""
    if accelerator.is_main_process:
        report = {"data": args.data, "names": data.names, **data.report.to_dict(data)}
        write_json(args.output_dir / "data_report.json", report)
        if not args.eval_only:
            plot_label_statistics(label_statistics(data.splits["train"], data.names), data.names, args.output_dir / "labels.png")
    require_boxes(data, args.output_dir / "data_report.json")


def build_training(accelerator, args, plan, data, config, weights, hyp):
    """Model (from --weights when given), its EMA, optimizer, schedule and data loaders, prepared by Accelerate."""
    model = build_model(config, pretrained=args.pretrained)
    initial = "COCO init" if args.pretrained else "from scratch"
    start_note = start_from(model, weights, config["labels"], head_parameters(model), initial)
    frozen = freeze_backbone(model, args.freeze)
    start_note += f", frozen: {', '.join(frozen)}" if frozen else ""
    set_postprocess(model, hyp["eval_conf"], hyp["eval_iou"], hyp["max_det"])
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model.backbone.compile()  # in place, so parameter names (checkpoints, model/) stay the same
    datasets = detection_datasets(args, data, config["img_size"], hyp)
    loaders = {split: image_loader(ds, args, plan, config, shuffle=split == "train") for split, ds in datasets.items()}
    # Weight decay as YOLO scales it: proportional to the effective batch relative to the nominal one.
    decay = hyp["weight_decay"] * plan.effective_batch_size / args.nominal_batch_size
    optimizer = make_optimizer(parameter_groups(model, decay), hyp)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared, strict=True))
    steps_per_epoch = math.ceil(len(loaders["train"]) / plan.accumulation_steps)
    scheduler = build_scheduler(
        optimizer,
        total_steps=steps_per_epoch * args.epochs,
        warmup_steps=round(hyp["warmup_epochs"] * steps_per_epoch),
        shape=hyp["schedule"],
        final_lr_ratio=hyp["lrf"],
    )
    ema = make_ema(accelerator.unwrap_model(model, keep_torch_compile=False), hyp["ema_decay"], hyp["ema_tau"])
    seed_per_process(accelerator, args.seed)
    return model, ema, optimizer, scheduler, datasets, loaders, start_note


def run_fingerprint(accelerator, args, plan, data, config, hyp) -> dict:
    """Anything here that differs on --resume would train on other data, in another order or by another recipe: each
    image counts by its file's content (or its Hub dataset's fingerprint and row) and by its boxes and classes."""
    hub = {split: dataset._fingerprint for split, dataset in data.hub.items()}
    images = {
        split: [(hub.get(split), s.source if split in hub else Path(s.source), s.boxes, s.labels) for s in samples]
        for split, samples in data.splits.items()
    }
    return {
        "task": TASK,
        "labels": config["labels"],
        "processes": plan.processes,
        "batch_size": plan.batch_size,  # what --batch-size auto found
        "mixed_precision": accelerator.mixed_precision,
        "hyp": hyp,
        "img_size": config["img_size"],
        **files_fingerprint(images),
        **{k: getattr(args, k) for k in RECIPE_ARGS},
    }


def print_start(accelerator, args, plan, data, config, model, train_dl, hyp, start_note):
    labels, steps = config["labels"], math.ceil(len(train_dl) / plan.accumulation_steps)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print_summary(
        accelerator,
        "object detection",
        {
            "data": data.description,
            "images": ", ".join(f"{s} {len(v)} ({sum(len(x.labels) for x in v)} boxes)" for s, v in data.splits.items()),
            "data report": f"{data.report.summary()} (details: {args.output_dir / 'data_report.json'})",
            "classes": f"{len(labels)}: {', '.join(labels[:12])}{' ...' if len(labels) > 12 else ''}",
            "model": f"{config['model']} at {config['img_size']} px, {parameters:.2f} M parameters ({start_note})",
            "processes": f"{accelerator.num_processes} on {accelerator.device} (mixed precision: {accelerator.mixed_precision})",
            "batch": plan.describe(),
            "optimizer steps": f"{steps} per epoch, {steps * args.epochs} in total, {round(hyp['warmup_epochs'] * steps)} warmup",
            "mosaic": describe_mosaic(args, hyp),
            "image cache": describe_cache(train_dl.dataset.cache),
        },
    )


def describe_cache(cache) -> str:
    return f"{cache.path} ({cache.path.stat().st_size / 1e6:.0f} MB)" if cache else "off: images decoded as they are read"


def train(accelerator, args, loop, model, ema, optimizer, scheduler, datasets, loaders, results, config, hyp):
    model_dir, metric = args.output_dir / "model", load_metric(str(METRIC))
    warmup_steps = round(hyp["warmup_epochs"] * math.ceil(len(loaders["train"]) / accelerator.gradient_accumulation_steps))
    for epoch in loop.epochs():
        model.train()
        datasets["train"].set_epoch(epoch)  # augmentation seeded by (seed, epoch, image)
        for images, targets in loop.batches(loaders["train"]):
            images, targets = to_training_batch(accelerator, args, images, targets, config["img_size"], loop.state)
            with accelerator.accumulate(model):
                warmup_momentum(optimizer, loop.state.step, warmup_steps, hyp["warmup_momentum"], hyp["momentum"])
                with accelerator.autocast():
                    losses = model(images, targets)
                loss = sum(losses.values())
                accelerator.backward(loss)
                loop.after_backward({"loss": loss, **losses}, len(targets))
                if optimizer_step(accelerator, model, optimizer, scheduler, hyp["clip_grad"]):
                    ema.update_parameters(accelerator.unwrap_model(model))
        if loop.stopped:
            return
        train_row = loop.epoch_summary()

        val, _ = evaluate(
            ema.module, loaders["val"], accelerator, datasets["val"].samples, config["labels"], metric, args.map_backend
        )
        fitness = 0.1 * val["map50"] + 0.9 * val["map"]
        improved = loop.end_epoch(fitness, {k: val[k] for k in MAP_KEYS})
        if improved and accelerator.is_main_process:
            save_model(model_dir, accelerator.unwrap_model(ema.module, keep_torch_compile=False), config)
        accelerator.wait_for_everyone()
        results.add(
            {
                "epoch": epoch,
                "step": loop.state.step,
                "lr": scheduler.get_last_lr()[0],
                **train_row,
                **{f"val_{k}": val[k] for k in MAP_KEYS},
                "fitness": fitness,
            },
            step=loop.state.step,
        )
        accelerator.print(
            f"epoch {epoch + 1}: loss {train_row['train_loss']:.4f}, val mAP50 {val['map50']:.4f}, mAP50-95 {val['map']:.4f}"
            f"{' (best)' if improved else ''}, {train_row['train_samples_per_second']:.1f} images/s"
        )
        loop.next_epoch()
        if args.patience and loop.state.stale_epochs >= args.patience:
            accelerator.print(f"early stop: no improvement for {args.patience} epochs (best epoch {loop.state.best_epoch + 1})")
            return


def finish(accelerator, args, state, best_model, datasets, loaders, results, data, config):
    """The best (EMA) model on val and test: metrics.json, COCO json files, pictures and the model card."""
    if state.best_epoch is None:
        raise SystemExit("no epoch was trained (--epochs 0?), so there is no model to evaluate")
    model_dir = args.output_dir / "model"
    best_model.load_state_dict(load_pretrained(model_dir)[0])
    summary = {
        "task": TASK,
        "best_epoch": state.best_epoch,
        "labels": config["labels"],
        "train_samples_per_second": results.mean("train_samples_per_second"),
        **score_splits(accelerator, args, best_model, datasets, loaders, config),
    }
    if accelerator.is_main_process:
        write_json(args.output_dir / "metrics.json", summary)
        plot_curves(results.path, args.output_dir / "curves.png")
        write_card(args, model_dir, data, config, summary)
    shown = "test" if "test" in summary else "val"
    accelerator.print(
        f"best epoch {state.best_epoch + 1}: {shown} mAP50 {summary[shown]['map50']:.4f}, "
        f"mAP50-95 {summary[shown]['map']:.4f}; model in {model_dir}"
    )


def evaluate_saved_model(accelerator, args, plan, data, config, weights, hyp):
    """--eval-only: score the --weights model on val and test (exactly once per image under DDP)."""
    model = build_model(config)
    model.load_state_dict(weights[0])
    set_postprocess(model, hyp["eval_conf"], hyp["eval_iou"], hyp["max_det"])
    datasets = {s: ds for s, ds in detection_datasets(args, data, config["img_size"], hyp).items() if s != "train"}
    loaders = {split: image_loader(ds, args, plan, config, shuffle=False) for split, ds in datasets.items()}
    model, *prepared = accelerator.prepare(model, *loaders.values())
    loaders = dict(zip(loaders, prepared, strict=True))
    summary = {"task": TASK, "weights": str(args.weights), "labels": config["labels"]}
    summary.update(score_splits(accelerator, args, accelerator.unwrap_model(model), datasets, loaders, config))
    write_args_json(
        args, accelerator, plan, hyp=hyp, labels=config["labels"], img_size=config["img_size"], data_description=data.description
    )
    if accelerator.is_main_process:
        write_json(args.output_dir / "metrics.json", summary)
    for split in loaders:
        accelerator.print(
            f"{split}: mAP50 {summary[split]['map50']:.4f}, mAP50-95 {summary[split]['map']:.4f} on {len(datasets[split])} images"
        )
    accelerator.end_training()


def score_splits(accelerator, args, model, datasets, loaders, config) -> dict:
    """mAP on val and test; the predictions as COCO results beside a COCO ground truth, so anyone can re-check."""
    metric, scores = load_metric(str(METRIC)), {}
    for split in ("val", "test"):
        if split not in loaders:
            continue
        samples = datasets[split].samples
        scores[split], predictions = evaluate(
            model, loaders[split], accelerator, samples, config["labels"], metric, args.map_backend
        )
        if accelerator.is_main_process:
            write_json(args.output_dir / f"predictions_{split}.json", coco_results(predictions))
            write_json(args.output_dir / f"ground_truth_{split}.json", to_coco(samples, config["labels"]))
            if split == "val":
                draw_grid(datasets["val"], predictions, config["labels"], args.output_dir / "val_predictions.png")
    return scores


# ==================================================================== training helpers
def detection_datasets(args, data, img_size: int, hyp: dict) -> dict:
    augment = not args.no_augment and not args.eval_only
    train_cache = None if args.eval_only else training_image_cache(args, data.splits["train"], data.hub.get("train"), img_size)
    return {
        split: DetectionDataset(
            samples,
            train_transform(img_size, hyp) if split == "train" and augment else eval_transform(img_size),
            data.hub.get(split),
            seed=args.seed,
            colour_jitter=ColourJitter(hyp["colour"], hyp["photometric"]) if split == "train" and augment else None,
            mosaic=Mosaic(img_size, hyp, mosaic_epochs(args.epochs, hyp)) if split == "train" and augment else None,
            cache=train_cache if split == "train" else None,
        )
        for split, samples in data.splits.items()
    }


def training_image_cache(args, samples, hub_dataset, img_size: int) -> ImageCache | None:
    """Training reads every image once per epoch, or four times with mosaic: decode them once. Not when the cache
    would take over half the free space of --cache-dir (then the run says so and decodes as it goes)."""
    if args.no_cache:
        return None
    needed, free = image_cache_bytes(samples, img_size), disk_free(args.cache_dir)
    if needed > free / 2:
        print(f"image cache off: {len(samples)} training images at {img_size} px take {needed / 1e9:.1f} GB and "
              f"{args.cache_dir} has {free / 1e9:.1f} GB free; give --cache-dir on a larger disk, or --no-cache to "
              "silence this")  # fmt: skip
        return None
    return ImageCache(samples, hub_dataset, img_size, args.cache_dir, args.workers)


def disk_free(folder: Path) -> int:
    folder = Path(folder).absolute()
    while not folder.exists():  # the cache folder is made on first use
        folder = folder.parent
    return shutil.disk_usage(folder).free


def mosaic_epochs(epochs: int, hyp: dict) -> int:
    """How many epochs from the start use mosaic: all but the closed last ones (see close_mosaic in HYP)."""
    if not hyp["mosaic"]:
        return 0
    return epochs - min(hyp["close_mosaic"], max(1, round(epochs / 5)))


def describe_mosaic(args, hyp: dict) -> str:
    until = 0 if args.no_augment else mosaic_epochs(args.epochs, hyp)
    if until <= 0:
        return "off"
    return f"probability {hyp['mosaic']:g}, epochs 1-{until} of {args.epochs}"


def image_loader(dataset, args, plan, config, shuffle: bool):
    collate = make_collate(config["img_size"], channels_last=shuffle)  # the training loader: see to_training_batch
    return make_loader(dataset, batch_size=plan.batch_size, shuffle=shuffle, workers=args.workers, collate_fn=collate)


def to_training_batch(accelerator, args, images, targets, img_size: int, state):
    """uint8 batch -> float images with their colour jitter, targets on the device, multi-scale size."""
    # The loader's batch is channels-last (the layout the mosaic makes without a transpose per image); transposed here,
    # on the device, where it is cheap.
    images = images.contiguous()
    if args.no_augment:
        images = images.float().div_(255)
    else:
        images = ColourJitter.apply(images, torch.stack([t["colour"] for t in targets]).to(images.device))
    targets = targets_to_model(targets, accelerator.device)
    if args.multi_scale:
        size = random_size(args, img_size, state.epoch, state.batch_in_epoch, accelerator)
        images, targets = rescale_batch(images, targets, size)
    return images, targets


def relabel(data, labels: list[str], root):
    """Express every box's class as an index into the model's labels."""
    index = label_index(data.names, labels, root)
    for sample in (s for samples in data.splits.values() for s in samples):
        sample.labels = index[sample.labels]
    data.names = labels


def make_optimizer(groups: list[dict], hyp: dict) -> torch.optim.Optimizer:
    if hyp["optimizer"] == "SGD":
        return torch.optim.SGD(groups, lr=hyp["lr0"], momentum=hyp["momentum"], nesterov=True)
    if hyp["optimizer"] == "AdamW":
        return torch.optim.AdamW(groups, lr=hyp["lr0"], betas=(hyp["momentum"], 0.999))
    raise SystemExit(f"hyp optimizer {hyp['optimizer']!r}: use SGD or AdamW")


def warmup_momentum(optimizer, step: int, warmup_steps: int, start: float, end: float):
    """Ramp SGD momentum (or Adam's beta1) from start to end over the warmup, as the YOLO recipe does."""
    value = end if step >= warmup_steps else start + (end - start) * step / warmup_steps
    for group in optimizer.param_groups:
        if "momentum" in group:
            group["momentum"] = value
        elif "betas" in group:
            group["betas"] = (value, group["betas"][1])


def probe_step(args, config: dict):
    """One training step on random images at the largest training size, for --batch-size auto."""
    size = int(config["img_size"] * (1.5 if args.multi_scale else 1))

    def step(batch_size, device, dtype):
        model = build_model(config).to(device).train()
        box = {
            "boxes": torch.tensor([[4.0, 4.0, size / 2, size / 2]], device=device),
            "labels": torch.ones(1, dtype=torch.int64, device=device),
        }
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = sum(model(torch.rand(batch_size, 3, size, size, device=device), [box] * batch_size).values())
        loss.backward()

    return step


def random_size(args, img_size: int, epoch: int, batch_in_epoch: int, accelerator) -> int:
    """Multi-scale size for this batch, seeded by its global position: identical after a resume and for any process count."""
    global_batch = batch_in_epoch * accelerator.num_processes + accelerator.process_index
    rng = random.Random(hash((args.seed, epoch, global_batch)))
    return rng.randrange(int(img_size * 0.5) // 32, int(img_size * 1.5) // 32 + 1) * 32


def rescale_batch(images: torch.Tensor, targets: list[dict], size: int):
    factor = size / images.shape[-1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, [{**t, "boxes": t["boxes"] * factor} for t in targets]


# ==================================================================== evaluation
@torch.no_grad()
def evaluate(model, loader, accelerator, samples, names, metric, backend) -> tuple[dict, list[dict]]:
    """Each process predicts its shard; gather_for_metrics(use_gather_object=True) drops the padding added for
    even batches, so each image counts once. Every process computes the (identical) mAP, so all agree on the best
    epoch without a broadcast. Boxes are mapped back to the pixels of the original image files."""
    model.eval()
    predictions = []
    for images, targets in loader:
        with accelerator.autocast():
            outputs = model(images.float().div_(255))
        batch = [
            {
                "image_id": t["image_id"],
                "boxes": to_original_coordinates(out["boxes"].float(), t).cpu().numpy(),
                "scores": out["scores"].float().cpu().numpy(),
                "labels": (out["labels"] - 1).cpu().numpy(),
            }
            for out, t in zip(outputs, targets, strict=False)
        ]
        # Per batch: on the last one, accelerate knows how many gathered entries are padding and drops them.
        predictions += accelerator.gather_for_metrics(batch, use_gather_object=True)
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


# ==================================================================== pictures
def draw_grid(dataset: DetectionDataset, predictions: list[dict], names, path: Path, count: int = 16, conf: float = 0.3):
    """Validation images with predictions (score >= conf) over the ground truth, as a 4-column grid."""
    from torchvision.utils import make_grid

    tiles, tile = [], 256
    for index, pred in list(enumerate(predictions))[:count]:
        keep = pred["scores"] >= conf
        image = draw_detections(
            dataset.load(index),
            pred["boxes"][keep],
            pred["labels"][keep],
            pred["scores"][keep],
            names,
            dataset.samples[index].boxes,
        )
        image = TF.resize(image, None, max_size=tile)
        tiles.append(F.pad(image, (0, tile - image.shape[2], 0, tile - image.shape[1])))
    TF.to_pil_image(make_grid(tiles, nrow=4, padding=4)).save(path)


def write_card(args, model_dir: Path, data, config: dict, summary: dict):
    metrics = {split: {k: summary[split][k] for k in ("map", "map50", "map75")} for split in ("val", "test") if split in summary}
    usage = f"""```bash
python scripts/predict_detection.py --model-dir {model_dir} photos/ --conf 0.25   # COCO json, YOLO txt, drawn images
python scripts/train_detection.py --eval-only --weights {model_dir} --data OTHER.yaml --output-dir runs/eval
python scripts/export_model.py --model-dir {model_dir} --format onnx              # image -> boxes, scores, labels
python scripts/serve.py --model-dir {model_dir} --port 8000                       # POST /v1/predict
```
Input: RGB images letterboxed to {config["img_size"]} x {config["img_size"]} px (the predict script and the server do it)."""
    write_model_card(
        model_dir,
        pipeline_tag="object-detection",
        title=f"{config['model']} object detector ({len(config['labels'])} classes)",
        labels=config["labels"],
        data=f"{data.description}. Best epoch {summary['best_epoch']} of {args.epochs}, picked by 0.1 mAP50 + 0.9 mAP50-95.",
        metrics=metrics,
        arguments={k: v for k, v in vars(args).items() if k != "output_dir"},
        usage=usage,
    )


def plot_label_statistics(stats: dict, names: list[str], path: Path):
    """Boxes per class, box width vs height, and where box centres fall (all normalised by image size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(range(len(names)), stats["counts"])
    axes[0].set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0)
    axes[0].set_title("boxes per class")
    axes[1].scatter(stats["wh"][:, 0], stats["wh"][:, 1], s=3, alpha=0.4)
    axes[1].set(xlabel="width", ylabel="height", xlim=(0, 1), ylim=(0, 1), title="box size / image size")
    axes[2].hist2d(stats["centers"][:, 0], stats["centers"][:, 1], bins=20, range=[[0, 1], [0, 1]], cmap="Blues")
    axes[2].set(xlabel="x", ylabel="y", title="box centres")
    axes[2].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
