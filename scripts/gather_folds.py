#!/usr/bin/env python
"""Summarise a cross-validation: OUTPUT_DIR/cv_metrics.json from the fold runs OUTPUT_DIR/fold_K/metrics.json.

    python scripts/gather_folds.py runs/us8k_cv                   # after one job per fold (slurm_folds_array.sbatch)
    python scripts/gather_folds.py runs/us8k_cv --allow-missing   # the folds finished so far

train_audio.py --fold all writes the same file through write_cv_metrics() below. cv_metrics.json holds each fold's
test accuracy and macro-F1 with its run folder (relative to OUTPUT_DIR), and their mean and sample standard
deviation over the folds. The folds expected are the official folds of the data the runs were trained on (read
from their args.json), or --folds. A fold whose folder is missing or holds no finished run is named, and the
command exits non-zero unless --allow-missing is given.
"""

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

from audio_data import DataError, official_folds

from shared.runtime import write_json

CV_FILE = "cv_metrics.json"
METRICS = ("accuracy", "macro_f1")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="the folder holding fold_1/, fold_2/, ... (train_audio.py runs)")
    parser.add_argument(
        "--folds",
        type=fold_list,
        default=None,
        help="the folds to expect, e.g. 1-10 or 1,2,5 (default: the official folds of the runs' --data)",
    )
    parser.add_argument(
        "--allow-missing", action="store_true", help="summarise the finished folds even when others are missing or unfinished"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    folds = args.folds or expected_folds(args.output_dir)
    summary = write_cv_metrics(args.output_dir, folds, allow_missing=args.allow_missing)
    print(describe(summary, args.output_dir / CV_FILE))


def fold_list(text: str) -> list[int]:
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-"))
            return list(range(first, last + 1))
        return sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a range such as 1-10 or a list such as 1,2,5") from None


def expected_folds(output_dir: Path) -> list[int]:
    """The official folds of the data set the fold runs name in their args.json."""
    records = sorted(Path(output_dir).glob("fold_*/args.json"))
    if not records:
        raise SystemExit(f"{output_dir}: no fold_K/args.json, so the folds to expect are unknown; pass --folds (e.g. 1-10)")
    run = json.loads(records[0].read_text())
    try:
        return official_folds(run["data"], run.get("format"))
    except DataError as err:
        raise SystemExit(f"{records[0]} names --data {run['data']}, which cannot be read here ({err}); pass --folds") from None


def fold_problem(run: Path) -> str | None:
    """Why a fold's folder does not hold a finished run with test metrics; None when it does."""
    if not run.is_dir():
        return "missing: no such folder"
    metrics = run / "metrics.json"
    if not metrics.is_file():
        return "unfinished: no metrics.json yet (continue it with --resume)"
    if "test" not in json.loads(metrics.read_text()):
        return "no test metrics in metrics.json (trained with a layout that has no test fold?)"
    return None


def cv_metrics(output_dir: Path, folds: list[int], *, allow_missing: bool = False) -> dict:
    """The cross-validation summary of OUTPUT_DIR/fold_K for the given folds; stops naming the folds that are not
    finished, unless allow_missing (then they are listed in the summary)."""
    output_dir = Path(output_dir)
    problems = {f"fold_{k}": fold_problem(output_dir / f"fold_{k}") for k in folds}
    absent = {name: why for name, why in problems.items() if why}
    if absent and (not allow_missing or len(absent) == len(folds)):
        listing = "\n".join(f"  {output_dir / name}: {why}" for name, why in absent.items())
        hint = "" if len(absent) == len(folds) else "; or pass --allow-missing to summarise the others"
        raise SystemExit(f"{len(absent)} of {len(folds)} folds have no finished run:\n{listing}\nFinish them{hint}.")
    per_fold = []
    for k in folds:
        if problems[f"fold_{k}"] is None:
            test = json.loads((output_dir / f"fold_{k}" / "metrics.json").read_text())["test"]
            per_fold.append({"fold": k, "run": f"fold_{k}", **{m: test[m] for m in METRICS}})
    return {
        "split": "test",
        "folds": per_fold,
        "mean": {m: mean([f[m] for f in per_fold]) for m in METRICS},
        "std": {m: sample_std([f[m] for f in per_fold]) for m in METRICS},
        "std_kind": "sample standard deviation over folds (n - 1 in the denominator); null for a single fold",
        "missing": absent,
    }


def write_cv_metrics(output_dir: Path, folds: list[int], *, allow_missing: bool = False) -> dict:
    summary = cv_metrics(output_dir, folds, allow_missing=allow_missing)
    write_json(Path(output_dir) / CV_FILE, summary)
    return summary


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sample_std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def describe(summary: dict, path: Path) -> str:
    def spread(metric):
        std = summary["std"][metric]
        return f"{summary['mean'][metric]:.4f}" + ("" if std is None else f" +- {std:.4f}")

    missing = f" ({len(summary['missing'])} missing: {', '.join(summary['missing'])})" if summary["missing"] else ""
    return (
        f"{len(summary['folds'])} folds{missing}: test accuracy {spread('accuracy')}, "
        f"test macro-F1 {spread('macro_f1')} (mean +- sample std); written to {path}"
    )


if __name__ == "__main__":
    main()
