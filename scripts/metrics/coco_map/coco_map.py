"""COCO box mAP as an `evaluate` module, computed by pycocotools (the reference) or faster-coco-eval.

Inputs, one entry per image:
  predictions: {"image_id": int, "boxes": [[x0, y0, x1, y1], ...] pixels, "scores": [...], "labels": [...]}
  references:  {"image_id": int, "boxes": [[x0, y0, x1, y1], ...] pixels, "labels": [...], "width": int, "height": int}
Labels are the category ids. compute(..., label_names=[...]) names categories 0..K-1 for per_class_ap;
backend="pycocotools" (default) or "faster_coco_eval".

Returns map (IoU .50:.95), map50, map75, map_small, map_medium, map_large, per_class_ap ({name: AP .50:.95}),
per_class_ap50, pr_curves ({name: precision at recall 0, 0.01, ..., 1, IoU .50}) and confusion_matrix (YOLO's: score
>= 0.25, IoU >= 0.5, background last). As in COCO, -1 means there is no ground truth to score (for example no small
objects, or no object of that class)."""

import contextlib
import io

import datasets
import evaluate
import numpy as np

STAT_NAMES = ["map", "map50", "map75", "map_small", "map_medium", "map_large"]
INT, FLOAT = datasets.Value("int64"), datasets.Value("float64")
BOXES = datasets.Sequence(datasets.Sequence(FLOAT, length=4))
FEATURES = datasets.Features(
    {
        "predictions": {"image_id": INT, "boxes": BOXES, "scores": datasets.Sequence(FLOAT), "labels": datasets.Sequence(INT)},
        "references": {"image_id": INT, "boxes": BOXES, "labels": datasets.Sequence(INT), "width": INT, "height": INT},
    }
)


class CocoMap(evaluate.Metric):
    def _info(self):
        citation = "Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014."
        return evaluate.MetricInfo(description=__doc__, citation=citation, inputs_description=__doc__, features=FEATURES)

    def _compute(self, predictions, references, label_names=None, backend="pycocotools"):
        result = evaluate_coco(*coco_dicts(predictions, references, label_names), backend)
        return result | {"confusion_matrix": confusion_matrix(predictions, references, label_names).tolist()}


def confusion_matrix(predictions, references, label_names=None, conf: float = 0.25, iou: float = 0.5) -> np.ndarray:
    """Counts by (true class, predicted class) as YOLO draws them, the last row and column being background: each
    detection scoring at least conf, by score, takes the unmatched box it overlaps most (IoU >= iou, any class); a
    detection that takes none is a false positive, a box that none takes is missed."""
    classes = (
        len(label_names) if label_names is not None else 1 + max((max(r["labels"], default=-1) for r in references), default=-1)
    )
    matrix = np.zeros((classes + 1, classes + 1), dtype=np.int64)
    found = {p["image_id"]: p for p in predictions}
    for ref in references:
        pred = found.get(ref["image_id"], {"boxes": [], "scores": [], "labels": []})
        keep = [i for i in np.argsort(-np.asarray(pred["scores"]), kind="stable") if pred["scores"][i] >= conf]
        truth, free = np.asarray(ref["boxes"], dtype=float).reshape(-1, 4), np.ones(len(ref["boxes"]), dtype=bool)
        for i in keep:
            overlap = np.where(free, box_iou(np.asarray(pred["boxes"][i], dtype=float), truth), 0.0)
            j = int(overlap.argmax()) if len(truth) else -1
            if j >= 0 and overlap[j] >= iou:
                free[j] = False
                matrix[ref["labels"][j], pred["labels"][i]] += 1
            else:
                matrix[classes, pred["labels"][i]] += 1
        for j in np.flatnonzero(free):
            matrix[ref["labels"][j], classes] += 1
    return matrix


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of boxes."""
    low, high = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / np.maximum(np.prod(box[2:] - box[:2]) + areas - inter, 1e-9)


def coco_dicts(predictions, references, label_names=None):
    """COCO ground truth (instances) and results lists from per-image dicts; boxes become [x, y, w, h]. An entry's
    file_name, when it has one, is kept."""
    ids = set(range(len(label_names))) if label_names is not None else set()
    images, annotations, results = [], [], []
    for ref in references:
        images.append({"id": int(ref["image_id"]), **named(ref), "width": int(ref["width"]), "height": int(ref["height"])})
        for (x0, y0, x1, y1), label in zip(ref["boxes"], ref["labels"], strict=False):
            ids.add(int(label))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(ref["image_id"]),
                    "category_id": int(label),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    for pred in predictions:
        for (x0, y0, x1, y1), score, label in zip(pred["boxes"], pred["scores"], pred["labels"], strict=False):
            ids.add(int(label))
            results.append(
                {
                    "image_id": int(pred["image_id"]),
                    **named(pred),
                    "category_id": int(label),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(score),
                }
            )
    categories = [
        {"id": i, "name": label_names[i] if label_names is not None and i < len(label_names) else str(i)} for i in sorted(ids)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def named(entry: dict) -> dict:
    return {"file_name": entry["file_name"]} if "file_name" in entry else {}


def evaluate_coco(gt: dict, results: list, backend: str = "pycocotools") -> dict:
    """Run COCOeval on a ground-truth dict and a results list; return the summary and per-class AP."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Evaluator
    elif backend == "faster_coco_eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as Evaluator
    else:
        raise ValueError(f"backend must be 'pycocotools' or 'faster_coco_eval', not {backend!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else COCO()  # loadRes cannot take an empty list; COCO() scores 0
        e = Evaluator(coco_gt, coco_dt, iouType="bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    out = {name: float(v) for name, v in zip(STAT_NAMES, e.stats, strict=False)}
    precision = np.asarray(e.eval["precision"])[:, :, :, 0, -1]  # IoU x recall x class, all areas, 100 detections
    per_class, per_class_50, curves = {}, {}, {}
    for k, cat_id in enumerate(e.params.catIds):
        p = precision[:, :, k]
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
        per_class_50[name] = float(p[0][p[0] > -1].mean()) if (p[0] > -1).any() else -1.0
        curves[name] = p[0].tolist()  # precision at recall 0, 0.01, ..., 1 (IoU .50); -1 where there is no box
    return out | {"per_class_ap": per_class, "per_class_ap50": per_class_50, "pr_curves": curves}
