"""COCO mAP evaluation time: the same synthetic predictions scored by each backend, by COCOeval directly and
through launchkit's evaluate module. `import metrics` resolves because benchmarks/run.py puts scripts/ on
sys.path."""

import statistics
import time
from pathlib import Path

import numpy as np

BACKENDS = ("pycocotools", "faster_coco_eval")


def synthetic_detections(images: int) -> tuple[list[dict], list[dict]]:
    """(predictions, references): 1-7 true boxes per image, predicted jittered, plus false positives up to 100
    predictions per image, as evaluation at a 0.001 score threshold produces."""
    rng = np.random.default_rng(0)
    references, predictions = [], []
    for image_id in range(images):
        n = int(rng.integers(1, 8))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(10, 200, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, 5, n)
        references.append({"image_id": image_id, "boxes": boxes.tolist(), "labels": labels.tolist(), "width": 640, "height": 640})
        fp = 100 - n
        fp_xy = rng.uniform(0, 500, (fp, 2))
        pred_boxes = np.concatenate(
            [boxes + rng.normal(0, 6, boxes.shape), np.concatenate([fp_xy, fp_xy + rng.uniform(5, 150, (fp, 2))], axis=1)]
        )
        predictions.append(
            {
                "image_id": image_id,
                "boxes": pred_boxes.tolist(),
                "scores": np.concatenate([rng.uniform(0.3, 1, n), rng.uniform(0.001, 0.6, fp)]).tolist(),
                "labels": np.concatenate([labels, rng.integers(0, 5, fp)]).tolist(),
            }
        )
    return predictions, references


def coco_benchmark(images: int, reps: int) -> dict:
    """Median seconds of each backend over `reps` runs, by COCOeval and through the module, and the mAP."""
    import evaluate
    from metrics.coco_map.coco_map import coco_dicts, evaluate_coco

    predictions, references = synthetic_detections(images)
    gt, results = coco_dicts(predictions, references)
    metric = evaluate.load(str(Path(__file__).resolve().parents[1] / "scripts" / "metrics" / "coco_map"))
    out = {"images": images, "detections": len(results)}
    for backend in BACKENDS:
        raw, module = [], []
        for _ in range(reps):
            start = time.perf_counter()
            value = evaluate_coco(gt, results, backend)["map"]
            raw.append(time.perf_counter() - start)
            start = time.perf_counter()
            metric.compute(predictions=predictions, references=references, backend=backend)
            module.append(time.perf_counter() - start)
        out[backend] = {"cocoeval": statistics.median(raw), "module": statistics.median(module), "map": value}
    return out
