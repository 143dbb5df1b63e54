"""Training curves from results.csv as a PNG file (matplotlib, no display needed)."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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


def _numeric(value: str) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
