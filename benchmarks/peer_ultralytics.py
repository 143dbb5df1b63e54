"""The peer's side of the comparison, run by the peer's own interpreter (benchmarks/.peer-venv), never by launchkit's.

    benchmarks/.peer-venv/bin/python benchmarks/peer_ultralytics.py train --data D/data.yaml --out RUN --epochs 20 --imgsz 320
    benchmarks/.peer-venv/bin/python benchmarks/peer_ultralytics.py loader --data D/data.yaml --imgsz 640 --images 200 --cache ram

`train` is what a user types, `yolo train model=yolov8n.yaml data=... epochs=... imgsz=...` (from scratch, the
peer's defaults otherwise, fp32 as it runs on a CPU), then predicts the test split at the thresholds its own
validation uses (conf 0.001, NMS IoU 0.7, 300 per image) into RUN/test_predictions.json, keyed by file name, so
that launchkit's evaluator scores both tools alike. RUN/summary.json holds the training wall time.
`loader` times the peer's own training data loader (mosaic and the rest of its default augmentation) with one
worker and its image cache off (`cache=False`), in RAM or on disk, and prints images/s as JSON."""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # no update checks, no downloads: the network is not there

from ultralytics import YOLO  # noqa: I001  (after the environment it reads)


def train(args):
    out = args.out.resolve()
    model = YOLO("yolov8n.yaml")
    started = time.perf_counter()
    model.train(
        data=str(args.data), epochs=args.epochs, imgsz=args.imgsz, batch=16, workers=args.workers, device="cpu",
        pretrained=False, amp=False, plots=False, project=str(out.parent), name=out.name, exist_ok=True, seed=0,
    )  # fmt: skip
    wall = time.perf_counter() - started
    best = YOLO(str(out / "weights" / "best.pt"))
    test_images = sorted((args.data.parent / "images" / "test").glob("*.jpg"))
    predictions = []
    for result in best.predict(
        [str(p) for p in test_images],
        imgsz=args.imgsz,
        conf=0.001,
        iou=0.7,
        max_det=300,
        device="cpu",
        stream=True,
        verbose=False,
    ):
        name, boxes = Path(result.path).name, result.boxes
        for (x0, y0, x1, y1), cls, score in zip(boxes.xyxy.tolist(), boxes.cls.tolist(), boxes.conf.tolist(), strict=True):
            predictions.append({"file_name": name, "category_id": int(cls), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    (out / "test_predictions.json").write_text(json.dumps(predictions))
    (out / "summary.json").write_text(json.dumps({"train_seconds": wall, "epochs": args.epochs}))


def loader(args):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cache = {"off": False, "ram": "ram", "disk": "disk"}[args.cache]
    cfg = get_cfg(overrides={"imgsz": args.imgsz, "data": str(args.data), "cache": cache})
    data = check_det_dataset(str(args.data))
    dataset = build_yolo_dataset(cfg, data["train"], batch=16, data=data, mode="train", stride=32)  # builds the cache
    dl = build_dataloader(dataset, batch=16, workers=1, shuffle=True)
    seen, started = 0, None
    while started is None or seen < args.images:
        for batch in dl:
            if started is None:  # the first batch pays for starting the worker
                started = time.perf_counter()
                continue
            seen += len(batch["img"])
            if seen >= args.images:
                break
    print(json.dumps({"images_per_second": seen / (time.perf_counter() - started), "images": seen}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train", "loader"])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=256, help="loader: images to time after the first batch")
    p.add_argument("--cache", choices=["off", "ram", "disk"], default="off", help="loader: the peer's image cache")
    args = p.parse_args()
    train(args) if args.mode == "train" else loader(args)


if __name__ == "__main__":
    main()
