"""Detection data: YOLO, COCO json and Hub datasets read into samples per split (boxes xyxy in pixels of the upright
image, labels 0-based), bad input fixed or skipped and counted in a DataReport; box-aware augmentation; batching;
--streaming: shards read while training (StreamedImages)."""

import hashlib
import itertools
import json
import math
import os
import random
import shutil
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from metrics.coco_map.coco_map import coco_dicts
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torchvision import tv_tensors
from torchvision.ops import box_area, clip_boxes_to_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, make_grid

from shared.cache import MappedArray, build_once, cache_root, decoded_in_order, file_stamp
from shared.model_io import label_index
from shared.runtime import (
    columns_ahead,
    make_loader,
    open_streams,
    prepared_share,
    print_summary,
    shard_identities,
    stored_file,
    stream_loader,
)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
FORMATS = ("yolo", "coco", "hub")
MAX_PIXELS = 40_000_000  # larger images are skipped unread: one decoded 95-megapixel image is 285 MB of RGB
# probe_image enforces the cap from the header, as a counted skip; PIL's own check would warn (or raise) first.
Image.MAX_IMAGE_PIXELS = None
PALETTE = ["red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple", "brown", "pink"]
DARK = {"red", "blue", "magenta", "purple", "brown"}  # white names on these, black on the others
PAD_VALUE = 114  # the grey YOLO letterboxes with
PADDING = -1  # --streaming: the image_id of rows that only even out the processes' evaluation batches
MOSAIC_POOL = 64  # --streaming: a mosaic draws its other three images from this many a worker decoded last
GROUND_TRUTH = ["image_id", "width", "height", "objects"]  # the columns --streaming reads ahead: all but the image


@dataclass
class Sample:
    image_id: int
    file_name: str  # as written to COCO json: relative to the dataset root when there is one
    source: str | int  # image path, or row index into a Hub dataset
    width: int  # of the upright image
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    labels: np.ndarray  # (N,) int64 class index


@dataclass
class DetectionData:
    names: list[str]
    splits: dict[str, list[Sample]]
    report: "DataReport"
    hub: dict = field(default_factory=dict)  # split -> datasets.Dataset for Hub data
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)  # split -> the file, folder or Hub split it came from
    shards: dict[str, list] = field(default_factory=dict)  # --streaming: split -> its data files
    streams: dict = field(default_factory=dict)  # --streaming: split -> a datasets IterableDataset of image_id and image


class DataReport:
    """Per-file counts of what was fixed or skipped, per-split totals, and the pixel cap images were held to."""

    ACTIONS = {
        "wrong_field_count": "label line skipped: a YOLO line needs 5 fields 'class cx cy w h'",
        "class_out_of_range": "box skipped: class id is not an index of `names` (or category not in the json)",
        "coords_outside_0_1": "box skipped: YOLO coordinates must be normalised to [0, 1]",
        "non_finite_box": "box skipped: a coordinate is NaN or infinite",
        "missing_bbox": "COCO annotation skipped: no `bbox` of 4 numbers [x, y, w, h] (listed by annotation id)",
        "zero_size_box": "box skipped: width or height is zero",
        "duplicate_box": "box skipped: the same class and box appear twice",
        "box_clipped_to_image": "box clipped to the image borders",
        "crowd_annotation": "COCO iscrowd=1 annotation skipped",
        "corrupt_image": "image skipped: it cannot be decoded",
        "missing_image": "image skipped: the file does not exist",
        "too_large": "image skipped unread: more than {max_pixels:,} pixels (width x height from its header); "
        "raise the cap with --max-pixels to keep it",
        "unreadable_label": "image skipped: its label file cannot be read as UTF-8 text, so its boxes are unknown "
        "(as a background image it would teach that its objects are background)",
        "orphan_label": "label file unused: no image of the same name in the matching images/ folder",
        "size_mismatch": "COCO width/height differ from the image file: the file's size is used and the boxes are "
        "kept as written (clipped to the image); check the image was not resized after labelling",
        "exif_rotated": "image rotated upright from its EXIF orientation (labels refer to the upright image)",
        "converted_to_rgb": "image converted to 8-bit RGB (grayscale, RGBA, palette, CMYK or 16-bit)",
    }

    def __init__(self, max_pixels: int = MAX_PIXELS):
        self.max_pixels = max_pixels
        self.files: dict[str, Counter] = defaultdict(Counter)
        self.totals: dict[str, Counter] = defaultdict(Counter)

    def add(self, split: str, file: str, kind: str, count: int = 1):
        if count:
            self.files[str(file)][kind] += count
            self.totals[split][kind] += count

    def to_dict(self, data: DetectionData) -> dict:
        return {
            "meaning": {kind: text.format(max_pixels=self.max_pixels) for kind, text in self.ACTIONS.items()},
            "splits": {
                s: {
                    "images": len(v),
                    "background_images": sum(len(x.labels) == 0 for x in v),
                    "boxes": int(sum(len(x.labels) for x in v)),
                    "problems": dict(self.totals.get(s, {})),
                }
                for s, v in data.splits.items()
            },
            "files": {f: dict(c) for f, c in sorted(self.files.items())},
        }

    def summary(self) -> str:
        parts = [f"{split}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for split, c in self.totals.items()]
        return "; ".join(parts) if parts else "no problems found"


# ----------------------------------------------------------------------------------------------- images
def image_fixes(img: Image.Image) -> list[str]:
    """What open_rgb does to the image, for the report."""
    return ["exif_rotated"] * (img.getexif().get(0x0112, 1) != 1) + ["converted_to_rgb"] * (img.mode != "RGB")


def open_rgb(image: Image.Image | str | Path) -> tuple[Image.Image, list[str]]:
    """Decode to upright 8-bit RGB; return the image and what had to be fixed."""
    img = Image.open(image) if isinstance(image, (str, Path)) else image
    fixes = image_fixes(img)
    if "exif_rotated" in fixes:
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert() would clip 16-bit values at 255; scale the full range instead.
        a = np.asarray(img, dtype=np.float32)
        a = a / 257.0 if img.mode.startswith("I;16") or a.max() > 255 else a
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (PAD_VALUE,) * 3 + (255,)), rgba)
    return (img if img.mode == "RGB" else img.convert("RGB")), fixes


def probe_image(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[tuple[int, int] | None, list[str]]:
    """Upright (width, height) and fixes, or None when the file is missing, too large or cannot be decoded."""
    if not path.is_file():
        return None, ["missing_image"]
    try:
        with Image.open(path) as img:
            w, h = img.size  # from the header: nothing is decoded yet
            if w * h > max_pixels:
                return None, ["too_large"]
            img.load()
            rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            return ((h, w) if rotated else (w, h)), image_fixes(img)
    except Exception:  # PIL raises many types for broken files; all mean "cannot use this image"
        return None, ["corrupt_image"]


def probe_all(paths: list[Path], max_pixels: int = MAX_PIXELS):
    """Decoding is the slow part of a scan; PIL releases the GIL, so threads help."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda path: probe_image(path, max_pixels), paths))


# ----------------------------------------------------------------------------------------------- loading
def load_data(
    data: str, val_fraction: float = 0.1, fmt: str | None = None, max_pixels: int = MAX_PIXELS, streaming: bool = False
) -> DetectionData:
    """--data: a data.yaml (YOLO), a COCO instances json, a save_to_disk folder, or with fmt "hub" a Hub dataset id.
    fmt forces the parser; without it the format is told from the path. streaming: --data is a folder of shards or a
    Hub id, read while training (streamed_data)."""
    if streaming:
        return streamed_data(data, max_pixels)
    path = Path(data)
    fmt = fmt or detect_format(path)
    if fmt == "hub":
        import datasets

        try:
            dsd = datasets.load_from_disk(data) if is_saved_dataset(path) else datasets.load_dataset(data)
        except Exception as e:  # offline misses and unknown ids surface as several exception types
            raise SystemExit(
                f"--data {data}: the Hub dataset could not be loaded ({type(e).__name__}: {e}). "
                "Use a data.yaml or COCO json path, or a Hub id that is cached locally (HF_HOME) or reachable."
            ) from e
        dsd = datasets.DatasetDict({"train": dsd}) if isinstance(dsd, datasets.Dataset) else dsd
        return from_hub_dataset(dsd, data, val_fraction, max_pixels)
    if fmt not in FORMATS:
        raise SystemExit(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise SystemExit(f"--data {path}: no such file (YOLO data is a data.yaml, COCO data an instances .json)")
    if fmt == "yolo":
        return load_data_yaml(path, max_pixels)
    report, sources = DataReport(max_pixels), {"train": str(path)}
    train, names = read_coco(path, report, "train")
    splits = split_off({"train": train}, sources, val_fraction)
    return DetectionData(names, splits, report, description=f"COCO json {path} (val: {val_fraction:.0%} of it)", sources=sources)


def detect_format(path: Path) -> str:
    if not path.exists():
        # Never a Hub id by guess: a mistyped path would cost ~25 s of offline retries before failing.
        raise SystemExit(f"no such file or folder {path}; for a Hub dataset add --format hub")
    if path.suffix in (".yaml", ".yml"):
        return "yolo"
    if path.suffix == ".json":
        return "coco"
    if is_saved_dataset(path):
        return "hub"
    raise SystemExit(
        f"--data {path}: expected a data.yaml, a COCO instances .json or a folder written by save_to_disk "
        f"(--format {{{','.join(FORMATS)}}} forces one)"
    )


def is_saved_dataset(path: Path) -> bool:
    """A folder written by save_to_disk: of a DatasetDict (dataset_dict.json) or of a single Dataset (state.json)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_data_yaml(path: Path, max_pixels: int = MAX_PIXELS) -> DetectionData:
    try:
        with path.open("rb") as f:  # binary: a file that is not UTF-8 is a YAMLError too; errors name the file
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise SystemExit(f"{path}: not valid YAML; fix it where the parser stopped:\n{e}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: expected `key: value` lines (path, train, val, test, names), got a YAML {type(cfg).__name__}")
    names = parse_names(cfg.get("names"), path)
    root = (path.parent / cfg.get("path", ".")).resolve()
    for split in ("train", "val"):
        if not cfg.get(split):
            raise SystemExit(
                f"{path}: no `{split}:` entry. Add `{split}: images/{split}` (a folder of images, a .txt list "
                "of image paths or a COCO .json), relative to `path:`"
            )
    report, splits, sources = DataReport(max_pixels), {}, {}
    for split in [s for s in ("train", "val", "test") if cfg.get(s)]:
        entries = cfg[split] if isinstance(cfg[split], list) else [cfg[split]]
        splits[split] = [s for entry in entries for s in read_split_entry(root / str(entry), names, report, split, path)]
        sources[split] = ", ".join(str(root / str(entry)) for entry in entries)
        for i, s in enumerate(splits[split]):
            s.image_id = i
    return DetectionData(names, splits, report, description=f"YOLO data.yaml {path} (root {root})", sources=sources)


def parse_names(names, path: Path) -> list[str]:
    """`names: [cat, dog]` or `names: {0: cat, 1: dog}` (ids as YAML ints or strings) as a list in id order."""
    if names is None:
        raise SystemExit(
            f"{path}: no `names:`. Add the class names, as a list `names: [cat, dog]` or a dict "
            "`names: {0: cat, 1: dog}`, in the order of the class ids used in the label files"
        )
    if isinstance(names, dict):
        try:
            by_id = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            if all(isinstance(v, int) for v in names.values()):
                flipped = ", ".join(f"{i}: {n}" for n, i in sorted(names.items(), key=lambda item: item[1]))
                raise SystemExit(f"{path}: `names` maps names to ids; it must map ids to names: `names: {{{flipped}}}`") from None
            raise SystemExit(
                f"{path}: `names` keys must be the class ids 0, 1, ... (`names: {{0: cat, 1: dog}}`), got {list(names)}"
            ) from None
        if sorted(by_id) != list(range(len(by_id))):
            raise SystemExit(f"{path}: `names` keys must be the class ids 0..{len(by_id) - 1}, got {sorted(by_id)}")
        names = [by_id[i] for i in range(len(by_id))]
    if not isinstance(names, list) or not names:
        raise SystemExit(f"{path}: `names` must be a non-empty list or dict of class names")
    return [str(n) for n in names]


def read_split_entry(target: Path, names: list[str], report: DataReport, split: str, yaml_path: Path) -> list[Sample]:
    """One entry of a data.yaml split: a COCO json, a .txt list of images or a folder of images with YOLO labels."""
    if target.suffix == ".json":
        if not target.is_file():
            raise SystemExit(f"{yaml_path}: `{split}` COCO file {target} not found (paths are relative to `path:`)")
        samples, json_names = read_coco(target, report, split)
        if json_names != names:
            raise SystemExit(f"{yaml_path}: `names` {names} differ from the categories of {target} {json_names}")
        return samples
    if target.suffix == ".txt" and target.is_file():
        try:
            lines = target.read_text(encoding="utf-8-sig").splitlines()  # -sig: the byte-order mark Windows editors add
        except UnicodeDecodeError as e:
            raise SystemExit(f"{target}: not UTF-8 text ({e}); save the list of image paths as UTF-8") from None
        # Relative to the list's folder and not resolved: a symlinked image finds its label by the path it is listed as.
        images = [target.parent / line.strip() for line in lines if line.strip()]
    elif target.is_dir():
        images = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise SystemExit(f"{yaml_path}: `{split}` folder {target} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        # Label files no image claims (a renamed or deleted image): their boxes are not trained on, so the report says so.
        claimed = {label_path(image) for image in images}
        for label in sorted(label_path(target / "image").parent.rglob("*.txt")):
            if label not in claimed:
                report.add(split, label, "orphan_label")
    else:
        raise SystemExit(
            f"{yaml_path}: `{split}` folder {target} not found. Fix `{split}:` or `path:` "
            "(split paths are relative to `path:`, which is relative to the data.yaml)"
        )
    samples = []
    for image, (size, fixes) in zip(images, probe_all(images, report.max_pixels), strict=False):
        for fix in fixes:
            report.add(split, image, fix)
        if size is None:
            continue
        label = label_path(image)
        if not label.is_file() and label_path(image.resolve()).is_file():  # kept beside the file a symlink points to
            label = label_path(image.resolve())
        try:
            boxes, labels = parse_yolo_label(label, *size, len(names), report, split)
        except (UnicodeDecodeError, OSError):
            report.add(split, label, "unreadable_label")
            continue
        try:  # the name as listed, symlinks kept: a symlinked image keeps its name inside the dataset
            name = str(Path(os.path.abspath(image)).relative_to(os.path.abspath(target.parent)))
        except ValueError:
            name = str(image)
        samples.append(Sample(len(samples), name, str(image), *size, boxes, labels))
    return samples


def label_path(image: Path) -> Path:
    """YOLO convention: the last `images` folder of the path becomes `labels`, the suffix `.txt`."""
    parts = list(image.parts)
    if "images" in parts[:-1]:
        parts[len(parts) - 2 - parts[-2::-1].index("images")] = "labels"
    return Path(*parts).with_suffix(".txt")


def parse_yolo_label(path: Path, w: int, h: int, nc: int, report: DataReport, split: str):
    """Rows `class cx cy w h` (normalised). A missing file means a background image."""
    rows = []
    for line in path.read_text(encoding="utf-8-sig").splitlines() if path.is_file() else []:
        if not line.split():
            continue
        try:
            cls, *xywh = (float(x) for x in line.split())
            cx, cy, bw, bh = xywh
        except ValueError:  # not 5 fields, or not numbers
            problem = "wrong_field_count"
        else:
            if not cls.is_integer() or not 0 <= cls < nc:
                problem = "class_out_of_range"
            elif not all(map(math.isfinite, xywh)):
                problem = "non_finite_box"
            elif any(not 0.0 <= v <= 1.0 for v in xywh):
                problem = "coords_outside_0_1"
            else:
                rows.append((int(cls), (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
                continue
        report.add(split, path, problem)
    return clean_boxes(rows, w, h, report, split, path)


def clean_boxes(rows, w: int, h: int, report: DataReport, split: str, file) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image, drop empty ones and exact duplicates; every change is counted."""
    seen, boxes, labels = set(), [], []
    for cls, x0, y0, x1, y1 in rows:
        if not all(map(math.isfinite, (x0, y0, x1, y1))):  # NaN slips through every comparison below
            report.add(split, file, "non_finite_box")
            continue
        c = (min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h))
        if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
            report.add(split, file, "zero_size_box")
            continue
        if max(abs(a - b) for a, b in zip(c, (x0, y0, x1, y1), strict=False)) > 0.5:
            report.add(split, file, "box_clipped_to_image")
        key = (cls, *(round(v, 2) for v in c))
        if key in seen:
            report.add(split, file, "duplicate_box")
            continue
        seen.add(key)
        boxes.append(c)
        labels.append(cls)
    return np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(labels, dtype=np.int64)


def read_coco(path: Path, report: DataReport, split: str):
    """A COCO instances file; images are looked up relative to the json's folder, its parent, or an images/ folder there."""
    try:
        coco = json.loads(path.read_bytes())
    except ValueError as e:  # a JSONDecodeError, or a UnicodeDecodeError for a file that is not UTF-8/16/32
        raise SystemExit(f"{path}: not valid JSON ({e}); fix it, or export it again from the labelling tool") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or key not in coco:
            raise SystemExit(f"{path}: not a COCO instances file (no `{key}` list)")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index_of = {c["id"]: i for i, c in enumerate(categories)}
    root = find_image_root(path, coco["images"])
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        by_image[ann.get("image_id")].append(ann)
    files = [root / im["file_name"] for im in coco["images"]]
    samples = []
    for im, file, (size, fixes) in zip(coco["images"], files, probe_all(files, report.max_pixels), strict=False):
        for fix in fixes:
            report.add(split, file, fix)
        if size is None:
            continue
        if "width" in im and "height" in im and (im["width"], im["height"]) != size:
            report.add(split, file, "size_mismatch")
        rows = []
        for ann in by_image[im["id"]]:
            try:
                x, y, bw, bh = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                x = None
            if ann.get("iscrowd", 0):
                report.add(split, file, "crowd_annotation")
            elif x is None:
                report.add(split, f"{path} annotation {ann.get('id')}", "missing_bbox")
            elif ann.get("category_id") not in index_of:
                report.add(split, file, "class_out_of_range")
            else:
                rows.append((index_of[ann["category_id"]], x, y, x + bw, y + bh))
        boxes, labels = clean_boxes(rows, *size, report, split, file)
        samples.append(Sample(im["id"], im["file_name"], str(file), *size, boxes, labels))
    return samples, [str(c["name"]) for c in categories]


def find_image_root(json_path: Path, images: list[dict]) -> Path:
    """The folder `file_name` is relative to: the json's, its parent, or an images/ folder in either. Judged by the
    first 50 entries, so a missing first image does not send every lookup to the wrong folder."""
    candidates = [json_path.parent, json_path.parent.parent, json_path.parent / "images", json_path.parent.parent / "images"]
    first = [im["file_name"] for im in images[:50]]
    for root in candidates:
        if any((root / name).is_file() for name in first):
            return root
    if first:
        raise SystemExit(
            f"{json_path}: none of its first {len(first)} images (such as {first[0]}) is in any of "
            f"{', '.join(map(str, candidates))}; put the images in one of them (`file_name` is relative to it)"
        )
    return json_path.parent


def from_hub_dataset(dsd, name: str = "hub", val_fraction: float = 0.1, max_pixels: int = MAX_PIXELS) -> DetectionData:
    """Splits in the `objects{bbox, category}` convention (bbox = COCO [x, y, w, h] pixels, category a ClassLabel)."""
    aliases = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
    report, splits, hub, sources = DataReport(max_pixels), {}, {}, {}
    names = None
    for hub_split, ds in dsd.items():
        split = aliases.get(hub_split)
        if split is None:
            continue
        if "objects" not in ds.features or "image" not in ds.features:
            raise SystemExit(
                f"{name}: split {hub_split} needs columns `image` and `objects` (with `bbox` and `category`); "
                f"it has {list(ds.features)}"
            )
        names = names or class_names(ds.features)
        hub[split] = ds
        splits[split] = read_hub_split(ds, split, report, names)
        sources[split] = f"{name} split {hub_split}"
    if "train" not in splits:
        raise SystemExit(f"{name}: no `train` split (found {list(dsd)})")
    if not names:
        raise SystemExit(f"{name}: `objects.category` is not a ClassLabel, so the class names are unknown")
    if "val" not in splits:
        split_off(splits, sources, val_fraction)
        hub["val"] = hub["train"]
    return DetectionData(names, splits, report, hub=hub, description=f"Hub dataset {name}", sources=sources)


def class_names(features) -> list[str]:
    """The names of `objects.category` when it is a ClassLabel (or a list of them), else []."""
    category = features["objects"]["category"]
    return list(getattr(getattr(category, "feature", category), "names", None) or [])


def read_hub_split(ds, split: str, report: DataReport, names: list[str]) -> list[Sample]:
    if {"width", "height"} <= set(ds.features):
        sizes = zip(ds["width"], ds["height"], strict=True)
    else:
        sizes = (open_rgb(ds[i]["image"])[0].size for i in range(len(ds)))
    return hub_samples(zip(itertools.count(), sizes, ds["objects"]), split, report, names)


def hub_samples(rows, split: str, report: DataReport, names: list[str]) -> list[Sample]:
    """Each row (id, (width, height), objects{bbox, category}) as image id, its boxes cleaned; too large images skipped."""
    samples = []
    for i, (w, h), obj in rows:
        file = f"{split}/{i}"
        if w * h > report.max_pixels:
            report.add(split, file, "too_large")
            continue
        rows = []
        for (x, y, bw, bh), cat in zip(obj["bbox"], obj["category"], strict=False):
            if not 0 <= cat < len(names):
                report.add(split, file, "class_out_of_range")
                continue
            rows.append((int(cat), x, y, x + bw, y + bh))
        boxes, labels = clean_boxes(rows, w, h, report, split, file)
        samples.append(Sample(i, f"{i:08d}.jpg", i, w, h, boxes, labels))
    return samples


def split_off(splits: dict, sources: dict, fraction: float) -> dict:
    """Hold out a fixed (seed-independent) random share of train as val, so every run and process agrees on it."""
    samples, order = splits["train"], list(range(len(splits["train"])))
    random.Random(0).shuffle(order)
    n_val = max(1, round(len(samples) * fraction))
    splits["train"], splits["val"] = [samples[i] for i in sorted(order[n_val:])], [samples[i] for i in sorted(order[:n_val])]
    sources["val"] = f"{sources['train']} ({fraction:.0%} of it)"
    return splits


def streamed_data(name: str, max_pixels: int = MAX_PIXELS) -> DetectionData:
    """--streaming: the splits of a shard folder (make_shards.py's, WebDataset tar files, other data files `datasets`
    reads) or a Hub id, read while training. All columns but the image are read ahead: the boxes of training, the
    ground truth of evaluation, the class counts. The images are streamed with their image_id, which ties each to its
    boxes. Classes given as ids rather than a ClassLabel are named by their numbers."""
    import datasets

    streams, files, sources = open_streams(name)
    streams = webdataset_as_columns(streams)
    features = streams["train"].features or {}
    if not set(GROUND_TRUTH + ["image"]) <= set(features):
        raise SystemExit(
            f"--data {name} --streaming: needs columns image, image_id, width, height and objects{{bbox, category}}, or "
            f"WebDataset samples KEY.jpg beside KEY.json holding the others (has {features}); write the shards with "
            "scripts/make_shards.py detection"
        )
    report, ahead = DataReport(max_pixels), columns_ahead(name, GROUND_TRUTH, streams)
    rows = {part: list(ahead[source]) for part, source in sources.items()}
    names = class_names(features) or class_ids(rows.values())
    splits = {}
    for part, source in sources.items():
        ids = Counter(r["image_id"] for r in rows[part])
        if len(ids) < len(rows[part]):
            raise SystemExit(f"--data {name} --streaming: image_id {ids.most_common(1)[0][0]} is not unique in {source}")
        samples = ((r["image_id"], (r["width"], r["height"]), r["objects"]) for r in rows[part])
        splits[part] = hub_samples(samples, part, report, names)
    # The workers read no box column again; they read the images, and training's decoded pixels where there are some.
    images = columns_ahead(name, ["image_id", "image", *(c for c in features if c.startswith("pixels_"))], streams)
    images = {part: images[source].cast_column("image", datasets.Image(decode=False)) for part, source in sources.items()}
    return DetectionData(
        names,
        splits,
        report,
        description=f"streamed shards {name}",
        sources={part: f"{name} split {source}" for part, source in sources.items()},
        shards={part: files.get(source, []) for part, source in sources.items()},
        streams=images,
    )


def class_ids(splits) -> list[str]:
    """Classes given as ids 0..N-1 (no ClassLabel, as in WebDataset json), named by their numbers."""
    highest = max((max(r["objects"]["category"], default=-1) for rows in splits for r in rows), default=-1)
    return [str(k) for k in range(highest + 1)]


def webdataset_as_columns(streams: dict) -> dict:
    """WebDataset samples (KEY.jpg, .jpeg, .png or .webp beside KEY.json holding image_id, width, height and objects)
    as the columns other data files have; other streams as they are."""
    import datasets

    features = streams["train"].features or {}
    image = next((suffix for suffix in ("jpg", "jpeg", "png", "webp") if suffix in features), None)
    if image is None or not isinstance(features.get("json"), dict):
        return streams
    columns = datasets.Features({**features["json"], "image": datasets.Image(decode=False)})
    return {
        split: stream.cast_column(image, datasets.Image(decode=False)).map(
            lambda row: {**row["json"], "image": row[image]}, remove_columns=list(features), features=columns
        )
        for split, stream in streams.items()
    }


def require_boxes(data: DetectionData, report_path: Path):
    """Stop when a split kept no box: training would learn nothing, and an mAP of -1 cannot pick the best epoch."""
    for split, samples in data.splits.items():
        if not any(len(s.labels) for s in samples):
            raise SystemExit(
                f"the {split} split ({data.sources.get(split, data.description)}) has no boxes after cleaning: "
                f"{len(samples)} images, all background or with every box skipped. See {report_path} for what was "
                f"skipped and why; fix those labels, or give the {split} split labelled images."
            )


def relabel(data: DetectionData, labels: list[str], root):
    """Express every box's class as an index into the model's labels."""
    index = label_index(data.names, labels, root)
    for sample in (s for samples in data.splits.values() for s in samples):
        sample.labels = index[sample.labels]
    data.names = labels


# ----------------------------------------------------------------------------------------------- outputs
def to_coco(samples: list[Sample], names: list[str]) -> dict:
    """COCO instances dict; category ids are the class indices, annotation ids start at 1 (pycocotools needs > 0)."""
    references = [{**vars(s), "boxes": s.boxes.tolist(), "labels": s.labels.tolist()} for s in samples]
    return coco_dicts([], references, names)[0]


def coco_results(predictions: list[dict]) -> list[dict]:
    """COCO results (bbox [x, y, w, h] pixels, category_id = class index) of [{"image_id", "boxes" (xyxy), "scores",
    "labels"}, and optionally "file_name"]."""
    return coco_dicts([{k: v.tolist() if hasattr(v, "tolist") else v for k, v in p.items()} for p in predictions], [])[1]


def draw_detections(image: Image.Image, boxes, labels, scores, names: list[str], truth=None) -> torch.Tensor:
    """The image (uint8 CHW) with predicted boxes coloured by class and named, over the ground truth in white."""
    tensor = F.pil_to_tensor(image)
    if truth is not None and len(truth):
        tensor = draw_bounding_boxes(tensor, torch.as_tensor(truth), colors="white", width=1)
    if len(boxes):
        named = [f"{names[c]} {s:.2f}" for c, s in zip(labels.tolist(), scores.tolist(), strict=True)]
        tensor = draw_named_boxes(tensor, torch.as_tensor(boxes), labels.tolist(), named, width=2)
    return tensor


def draw_named_boxes(image: torch.Tensor, boxes: torch.Tensor, classes: list[int], names: list[str], width: int = 1):
    """Boxes coloured by class, each named on a label of its colour (readable on any picture)."""
    colours = [PALETTE[c % len(PALETTE)] for c in classes]
    text = ["white" if colour in DARK else "black" for colour in colours]
    return draw_bounding_boxes(
        image, boxes, names, colours, width=width, font=font_file(), font_size=12, label_colors=text, fill_labels=True
    )


def font_file() -> str:
    """A TrueType font for readable labels: the DejaVu Sans that matplotlib ships."""
    from matplotlib import font_manager

    return font_manager.findfont("DejaVu Sans")


def draw_grid(dataset: "DetectionDataset", predictions: list[dict], names, path: Path, count: int = 16, conf: float = 0.3):
    """Validation images scaled to 320 px tiles, predictions (score >= conf) over the ground truth, under a legend."""
    tiles, tile = [], 320
    for index, (image, pred) in enumerate(zip(dataset.first_images(count), predictions, strict=False)):
        scale = tile / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        boxes, labels, scores = (pred[key][pred["scores"] >= conf] for key in ("boxes", "labels", "scores"))
        drawn = draw_detections(image, boxes * scale, labels, scores, names, dataset.samples[index].boxes * scale)
        tiles.append(torch.nn.functional.pad(drawn, (0, tile - drawn.shape[2], 0, tile - drawn.shape[1])))
    save_with_caption(
        make_grid(tiles, nrow=4, padding=4), f"white: ground truth; colours: predictions (class, score >= {conf})", path
    )


def save_with_caption(grid: torch.Tensor, caption: str, path: Path):
    picture, font = F.to_pil_image(grid), ImageFont.truetype(font_file(), 16)
    framed = Image.new("RGB", (max(picture.width, round(font.getlength(caption)) + 12), picture.height + 28), "white")
    framed.paste(picture, (0, 28))
    ImageDraw.Draw(framed).text((6, 5), caption, fill="black", font=font)
    framed.save(path)


def draw_batch(images: torch.Tensor, targets: list[dict], names: list[str], path: Path, count: int = 16):
    """train_batch0.jpg: the first training batch as the model sees it (augmented), with its boxes and class names."""
    tiles = []
    for image, target in zip(images[:count], targets[:count], strict=False):
        pixels = (image.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu()
        labels = (target["labels"] - 1).tolist()  # the model's labels count background as 0
        boxes = target["boxes"].detach().float().cpu()
        tiles.append(draw_named_boxes(pixels, boxes, labels, [names[c] for c in labels]))
    save_with_caption(make_grid(tiles, nrow=4, padding=4), "the first training batch, augmented, with its boxes", path)


def plot_pr_curves(curves: dict, path: Path, what: str):
    """Precision against recall per class at IoU .50 (COCOeval's 101 recall points), with each class's AP50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, precision in curves.items():
        precision = np.asarray(precision)
        if (precision > -1).any():
            ax.plot(recall, np.clip(precision, 0, None), label=f"{name} {precision[precision > -1].mean():.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"precision-recall at IoU 0.5: {what}")
    ax.legend(fontsize=8, title="class, AP50", loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_label_statistics(samples: list[Sample], names: list[str], path: Path):
    """Boxes per class, box width vs height, and where box centres fall (all normalised by image size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.bincount(np.concatenate([s.labels for s in samples] + [np.zeros(0, np.int64)]), minlength=len(names))
    wh = np.concatenate([(s.boxes[:, 2:] - s.boxes[:, :2]) / [s.width, s.height] for s in samples] + [np.zeros((0, 2))])
    centers = np.concatenate([(s.boxes[:, 2:] + s.boxes[:, :2]) / 2 / [s.width, s.height] for s in samples] + [np.zeros((0, 2))])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(range(len(names)), counts)
    axes[0].set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0)
    axes[0].set_title("boxes per class")
    axes[1].scatter(wh[:, 0], wh[:, 1], s=3, alpha=0.4)
    axes[1].set(xlabel="width", ylabel="height", xlim=(0, 1), ylim=(0, 1), title="box size / image size")
    axes[2].hist2d(centers[:, 0], centers[:, 1], bins=20, range=[[0, 1], [0, 1]], cmap="Blues")
    axes[2].set(xlabel="x", ylabel="y", title="box centres")
    axes[2].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_start(accelerator, args, plan, data: DetectionData, config: dict, model, cache, steps: str, start_note: str):
    """The run at a glance: data, model, processes, batch plan, schedule (steps), augmentation and cache."""
    labels, parameters = config["labels"], sum(p.numel() for p in model.parameters()) / 1e6
    cached = f"{cache.path} ({cache.path.stat().st_size / 1e6:.0f} MB)" if cache else "off: images decoded as they are read"
    until = 0 if args.no_augment else mosaic_epochs(args.epochs, vars(args))
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
            "optimizer steps": steps,
            "mosaic": f"probability {args.mosaic:g}, epochs 1-{until} of {args.epochs}" if until > 0 else "off",
            "image cache": cached,
        },
    )


# ----------------------------------------------------------------------------------------------- training data
@dataclass
class Tile:
    image: torch.Tensor  # upright RGB, uint8 (3, H, W)
    boxes: torch.Tensor  # (N, 4) xyxy in its pixels
    labels: torch.Tensor


class DetectionDataset(torch.utils.data.Dataset):
    """(uint8 CHW image, target with xyxy boxes in its pixels) after the transform, or the mosaic while it is on.
    Augmentation is seeded by (seed, epoch, index): the same whatever the process and worker count, or a resume."""

    def __init__(
        self, samples: list[Sample], transform, hub_dataset=None, seed: int = 0, colour_jitter=None, mosaic=None, cache=None
    ):
        self.samples, self.transform, self.hub_dataset, self.seed = samples, transform, hub_dataset, seed
        self.colour_jitter, self.mosaic, self.cache = colour_jitter, mosaic, cache
        # Shared so that persistent workers see the epoch, and with it the seed and whether mosaic is closed.
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int):
        self.epoch.fill_(epoch)

    def __len__(self):
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        s = self.samples[index]
        return open_rgb(self.hub_dataset[s.source]["image"] if self.hub_dataset is not None else s.source)[0]

    def first_images(self, count: int) -> list[Image.Image]:
        return [self.load(index) for index in range(min(count, len(self)))]

    def tile(self, index: int) -> Tile:
        """The image before augmentation, from the cache when there is one (then scaled down, its boxes too)."""
        if self.cache is None:
            return full_size_tile(self.load(index), self.samples[index])
        return scaled_tile(self.cache.image(index), self.samples[index])

    def __getitem__(self, index: int):
        return self.augmented(index, self, index)

    def augmented(self, index: int, pool, position: int):
        """Sample `index` as training or evaluation takes it, augmented with draws seeded by (seed, epoch, index). Its
        image is pool.tile(position); a mosaic draws the other three from pool (this dataset, or a stream's RecentTiles)."""
        s = self.samples[index]
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also seeds CUDA, with a stack trace that took a third of the time.
            torch.default_generator.manual_seed(hash((self.seed, int(self.epoch), index)) & 0x7FFF_FFFF)
            if self.mosaic is not None and self.mosaic.applies(int(self.epoch)):
                image, target = self.mosaic(pool, position)
            else:
                tile = pool.tile(position)
                boxes = tv_tensors.BoundingBoxes(tile.boxes, format="XYXY", canvas_size=tuple(tile.image.shape[1:]))
                image, target = self.transform(tv_tensors.Image(tile.image), {"boxes": boxes, "labels": tile.labels})
            colour = self.colour_jitter.sample() if self.colour_jitter else torch.ones(3)
        h, w = image.shape[-2:]
        return image.as_subclass(torch.Tensor), {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
            "labels": target["labels"],
            "colour": colour,
            "image_id": s.image_id,
            "orig_size": (s.height, s.width),
            "size": (h, w),
        }


def full_size_tile(image: Image.Image, s: Sample) -> Tile:
    return Tile(F.pil_to_tensor(image), torch.from_numpy(s.boxes), torch.from_numpy(s.labels))


def scaled_tile(image: torch.Tensor, s: Sample) -> Tile:
    """An image at another size than the sample's (the image cache's), its boxes scaled with it."""
    scale = torch.tensor([image.shape[2] / s.width, image.shape[1] / s.height] * 2)
    return Tile(image, torch.from_numpy(s.boxes) * scale, torch.from_numpy(s.labels))


class RecentTiles:
    """--streaming: the images a DataLoader worker decoded last, what a mosaic draws its other three from: a stream has
    no random access, so where the cached path draws from the whole split, this draws from the last MOSAIC_POOL images
    of the worker's share. Emptied when an epoch starts, so a resumed epoch, replayed from its start, fills it alike."""

    def __init__(self, size: int):
        self.tiles, self.epoch = deque(maxlen=size), None

    def add(self, tile: Tile, epoch: int) -> int:
        """Keep tile; its position in the pool."""
        if epoch != self.epoch:
            self.tiles.clear()
            self.epoch = epoch
        self.tiles.append(tile)
        return len(self.tiles) - 1

    def __len__(self):
        return len(self.tiles)

    def tile(self, position: int) -> Tile:
        return self.tiles[position]


class StreamedImages(DetectionDataset):
    """--streaming: a split read from its shards while training, where DetectionDataset reads files or the
    image cache. Each process reads its share (datasets' split_dataset_by_node), training shuffles through a seeded
    buffer (reshuffled each epoch), and each image is decoded and augmented in a DataLoader worker as DetectionDataset
    does it: the same draws for the same image and epoch, training images scaled as the image cache scales them. Only
    the mosaic differs: its other three images come from the worker's RecentTiles, not from the whole split."""

    def __init__(self, samples: list[Sample], stream, scale_to: int | None, **options):
        super().__init__(samples, **options)
        self.stream, self.scale_to = stream, scale_to
        self.position = {s.source: k for k, s in enumerate(samples)}  # image_id -> index in samples
        self.recent = RecentTiles(MOSAIC_POOL if self.mosaic else 1)

    def loader(self, accelerator, batch_size: int, workers: int, shuffle_buffer: int | None, seed: int, collate):
        stream = prepared_share(accelerator, self.stream, self.prepare, shuffle_buffer, seed, batch_size)
        pad = None if shuffle_buffer else pad_row  # evaluation drops these rows

        def batch(rows):
            return collate([(r["pixels"], r["target"]) for r in rows])

        return stream_loader(accelerator, stream, batch_size, workers, len(self), batch, pad)

    def prepare(self, row: dict) -> dict | None:
        """A row as DetectionDataset gives its sample; None for a row left out (--max-*-samples, too large) or one that
        cannot be decoded (with a warning naming it)."""
        index = self.position.get(row["image_id"])
        if index is None:
            return None
        try:
            tile = self.tile_of(row, self.samples[index])
        except Exception as err:  # PIL raises many types for broken files; all mean "cannot use this image"
            print(f"warning: skipped image_id {row['image_id']} of the stream ({type(err).__name__}: {err})", flush=True)
            return None
        pixels, target = self.augmented(index, self.recent, self.recent.add(tile, int(self.epoch)))
        return {"pixels": pixels, "target": target}

    def tile_of(self, row: dict, s: Sample) -> Tile:
        """The row's image before augmentation: for training scaled as the image cache holds it, read from the shards'
        pixels for this size when make_shards.py --img-size stored them, else decoded."""
        if not self.scale_to:
            return full_size_tile(stored_image(row["image"]), s)
        (w, h), stored = scaled_size(s.width, s.height, self.scale_to), row.get(pixels_column(self.scale_to))
        if stored is None:
            return scaled_tile(scaled_pixels(stored_image(row["image"]), (w, h)), s)
        return scaled_tile(torch.frombuffer(bytearray(stored), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1), s)

    def first_images(self, count: int) -> list[Image.Image]:
        kept = (row for row in self.stream if row["image_id"] in self.position)
        return [stored_image(row["image"]) for row in itertools.islice(kept, count)]


def stored_image(value: dict) -> Image.Image:
    """An undecoded Image value ({"bytes", "path"}: a stream's, a shard row's) decoded as training reads images."""
    return open_rgb(Image.open(stored_file(value)))[0]


def pad_row(row: dict) -> dict:
    return {**row, "target": {**row["target"], "image_id": PADDING}}


IMAGE_CACHE_VERSION = 4  # bump when the cached representation changes


class ImageCache:
    """A split's images decoded once, scaled to a long side of img_size, as uint8 HWC one after another in
    CACHE/<key>.u8: a memory map workers, processes and later runs read instead of decoding (a 640 px JPEG takes PIL
    about 2 ms, four times per mosaic sample). Key: the image files' stamps or the Hub split's fingerprint, img_size."""

    def __init__(self, samples: list[Sample], hub_dataset, img_size: int, cache_dir: Path, workers: int = 0):
        self.sizes = [scaled_size(s.width, s.height, img_size) for s in samples]
        lengths = np.array([3 * w * h for w, h in self.sizes], dtype=np.int64)
        self.starts = np.cumsum(lengths) - lengths
        self.path = Path(cache_dir) / f"{image_cache_key(samples, hub_dataset, img_size)}.u8"
        build_once(self.path, lambda write: build_image_cache(samples, hub_dataset, self.sizes, write, workers))
        # Copy-on-write: the tensors are views of the map, and torch wants writable memory.
        self.array = MappedArray(self.path, np.uint8, mode="c")

    def image(self, index: int) -> torch.Tensor:
        """(3, H, W) with channels-last strides: torch resizes uint8 that way two to three times faster."""
        (w, h), start = self.sizes[index], self.starts[index]
        return torch.from_numpy(self.array[start : start + 3 * w * h].reshape(h, w, 3)).permute(2, 0, 1)


def scaled_size(width: int, height: int, img_size: int) -> tuple[int, int]:
    """An image at a long side of img_size, up or down: a small source is scaled once into the cache, not once per
    mosaic tile it appears in (320 px JPEGs at 640: 2.3x the images per second per worker)."""
    scale = img_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_cache_key(samples: list[Sample], hub_dataset, img_size: int) -> str:
    h = hashlib.sha1(f"v{IMAGE_CACHE_VERSION}|{img_size}|{len(samples)}|".encode())
    if hub_dataset is not None:
        h.update(f"{hub_dataset._fingerprint}|{[s.source for s in samples]}".encode())
    else:
        for s in samples:
            h.update(file_stamp(s.source))
    return h.hexdigest()[:20]


class _ScaleJob(DetectionDataset):
    def __init__(self, samples: list[Sample], hub_dataset, sizes: list[tuple[int, int]]):
        super().__init__(samples, None, hub_dataset)
        self.sizes = sizes

    def __getitem__(self, index: int) -> bytes:
        return cached_pixels(self.load(index), self.sizes[index])


def cached_pixels(image: Image.Image, size: tuple[int, int]) -> bytes:
    """The image scaled to size (width, height) as the image cache and make_shards.py --img-size store it: uint8
    height x width x RGB."""
    return scaled_pixels(image, size).permute(1, 2, 0).numpy().tobytes()


def pixels_column(img_size: int) -> str:
    """The shards' column of training images decoded and scaled for --img-size (make_shards.py --img-size)."""
    return f"pixels_{img_size}"


def scaled_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The image at size (width, height) as uint8 (3, H, W) with channels-last strides, as the image cache holds it:
    bilinear, antialiased when it shrinks (PIL's filter, within 1 of PIL's pixels, in 40% of its time)."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    scaled = torch.nn.functional.interpolate(pixels, size=size[::-1], mode="bilinear", antialias=True)
    return scaled.contiguous(memory_format=torch.channels_last)[0]


def build_image_cache(samples, hub_dataset, sizes, write, workers: int) -> dict:
    # In index order, so each image lands at its start.
    for image in decoded_in_order(_ScaleJob(samples, hub_dataset, sizes), workers, "decoding training images (once; cached)"):
        write(image)
    return {"images": len(samples), "sizes": sizes}


def default_cache_dir() -> Path:
    return cache_root() / "detection"


def image_identities(data: DetectionData) -> dict[str, list]:
    """Per split, what identifies each image for a run's fingerprint (shared.runtime.files_fingerprint): its file, or
    its Hub dataset's fingerprint and row, with its boxes and classes."""
    if data.streams:  # --streaming: the shard files by content, and the boxes read ahead
        return {
            split: shard_identities(data.shards[split]) + [(s.source, s.boxes, s.labels) for s in samples]
            for split, samples in data.splits.items()
        }
    hub = {split: dataset._fingerprint for split, dataset in data.hub.items()}
    return {
        split: [(hub.get(split), s.source if split in hub else Path(s.source), s.boxes, s.labels) for s in samples]
        for split, samples in data.splits.items()
    }


def spread(samples: list, limit: int | None) -> list:
    """--max-train-samples / --max-eval-samples: `limit` samples spread evenly over the split."""
    if limit is None or limit >= len(samples):
        return samples
    return [samples[i] for i in np.linspace(0, len(samples) - 1, limit).round().astype(int)]


def detection_datasets(args, data: DetectionData, img_size: int, recipe: dict) -> dict:
    """A DetectionDataset per split (with --eval-only, val and test only); the training one augmented (unless
    --no-augment) and read from the image cache, or with --streaming a StreamedImages per split."""
    augment = not args.no_augment and not args.eval_only
    cached = not (args.eval_only or args.streaming)
    train_cache = training_image_cache(args, data.splits["train"], data.hub.get("train"), img_size) if cached else None
    datasets = {}
    for split, samples in data.splits.items():
        if args.eval_only and split == "train":
            continue
        train = split == "train" and augment
        options = {
            "transform": train_transform(img_size, recipe) if train else eval_transform(img_size),
            "seed": args.seed,
            "colour_jitter": ColourJitter(recipe["colour"], recipe["photometric"]) if train else None,
            "mosaic": Mosaic(img_size, recipe, mosaic_epochs(args.epochs, recipe)) if train else None,
        }
        if args.streaming:  # training images scaled as the image cache scales them
            datasets[split] = StreamedImages(samples, data.streams[split], img_size if split == "train" else None, **options)
        else:
            cache = train_cache if split == "train" else None
            datasets[split] = DetectionDataset(samples, hub_dataset=data.hub.get(split), cache=cache, **options)
    return datasets


def training_image_cache(args, samples, hub_dataset, img_size: int) -> "ImageCache | None":
    """Training reads every image once per epoch, or four times with mosaic: decode them once. Not when the cache
    would take over half the free space of --cache-dir (then the run says so and decodes as it goes)."""
    if args.no_cache:
        return None
    needed = sum(3 * w * h for w, h in (scaled_size(s.width, s.height, img_size) for s in samples))
    free = disk_free(args.cache_dir)
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


def image_loader(accelerator, dataset, args, plan, config: dict, shuffle: bool):
    collate = make_collate(config["img_size"], channels_last=shuffle)  # the training loader: see make_collate
    if isinstance(dataset, StreamedImages):
        buffer = args.shuffle_buffer if shuffle else None
        return dataset.loader(accelerator, plan.batch_size, args.workers, buffer, args.seed, collate)
    return make_loader(dataset, batch_size=plan.batch_size, shuffle=shuffle, workers=args.workers, collate_fn=collate)


def mosaic_epochs(epochs: int, recipe: dict) -> int:
    """How many epochs from the start use mosaic: all but the closed last ones (see close_mosaic in the RECIPE)."""
    if not recipe["mosaic"]:
        return 0
    return epochs - min(recipe["close_mosaic"], max(1, round(epochs / 5)))


def to_training_batch(accelerator, args, images, targets, img_size: int, state):
    """uint8 batch -> float images with their colour jitter, targets on the device (labels 1..K: torchvision's
    detectors keep 0 for background), at a random multi-scale size with --multi-scale."""
    # The loader's batch is channels-last (as the mosaic makes it); transposed here, on the device, where it is cheap.
    images = images.contiguous()
    if args.no_augment:
        images = images.float().div_(255)
    else:
        images = ColourJitter.apply(images, torch.stack([t["colour"] for t in targets]).to(images.device))
    device = accelerator.device
    targets = [
        {"boxes": t["boxes"].to(device, non_blocking=True), "labels": t["labels"].to(device, non_blocking=True) + 1}
        for t in targets
    ]
    if args.multi_scale:
        # A size in 0.5-1.5 img_size (a multiple of 32) seeded by the batch's place in the global order: the same after
        # a resume and for any process count.
        global_batch = state.batch_in_epoch * accelerator.num_processes + accelerator.process_index
        rng = random.Random(hash((args.seed, state.epoch, global_batch)))
        size = rng.randrange(int(img_size * 0.5) // 32, int(img_size * 1.5) // 32 + 1) * 32
        factor = size / images.shape[-1]
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        targets = [{**t, "boxes": t["boxes"] * factor} for t in targets]
    return images, targets


def train_transform(img_size: int, recipe: dict):
    """Horizontal flip, scale jitter, then a random img_size crop (padded where the image is smaller); boxes follow and
    too-small leftovers are dropped. Colour jitter runs batched on the device (ColourJitter)."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=recipe["fliplr"]),
            v2.ScaleJitter((img_size, img_size), scale_range=(1 - recipe["scale"], 1 + recipe["scale"])),
            v2.RandomCrop(img_size, pad_if_needed=True, fill={tv_tensors.Image: PAD_VALUE, "others": 0}),
            v2.SanitizeBoundingBoxes(min_size=recipe["min_box_size"]),
        ]
    )


MIN_VISIBLE = 0.1  # a mosaic keeps a box only if this much of its area is in view (YOLO's box_candidates area_thr)
QUADRANTS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (x, y) side of the centre: top-left, top-right, bottom-left, bottom-right


class Mosaic:
    """YOLO's 4-image mosaic, in place of train_transform with probability recipe mosaic for the epochs before
    until_epoch (YOLO ends training on whole images, as evaluation sees them). The image and three random others meet
    at a random centre of a 2 img_size canvas; a view of it at a random scale (1 +- scale) and shift (+- translate)
    becomes the sample, then the flip. Draws come from the generator the dataset seeded."""

    def __init__(self, img_size: int, recipe: dict, until_epoch: int):
        self.size, self.until_epoch = img_size, until_epoch
        self.p, self.scale, self.translate = recipe["mosaic"], recipe["scale"], recipe["translate"]
        self.fliplr, self.min_box_size = recipe["fliplr"], recipe["min_box_size"]

    def applies(self, epoch: int) -> bool:
        return epoch < self.until_epoch and bool(torch.rand(()) < self.p)

    def __call__(self, dataset: DetectionDataset, index: int):
        others = torch.randint(len(dataset), (3,)).tolist()
        centre = torch.randint(self.size // 2, self.size * 3 // 2 + 1, (2,)).tolist()
        ratio = 1 + (float(torch.rand(())) * 2 - 1) * self.scale
        shift = ((torch.rand(2) * 2 - 1) * self.translate).tolist()
        image, target = mosaic_view([dataset.tile(i) for i in [index, *others]], centre, self.size, ratio, shift)
        if torch.rand(()) < self.fliplr:
            image, target["boxes"] = image.flip(-1), F.horizontal_flip(target["boxes"])
        boxes = target["boxes"]
        keep = ((boxes[:, 2:] - boxes[:, :2]) >= self.min_box_size).all(1)
        return tv_tensors.Image(image), {"boxes": boxes[keep], "labels": target["labels"][keep]}


def mosaic_view(tiles: list[Tile], centre: list[int], size: int, ratio: float, shift: list[float]):
    """The size x size view of four tiles (each at a long side of size, a corner at centre, one per quadrant) on a
    2 size grey canvas, scaled by ratio about its centre, which lands at (0.5 + shift) * size: YOLO's random_perspective
    with scale and translation only. Boxes are clipped to what is in view of their own tile and dropped below
    MIN_VISIBLE of their area. Only the window in view is built, then resized once."""
    window = max(1, round(size / ratio))
    corner = [round(size - (0.5 + s) * window) for s in shift]  # the canvas pixel at the view's top-left
    # Height x width x 3: copies into it are row copies, and torch resizes uint8 2-3x faster in channels-last order.
    canvas = torch.full((1, window, window, 3), PAD_VALUE, dtype=torch.uint8)
    boxes, labels = [], []
    for quadrant, tile in zip(QUADRANTS, tiles, strict=True):
        tile = at_long_side(tile, size)
        (h, w), (cx, cy) = tile.image.shape[1:], centre
        left, top = (cx - w if quadrant[0] == 0 else cx), (cy - h if quadrant[1] == 0 else cy)
        # The tile's pixels that are on the canvas and in the window, in window coordinates.
        x0, x1 = max(left, 0, corner[0]) - corner[0], min(left + w, 2 * size, corner[0] + window) - corner[0]
        y0, y1 = max(top, 0, corner[1]) - corner[1], min(top + h, 2 * size, corner[1] + window) - corner[1]
        if x1 <= x0 or y1 <= y0:
            continue
        ox, oy = left - corner[0], top - corner[1]  # where the tile's first pixel is in the window
        canvas[0, y0:y1, x0:x1] = tile.image[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox].permute(1, 2, 0)
        b = tile.boxes.float() + torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
        visible = torch.stack([b[:, 0].clamp(x0, x1), b[:, 1].clamp(y0, y1), b[:, 2].clamp(x0, x1), b[:, 3].clamp(y0, y1)], 1)
        keep = box_area(visible) >= MIN_VISIBLE * box_area(b)
        boxes.append(visible[keep] * (size / window))
        labels.append(tile.labels[keep])
    image = canvas.permute(0, 3, 1, 2)
    if window != size:
        image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.cat([torch.zeros(0, 4), *boxes]), format="XYXY", canvas_size=(size, size)),
        "labels": torch.cat([torch.zeros(0, dtype=torch.int64), *labels]),
    }
    return image[0], target  # channels-last strides: see make_collate


def at_long_side(tile: Tile, size: int) -> Tile:
    """The tile scaled to a long side of size (cached images already are, unless they are smaller)."""
    h, w = tile.image.shape[1:]
    if max(w, h) == size:
        return tile
    nw, nh = max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h)))
    image = torch.nn.functional.interpolate(tile.image[None], size=(nh, nw), mode="bilinear", antialias=True)[0]
    return Tile(image, tile.boxes.float() * torch.tensor([nw / w, nh / h, nw / w, nh / h]), tile.labels)


class ColourJitter:
    """Brightness, contrast and saturation factors in [1 - strength, 1 + strength], drawn per image in the data
    loader (seeded like the other augmentations) and applied to the whole batch on the device, where it costs almost
    nothing (per image on uint8 it was the slowest step)."""

    def __init__(self, strength: float, p: float):
        self.strength, self.p = strength, p

    def sample(self) -> torch.Tensor:
        factors = 1 + (torch.rand(3) * 2 - 1) * self.strength
        return factors if torch.rand(()) < self.p else torch.ones(3)

    @staticmethod
    def apply(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) and (N, 3) factors -> float in [0, 1]. The three jitters are affine in RGB, so together
        they are one 3x3 matrix and offset per image: a single pass over the pixels."""
        n = len(images)
        b, c, s = factors.unbind(1)
        luma = torch.tensor([0.299, 0.587, 0.114], device=images.device)
        pixels = images.reshape(n, 3, -1).float()
        mean_grey = pixels.mean(2) @ luma / 255  # per image, before brightness
        eye = torch.eye(3, device=images.device)
        saturation = s.view(n, 1, 1) * eye + (1 - s).view(n, 1, 1) * luma.view(1, 1, 3)  # s*I + (1-s) * 1 luma^T
        matrix = (b * c / 255).view(n, 1, 1) * saturation
        offset = ((1 - c) * b * mean_grey).view(n, 1, 1)  # saturation leaves a uniform grey unchanged
        return torch.baddbmm(offset, matrix, pixels).clamp_(0, 1).view_as(images)


def eval_transform(img_size: int):
    """The long side becomes img_size, aspect kept (collate pads the rest)."""
    return v2.Resize(size=None, max_size=img_size)


def make_collate(img_size: int, channels_last: bool = False):
    """Stack images into one uint8 batch, padded bottom-right to img_size x img_size (boxes stay valid). channels_last:
    laid out as the mosaic makes its samples, so stacking them is a copy, not a transpose (see to_training_batch)."""

    def collate(batch):
        shape = (len(batch), img_size, img_size, 3) if channels_last else (len(batch), 3, img_size, img_size)
        images = torch.empty(shape, dtype=torch.uint8)
        images = images.permute(0, 3, 1, 2) if channels_last else images
        for i, (image, _) in enumerate(batch):
            h, w = image.shape[1:]
            images[i, :, :h, :w] = image
            images[i, :, h:], images[i, :, :h, w:] = PAD_VALUE, PAD_VALUE  # training images mostly fill it: no pass over all
        return images, [t for _, t in batch]

    return collate


def to_original_coordinates(boxes: torch.Tensor, target: dict) -> torch.Tensor:
    """Undo the eval resize: boxes in the pixels of the image file (upright)."""
    (h0, w0), (h, w) = target["orig_size"], target["size"]
    scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h], dtype=boxes.dtype, device=boxes.device)
    return clip_boxes_to_image(boxes * scale, (h0, w0))
