"""results.csv (a row per epoch), metrics.json and TensorBoard scalars, written by the main process."""

import csv
from pathlib import Path

from accelerate import Accelerator

from shared.runtime import write_json


class ResultsLog:
    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = Path(output_dir) / "results.csv"

    def keep_epochs_before(self, epoch: int):
        """On resume, drop rows of epochs the checkpoint had not finished, so no epoch appears twice."""
        if self.accelerator.is_main_process and self.path.exists():
            rows = [r for r in self.rows() if int(r["epoch"]) < epoch]
            self.path.unlink()
            for row in rows:
                self._append(row)

    def add(self, row: dict, step: int):
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        self.accelerator.log(scalars, step=step)
        if self.accelerator.is_main_process:
            self._append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

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


def write_metrics(accelerator: Accelerator, output_dir: Path, metrics: dict):
    if accelerator.is_main_process:
        write_json(Path(output_dir) / "metrics.json", metrics)
