"""Classification metrics as an `evaluate` module kept in the repository, from class indices: accuracy, macro-F1 (the
mean F1 over classes that occur in the references or the predictions, as scikit-learn's default), per-class precision,
recall, F1 and support, and the confusion matrix (rows: true class, columns: predicted class). A class never predicted
has precision 0; a class without references has recall 0."""

import datasets
import evaluate
import numpy as np

_KWARGS = """predictions, references (lists of int): class indices. labels (list of str, optional): class names in index
order; they key `per_class` and size the matrix."""


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        pred, true = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
        n = len(labels) if labels is not None else int(max(pred.max(initial=-1), true.max(initial=-1)) + 1)
        names = list(labels) if labels is not None else [str(i) for i in range(n)]
        matrix = np.zeros((n, n), dtype=np.int64)
        np.add.at(matrix, (true, pred), 1)
        tp, support, predicted = np.diag(matrix).astype(float), matrix.sum(axis=1), matrix.sum(axis=0)
        precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
        present = (support > 0) | (predicted > 0)
        per_class = zip(names, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist(), strict=True)
        return {
            "accuracy": float(tp.sum() / max(len(true), 1)),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class": {name: {"precision": p, "recall": r, "f1": f, "support": s} for name, p, r, f, s in per_class},
            "confusion_matrix": matrix.tolist(),
        }
