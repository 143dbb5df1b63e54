"""BASELINE, not launchkit: a plain float32 detection training loop in the style of torchvision's
references/detection (train.py + engine.train_one_epoch).

This script exists only so `make bench` can measure launchkit's scripts/train_detection.py against the
common recipe on the same data, model, image size, batch size and worker count:

- a Dataset that opens each image with PIL and applies per-image transforms (PILToTensor, scale to
  float, random horizontal flip), collated as a tuple of lists;
- the model's own GeneralizedRCNNTransform resizes and normalises each image;
- SGD with momentum and weight decay, the references' linear warm-up in the first epoch, float32
  only, one optimizer step per batch (no gradient accumulation), no EMA, no gradient clipping;
- loss.item() every step for the finite-loss check and the running mean, as engine.py does.

The model is built by launchkit's scripts/detection_model.py (same architecture and head), so only the
training pipeline differs. Data: a YOLO data.yaml (train/val folders of images; labels/*.txt beside them).
Writes OUTPUT_DIR/results.csv (a row per epoch) and OUTPUT_DIR/metrics.json (with val COCO mAP).
"""

import argparse
import contextlib
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from detection_model import build_model  # the same architecture launchkit trains

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="YOLO data.yaml with train, val and names")
    p.add_argument("--output-dir", type=Path, required=True, help="where results.csv and metrics.json go")
    p.add_argument("--model", default="fcos_tiny", help="detector name understood by scripts/detection_model.py")
    p.add_argument("--img-size", type=int, default=224, help="size the model's transform resizes to")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--batch-size", type=int, default=16, help="images per step")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p.parse_args(argv)


class YoloDataset(torch.utils.data.Dataset):
    def __init__(self, image_dir: Path, transforms):
        self.images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.transforms = transforms

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        path = self.images[index]
        image = Image.open(path).convert("RGB")
        w, h = image.size
        label_file = Path(str(path.parent).replace("images", "labels")) / (path.stem + ".txt")
        rows = (
            [list(map(float, line.split())) for line in label_file.read_text().splitlines() if line.strip()]
            if label_file.exists()
            else []
        )
        boxes = torch.tensor(
            [[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h] for _, cx, cy, bw, bh in rows],
            dtype=torch.float32,
        ).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor([int(r[0]) + 1 for r in rows], dtype=torch.int64),  # 0 is background
            "image_id": index,
        }
        return self.transforms(image, target)


def get_transform(train: bool):
    transforms = [T.PILToTensor(), T.ToDtype(torch.float, scale=True)]
    if train:
        transforms.append(T.RandomHorizontalFlip(0.5))
    transforms.append(T.ToPureTensor())
    return T.Compose(transforms)


def collate_fn(batch):
    return tuple(zip(*batch, strict=True))


def train_one_epoch(model, optimizer, loader, device, warmup):
    model.train()
    running, seen = 0.0, 0
    for images, targets in loader:
        images = [image.to(device) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        if not math.isfinite(loss_value):
            sys.exit(f"Loss is {loss_value}, stopping training")
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        if warmup is not None:
            warmup.step()
        running += loss_value * len(images)
        seen += len(images)
    return running / max(seen, 1), seen


@torch.no_grad()
def evaluate_map(model, loader, device) -> float:
    """COCO mAP@[.5:.95] with pycocotools, as the references' CocoEvaluator computes it."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    images_info, annotations, results = [], [], []
    for images, targets in loader:
        outputs = model([image.to(device) for image in images])
        for image, target, out in zip(images, targets, outputs, strict=True):
            image_id = int(target["image_id"])
            images_info.append({"id": image_id, "width": image.shape[-1], "height": image.shape[-2]})
            for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
            for (x0, y0, x1, y1), score, label in zip(
                out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True
            ):
                results.append({"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    if not results:
        return 0.0
    categories = sorted({a["category_id"] for a in annotations} | {r["category_id"] for r in results})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images_info, "annotations": annotations, "categories": [{"id": c} for c in categories]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    cfg = yaml.safe_load(args.data.read_text())
    root = (args.data.parent / cfg.get("path", ".")).resolve()
    names = cfg["names"] if isinstance(cfg["names"], list) else [cfg["names"][k] for k in sorted(cfg["names"])]
    train_ds = YoloDataset(root / cfg["train"], get_transform(train=True))
    val_ds = YoloDataset(root / cfg["val"], get_transform(train=False))
    train_dl = torch.utils.data.DataLoader(
        train_ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, collate_fn=collate_fn
    )
    val_dl = torch.utils.data.DataLoader(
        val_ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, collate_fn=collate_fn
    )

    model = build_model({"model": args.model, "labels": names, "img_size": args.img_size}).to(device)
    model.transform._skip_resize = False  # as torchvision's references train: the model's transform resizes each image
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)

    rows = []
    for epoch in range(args.epochs):
        warmup = None
        if epoch == 0:  # references/detection/engine.py: linear warm-up over the first epoch
            warmup = torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0 / 1000, total_iters=min(1000, len(train_dl) - 1)
            )
        start = time.perf_counter()
        loss, seen = train_one_epoch(model, optimizer, train_dl, device, warmup)
        seconds = time.perf_counter() - start
        rows.append({"epoch": epoch, "train_loss": loss, "seconds": seconds, "train_samples_per_second": seen / seconds})
        print(f"epoch {epoch}: loss {loss:.4f}  {seen / seconds:.1f} images/s", flush=True)
    val_map = evaluate_map(model, val_dl, device)
    print(f"val mAP {val_map:.4f}")

    with (args.output_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = {
        "task": "detection-baseline",
        "labels": names,
        "train_samples_per_second": rows[-1]["train_samples_per_second"],
        "val": {"map": val_map},
    }
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
