"""results.csv (a row per epoch) and TensorBoard scalars, written by the main process."""

import csv
import os
from pathlib import Path

from accelerate import Accelerator


class ResultsLog:
    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "results.csv"

    def keep_epochs_before(self, epoch: int):
        """On resume, drop rows of epochs the checkpoint had not finished, so no epoch appears twice."""
        if self.accelerator.is_main_process and self.path.exists():
            rows = [r for r in self.rows() if int(r["epoch"]) < epoch]
            if not rows:
                self.path.unlink()
                return
            tmp = self.path.with_name(self.path.name + ".tmp")  # renamed when complete: a kill never loses a row
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.path)

    def add(self, row: dict, step: int):
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        self.accelerator.log(scalars, step=step)
        if self.accelerator.is_main_process:
            self._append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def mean(self, column: str) -> float:
        """Mean of a column over the epochs logged (e.g. training throughput for metrics.json)."""
        values = [float(r[column]) for r in self.rows()]
        return sum(values) / len(values) if values else 0.0

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def _append(self, row: dict):
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
