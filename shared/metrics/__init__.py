"""evaluate modules kept in the repository (the Hub's cannot be fetched offline), loaded by path."""

from pathlib import Path

import evaluate

HERE = Path(__file__).parent


def load_metric(name: str) -> evaluate.EvaluationModule:
    """name: a folder beside this file (classification, coco_map)."""
    return evaluate.load(str(HERE / name))
