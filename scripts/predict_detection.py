#!/usr/bin/env python
"""Detect objects in images with a model trained by train_detection.py.

    python scripts/predict_detection.py --model-dir runs/det/model photos/ extra.jpg --output-dir runs/det/predict

Writes to --output-dir: predictions.json (COCO results: image_id, file_name, category_id = class index,
bbox [x, y, w, h] in pixels, score), images.json (image_id -> file), labels/<image>.txt (YOLO rows
`class cx cy w h confidence`, normalised) and drawn/<image>.jpg (boxes drawn on the picture). <image> is the
image's path relative to the folder it was found in, without its suffix (photos/ holding a/x.jpg gives
labels/a/x.txt); with several inputs it is relative to the folder that holds them all. Earlier outputs in
--output-dir are replaced only with --overwrite."""

import argparse
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

import torch
from detection_data import IMAGE_EXTENSIONS, draw_detections, open_rgb
from detection_predictor import DetectionPredictor, find_images, image_samples, yolo_lines
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from shared.runtime import write_json

OUTPUTS = ("predictions.json", "images.json", "skipped.json", "labels", "drawn")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="the model/ folder of a training run")
    p.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    p.add_argument("--output-dir", type=Path, default=None, help="where results go (default: predict/ beside --model-dir)")
    p.add_argument(
        "--conf", type=float, default=None, help="keep detections with at least this score (default: the model's, 0.25)"
    )
    p.add_argument("--iou", type=float, default=None, help="NMS IoU threshold (default: the one used in training)")
    p.add_argument("--img-size", type=int, default=None, help="long side the images are resized to (default: the training size)")
    p.add_argument("--max-det", type=int, default=None, help="at most this many detections per image (default: the model's, 100)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--no-draw", action="store_true", help="skip writing drawn images")
    p.add_argument("--overwrite", action="store_true", help="remove earlier predictions in --output-dir first")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    thresholds = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det}
    predictor = DetectionPredictor.load(args.model_dir, device, img_size=args.img_size, **thresholds)
    out = args.output_dir or args.model_dir.parent / "predict"

    files = find_images(args.inputs)
    stems = dict(zip(files, output_stems(list(files.values())), strict=True))
    samples, skipped = image_samples(list(files))
    if not samples:
        raise SystemExit(f"no readable images in {', '.join(map(str, args.inputs))} ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    results, started = [], time.perf_counter()
    clear_earlier_outputs(out, args.overwrite)
    bar = tqdm(total=len(samples), desc="predicting", unit="image", dynamic_ncols=True)  # TQDM_DISABLE=1 silences it
    for images, meta in predictor.batches(samples, args.batch_size):
        bar.update(len(meta))
        for (sample, target), found in zip(meta, predictor.detect(images), strict=True):
            boxes, scores, labels = found = predictor.in_file_pixels(found, target)
            results += predictor.entries(sample.image_id, sample.file_name, found)
            rows = [
                f"{line} {s:.4f}"
                for line, s in zip(yolo_lines(boxes, labels, sample.width, sample.height), scores.tolist(), strict=False)
            ]
            stem = stems[Path(sample.source)]
            label_file = out / "labels" / f"{stem}.txt"
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text("".join(r + "\n" for r in rows))
            if not args.no_draw:
                drawn = out / "drawn" / f"{stem}.jpg"
                drawn.parent.mkdir(parents=True, exist_ok=True)
                image = draw_detections(open_rgb(sample.source)[0], boxes, labels, scores, predictor.config["labels"])
                TF.to_pil_image(image).save(drawn, quality=92)
    write_json(out / "predictions.json", results)
    write_json(out / "images.json", {s.image_id: s.file_name for s in samples})
    if skipped:
        write_json(out / "skipped.json", skipped)
        print(f"skipped {len(skipped)} unreadable image(s), listed in {out / 'skipped.json'}")
    bar.close()
    seconds = time.perf_counter() - started
    print(f"{len(results)} detections (score >= {predictor.conf}) in {len(samples)} images, {seconds:.1f} s -> {out}")


def output_stems(relatives: list[Path]) -> list[Path]:
    """Output names without suffix: the relative path without its suffix (a/x.jpg -> a/x, as YOLO labels are
    named), or with it where images differ only by suffix (a/x.jpg, a/x.png), so no output overwrites another."""
    bare = [r.with_suffix("") for r in relatives]
    shared = Counter(bare)
    stems = [r if shared[b] > 1 else b for r, b in zip(relatives, bare, strict=True)]
    clashes = sorted(str(s) for s, n in Counter(stems).items() if n > 1)
    if clashes:
        raise SystemExit(f"images {', '.join(clashes)} would write the same output files; rename one of them")
    return stems


def clear_earlier_outputs(out: Path, overwrite: bool):
    """Earlier predictions are replaced whole or not at all: new outputs over old ones would leave the labels
    and drawings of images not predicted this time."""
    earlier = [out / name for name in OUTPUTS if (out / name).exists()]
    if earlier and not overwrite:
        raise SystemExit(
            f"{out} holds earlier predictions ({', '.join(p.name for p in earlier)}); add --overwrite to replace "
            "them, or pick another --output-dir"
        )
    for path in earlier:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


if __name__ == "__main__":
    main()
