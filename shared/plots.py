"""Training curves from results.csv as a PNG file (matplotlib, no display needed), and the run's pictures to trackers."""

import csv
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

NOT_CURVES = {"epoch", "step", "seconds"}


def plot_curves(results_csv: Path, out_png: Path):
    """A panel per numeric column of results.csv against the epoch, counted from 1 as the console counts it (the csv's
    `epoch` column is the 0-based index a resumed run keeps); train_X and val_X share a panel, and a column that is
    -1 throughout (COCO's "no such objects", e.g. map_large on small images) is left out."""
    with Path(results_csv).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    columns = [c for c in rows[0] if c not in NOT_CURVES and _numeric(rows[0][c])]
    columns = [c for c in columns if any(float(r[c]) != -1 for r in rows)]
    panels: dict[str, list[str]] = {}
    for column in columns:
        name = column.removeprefix("train_").removeprefix("val_")
        paired = f"train_{name}" in columns and f"val_{name}" in columns
        panels.setdefault(name if paired else column, []).append(column)
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, (title, shown) in zip(axes.flat, panels.items(), strict=False):
        for column in shown:
            ax.plot(epochs, [float(r[column]) for r in rows], marker=".", label=column)
        if len(shown) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _numeric(value: str) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def log_pictures(accelerator, pictures: list[Path], step: int):
    """The run's PNGs to every tracker that takes pictures: as images (TensorBoard, W&B, ...), as files (MLflow)."""
    if not accelerator.trackers:  # --report-to none: nothing to read the files for
        return
    pictures = [p for p in pictures if p.is_file()]
    images = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in pictures}
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({k: [v] for k, v in images.items()}, step=step)
        elif hasattr(tracker, "log_artifact"):
            for picture in pictures:
                tracker.log_artifact(str(picture), artifact_path="pictures")


def plot_confusion_matrix(matrix, labels: list[str], path: Path, title: str):
    """Rows (true classes) normalised to recall, with the counts written in when there are at most 30 classes."""
    matrix = np.asarray(matrix)
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(6, 0.5 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=10)
    if len(labels) <= 30:
        for i, j in np.ndindex(matrix.shape):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
