"""The COCO mAP evaluate module against pycocotools run directly, with both backends."""

import numpy as np
import pytest
from conftest import load_metric
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def random_detections(seed=0, images=40, classes=4):
    rng = np.random.default_rng(seed)
    preds, refs = [], []
    for i in range(images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 400, (n, 2))
        gt = np.concatenate([xy, xy + rng.uniform(4, 200, (n, 2))], 1)
        refs.append(
            {"image_id": i, "boxes": gt.tolist(), "labels": rng.integers(0, classes, n).tolist(), "width": 640, "height": 480}
        )
        m = int(rng.integers(0, 10))
        jittered = np.concatenate([gt, gt[:0]])[: min(n, m)] + rng.normal(0, 6, (min(n, m), 4))
        xy = rng.uniform(0, 400, (m - len(jittered), 2))
        extra = np.concatenate([xy, xy + rng.uniform(4, 200, (len(xy), 2))], 1)
        boxes = np.concatenate([jittered, extra])
        preds.append(
            {
                "image_id": i,
                "boxes": boxes.tolist(),
                "scores": rng.uniform(0, 1, m).tolist(),
                "labels": np.concatenate([refs[-1]["labels"][: len(jittered)], rng.integers(0, classes, len(extra))]).tolist(),
            }
        )
    return preds, refs


def pycocotools_directly(preds, refs, classes):
    gt = COCO()
    gt.dataset = {
        "images": [{"id": r["image_id"], "width": r["width"], "height": r["height"]} for r in refs],
        "categories": [{"id": c} for c in range(classes)],
        "annotations": [
            {"id": k + 1, **a}
            for k, a in enumerate(
                {
                    "image_id": r["image_id"],
                    "category_id": c,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "area": (b[2] - b[0]) * (b[3] - b[1]),
                    "iscrowd": 0,
                }
                for r in refs
                for b, c in zip(r["boxes"], r["labels"], strict=False)
            )
        ],
    }
    gt.createIndex()
    dt = gt.loadRes(
        [
            {"image_id": p["image_id"], "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            for p in preds
            for b, s, c in zip(p["boxes"], p["scores"], p["labels"], strict=False)
        ]
    )
    e = COCOeval(gt, dt, "bbox")
    e.evaluate()
    e.accumulate()
    e.summarize()
    return e


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_map_module_equals_pycocotools(backend):
    preds, refs = random_detections()
    names = ["a", "b", "c", "d"]
    ours = load_metric("coco_map").compute(predictions=preds, references=refs, label_names=names, backend=backend)
    e = pycocotools_directly(preds, refs, 4)
    for key, value in zip(["map", "map50", "map75", "map_small", "map_medium", "map_large"], e.stats, strict=False):
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert 0.05 < ours["map50"] < 0.95  # a non-trivial case
    for k, name in enumerate(names):
        p = e.eval["precision"][:, :, k, 0, -1]
        assert ours["per_class_ap"][name] == pytest.approx(p[p > -1].mean(), abs=1e-6)


def test_map_module_without_detections_scores_zero():
    _, refs = random_detections(seed=1)
    empty = [{"image_id": r["image_id"], "boxes": [], "scores": [], "labels": []} for r in refs]
    out = load_metric("coco_map").compute(predictions=empty, references=refs, label_names=["a", "b", "c", "d"])
    assert out["map"] == 0 and out["map50"] == 0
