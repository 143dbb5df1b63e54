"""Write a small object-detection dataset in YOLO layout: coloured shapes on textured backgrounds.

    python scripts/make_demo_detection.py --output-dir data/demo_detection

gives data.yaml, images/{train,val,test}/*.jpg and labels/{train,val,test}/*.txt (class cx cy w h,
normalised). A few images per split have no objects and no label file (background images)."""

import argparse
import random
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ["square", "circle", "triangle"]
COLOURS = {"square": (220, 40, 40), "circle": (40, 200, 60), "triangle": (50, 90, 230)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, required=True, help="dataset root (data.yaml goes here)")
    p.add_argument("--train", type=int, default=384, help="training images (default 384)")
    p.add_argument("--val", type=int, default=96, help="validation images (default 96)")
    p.add_argument("--test", type=int, default=96, help="test images, 0 for no test split (default 96)")
    p.add_argument("--size", type=int, default=224, help="long side of the images in pixels (default 224)")
    p.add_argument("--max-objects", type=int, default=4, help="at most this many shapes per image (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p.parse_args(argv)


def textured_background(rng: random.Random, w: int, h: int) -> Image.Image:
    """A colour gradient, blurred noise and a few muted strokes, so the model cannot key on a flat colour."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [rng.uniform(60, 190) + rng.uniform(-50, 50) * (x / w) + rng.uniform(-50, 50) * (y / h) for _ in range(3)], axis=-1
    )
    noise = nrng.normal(0, rng.uniform(8, 25), size=(h // 4 + 1, w // 4 + 1, 3))
    noise = np.kron(noise, np.ones((4, 4, 1)))[:h, :w]
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        grey = rng.randint(70, 180)
        draw.line(
            [(rng.randrange(w), rng.randrange(h)), (rng.randrange(w), rng.randrange(h))],
            fill=(grey, grey, grey),
            width=rng.randint(1, 4),
        )
    return img


def jitter(rng: random.Random, colour):
    return tuple(int(np.clip(c + rng.randint(-35, 35), 0, 255)) for c in colour)


def draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, name: str, box):
    x0, y0, x1, y1 = box
    fill = jitter(rng, COLOURS[name])
    if name == "square":
        draw.rectangle(box, fill=fill)
    elif name == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def place_boxes(rng: random.Random, w: int, h: int, count: int):
    """Square boxes of 12-40% of the short side that overlap little, so every object stays visible."""
    boxes = []
    for _ in range(count * 20):
        if len(boxes) == count:
            break
        side = rng.uniform(0.12, 0.4) * min(w, h)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        box = (x0, y0, x0 + side, y0 + side)
        if all(_iou(box, b) < 0.1 for b in boxes):
            boxes.append(box)
    return boxes


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def write_split(root: Path, split: str, n: int, args, rng: random.Random):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # Mixed aspect ratios exercise letterboxing; every 16th image is background only.
        aspect = rng.choice([1.0, 4 / 3, 3 / 4])
        w = args.size if aspect >= 1 else round(args.size * aspect)
        h = args.size if aspect <= 1 else round(args.size / aspect)
        img = textured_background(rng, w, h)
        draw = ImageDraw.Draw(img)
        count = 0 if i % 16 == 15 else rng.randint(1, args.max_objects)
        lines = []
        for box in place_boxes(rng, w, h, count):
            cls = rng.randrange(len(CLASSES))
            draw_shape(draw, rng, CLASSES[cls], box)
            x0, y0, x1, y1 = box
            lines.append(f"{cls} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}")
        stem = f"{split}_{i:05d}"
        img.save(root / "images" / split / f"{stem}.jpg", quality=92)
        if lines:
            (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    rng = random.Random(args.seed)
    root = args.output_dir
    splits = {"train": args.train, "val": args.val, "test": args.test}
    for split, n in splits.items():
        if n > 0:
            write_split(root, split, n, args, rng)
    data = {"path": ".", **{s: f"images/{s}" for s, n in splits.items() if n > 0}, "names": dict(enumerate(CLASSES))}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    total = sum(splits.values())
    print(f"wrote {total} images ({', '.join(f'{s} {n}' for s, n in splits.items())}) and {root / 'data.yaml'}")


if __name__ == "__main__":
    main()
