#!/usr/bin/env python
"""Summarise a cross-validation: OUTPUT_DIR/cv_metrics.json from the fold runs OUTPUT_DIR/fold_K/metrics.json.

    python scripts/gather_folds.py runs/us8k_cv                   # after one job per fold (slurm_folds_array.sbatch)
    python scripts/gather_folds.py runs/us8k_cv --allow-missing   # the folds finished so far

train_audio.py --fold all writes the same file through audio_data.write_cv_metrics(). cv_metrics.json holds each fold's
test accuracy and macro-F1 with its run folder (relative to OUTPUT_DIR), and their mean and sample standard
deviation over the folds. The folds expected are the official folds of the data the runs were trained on (read
from their args.json), or --folds. A fold whose folder is missing or holds no finished run is named, and the
command exits non-zero unless --allow-missing is given.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory

from audio_data import DataError, official_folds, write_cv_metrics


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
    print(write_cv_metrics(args.output_dir, folds, allow_missing=args.allow_missing))


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


if __name__ == "__main__":
    main()
