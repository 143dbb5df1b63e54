"""Curves from results.csv and a confusion matrix, as PNG files (matplotlib, no display needed)."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

NOT_CURVES = {"epoch", "step", "seconds"}


def plot_curves(results_csv: Path, out_png: Path):
    """One panel per numeric column of results.csv against the epoch."""
    with Path(results_csv).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    columns = [c for c in rows[0] if c not in NOT_CURVES and _numeric(rows[0][c])]
    cols = min(4, len(columns))
    nrows = -(-len(columns) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        ax.plot(epochs, [float(r[column]) for r in rows], marker=".")
        ax.set_title(column)
        ax.set_xlabel("epoch")
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(matrix, labels: list[str], out_png: Path, title: str = "confusion matrix"):
    """Row-normalised colours (recall per true class), raw counts in the cells."""
    matrix = np.asarray(matrix)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(labels) <= 30:
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(
                    j, i, int(matrix[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8
                )
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _numeric(value: str) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
