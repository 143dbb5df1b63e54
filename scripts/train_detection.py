#!/usr/bin/env python
"""Train an object detector (any torchvision detection model, or the small fcos_tiny) with the YOLO recipe,
on a CPU, one GPU or many, with Accelerate.

    python scripts/train_detection.py --data data/demo_detection/data.yaml --output-dir runs/det --epochs 30
    accelerate launch --config_file accelerate_configs/gpu4_fp16.yaml scripts/train_detection.py \\
        --data my_data/data.yaml --model fcos_resnet50_fpn --pretrained --img-size 640 --output-dir runs/det

--data is a YOLO data.yaml, a COCO instances .json or a Hub dataset id (objects{bbox, category}).
The recipe: nominal batch 64 by gradient accumulation across processes, warmup of LR and momentum, cosine
decay, EMA weights for evaluation and saving, box-aware augmentation, optional multi-scale, gradient
clipping, COCO mAP every epoch, best model by fitness 0.1 mAP50 + 0.9 mAP50-95, early stop. The run
directory gets args.json, data_report.json, results.csv, metrics.json, model/ (what predict_detection.py
loads), checkpoints/, logs/ (TensorBoard), predictions_{split}.json + ground_truth_{split}.json (COCO, for
re-checking with pycocotools), curves.png, labels.png and val_predictions.png."""

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from detection_data import (
    MAX_PIXELS,
    ColourJitter,
    DetectionDataset,
    eval_transform,
    label_statistics,
    load_data,
    make_collate,
    require_boxes,
    targets_to_model,
    to_coco,
    to_original_coordinates,
    train_transform,
)
from detection_model import available_models, build_model, freeze_backbone, input_size, set_postprocess

from shared.checkpoint import Checkpoints, GracefulStop, RunFolder
from shared.ema import make_ema
from shared.metrics import load_metric
from shared.model_io import load_pretrained, save_pretrained
from shared.plots import plot_curves
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
from shared.schedule import build_scheduler, warmup_momentum
from shared.training import (
    StepGuard,
    epoch_bar,
    largest_batch_size,
    optimizer_step,
    throughput,
    unwrap_for_saving,
)

TASK = "detection"

# The recipe in one place; --hyp FILE.yaml overrides any of these keys.
HYP = {
    "optimizer": "SGD",  # SGD (Nesterov) or AdamW
    "lr0": 0.01,  # peak learning rate at the nominal batch
    "lrf": 0.01,  # final LR as a fraction of lr0
    "schedule": "cosine",  # cosine or linear decay after warmup
    "momentum": 0.937,  # SGD momentum / Adam beta1
    "weight_decay": 5e-4,  # on conv/linear weights only, scaled by effective batch / 64
    "warmup_epochs": 3.0,  # LR ramps from 0 and momentum from warmup_momentum over this many epochs
    "warmup_momentum": 0.8,
    "ema_decay": 0.9999,  # EMA decay, ramped as decay * (1 - exp(-updates / ema_tau))
    "ema_tau": 2000,
    "clip_grad": 10.0,  # max gradient norm (0: off)
    "fliplr": 0.5,  # horizontal flip probability
    "scale": 0.5,  # scale jitter: 1 +- scale
    "photometric": 0.5,  # probability of brightness/contrast/saturation jitter
    "colour": 0.4,  # jitter factors in 1 +- colour
    "min_box_size": 2.0,  # boxes cropped below this many pixels are dropped
    "eval_conf": 0.001,  # score threshold for mAP (low, as COCO evaluation expects)
    "eval_iou": 0.6,  # NMS IoU
    "max_det": 100,  # detections per image
}


# The arguments that fix the sample order and the schedule: a resumed run must have the same ones.
ORDER_AND_SCHEDULE_ARGS = ("model", "batch_size", "nominal_batch_size", "epochs", "seed", "multi_scale", "val_fraction")


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
    r.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="update the progress bar every N optimizer steps (default 10)",
    )
    add_common_args(parser, epochs=30, batch_size=16, nominal_batch_size=64)
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
    if args.batch_size == "auto":
        args.batch_size = largest_batch_size(args, probe_step(args))
    accelerator = setup_accelerator(args)
    run = RunFolder(accelerator, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    accelerator.init_trackers(TASK, config=flat_config(args))

    # ---------------------------------------------------------------- data
    data = load_data(args.data, args.val_fraction, fmt=args.format, max_pixels=args.max_pixels)
    names = data.names
    if accelerator.is_main_process:
        write_json(args.output_dir / "data_report.json", {"data": args.data, "names": names, **data.report.to_dict(data)})
    require_boxes(data, args.output_dir / "data_report.json")

    # ---------------------------------------------------------------- model
    model = build_model(args.model, len(names), args.img_size, args.pretrained)
    img_size = input_size(model, args.img_size)
    frozen = freeze_backbone(model, args.freeze)
    set_postprocess(model, hyp["eval_conf"], hyp["eval_iou"], hyp["max_det"])
    model.transform._skip_resize = True  # batches arrive at their training size (multi-scale included)
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model.backbone.compile()  # in place, so parameter names (checkpoints, model/) stay the same

    augment = not args.no_augment
    datasets = {
        split: DetectionDataset(
            samples,
            train_transform(img_size, hyp) if split == "train" and augment else eval_transform(img_size),
            data.hub.get(split),
            seed=args.seed,
            colour_jitter=ColourJitter(hyp["colour"], hyp["photometric"]) if split == "train" and augment else None,
        )
        for split, samples in data.splits.items()
    }
    collate = make_collate(img_size)
    train_dl = make_loader(datasets["train"], batch_size=args.batch_size, shuffle=True, workers=args.workers, collate_fn=collate)
    val_dl = make_loader(datasets["val"], batch_size=args.batch_size, shuffle=False, workers=args.workers, collate_fn=collate)

    # ---------------------------------------------------------------- optimizer, schedule, EMA
    optimizer = make_optimizer(model, hyp, args.effective_batch_size)
    model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    steps_per_epoch = math.ceil(len(train_dl) / args.accumulation_steps)
    warmup_steps = round(hyp["warmup_epochs"] * steps_per_epoch)
    scheduler = build_scheduler(
        optimizer,
        total_steps=steps_per_epoch * args.epochs,
        warmup_steps=warmup_steps,
        shape=hyp["schedule"],
        final_lr_ratio=hyp["lrf"],
    )
    ema = make_ema(unwrap_for_saving(accelerator, model), hyp["ema_decay"], hyp["ema_tau"])
    seed_per_process(accelerator, args.seed)

    # Anything here that differs on --resume would skip the wrong samples or jump the schedule.
    fingerprint = {
        "task": TASK,
        "labels": names,
        "processes": accelerator.num_processes,
        "hyp": hyp,
        "img_size": img_size,
        "files": files_fingerprint({split: [str(s.source) for s in samples] for split, samples in data.splits.items()}),
        **{k: getattr(args, k) for k in ORDER_AND_SCHEDULE_ARGS},
    }
    checkpoints = Checkpoints(
        accelerator,
        run,
        keep=args.keep_checkpoints,
        fingerprint=fingerprint,
        modules={"model": model, "ema": ema},
        states={"optimizer": optimizer, "scheduler": scheduler},
    )
    progress = checkpoints.resume(args.resume) or {
        "epoch": 0,
        "batch_in_epoch": 0,
        "step": 0,
        "loss_sums": {},
        "loss_batches": 0,
        "best_fitness": None,
        "best_epoch": None,
        "stale_epochs": 0,
    }
    results = ResultsLog(accelerator, args.output_dir)
    results.keep_epochs_before(progress["epoch"])
    config = {
        "task": TASK,
        "model": args.model,
        "labels": names,
        "num_classes": len(names),
        "img_size": img_size,
        "conf": 0.25,
        "iou": hyp["eval_iou"],
        "max_det": hyp["max_det"],
    }
    write_args_json(args, accelerator, hyp=hyp, labels=names, img_size=img_size, data_description=data.description)
    print_summary(
        accelerator,
        "object detection",
        {
            "data": data.description,
            "images": ", ".join(f"{s} {len(v)} ({sum(len(x.labels) for x in v)} boxes)" for s, v in data.splits.items()),
            "data report": f"{data.report.summary()} (details: {args.output_dir / 'data_report.json'})",
            "classes": f"{len(names)}: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}",
            "model": f"{args.model} at {img_size} px, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
            + (f", frozen: {', '.join(frozen)}" if frozen else "")
            + (", COCO init" if args.pretrained else ""),
            "processes": f"{accelerator.num_processes} on {accelerator.device} (mixed precision: {accelerator.mixed_precision})",
            "batch": f"{args.batch_size} per device x {accelerator.num_processes} processes x {args.accumulation_steps} "
            f"accumulation steps = {args.effective_batch_size} per optimizer step",
            "optimizer steps": f"{steps_per_epoch} per epoch, {steps_per_epoch * args.epochs} in total, {warmup_steps} warmup",
        },
    )
    if accelerator.is_main_process:
        plot_label_statistics(label_statistics(data.splits["train"], names), names, args.output_dir / "labels.png")

    # ---------------------------------------------------------------- training loop
    guard = StepGuard(accelerator, GracefulStop())
    model_dir = args.output_dir / "model"
    metric = load_metric("coco_map")
    step = progress["step"]
    for epoch in range(progress["epoch"], args.epochs):
        resumed_here = epoch == progress["epoch"] and progress["batch_in_epoch"] > 0
        skip = progress["batch_in_epoch"] if resumed_here else 0
        carried = progress["loss_sums"] if resumed_here else {}
        carried_batches = progress["loss_batches"] if resumed_here else 0
        model.train()
        train_dl.set_epoch(epoch)  # seeded by (seed, epoch): the same order for any process count and after a resume
        datasets["train"].set_epoch(epoch)  # augmentation seeded by (seed, epoch, image)
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        loss_names, running, local_batches = None, None, 0  # running loss sums stay on the device: no host sync per step
        start, batch_in_epoch = time.perf_counter(), skip
        bar = epoch_bar(accelerator, epoch=epoch, epochs=args.epochs, total=len(train_dl), done=skip)
        for images, targets in loader:
            if augment:
                images = ColourJitter.apply(images, torch.stack([t["colour"] for t in targets]).to(images.device))
            else:
                images = images.float().div_(255)
            targets = targets_to_model(targets, accelerator.device)
            if args.multi_scale:
                images, targets = rescale_batch(images, targets, random_size(args, img_size, epoch, batch_in_epoch, accelerator))
            with accelerator.accumulate(model):
                warmup_momentum(optimizer, step, warmup_steps, hyp["warmup_momentum"], hyp["momentum"])
                with accelerator.autocast():
                    losses = model(images, targets)
                loss = sum(losses.values())
                accelerator.backward(loss)
                guard.add(loss)
                stopping = accelerator.sync_gradients and guard.stop_agreed(epoch=epoch, step=step + 1)
                stepped = optimizer_step(accelerator, model, optimizer, scheduler, ema, hyp["clip_grad"])
            values = torch.stack([loss.detach(), *(v.detach() for v in losses.values())]).double()
            loss_names = loss_names or ["loss", *losses]
            running = values if running is None else running + values
            local_batches += 1
            batch_in_epoch += 1
            bar.update(1)
            if not stepped:
                continue
            step += 1
            checkpoint_due = bool(args.checkpoint_steps) and step % args.checkpoint_steps == 0
            if step % args.log_every == 0:
                mean_loss = running[0].item() / local_batches
                seen = local_batches * args.batch_size * accelerator.num_processes
                bar.set_postfix(
                    loss=f"{mean_loss:.3f}",
                    img_per_s=f"{seen / (time.perf_counter() - start):.1f}",
                    lr=f"{scheduler.get_last_lr()[0]:.2e}",
                )
            if checkpoint_due or stopping:
                losses_so_far = epoch_losses(
                    accelerator, loss_names, running, local_batches, carried, carried_batches, reduce_only=True
                )
                save_checkpoint(
                    accelerator, checkpoints, progress, epoch=epoch, batch_in_epoch=batch_in_epoch, step=step, **losses_so_far
                )
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
        train = epoch_losses(accelerator, loss_names, running, local_batches, carried, carried_batches)
        train_images = local_batches * args.batch_size * accelerator.num_processes

        # ------------------------------------------------------------ evaluation of the EMA weights
        val, _ = evaluate(ema.module, val_dl, accelerator, data.splits["val"], names, metric, args.map_backend)
        fitness = 0.1 * val["map50"] + 0.9 * val["map"]
        improved = progress["best_fitness"] is None or fitness > progress["best_fitness"]
        if improved:
            progress.update(best_fitness=fitness, best_epoch=epoch, stale_epochs=0)
            if accelerator.is_main_process:
                save_pretrained(model_dir, unwrap_for_saving(accelerator, ema.module), config)
        else:
            progress["stale_epochs"] += 1
        accelerator.wait_for_everyone()
        results.add(
            {
                "epoch": epoch,
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                **{f"train_{k}": v for k, v in train.items()},
                **{f"val_{k}": val[k] for k in ("map", "map50", "map75", "map_small", "map_medium", "map_large")},
                "fitness": fitness,
                "seconds": seconds,
                "train_samples_per_second": throughput(train_images, seconds),
            },
            step=step,
        )
        accelerator.print(
            f"epoch {epoch + 1}: loss {train['loss']:.4f}, val mAP50 {val['map50']:.4f}, mAP50-95 {val['map']:.4f}"
            f"{' (best)' if improved else ''}, {throughput(train_images, seconds):.1f} images/s"
        )
        save_checkpoint(
            accelerator, checkpoints, progress, epoch=epoch + 1, batch_in_epoch=0, step=step, loss_sums={}, loss_batches=0
        )
        if args.patience and progress["stale_epochs"] >= args.patience:
            accelerator.print(f"early stop: no improvement for {args.patience} epochs (best epoch {progress['best_epoch'] + 1})")
            break
        if guard.stop_agreed(epoch=epoch, step=step):
            accelerator.print(f"stopped after epoch {epoch + 1}; checkpoint saved. Continue with the same command plus --resume.")
            accelerator.end_training()
            return

    # ---------------------------------------------------------------- best model on val (and test), artifacts
    if progress["best_epoch"] is None:
        raise SystemExit("no epoch was trained (--epochs 0?), so there is no model to evaluate")
    state, _ = load_pretrained(model_dir)
    best_model = ema.module
    best_model.load_state_dict(state)
    summary = {
        "task": TASK,
        "best_epoch": progress["best_epoch"],
        "labels": names,
        "train_samples_per_second": mean_throughput(results),
    }
    for split in ("val", "test"):
        if split not in data.splits:
            continue
        dl = (
            val_dl
            if split == "val"
            else accelerator.prepare_data_loader(
                make_loader(datasets[split], batch_size=args.batch_size, shuffle=False, workers=args.workers, collate_fn=collate)
            )
        )
        metrics, predictions = evaluate(best_model, dl, accelerator, data.splits[split], names, metric, args.map_backend)
        summary[split] = metrics
        if accelerator.is_main_process:
            write_json(args.output_dir / f"predictions_{split}.json", coco_results(predictions))
            write_json(args.output_dir / f"ground_truth_{split}.json", to_coco(data.splits[split], names))
            if split == "val":
                draw_predictions(datasets["val"], predictions, names, args.output_dir / "val_predictions.png")
    write_metrics(accelerator, args.output_dir, summary)
    if accelerator.is_main_process:
        plot_curves(results.path, args.output_dir / "curves.png")
    shown = "test" if "test" in summary else "val"
    accelerator.print(
        f"best epoch {progress['best_epoch'] + 1}: {shown} mAP50 {summary[shown]['map50']:.4f}, "
        f"mAP50-95 {summary[shown]['map']:.4f}; model in {model_dir}"
    )
    accelerator.end_training()


# ==================================================================== training helpers
def make_optimizer(model, hyp: dict, effective_batch: int) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only (not biases or norms), scaled to the batch as YOLO does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": hyp["weight_decay"] * effective_batch / 64},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if hyp["optimizer"] == "SGD":
        return torch.optim.SGD(groups, lr=hyp["lr0"], momentum=hyp["momentum"], nesterov=True)
    if hyp["optimizer"] == "AdamW":
        return torch.optim.AdamW(groups, lr=hyp["lr0"], betas=(hyp["momentum"], 0.999))
    raise SystemExit(f"hyp optimizer {hyp['optimizer']!r}: use SGD or AdamW")


def probe_step(args):
    """One training step on random images at the largest training size, for --batch-size auto."""
    size = int(args.img_size * (1.5 if args.multi_scale else 1))

    def step(batch_size, device, dtype):
        model = build_model(args.model, 1, args.img_size).to(device).train()
        model.transform._skip_resize = True
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


def epoch_losses(accelerator, names, running, local_batches, carried: dict, carried_batches: int, reduce_only=False) -> dict:
    """Mean of each loss over the epoch's batches on all processes, including those before a resume.
    reduce_only returns the sums instead (what a checkpoint stores)."""
    sums = accelerator.reduce(running, "sum").tolist() if running is not None else [0.0] * len(carried)
    names = names or list(carried)
    sums = {n: s + carried.get(n, 0.0) for n, s in zip(names, sums, strict=False)}
    batches = local_batches * accelerator.num_processes + carried_batches
    if reduce_only:
        return {"loss_sums": sums, "loss_batches": batches}
    return {n: s / max(batches, 1) for n, s in sums.items()}


def save_checkpoint(accelerator, checkpoints, progress: dict, **position):
    """Everything the loop needs to continue exactly: position, the epoch's running losses, best fitness, patience."""
    progress.update(position)
    checkpoints.save(dict(progress))


def mean_throughput(results: ResultsLog) -> float:
    rows = results.rows()
    return sum(float(r["train_samples_per_second"]) for r in rows) / len(rows) if rows else 0.0


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


def coco_results(predictions: list[dict]) -> list[dict]:
    """COCO results format: one entry per box, bbox [x, y, w, h] in pixels, category_id = class index."""
    return [
        {"image_id": int(p["image_id"]), "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)}
        for p in predictions
        for (x0, y0, x1, y1), score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(), strict=False)
    ]


# ==================================================================== pictures
def draw_predictions(dataset: DetectionDataset, predictions: list[dict], names, path: Path, count: int = 16, conf: float = 0.3):
    """Validation images with predictions (score >= conf, coloured by class) and ground truth (white)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF
    from torchvision.utils import draw_bounding_boxes, make_grid

    palette = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple", "brown", "pink"]
    tiles, tile = [], 256
    for index, pred in list(enumerate(predictions))[:count]:
        image = TF.pil_to_tensor(dataset.load(index))
        sample = dataset.samples[index]
        keep = pred["scores"] >= conf
        if len(sample.boxes):
            image = draw_bounding_boxes(image, torch.as_tensor(sample.boxes), colors="white", width=1)
        if keep.any():
            labels = [f"{names[c]} {s:.2f}" for c, s in zip(pred["labels"][keep], pred["scores"][keep], strict=False)]
            image = draw_bounding_boxes(
                image,
                torch.as_tensor(pred["boxes"][keep]),
                labels=labels,
                width=2,
                colors=[palette[c % len(palette)] for c in pred["labels"][keep]],
            )
        image = TF.resize(image, None, max_size=tile)
        tiles.append(F.pad(image, (0, tile - image.shape[2], 0, tile - image.shape[1])))
    grid = make_grid(tiles, nrow=4, padding=4)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


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
