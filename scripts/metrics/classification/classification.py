"""Classification metrics as an `evaluate` module kept in the repository: accuracy, macro-F1,
per-class precision/recall/F1/support and the confusion matrix, from class indices."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Accuracy, macro-F1 (the mean F1 over classes that occur in the references or the
predictions, as scikit-learn's default), per-class precision, recall, F1 and support, and the confusion
matrix (rows: true class, columns: predicted class). A class never predicted has precision 0; a class
without references has recall 0."""

_KWARGS = """
Args:
    predictions (list of int): predicted class indices.
    references (list of int): true class indices.
    labels (list of str, optional): class names, index order; they key `per_class` and size the matrix.
Returns:
    accuracy, macro_f1, per_class {label: {precision, recall, f1, support}}, confusion_matrix (list of lists).
"""


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None):
        pred = np.asarray(predictions, dtype=np.int64)
        true = np.asarray(references, dtype=np.int64)
        n = len(labels) if labels is not None else int(max(pred.max(initial=-1), true.max(initial=-1)) + 1)
        names = list(labels) if labels is not None else [str(i) for i in range(n)]
        matrix = np.zeros((n, n), dtype=np.int64)
        np.add.at(matrix, (true, pred), 1)
        tp = np.diag(matrix).astype(float)
        support = matrix.sum(axis=1)
        predicted = matrix.sum(axis=0)
        precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
        recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=(precision + recall) > 0)
        present = (support > 0) | (predicted > 0)
        return {
            "accuracy": float(tp.sum() / max(len(true), 1)),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "per_class": {
                names[i]: {
                    "precision": float(precision[i]),
                    "recall": float(recall[i]),
                    "f1": float(f1[i]),
                    "support": int(support[i]),
                }
                for i in range(n)
            },
            "confusion_matrix": matrix.tolist(),
        }
