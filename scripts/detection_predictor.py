"""The detection task after training, written once for every script that uses a model/: predict_detection.py
writes its detections, serve.py answers with them, export_model.py exports the model and checks the export.

  load          model/ run by PyTorch, or an exported model (images -> boxes, scores, labels, num_detections) given
                as a run function
  pre-process   the letterbox: upright 8-bit RGB, long side resized to the model's size S (aspect kept), padded
                bottom-right with grey to S x S, as evaluation in training
  forward       boxes (xyxy in input pixels), scores and 0-based labels per image, above conf, after NMS at iou
  record        boxes back in the pixels of the image file, as COCO results (bbox [x, y, w, h])"""

import io
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torchvision
from detection_data import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    PAD_VALUE,
    DetectionDataset,
    Sample,
    coco_results,
    eval_transform,
    load_data,
    make_collate,
    open_rgb,
    probe_all,
    to_original_coordinates,
)
from detection_model import TASK, build_model, set_postprocess
from evaluate import load as load_metric
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.models.detection import FCOS
from torchvision.models.detection.image_list import ImageList
from torchvision.transforms.v2 import functional as TF

from shared.model_io import BadInput, load_pretrained, run_args

MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")
MIN_IOU, MAX_SCORE_DIFF, MAX_MAP_DIFF, MAX_CORNER_DIFF = 0.99, 1e-3, 1e-4, 1e-3  # export parity; corners in pixels


def load_model(directory: Path, device="cpu", conf: float | None = None, iou: float | None = None, max_det: int | None = None):
    """A saved model/ ready for inference, with its saved thresholds unless others are given."""
    state, config = load_pretrained(directory)
    if config.get("task") != TASK:
        raise SystemExit(f"{directory}: not a detection model (task {config.get('task')!r})")
    model = build_model(config)
    model.load_state_dict(state)
    conf, iou, max_det = (config[k] if v is None else v for k, v in (("conf", conf), ("iou", iou), ("max_det", max_det)))
    set_postprocess(model, conf, iou, max_det)
    return model.to(device).eval(), config


def find_images(inputs: list[Path]) -> dict[Path, Path]:
    """Every image once, mapped to its path relative to the folder holding all inputs (a file input counts as its
    folder): distinct files get distinct paths, and the same ones on every run."""
    for path in inputs:
        if not path.exists():
            raise SystemExit(f"{path}: no such file or folder")
    base = os.path.commonpath([os.path.abspath(path if path.is_dir() else path.parent) for path in inputs])
    found = {}
    for path in inputs:
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if path.is_dir() else [path]
        for image in images:
            found.setdefault(os.path.abspath(image), image)
    return {image: Path(absolute).relative_to(base) for absolute, image in found.items()}


def image_samples(files: list[Path]) -> tuple[list[Sample], list[dict]]:
    """The readable images as samples without ground truth, and {"file", "problem"} for each unreadable one."""
    samples, skipped = [], []
    for file, (size, problems) in zip(files, probe_all(files), strict=True):
        if size is None:
            skipped.append({"file": str(file), "problem": problems[0]})
            continue
        empty = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        samples.append(Sample(len(samples), str(file), str(file), size[0], size[1], *empty))
    return samples, skipped


@dataclass
class Letterboxed:
    name: str
    index: int  # position in the request: the image_id of its detections
    inputs: torch.Tensor  # (1, 3, S, S) uint8
    target: dict  # orig_size and size, to map boxes back to the file's pixels


class DetectionPredictor:
    """A detector and the letterbox it sees images through. flags are the calling script's parsed arguments (none of
    them is read for this task)."""

    task, name, input_name = TASK, "detection", "images"  # the contract of an export
    output_names = ["boxes", "scores", "labels", "num_detections"]
    media_types, suffixes = MEDIA_TYPES, IMAGE_EXTENSIONS

    def __init__(self, config: dict, model=None, run=None, flags=None, device="cpu", img_size=None):
        self.config, self.model, self.run, self.flags, self.device = config, model, run, flags, device
        self.backend = "pytorch" if run is None else "onnxruntime"
        self.conf, self.iou, self.max_det = config["conf"], config["iou"], config["max_det"]
        self.size = img_size or config["img_size"]
        self.resize, self.collate = eval_transform(self.size), make_collate(self.size)

    @classmethod
    def load(cls, model_dir: Path, device="cpu", flags=None, img_size=None, **thresholds) -> "DetectionPredictor":
        """thresholds: conf, iou and max_det in place of the model's own (None keeps its own)."""
        model, config = load_model(model_dir, device)
        config = config | {key: value for key, value in thresholds.items() if value is not None}
        return cls(config, model, flags=flags, device=device, img_size=img_size)

    def letterbox(self, image: Image.Image) -> tuple[torch.Tensor, dict]:
        resized = self.resize(tv_tensors.Image(TF.pil_to_tensor(image)))
        inputs, _ = self.collate([(resized, None)])
        return inputs, {"orig_size": (image.height, image.width), "size": tuple(resized.shape[-2:])}

    def batches(self, samples: list[Sample], batch_size: int, hub=None):
        """(uint8 images, [(sample, target), ...]) per batch_size samples, read from their files (or from hub)."""
        dataset = DetectionDataset(samples, None, hub)
        for start in range(0, len(samples), batch_size):
            positions = range(start, min(start + batch_size, len(samples)))
            boxed = [self.letterbox(dataset.load(i)) for i in positions]
            meta = [(samples[i], target) for i, (_, target) in zip(positions, boxed, strict=True)]
            yield torch.cat([inputs for inputs, _ in boxed]), meta

    @torch.no_grad()
    def detect(self, images: torch.Tensor, conf: float | None = None, iou: float | None = None) -> list[tuple]:
        """(boxes, scores, labels) per image. An export's score threshold, NMS IoU and max_det were fixed when it was
        made: a conf can only raise the threshold there (options refuses the rest)."""
        conf, iou = self.conf if conf is None else conf, self.iou if iou is None else iou
        if self.run is not None:
            found = self.unpack(self.run(images.float().div_(255)))
            return [(d["boxes"].float(), d["scores"].float(), d["labels"]) for d in keep_above(found, conf)]
        set_postprocess(self.model, conf, iou, self.max_det)
        outputs = self.model(images.to(self.device).float().div_(255))
        return [(o["boxes"].float().cpu(), o["scores"].float().cpu(), (o["labels"] - 1).cpu()) for o in outputs]

    def in_file_pixels(self, found: tuple, target: dict) -> tuple:
        boxes, scores, labels = found
        return to_original_coordinates(boxes, target), scores, labels

    def entries(self, image_id: int, file_name: str, found: tuple) -> list[dict]:
        """COCO results of one image's detections, found in the pixels of its file, each with its label's name."""
        boxes, scores, labels = found
        entries = coco_results(
            [{"image_id": image_id, "file_name": file_name, "boxes": boxes, "scores": scores, "labels": labels}]
        )
        names = self.config["labels"]
        return [{**e, "label": names[e["category_id"]] if e["category_id"] >= 0 else "background"} for e in entries]

    # ------------------------------------------------------------------ serve.py
    def contract(self) -> dict:
        return {
            "media_types": list(self.media_types),
            "img_size": self.size,
            "max_pixels": MAX_PIXELS,
            "query": {"conf": self.conf, "iou": self.iou},
            "max_det": self.max_det,
            "postprocess_fixed_at_export": self.run is not None,
        }

    def options(self, conf: float | None = None, iou: float | None = None) -> dict:
        """The query parameters of a request (serve.py hands this signature to FastAPI)."""
        conf, iou = self.conf if conf is None else conf, self.iou if iou is None else iou
        if not (0 <= conf <= 1 and 0 <= iou <= 1):
            raise BadInput("invalid_parameter", f"conf {conf} and iou {iou}: both must be between 0 and 1")
        if self.run is not None and (iou != self.iou or conf < self.conf):
            raise BadInput(
                "invalid_parameter",
                f"this ONNX model's NMS (iou {self.iou}) and lowest score (conf {self.conf}) were fixed at export: ask "
                "for the same iou and a conf at least as high, or serve the PyTorch model/ folder",
            )
        return {"conf": conf, "iou": iou}

    def batch_key(self, options: dict) -> tuple:
        return options["conf"], options["iou"]  # the model applies them to a whole forward pass

    def decode(self, files: list[tuple[str, bytes]]) -> list[Letterboxed]:
        return [Letterboxed(name, index, *self.letterbox(decode_image(name, data))) for index, (name, data) in enumerate(files)]

    def forward(self, images: torch.Tensor, key: tuple) -> list:
        return self.detect(images, *key)

    def answer(self, image: Letterboxed, outputs: list, options: dict) -> dict:
        (found,) = outputs
        height, width = image.target["orig_size"]
        detections = self.entries(image.index, image.name, self.in_file_pixels(found, image.target))
        return {"file_name": image.name, "width": width, "height": height, "detections": detections}

    # ------------------------------------------------------------------ export_model.py
    @cached_property
    def exportable(self) -> nn.Module:
        if not isinstance(self.model, FCOS):
            raise SystemExit(
                f"{self.config['model']} is a {type(self.model).__name__}; export reimplements the post-processing "
                "of FCOS detectors only (fcos_tiny, fcos_resnet50_fpn)"
            )
        return FCOSWithPostprocess(self.model, self.size).eval()

    def example(self, batch: int) -> torch.Tensor:
        return torch.full((batch, 3, self.size, self.size), PAD_VALUE / 255)

    @torch.no_grad()
    def run_reference(self, images: torch.Tensor) -> list[dict]:
        """torchvision's own forward; its labels count background as 0, the contract's labels do not. FCOS scores
        the background class too: its (rare, low) detections are dropped, as the exported model never makes them."""
        results = []
        for out in self.model(images):
            keep = out["labels"] > 0
            results.append({"boxes": out["boxes"][keep], "scores": out["scores"][keep], "labels": out["labels"][keep] - 1})
        return results

    def unpack(self, outputs: tuple) -> list[dict]:
        boxes, scores, labels, counts = outputs
        return [{"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]} for i, n in enumerate(counts.tolist())]

    def parity(self):
        return DetectionParity(load_metric(str(Path(__file__).resolve().parent / "metrics" / "coco_map")), self.config)

    def inputs(self, run_dir: Path, files: list[Path] | None, batch_size: int, limit: int | None):
        """Val images (with their boxes, for mAP) or the given images, letterboxed as predict_detection.py does."""
        if files:
            samples, skipped = image_samples(list(find_images(files)))
            for problem in skipped:
                print(f"skipped {problem['file']}: {problem['problem']}", file=sys.stderr)
            hub, source = None, {"source": "files", "paths": [str(f) for f in files]}
        else:
            run = run_args(run_dir)
            data = load_data(
                run["data"], run.get("val_fraction", 0.1), fmt=run.get("format"), max_pixels=run.get("max_pixels", MAX_PIXELS)
            )
            samples, hub = data.splits["val"], data.hub.get("val")
            source = {"source": f"val split of {run['data']}"}
        samples = samples[:limit]
        source["count"] = len(samples)
        return source, ((images.float() / 255, meta) for images, meta in self.batches(samples, batch_size, hub))


def yolo_lines(boxes, labels, w: int, h: int) -> list[str]:
    """`class cx cy w h` rows, normalised by the image size."""
    lines = []
    for (x0, y0, x1, y1), label in zip(np.asarray(boxes).tolist(), np.asarray(labels).tolist(), strict=False):
        lines.append(f"{int(label)} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}")
    return lines


def write_yolo_labels(samples: list[Sample], labels_dir: Path):
    """One .txt per image with objects (background images get none, as YOLO expects)."""
    for s in samples:
        if len(s.labels):
            out = Path(labels_dir) / Path(s.file_name).with_suffix(".txt").name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(yolo_lines(s.boxes, s.labels, s.width, s.height)) + "\n")


def keep_above(found: list[dict], conf: float) -> list[dict]:
    """Strictly above, as torchvision's detectors compare with score_thresh."""
    return [{key: value[d["scores"] > conf] for key, value in d.items()} for d in found]


def decode_image(name: str, data: bytes) -> Image.Image:
    """Upright 8-bit RGB, as predict_detection.py reads files. The pixel cap is checked from the header before
    anything is decoded (detection_data turns PIL's own decompression-bomb check off)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # UnidentifiedImageError mostly; PIL raises other types for some broken headers
        raise BadInput("undecodable_file", f"{name}: not an image in a format PIL reads") from None
    if image.width * image.height > MAX_PIXELS:
        raise BadInput("too_large", f"{name}: {image.width} x {image.height} pixels, more than {MAX_PIXELS}")
    try:
        image.load()
        return open_rgb(image)[0]
    except Exception as err:  # truncated or corrupt data: PIL raises many types
        raise BadInput("undecodable_file", f"{name}: corrupt image ({err})") from None


class FCOSWithPostprocess(nn.Module):
    """torchvision's FCOS inference on a batch of S x S images, with exportable ops instead of its per-image
    Python loops and data-dependent lists: same normalisation, backbone, head and anchors, then for all images at
    once per-level top-k candidates, decoding, score threshold, batched NMS and the best max_det, padded.

    torchvision's eval transform would resize an S x S image to S x S, which is the identity, so it is left out."""

    def __init__(self, fcos: FCOS, size: int):
        super().__init__()
        self.backbone, self.head, self.box_coder = fcos.backbone, fcos.head, fcos.box_coder
        self.size, self.conf, self.iou, self.max_det = size, fcos.score_thresh, fcos.nms_thresh, fcos.detections_per_img
        self.topk, divisible = fcos.topk_candidates, fcos.transform.size_divisible
        self.padded = -(-size // divisible) * divisible  # torchvision pads batches to a multiple of this (with zeros)
        self.register_buffer("mean", torch.tensor(fcos.transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(fcos.transform.image_std).view(1, 3, 1, 1))
        # Anchors depend only on the feature map sizes, which S fixes: computed once, stored as a constant.
        with torch.no_grad():
            padded = torch.zeros(1, 3, self.padded, self.padded)
            features = list(self.backbone(padded).values())
            self.register_buffer("anchors", fcos.anchor_generator(ImageList(padded, [(size, size)]), features)[0])
        self.level_sizes = [f.shape[-2] * f.shape[-1] * self.head.classification_head.num_anchors for f in features]

    def forward(self, images: torch.Tensor):
        scores, boxes = self.dense_predictions(images)
        image, score, label, box = self.candidates(scores, boxes)
        # NMS per image and class in one call: groups are moved apart (x by class, y by image) so boxes of different
        # groups never overlap; 2-D offsets keep the coordinates, and so float32 IoUs, small.
        group = torch.stack([label, image, label, image], dim=1).to(box.dtype) * (self.size + 1)
        keep = torchvision.ops.nms(box + group, score, self.iou)  # indices by decreasing score
        return self.best_per_image(images.shape[0], image[keep], score[keep], label[keep], box[keep])

    def dense_predictions(self, images: torch.Tensor):
        """Scores (B, anchors, classes) without the background class, and decoded boxes (B, anchors, 4) in input pixels."""
        x = (images - self.mean) / self.std
        x = nn.functional.pad(x, (0, self.padded - self.size, 0, self.padded - self.size))
        out = self.head(list(self.backbone(x).values()))
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"][..., 1:]) * torch.sigmoid(out["bbox_ctrness"]))
        anchors = self.anchors.expand(images.shape[0], -1, -1)
        return scores, self.box_coder.decode(out["bbox_regression"], anchors).clamp(0, self.size)

    def candidates(self, scores: torch.Tensor, boxes: torch.Tensor):
        """As torchvision: per level the topk_candidates best (anchor, class) pairs, of those the ones above conf.
        Top-k of all then thresholding keeps the same set as thresholding then top-k, with a fixed k."""
        classes = scores.shape[-1]
        best_scores, best_indices, start = [], [], 0
        for level in self.level_sizes:
            s, i = scores[:, start : start + level].flatten(1).topk(min(self.topk, level * classes), dim=1)
            best_scores.append(s)
            best_indices.append(i + start * classes)
            start += level
        best_scores, best_indices = torch.cat(best_scores, dim=1), torch.cat(best_indices, dim=1)
        image, slot = torch.nonzero(best_scores > self.conf, as_tuple=True)
        index = best_indices[image, slot]
        return image, best_scores[image, slot], index % classes, boxes[image, index // classes]

    def best_per_image(self, batch, image, score, label, box):
        """The first max_det detections of each image (already by decreasing score) into zero-padded outputs."""
        one_hot = (image[:, None] == torch.arange(batch, device=image.device)[None]).long()
        rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # position of each detection within its image
        keep = rank < self.max_det
        at = (image[keep], rank[keep])
        boxes = box.new_zeros(batch, self.max_det, 4).index_put(at, box[keep])
        scores = score.new_zeros(batch, self.max_det).index_put(at, score[keep])
        labels = label.new_zeros(batch, self.max_det).index_put(at, label[keep])
        return boxes, scores, labels, one_hot.sum(0).clamp(max=self.max_det)


class DetectionParity:
    """One-to-one matching of the export's detections to PyTorch's, image by image, and mAP of both.

    A detection whose score is within MAX_SCORE_DIFF of a cut (the conf threshold, or the lowest score of an image
    holding max_det detections) may fall on either side of it from float rounding alone; left without a partner, it
    is counted as at_cut, not as a failure. Every other detection must have its partner."""

    def __init__(self, metric, config: dict):
        self.metric, self.names, self.conf, self.max_det = metric, config["labels"], config["conf"], config["max_det"]
        self.counts = dict.fromkeys(
            ("images", "reference_detections", "exported_detections", "matched", "at_cut", "unmatched"), 0
        )
        self.min_iou, self.max_score_diff, self.max_box_diff = 1.0, 0.0, 0.0
        self.predictions = {"reference": [], "exported": []}
        self.references = []

    def add(self, meta: list, reference: list[dict], exported: list[dict]):
        for (sample, target), ref, exp in zip(meta, reference, exported, strict=True):
            self.counts["images"] += 1
            self.counts["reference_detections"] += len(ref["scores"])
            self.counts["exported_detections"] += len(exp["scores"])
            for detections, partnered in zip((ref, exp), self.match(ref, exp), strict=True):
                for score in detections["scores"][~partnered].tolist():
                    self.counts["at_cut" if self.at_cut(score, detections) else "unmatched"] += 1
            for key, out in (("reference", ref), ("exported", exp)):
                boxes = to_original_coordinates(out["boxes"].float(), target)
                self.predictions[key].append(
                    {"image_id": sample.image_id, "boxes": boxes.tolist(), "scores": out["scores"].tolist()}
                    | {"labels": out["labels"].tolist()}
                )
            self.references.append(
                {"image_id": sample.image_id, "boxes": sample.boxes.tolist(), "labels": sample.labels.tolist()}
                | {"width": sample.width, "height": sample.height}
            )

    def match(self, ref: dict, exp: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy by PyTorch's score order: each reference detection takes the free exported detection of its class
        that overlaps it most; the pair holds when IoU and score agree within the tolerances. Returns which
        reference and which exported detections have a partner."""
        iou = torchvision.ops.box_iou(ref["boxes"], exp["boxes"])
        # Boxes clipped to zero area at the border have no IoU (0 / 0): they agree when their corners do.
        same_corners = (ref["boxes"][:, None] - exp["boxes"][None]).abs().amax(dim=-1) < MAX_CORNER_DIFF
        iou = torch.where(iou.isnan(), same_corners.to(iou.dtype), iou)
        iou[ref["labels"][:, None] != exp["labels"][None, :]] = -1
        partnered = torch.zeros(len(ref["scores"]), dtype=torch.bool), torch.zeros(len(exp["scores"]), dtype=torch.bool)
        for i in range(len(iou) if iou.shape[1] else 0):
            j = int(iou[i].argmax())
            if iou[i, j] < 0:
                continue
            pair_iou, score_diff = float(iou[i, j]), abs(float(ref["scores"][i] - exp["scores"][j]))
            iou[:, j] = -1
            self.min_iou = min(self.min_iou, pair_iou)
            self.max_score_diff = max(self.max_score_diff, score_diff)
            self.max_box_diff = max(self.max_box_diff, float((ref["boxes"][i] - exp["boxes"][j]).abs().max()))
            if pair_iou > MIN_IOU and score_diff < MAX_SCORE_DIFF:
                partnered[0][i] = partnered[1][j] = True
                self.counts["matched"] += 1
        return partnered

    def at_cut(self, score: float, detections: dict) -> bool:
        full = len(detections["scores"]) == self.max_det
        return score - self.conf < MAX_SCORE_DIFF or (full and score - float(detections["scores"].min()) < MAX_SCORE_DIFF)

    def result(self) -> dict:
        c = self.counts
        problems = [f"{c['unmatched']} detections without a partner"] if c["unmatched"] else []
        figures = {
            **c,
            "min_iou": round(self.min_iou, 6),
            "max_abs_score_diff": self.max_score_diff,
            "max_abs_box_diff_pixels": self.max_box_diff,
            "tolerances": {"iou_above": MIN_IOU, "score_diff_below": MAX_SCORE_DIFF, "map_diff_at_most": MAX_MAP_DIFF},
        }
        if self.has_ground_truth():
            maps = {key: self.mean_ap(predictions) for key, predictions in self.predictions.items()}
            figures |= {f"{stat}_{key}": maps[key][stat] for stat in ("map", "map50") for key in maps}
            if abs(maps["reference"]["map"] - maps["exported"]["map"]) > MAX_MAP_DIFF:
                problems.append(f"mAP {maps['exported']['map']:.6f} exported vs {maps['reference']['map']:.6f} PyTorch")
        return {**figures, "passed": not problems, "problem": "; ".join(problems) or None}

    def has_ground_truth(self) -> bool:
        return any(r["boxes"] for r in self.references)

    def mean_ap(self, predictions: list[dict]) -> dict:
        """COCO mAP in the pixels of the image files, computed as train_detection.py's evaluate computes it."""
        return self.metric.compute(predictions=predictions, references=self.references, label_names=self.names)
