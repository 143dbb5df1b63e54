"""Audio datasets for train_audio.py: the splits of each layout (see --format), each clip decoded once with soundfile
into an on-disk cache of mono waveforms shared by runs and processes, what training takes from the splits, and
cross-validation over the official folds (--fold all, and gather_folds.py).

A clip is a file path, a Clip (a slice of a longer file: the _silence_ windows of the background noise), or a Hub
dataset row; read_audio() reads all three, so the cache, the report and export treat them alike."""

import argparse
import csv
import hashlib
import io
import json
import math
import os
import posixpath
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from shared.cache import MappedArray, build_once, cache_root, decoded_in_order, file_stamp
from shared.runtime import (
    VAL_NAMES,
    add_streaming_args,
    columns_ahead,
    hub_split_names,
    open_streams,
    prepared_share,
    print_summary,
    shard_identities,
    stored_file,
    stream_loader,
    write_json,
)

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff"}
FORMATS = ("urbansound8k", "esc50", "speech_commands", "folders", "hub")
DEFAULT_CLIP_SECONDS = {"urbansound8k": 4.0, "esc50": 5.0, "speech_commands": 1.0, "folders": 1.0, "hub": 1.0}
# The fold datasets: metadata file, its file, class and class-id columns, and the folder of fold k's audio.
FOLD_LAYOUTS = {
    "urbansound8k": ("metadata/UrbanSound8K.csv", "slice_file_name", "class", "classID", "audio/fold{k}"),
    "esc50": ("meta/esc50.csv", "filename", "category", "target", "audio"),
}
NOISE_FOLDER = "_background_noise_"
NOISE_SPLIT = "noise"  # shards' and Hub data's split of background recordings (what make_shards.py writes NOISE_FOLDER as)
UNKNOWN, SILENCE = "_unknown_", "_silence_"
CACHE_VERSION = 3  # bump when the cached representation changes
PCM_DTYPE = np.dtype("<i2")  # the cache file's samples, little-endian whatever machine wrote it
MIN_RATE, MAX_RATE = 1000, 384000  # Hz; a header outside this is broken or hostile (a 1 GHz rate asks for terabytes)
DOWNMIX_BLOCK = 1 << 20  # samples (all channels) read at a time: 4 MB
MAX_CHANNELS = 64  # decoding costs CPU per channel: a 196 kB Ogg file claiming 255 channels took 18 s
MAX_RATIO_TERM = 2560  # the resampling kernel grows with the ratio's terms; 384000 -> 22050 Hz (2560/147) fits
CV_FILE, CV_METRICS = "cv_metrics.json", ("accuracy", "macro_f1")  # the cross-validation summary of --fold all
ALL_FOLDS = "all"
PADDING = -1  # --streaming: the target of rows that only even out the processes' evaluation batches
# Training clips keep up to TRAIN_SPAN x --clip-seconds of their audio, for random crops: enough places to vary a clip's
# window, while the training cache stays at most this many times the clip length per clip.
TRAIN_SPAN = 3


class DataError(SystemExit):
    """Input the run cannot use; the message names the file and what to change."""


class BadClip(Exception):
    """A clip that cannot be decoded; it is skipped, counted and listed in data_report.json."""


@dataclass(frozen=True)
class Clip:
    """`frames` frames of the file at `path` from frame `start`, at the file's own rate (exact whatever --sample-rate)."""

    path: str
    start: int
    frames: int

    def __str__(self):
        return f"{self.path}[{self.start}:{self.start + self.frames}]"


@dataclass(frozen=True)
class KeywordTask:
    """Speech Commands keyword spotting as in Warden 2018 and TensorFlow's input_data.py: the wanted words, _unknown_
    (every other word) and _silence_ (windows of _background_noise_), these percentages of each split's wanted clips."""

    words: tuple[str, ...]
    unknown_percentage: float = 10.0
    silence_percentage: float = 10.0


@dataclass
class Split:
    sources: list  # file paths or Clips, or HubAudio for a Hub dataset
    targets: np.ndarray  # class index per clip
    names: list[str]  # what a report shows for each clip (its path)

    def spread(self, limit: int | None) -> "Split":
        """--max-train-samples / --max-eval-samples: `limit` clips spread evenly over the split, so a split listed class
        by class keeps every class in proportion."""
        if limit is None or limit >= len(self.targets):
            return self
        if isinstance(self.sources, ShardStream):  # a stream has no random access: its first `limit` clips
            return Split(self.sources.take(limit), self.targets[:limit], self.names[:limit])
        rows = np.linspace(0, len(self.targets) - 1, limit).round().astype(int)
        sources = self.sources.select(rows) if isinstance(self.sources, HubAudio) else [self.sources[i] for i in rows]
        return Split(sources, self.targets[rows], [self.names[i] for i in rows])


@dataclass
class AudioData:
    format: str
    labels: list[str]
    splits: dict[str, Split]  # "train", "val" and, when the data has one, "test"
    noise_files: list = field(default_factory=list)  # paths, or stored {"bytes", "path"} rows of a NOISE_SPLIT
    notes: list[str] = field(default_factory=list)  # how val and test were chosen, for the start-up summary
    protocol: dict | None = None  # a task that changes the classes (--wanted-words), for reports and resume


# ----------------------------------------------------------------------------- layouts


def detect_format(root: str) -> str:
    path = _require_folder(root)
    for fmt, (meta, *_) in FOLD_LAYOUTS.items():
        if (path / meta).is_file():
            return fmt
    if (path / "validation_list.txt").is_file() or (path / "testing_list.txt").is_file():
        return "speech_commands"
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "hub"
    return "folders"


def _require_folder(root: str) -> Path:
    """Only an explicit --format hub makes --data a Hub id: guessing would turn a mistyped path into half a
    minute of network retries and a confusing Hub error."""
    path = Path(root)
    if not path.exists():
        raise DataError(f"--data {root}: no such folder; for a Hub dataset add --format hub")
    if not path.is_dir():
        raise DataError(f"--data {root} is a file; pass the dataset's folder")
    return path


def load_audio_data(
    root: str,
    fmt: str | None = None,
    *,
    fold: int | None = None,
    val_fold: int | None = None,
    audio_column: str = "audio",
    label_column: str = "label",
    val_fraction: float = 0.1,
    keywords: KeywordTask | None = None,
    clip_seconds: float | None = None,
) -> AudioData:
    """The splits of a dataset, or a DataError naming the file to fix. keywords: a KeywordTask; clip_seconds: the
    length of its _silence_ windows (default: the layout's clip length)."""
    if fmt is None:
        fmt = detect_format(root)
    elif fmt != "hub":
        _require_folder(root)
    if keywords and fmt != "speech_commands":
        raise DataError(f"--wanted-words applies to the Speech Commands layout; {root} is in the {fmt} layout")
    if fmt in FOLD_LAYOUTS:
        return _fold_dataset(Path(root), fmt, fold, val_fold)
    if fold is not None and fmt != "hub":
        raise DataError(f"--fold applies to UrbanSound8K and ESC-50; {root} is in the {fmt} layout")
    if fmt == "speech_commands":
        return _speech_commands(Path(root), keywords, clip_seconds or DEFAULT_CLIP_SECONDS[fmt])
    if fmt == "folders":
        return _class_folders(Path(root), val_fraction)
    if fmt == "hub":
        return _hub_dataset(root, audio_column, label_column, val_fraction)
    raise DataError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")


def load_run_data(run: dict, clip_seconds: float | None = None) -> AudioData:
    """The splits named by train_audio.py's flags (vars(args)) or a run's args.json; clip_seconds as in load_audio_data."""
    words = run.get("wanted_words")
    percentages = run.get("unknown_percentage", 10.0), run.get("silence_percentage", 10.0)
    given = {k: run[k] for k in ("fold", "val_fold", "audio_column", "label_column", "val_fraction") if k in run}
    keywords = KeywordTask(tuple(words), *percentages) if words else None
    if run.get("streaming"):
        return _streamed_dataset(run["data"], run.get("audio_column", "audio"), run.get("label_column", "label"))
    return load_audio_data(
        run["data"], run.get("format"), **given, keywords=keywords, clip_seconds=clip_seconds or run.get("clip_seconds")
    )


def official_folds(root: str, fmt: str | None = None) -> list[int]:
    """The official folds of an UrbanSound8K or ESC-50 folder, for --fold all."""
    fmt = fmt or detect_format(root)
    if fmt not in FOLD_LAYOUTS:
        raise DataError(
            f"--fold all trains on every official fold, which only UrbanSound8K and ESC-50 have; {root} is in the {fmt} "
            "layout. Drop --fold (its splits are fixed by the layout) or point --data at a fold dataset."
        )
    return sorted(set(_fold_rows(Path(root), fmt)[2]))


def _fold_rows(root: Path, fmt: str):
    """The metadata file of a fold dataset, its rows (with line numbers) and each row's fold."""
    meta_name, file_col, class_col, _, _ = FOLD_LAYOUTS[fmt]
    meta = root / meta_name
    rows = _read_metadata(meta, {file_col, class_col, "fold"})
    return meta, rows, [_integer(meta, line, row, "fold") for line, row in rows]


def _fold_dataset(root: Path, fmt: str, fold: int | None, val_fold: int | None) -> AudioData:
    """UrbanSound8K and ESC-50: the official folds keep slices of one recording together, so the test
    fold is --fold K and validation is another whole fold (--val-fold, default the fold before K)."""
    _, file_col, class_col, id_col, folder = FOLD_LAYOUTS[fmt]
    meta, rows, row_folds = _fold_rows(root, fmt)
    folds = sorted(set(row_folds))
    fold = folds[0] if fold is None else fold
    if val_fold is None:
        val_fold = folds[folds.index(fold) - 1] if fold in folds else None
    for flag, value in (("--fold", fold), ("--val-fold", val_fold)):
        if value not in folds:
            raise DataError(f"{flag} {value}: {meta} has folds {folds}; pick one of them")
    if val_fold == fold:
        raise DataError(f"--val-fold {val_fold} equals the test fold --fold {fold}; pick another fold for validation")
    paths = [root / folder.format(k=k) / row[file_col] for (_, row), k in zip(rows, row_folds, strict=True)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{meta} lists {len(missing)} file(s) that do not exist, first {missing[0]}. "
            "Restore the audio files or remove their rows from the metadata."
        )
    labels = _official_label_order(meta, rows, class_col, id_col)
    index = {name: i for i, name in enumerate(labels)}
    parts = {"train": [], "val": [], "test": []}
    for (_, row), k, path in zip(rows, row_folds, paths, strict=True):
        part = "test" if k == fold else "val" if k == val_fold else "train"
        parts[part].append((str(path), index[row[class_col]]))
    splits = {name: _split(items) for name, items in parts.items()}
    note = f"test = fold {fold}, validation = fold {val_fold}, training = the other {len(folds) - 2} folds (official folds)"
    return AudioData(fmt, labels, splits, notes=[note])


def _read_text(path: Path) -> str:
    """A metadata or list file as text, without a byte-order mark (spreadsheet exports); bytes that are not UTF-8
    stop the run at their line instead of with a decode traceback."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: byte {data[err.start]:#04x} is not UTF-8; save the file as UTF-8") from None


def _read_metadata(meta: Path, columns: set[str]) -> list[tuple[int, dict]]:
    """The rows of an official metadata csv with their line numbers, after checking its shape."""
    if not meta.is_file():
        raise DataError(f"{meta} does not exist; restore the dataset's official metadata file (or pass another --format)")
    reader = csv.DictReader(io.StringIO(_read_text(meta), newline=""))
    rows = [(reader.line_num, row) for row in reader]
    if reader.fieldnames is None:
        raise DataError(f"{meta} is empty; restore the dataset's official metadata file")
    missing = columns - set(reader.fieldnames)
    if missing:
        raise DataError(f"{meta}: missing column(s) {sorted(missing)}; the file must keep the official header")
    if not rows:
        raise DataError(f"{meta} has a header but no rows; restore the dataset's official metadata file")
    for line, row in rows:
        if None in row or None in row.values():  # DictReader's marks for extra and missing fields
            raise DataError(f"{meta} line {line}: not the {len(reader.fieldnames)} fields of the header; fix the row")
    return rows


def _integer(meta: Path, line: int, row: dict, column: str) -> int:
    try:
        return int(row[column])
    except ValueError:
        raise DataError(
            f"{meta} line {line}: {column} {row[column]!r} is not a whole number; write it as the official files do (e.g. 3)"
        ) from None


def _official_label_order(meta: Path, rows: list[tuple[int, dict]], class_col: str, id_col: str) -> list[str]:
    """Labels in the order of the official class ids, so a model's output index is the dataset's id; that order is
    ambiguous unless every class name has one id and every id one name."""
    if id_col not in rows[0][1]:
        return sorted({row[class_col] for _, row in rows})
    pairs = {(_integer(meta, line, row, id_col), row[class_col]) for line, row in rows}
    ids, names = Counter(i for i, _ in pairs), Counter(name for _, name in pairs)
    conflicts = [(i, name) for i, name in sorted(pairs) if ids[i] > 1 or names[name] > 1]
    if conflicts:
        raise DataError(
            f"{meta}: {id_col} and {class_col} disagree: "
            + ", ".join(f"{id_col} {i} = {name!r}" for i, name in conflicts)
            + f". Each {class_col} needs exactly one {id_col}; fix the rows that differ."
        )
    return [name for _, name in sorted(pairs)]


def _speech_commands(root: Path, keywords: KeywordTask | None, clip_seconds: float) -> AudioData:
    """Speech Commands: the official list files split speakers; everything else is training data."""
    words = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != NOISE_FOLDER and not p.name.startswith("."))
    clips = {path.relative_to(root).as_posix(): (str(path), word) for word in words for path in _audio_files(root / word, root)}
    listed = {
        part: _list_entries(root / name, root, clips) if (root / name).is_file() else set()
        for part, name in (("val", "validation_list.txt"), ("test", "testing_list.txt"))
    }
    by_split = {"train": [], "val": [], "test": []}
    for rel, item in clips.items():
        by_split["val" if rel in listed["val"] else "test" if rel in listed["test"] else "train"].append(item)
    noise = _audio_files(root / NOISE_FOLDER, root, required=False) if (root / NOISE_FOLDER).is_dir() else []
    notes = ["validation and test from validation_list.txt and testing_list.txt"]
    if keywords:
        labels, parts, task_note = _keyword_splits(root, words, by_split, [str(p) for p in noise], keywords, clip_seconds)
        notes.append(task_note)
    else:
        labels, index = words, {word: i for i, word in enumerate(words)}
        parts = {name: [(path, index[word]) for path, word in items] for name, items in by_split.items()}
    if noise:
        notes.append(f"{len(noise)} background noise file(s) from {NOISE_FOLDER}/")
    splits = {name: _split(items) for name, items in parts.items() if items or name != "test"}
    _require_nonempty(splits, root)
    protocol = {**asdict(keywords), "words": list(keywords.words)} if keywords else None  # a list, as JSON reads it back
    return AudioData("speech_commands", labels, splits, [str(p) for p in noise], notes, protocol)


def _keyword_splits(root: Path, words: list[str], by_split: dict, noise: list[str], task: KeywordTask, clip_seconds: float):
    """The labels, splits and summary of the keyword task. Split membership stays the official lists'; per split,
    unknown clips (of the other words) and silence windows (of the noise files) are drawn with fixed seeds of the
    split alone, independent of --seed and of each other, so every run of the task sees the same clips."""
    missing = [w for w in task.words if w not in words]
    if missing or len(set(task.words)) != len(task.words):
        problem = f"no word folder for {missing}" if missing else "a word is named twice"
        raise DataError(f"--wanted-words: {problem} in {root}; the word folders are {words}. Name each folder once.")
    others = [w for w in words if w not in task.words]
    if task.unknown_percentage and not others:
        raise DataError(f"{root}: every word folder is wanted, so none is left for {UNKNOWN}; add --unknown-percentage 0")
    windows = _noise_lengths(root, noise) if task.silence_percentage else []
    labels = list(task.words) + [UNKNOWN] * bool(task.unknown_percentage) + [SILENCE] * bool(task.silence_percentage)
    index = {label: i for i, label in enumerate(labels)}
    parts, counts = {}, {}
    for k, (name, items) in enumerate(by_split.items()):
        wanted = [(path, index[word]) for path, word in items if word in task.words]
        candidates = [path for path, word in items if word not in task.words]
        count = math.ceil(len(wanted) * task.unknown_percentage / 100)  # ceil, as input_data.py: at least one clip
        unknown = [candidates[i] for i in sorted(np.random.default_rng([0, k]).permutation(len(candidates))[:count])]
        # Clip-long windows at random places of random noise files (one shorter than a clip: whole, zero-padded).
        rng, silence = np.random.default_rng([1, k]), []
        for _ in range(math.ceil(len(wanted) * task.silence_percentage / 100)):
            path, frames, rate = windows[int(rng.integers(len(windows)))]
            length = min(frames, round(clip_seconds * rate))
            silence.append(Clip(path, int(rng.integers(frames - length + 1)), length))
        parts[name] = wanted + [(p, index[UNKNOWN]) for p in unknown] + [(c, index[SILENCE]) for c in silence]
        counts[name] = f"{len(wanted)}/{len(unknown)}/{len(silence)}"
    note = (
        f"keyword task: {len(task.words)} wanted words + {UNKNOWN} ({task.unknown_percentage:g}% of the wanted clips, "
        f"drawn from {len(others)} other words) + {SILENCE} ({task.silence_percentage:g}%, {clip_seconds:g} s windows of "
        f"{NOISE_FOLDER}/); wanted/unknown/silence clips " + ", ".join(f"{n} {c}" for n, c in counts.items())
    )
    return labels, parts, note


def _noise_lengths(root: Path, noise: list[str]) -> list[tuple[str, int, int]]:
    """(path, frames, rate) of each readable noise file, from its header; the silence windows are cut from these."""
    found = []
    for path in noise:
        try:
            info = sf.info(_soundfile_source(path))
        except (sf.SoundFileError, RuntimeError, OSError):
            continue  # unreadable noise is listed in data_report.json by load_noise
        if info.frames:
            found.append((path, info.frames, info.samplerate))
    if not found:
        raise DataError(
            f"{root / NOISE_FOLDER}: no readable noise recording to cut {SILENCE} windows from; "
            "add the data set's _background_noise_/*.wav or pass --silence-percentage 0"
        )
    return found


def _list_entries(list_file: Path, root: Path, clips: dict) -> set[str]:
    """The clips (paths relative to root) that validation_list.txt or testing_list.txt names; './', backslashes,
    trailing spaces and CRLF are accepted. An entry that matches no clip stops the run: it would be trained on."""
    entries = set()
    for number, line in enumerate(_read_text(list_file).splitlines(), start=1):
        if not line.strip():
            continue
        entry = posixpath.normpath(line.strip().replace("\\", "/"))
        if entry not in clips:
            folder = entry.split("/")[0]
            problem = (
                f"which is not an audio clip in a class folder of {root}"
                if (root / entry).is_file()
                else f"which does not exist under {root}"
                + ("" if (root / folder).is_dir() else f": there is no class folder {folder}/")
            )
            raise DataError(f"{list_file} lists {entry}, {problem} (line {number}). Restore the file or remove the line.")
        entries.add(entry)
    if not entries:
        raise DataError(f"{list_file} names no clips; list one clip per line (e.g. yes/0a7c2a8d_nohash_0.wav) or delete the file")
    return entries


def _class_folders(root: Path, val_fraction: float) -> AudioData:
    """<label>/*.wav, optionally under train/ val/ test/. Without a val/ folder, a stratified split with a
    fixed seed carves validation (and, for a plain folder tree, test) clips out of training."""
    tree = root / "train" if (root / "train").is_dir() else root
    labels = sorted(p.name for p in tree.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not labels:
        raise DataError(
            f"{tree}: no class folders found; expected {tree}/<label>/*.wav (or pass --format to pick another layout)"
        )
    val_dir = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
    if tree != root:
        folders = {"train": tree, "val": val_dir, "test": root / "test" if (root / "test").is_dir() else None}
        parts = {name: _labelled_files(d, labels, required=name == "train") for name, d in folders.items() if d}
        notes = [f"splits from the {', '.join(f'{d.name}/' for d in folders.values() if d)} folders"]
        if not val_dir:
            parts["train"], parts["val"] = _stratified_split(parts["train"], val_fraction)
            notes.append(f"no val/ folder: {val_fraction:.0%} of train/ per class held out for validation (fixed seed)")
    else:
        rest, test = _stratified_split(_labelled_files(root, labels), val_fraction)
        train, val = _stratified_split(rest, val_fraction / (1 - val_fraction))
        parts = {"train": train, "val": val, "test": test}
        notes = [
            f"no train/val/test folders: {val_fraction:.0%} of each class held out for validation and "
            f"{val_fraction:.0%} for test (fixed seed, independent of --seed)"
        ]
    splits = {name: _split(items) for name, items in parts.items()}
    _require_nonempty(splits, root)
    return AudioData("folders", labels, splits, notes=notes)


def _hub_dataset(name: str, audio_column: str, label_column: str, val_fraction: float) -> AudioData:
    """A Hub dataset id (through the local cache when offline), a save_to_disk folder or a folder of data files (such as
    make_shards.py's parquet shards). Audio is read as raw bytes or paths and decoded with soundfile, so no
    torchcodec/FFmpeg is needed."""
    import datasets

    saved = (Path(name) / "dataset_dict.json").is_file() or (Path(name) / "state.json").is_file()  # by save_to_disk
    try:
        loaded = datasets.load_from_disk(name) if saved else datasets.load_dataset(name)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise DataError(
            f"--data {name}: not a local folder and not loadable as a Hugging Face dataset ({err}). "
            "Check the path or the dataset id; offline, the dataset must already be in the HF cache."
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if "train" not in loaded:
        raise DataError(f"--data {name}: no 'train' split (splits: {list(loaded)})")
    for split in loaded.values():
        for column, flag in ((audio_column, "--audio-column"), (label_column, "--label-column")):
            if column not in split.column_names:
                raise DataError(
                    f"--data {name}: column {column!r} does not exist; columns are {split.column_names}. "
                    f"Name the right one with {flag}."
                )
    sources = hub_split_names(loaded)
    named = isinstance(loaded["train"].features[label_column], datasets.ClassLabel)
    labels = (
        list(loaded["train"].features[label_column].names) if named else sorted({str(v) for v in loaded["train"][label_column]})
    )
    index = {label: i for i, label in enumerate(labels)}
    splits = {}
    for part, source in sources.items():
        ds = loaded[source]
        raw = ds[label_column]
        targets = np.array([v if named else index.get(str(v), -1) for v in raw], dtype=np.int64)
        if (targets < 0).any():
            bad = raw[int(np.argmax(targets < 0))]
            raise DataError(f"--data {name}: label {bad!r} appears outside the training split; it has no class to map to")
        audio = HubAudio(ds.cast_column(audio_column, datasets.Audio(decode=False)), audio_column)
        splits[part] = Split(audio, targets, [f"{name}[{i}]" for i in range(len(ds))])
    notes = [f"Hub splits: {', '.join(f'{p}={s}' for p, s in sources.items())}"]
    if "val" not in splits:
        full = splits["train"]
        splits["train"], splits["val"] = (
            Split(full.sources.select(ix), full.targets[ix], [full.names[i] for i in ix])
            for ix in _stratified_split(list(range(len(full.targets))), val_fraction, full.targets)
        )
        notes.append(f"no validation split: {val_fraction:.0%} of train per class held out (fixed seed)")
    noise = (
        loaded[NOISE_SPLIT].cast_column(audio_column, datasets.Audio(decode=False))[audio_column] if NOISE_SPLIT in loaded else []
    )
    return AudioData("hub", labels, splits, list(noise), notes=notes)


class HubAudio:
    """The audio column of a Hub dataset as a sequence of soundfile-readable sources (bytes or paths)."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return stored_file(self.dataset[int(i)][self.column])

    def select(self, indices):
        return HubAudio(self.dataset.select(indices), self.column)

    def fingerprint(self) -> str:
        return self.dataset._fingerprint


@dataclass
class ShardStream:
    """--streaming: one split of a dataset in shards (make_shards.py's parquet, any data files `datasets` reads, or a Hub
    id) as `datasets` IterableDatasets, opened with the columns a reader takes (parquet reads those alone: shards with
    --pcm hold each clip twice), and the files it reads (what a run's fingerprint takes)."""

    open_columns: Callable  # columns -> the split's IterableDataset of those columns
    columns: list[str]  # what open_columns can give
    files: list[str]
    limit: int | None = None  # --max-*-samples: the first `limit` rows

    def take(self, limit: int) -> "ShardStream":
        return replace(self, limit=limit)

    def read(self, columns: list[str]):
        stream = self.open_columns(columns)
        return stream if self.limit is None else stream.take(self.limit)

    def items(self) -> list[tuple]:
        return shard_identities(self.files)


def _streamed_dataset(name: str, audio_column: str, label_column: str) -> AudioData:
    """--streaming: the splits of a shard folder or Hub id, read as training goes. Only the label column is read ahead
    (the class counts and the fingerprint need it): a ClassLabel, as make_shards.py writes it, or class ids (a
    WebDataset's `.cls` files), then named by their numbers. Columns of decoded samples (make_shards.py --pcm) stream
    in place of the audio where they fit."""
    import datasets

    streams, files, sources = open_streams(name)
    features = streams["train"].features or {}
    label = features.get(label_column)
    if not (isinstance(label, datasets.ClassLabel) or getattr(label, "dtype", "").startswith(("int", "uint"))):
        raise DataError(
            f"--data {name} --streaming: column {label_column!r} is neither a ClassLabel nor class ids (features: "
            f"{features}); name the class column with --label-column, or make the shards with scripts/make_shards.py"
        )
    splits, labels = {}, columns_ahead(name, [label_column], streams)
    # Each clip as its file's bytes (or path), undecoded. Not Audio(decode=False): rows that come from Python
    # (WebDataset) are encoded again by their features, and Audio's encoder needs torchcodec.
    stored = datasets.Features({"bytes": datasets.Value("binary"), "path": datasets.Value("string")})

    def opened(source: str, columns: list[str]):
        stream = columns_ahead(name, columns, streams)[source]
        return stream.cast_column(audio_column, stored) if audio_column in columns else stream

    columns = [audio_column, label_column, *(c for c in features if c.startswith("pcm_"))]
    for part, source in sources.items():
        targets = np.fromiter((row[label_column] for row in labels[source]), dtype=np.int64)
        shards = ShardStream(partial(opened, source), columns, files.get(source, []))
        splits[part] = Split(shards, targets, [f"{name}[{source}]"] * len(targets))
    names = label.names if isinstance(label, datasets.ClassLabel) else _class_ids(name, splits)
    notes = [f"streamed splits: {', '.join(f'{p}={s}' for p, s in sources.items())}"]
    noise = streams[NOISE_SPLIT].cast_column(audio_column, stored) if NOISE_SPLIT in streams else []
    return AudioData("hub", list(names), splits, [row[audio_column] for row in noise], notes=notes)


def _class_ids(name: str, splits: dict[str, Split]) -> list[str]:
    """Classes given as ids 0..N-1 (WebDataset `.cls` files), named by their numbers."""
    highest = max(int(split.targets.max(initial=-1)) for split in splits.values())
    if min(int(split.targets.min(initial=0)) for split in splits.values()) < 0:
        raise DataError(f"--data {name} --streaming: class ids must run from 0 to the number of classes - 1")
    return [str(k) for k in range(highest + 1)]


class StreamedClips:
    """--streaming: a split read from its shards while training, where CachedClips reads its cache: each process reads
    its share (datasets' split_dataset_by_node), training shuffles through a buffer, and each clip is decoded in a
    DataLoader worker exactly as CachedClips decodes it, or copied from the shards' samples decoded so (make_shards.py
    --pcm). A clip that cannot be decoded is skipped with a warning."""

    def __init__(self, split: Split, sample_rate: int, num_samples: int, span: int, columns: tuple[str, str]):
        self.split, self.targets, self.skipped, self.num_samples = split, split.targets, [], num_samples
        stored = pcm_column(sample_rate, num_samples, span)
        self.stream = split.sources.read([stored, columns[1]] if stored in split.sources.columns else list(columns))
        self.decode = partial(
            _decode_row, sample_rate=sample_rate, num_samples=num_samples, span=span, columns=columns, stored=stored
        )

    def __len__(self):
        return len(self.targets)

    def loader(self, accelerator, batch_size: int, workers: int, shuffle_buffer: int | None, seed: int):
        stream = prepared_share(accelerator, self.stream, self.decode, shuffle_buffer, seed, batch_size)
        pad = None if shuffle_buffer else (lambda row: {**row, "target": PADDING})  # evaluation drops these rows
        return stream_loader(accelerator, stream, batch_size, workers, len(self), _collate_rows, pad)

    def first_windows(self, count: int) -> torch.Tensor:
        """The first `count` clips' first windows, for the log-mel mean/std (a stream has no evenly spaced rows)."""
        rows = (self.decode(row) for row in self.stream.take(count))
        return torch.stack([fix_length(torch.from_numpy(r["wave"]), self.num_samples) for r in rows if r is not None])


def pcm_column(sample_rate: int, num_samples: int, span: int) -> str:
    """The shards' column of int16 samples at sample_rate as a split with this clip length and span keeps them."""
    return f"pcm_{sample_rate}_{num_samples}_{span}"


def _decode_row(row: dict, sample_rate: int, num_samples: int, span: int, columns: tuple[str, str], stored=None):
    """A streamed row as CachedClips gives a clip, unpadded (None for a clip that cannot be decoded)."""
    if row.get(stored) is not None:
        pcm = np.frombuffer(row[stored], dtype=PCM_DTYPE).astype(np.int16)  # native order, and writable for torch
    else:
        audio = row[columns[0]]
        try:
            pcm = kept_pcm(stored_file(audio), sample_rate, num_samples, span)
        except BadClip as err:
            print(f"warning: skipped clip {audio.get('path')} of the stream ({err})", flush=True)
            return None
    return {"wave": pcm, "target": row[columns[1]], "length": len(pcm)}


def _collate_rows(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clips padded with silence to the batch's longest, as CachedClips pads them to the split's. Stacked in one op:
    a copy per clip into a zeroed batch took the main process 30 us a clip, a third of what a cached worker spends."""
    lengths = torch.tensor([row["length"] for row in rows])
    width = int(lengths.max())
    waves = [row["wave"] if len(row["wave"]) == width else fix_length(row["wave"], width) for row in rows]
    return torch.stack(waves), torch.tensor([row["target"] for row in rows]), lengths


def _labelled_files(root: Path, labels: list[str], required: bool = True) -> list[tuple[str, int]]:
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")) and p.name not in labels)
    if extra:
        raise DataError(f"{root} has class folder(s) {extra} that train/ does not have; add them to train/ or remove them")
    return [
        (str(f), i)
        for i, label in enumerate(labels)
        if (root / label).is_dir()
        for f in _audio_files(root / label, root, required)
    ]


def _audio_files(folder: Path, root: Path, required: bool = True) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if required and not files:
        raise DataError(
            f"class folder {folder} holds no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}); add clips or remove the folder"
        )
    return files


def _stratified_split(items: list, fraction: float, targets=None) -> tuple[list, list]:
    """Per class, hold out round(fraction x count) items (at least one when the class has two or more); fixed seed.
    targets: each item's class (default: the item's second element)."""
    rng, targets = np.random.default_rng(0), np.array([t for _, t in items] if targets is None else targets)
    keep, held = [], []
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        n = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        held.extend(members[:n])
        keep.extend(members[n:])
    return [items[i] for i in sorted(keep)], [items[i] for i in sorted(held)]


def _split(items: list[tuple]) -> Split:
    return Split([p for p, _ in items], np.array([t for _, t in items], dtype=np.int64), [str(p) for p, _ in items])


def _require_nonempty(splits: dict[str, Split], root: Path):
    for name in ("train", "val"):
        if not len(splits[name].sources):
            raise DataError(f"{root}: the {name} split is empty; check the layout (see --help for the expected folders)")


# ----------------------------------------------------------------------------- decoding


def read_audio(source, sample_rate: int, num_samples: int | None = None) -> torch.Tensor:
    """Any soundfile-readable clip, or a Clip slice of one, as mono float32 at sample_rate (all of it, or its first
    num_samples); training, predict and serve all read through here. BadClip for unreadable input or an odd rate."""
    path, start, limit = (source.path, source.start, source.frames) if isinstance(source, Clip) else (source, 0, math.inf)
    try:
        with sf.SoundFile(_soundfile_source(path)) as f:
            rate = f.samplerate
            if not MIN_RATE <= rate <= MAX_RATE:
                raise BadClip(f"sample rate {rate} Hz outside {MIN_RATE}-{MAX_RATE} Hz; a broken header, or resample the file")
            if f.channels > MAX_CHANNELS:
                raise BadClip(f"{f.channels} channels, more than {MAX_CHANNELS}; a broken header, or mix it down first")
            orig, new = _resample_ratio(rate, sample_rate)
            # Only the frames the clip needs (a 1 s clip of a long recording does not decode all of it), plus 10 ms so
            # the resampler sees the same neighbours at the cut as in the whole file. A Clip ends where its slice ends.
            frames = math.inf if num_samples is None else math.ceil(num_samples * orig / new) + rate // 100
            if start:
                f.seek(start)
            frames, mono, block = min(frames, limit), [], max(1, DOWNMIX_BLOCK // f.channels)
            # The channels' mean a block at a time: a 200 kB Ogg file can hold 255 channels of two minutes (6 GB).
            while frames > 0 and len(data := f.read(min(frames, block), dtype="float32", always_2d=True)):
                mono.append(data.mean(axis=1) if f.channels > 1 else data[:, 0])
                frames -= len(data)
            integers = f.subtype.startswith("PCM")  # whose samples are never NaN or infinite
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        # libsndfile's own words, without the file name: reports show the path beside the reason
        raise BadClip(f"unreadable: {getattr(err, 'error_string', err)}") from None
    if not mono:
        raise BadClip("empty: no audio frames")
    wave = torch.from_numpy(np.concatenate(mono))
    if not integers and not torch.isfinite(wave).all():
        raise BadClip("contains NaN or infinite samples")
    if orig != new:
        wave = AF.resample(wave, orig, new)
    return wave[:num_samples]


def _resample_ratio(rate: int, sample_rate: int) -> tuple[int, int]:
    """rate/sample_rate in lowest terms, or the nearest fraction whose terms stay within MAX_RATIO_TERM: torchaudio's
    kernel has about orig x new taps, so 16001 -> 16000 Hz (a 16001 x 16000 kernel, gigabytes) reads as 16000 Hz,
    0.006 % slow. Usual pairs are exact: 44100 -> 16000 is 441/160, the same output as resampling by the rates."""
    ratio = Fraction(min(rate, sample_rate), max(rate, sample_rate)).limit_denominator(MAX_RATIO_TERM)
    small, large = ratio.numerator, ratio.denominator
    return (large, small) if rate > sample_rate else (small, large)


def _soundfile_source(source):
    # soundfile encodes a str path as strict UTF-8, which fails on file names holding undecodable bytes
    # (Python keeps them as surrogate escapes); the file system's own bytes open any name.
    return os.fsencode(source) if isinstance(source, str | os.PathLike) else source


def fix_length(wave: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Keep the first num_samples (the clip's start), padding short clips with silence."""
    return torch.nn.functional.pad(wave[:num_samples], (0, max(0, num_samples - wave.shape[-1])))


def within_full_scale(waves: torch.Tensor) -> torch.Tensor:
    """Scale each clip (along the last dim) whose peak exceeds full scale down to a peak of 1.0: float files may hold
    samples beyond +-1 that int16 would clip. Training clips and predicted windows both pass through here."""
    return waves / waves.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)


def to_pcm16(wave: torch.Tensor) -> np.ndarray:
    return (within_full_scale(wave) * 32767).round().to(torch.int16).numpy()


def kept_pcm(source, sample_rate: int, num_samples: int, span: int) -> np.ndarray:
    """What the cache keeps of a clip (read_audio's sources) at sample_rate: at most its first span samples, at least
    num_samples (short clips padded with silence), as int16. BadClip as read_audio."""
    wave = read_audio(source, sample_rate, span)
    return to_pcm16(fix_length(wave, min(max(wave.shape[-1], num_samples), span)))


class _DecodeJob(torch.utils.data.Dataset):
    def __init__(self, sources, sample_rate, num_samples, span):
        self.sources, self.sample_rate, self.num_samples, self.span = sources, sample_rate, num_samples, span

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        try:
            return i, kept_pcm(self.sources[i], self.sample_rate, self.num_samples, self.span), None
        except BadClip as err:
            return i, None, str(err)


class CachedClips(torch.utils.data.Dataset):
    """int16 waveforms of one split, decoded once into CACHE/<key>.pcm (a memory map) for later runs and the other
    processes, which wait while one decodes (shared.cache.build_once). Each clip keeps its first num_samples, or up to
    span (training: random crops). Items: (waveform padded to the longest clip, so a batch stacks; class; length)."""

    def __init__(self, split: Split, sample_rate: int, num_samples: int, cache_dir: Path, workers=0, label="", span=None):
        span = max(span or num_samples, num_samples)
        array_path = Path(cache_dir) / f"{_cache_key(split, sample_rate, num_samples, span)}.pcm"

        def build(write) -> dict:
            bad, lengths = {}, [0] * len(split.sources)
            job = _DecodeJob(split.sources, sample_rate, num_samples, span)
            # Clips arrive in index order, so each one's place in the file is the sum of the lengths before it.
            for i, pcm, reason in decoded_in_order(job, workers, f"decoding {label} clips (once; cached)"):
                if pcm is None:
                    bad[i] = reason
                else:
                    write(pcm.astype(PCM_DTYPE).tobytes())
                    lengths[i] = len(pcm)
            return dict(
                clips=len(split.sources), sample_rate=sample_rate, num_samples=num_samples, span=span, bad=bad, lengths=lengths
            )

        record = build_once(array_path, build)
        bad = {int(i): reason for i, reason in record["bad"].items()}
        lengths = np.array(record["lengths"], dtype=np.int64)
        self.skipped = [{"path": split.names[i], "reason": reason} for i, reason in sorted(bad.items())]
        self.rows = np.array([i for i in range(len(split.targets)) if i not in bad], dtype=np.int64)
        self.targets = split.targets[self.rows]
        self.starts, self.lengths = (np.cumsum(lengths) - lengths)[self.rows], lengths[self.rows]
        self.num_samples, self.width = num_samples, int(self.lengths.max(initial=num_samples))
        self.array = MappedArray(array_path, PCM_DTYPE)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        start, length = self.starts[i], self.lengths[i]
        wave = np.zeros(self.width, dtype=np.int16)
        wave[:length] = self.array[start : start + length]
        return torch.from_numpy(wave), int(self.targets[i]), int(length)


def _cache_key(split: Split, sample_rate: int, num_samples: int, span: int | None = None) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{sample_rate}|{num_samples}|{span or num_samples}|".encode())
    if isinstance(split.sources, HubAudio):
        h.update(split.sources.fingerprint().encode())
    else:
        for source in split.sources:
            path, where = (source.path, f"[{source.start}:{source.frames}]") if isinstance(source, Clip) else (source, "")
            h.update(file_stamp(path) + where.encode())
    return h.hexdigest()[:20]


def require_usable_splits(clips: dict[str, CachedClips], report_path: Path):
    """Stop before training when decoding left a split without clips, not at the end when evaluation finds none."""
    for name, split in clips.items():
        if not len(split):
            skipped = f"all {len(split.skipped)} of its clips were skipped as unreadable or empty"
            why = skipped if split.skipped else "it has no clips"
            raise DataError(
                f"the {name} split has no usable clips: {why}. {report_path} lists every skipped file with the reason; "
                "repair or replace those files."
            )


def load_noise(files: list, sample_rate: int) -> tuple[torch.Tensor, list[dict]]:
    """Background noise recordings (AudioData.noise_files) concatenated into one float32 waveform, and the files skipped
    as unreadable."""
    waves, skipped = [], []
    for f in files:
        try:
            waves.append(read_audio(f if isinstance(f, str) else stored_file(f), sample_rate))
        except BadClip as err:
            skipped.append({"path": f if isinstance(f, str) else f["path"], "reason": str(err)})
    return (torch.cat(waves) if waves else torch.zeros(0)), skipped


# ----------------------------------------------------------------------------- what training takes from the splits


def require_every_class(root: str, labels: list[str], train: CachedClips):
    counts = torch.bincount(torch.from_numpy(train.targets), minlength=len(labels))
    empty = [labels[i] for i in range(len(labels)) if counts[i] == 0]
    if empty:
        raise DataError(
            f"{root}: class(es) {empty} have no usable training clips; add clips or remove the class "
            "(data_report.json lists skipped files)"
        )


def normalisation_sample(train: CachedClips, count: int = 256) -> torch.Tensor:
    """Evenly spaced training clips for the log-mel mean/std (the same on every process, no randomness), each clip's
    first window, the one evaluation sees."""
    if isinstance(train, StreamedClips):
        return train.first_windows(count)
    picks = torch.linspace(0, len(train) - 1, min(count, len(train))).long().unique()
    return torch.stack([train[int(i)][0][: train.num_samples] for i in picks])


def class_weights(train: CachedClips, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, 1 on average over the classes (--class-weights)."""
    counts = torch.bincount(torch.from_numpy(train.targets), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp_min(1))


def clip_items(split: Split) -> list[tuple]:
    """Each clip as shared.runtime.files_fingerprint takes it: its file (by content) and window, or its row of a Hub
    dataset (by the dataset's fingerprint), and its class."""
    if isinstance(split.sources, ShardStream):
        return split.sources.items()
    if isinstance(split.sources, HubAudio):
        return [(split.sources.fingerprint(), i, t) for i, t in enumerate(split.targets.tolist())]
    where = [(Path(s),) if isinstance(s, str) else (Path(s.path), s.start, s.frames) for s in split.sources]
    return [(*w, t) for w, t in zip(where, split.targets.tolist(), strict=True)]


def noise_items(files: list) -> list:
    """AudioData.noise_files as files_fingerprint takes them: a file by its content, a stored row by its bytes' hash."""
    return [Path(f) if isinstance(f, str) else hashlib.sha1(f["bytes"] or f["path"].encode()).hexdigest() for f in files]


def data_report(args, data: AudioData, clips: dict[str, CachedClips], noise_skipped: list[dict]) -> dict:
    """What data_report.json holds: what was used, and every clip skipped with the reason."""
    skipped = [{"split": name, **s} for name, c in clips.items() for s in c.skipped]
    skipped += [{"split": "background_noise", **s} for s in noise_skipped]
    return {
        "data": str(args.data),
        "format": data.format,
        "notes": data.notes,
        "protocol": data.protocol,
        "labels": data.labels,
        "clips": {name: len(c) for name, c in clips.items()},
        "skipped_count": len(skipped),
        "skipped": skipped,
        "cache_dir": str(args.cache_dir),
    }


# ----------------------------------------------------------------------------- cross-validation over official folds


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


def write_cv_metrics(output_dir: Path, folds: list[int], *, allow_missing: bool = False) -> str:
    """OUTPUT_DIR/cv_metrics.json from the test metrics of OUTPUT_DIR/fold_K for the given folds, and its one-line
    summary; stops naming the folds that are not finished, unless allow_missing (then the summary lists them)."""
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
            per_fold.append({"fold": k, "run": f"fold_{k}", **{m: test[m] for m in CV_METRICS}})
    mean = {m: statistics.mean(f[m] for f in per_fold) for m in CV_METRICS}
    std = {m: statistics.stdev(f[m] for f in per_fold) if len(per_fold) > 1 else None for m in CV_METRICS}
    summary = {
        "split": "test",
        "folds": per_fold,
        "mean": mean,
        "std": std,
        "std_kind": "sample standard deviation over folds (n - 1 in the denominator); null for a single fold",
        "missing": absent,
    }
    write_json(output_dir / CV_FILE, summary)
    spread = {m: f"{mean[m]:.4f}" + ("" if std[m] is None else f" +- {std[m]:.4f}") for m in CV_METRICS}
    return (
        f"{len(per_fold)} folds"
        + (f" ({len(absent)} missing: {', '.join(absent)})" if absent else "")
        + f": test accuracy {spread['accuracy']}, test macro-F1 {spread['macro_f1']} (mean +- sample std); "
        f"written to {output_dir / CV_FILE}"
    )


def cross_validate(args, train_fold):
    """--fold all: train_fold(fold_args) per official fold as `--fold K --output-dir OUTPUT_DIR/fold_K`, then
    OUTPUT_DIR/cv_metrics.json. --resume keeps finished folds; a stopped fold (train_fold False) ends the command."""
    if args.val_fold is not None:
        raise SystemExit("--val-fold with --fold all: each fold's validation is the fold before it; drop --val-fold")
    if args.eval_only:
        raise SystemExit("--fold all trains a model per fold; to score one model, use --eval-only with --fold K")
    if args.resume not in (None, "latest"):
        raise SystemExit(
            f"--resume {args.resume} with --fold all: each fold resumes from its own newest checkpoint; use plain --resume"
        )
    folds, stopped = official_folds(args.data, args.format), False
    # Every process reads the same finished folds and agrees on stops, so all skip and stop alike; the launchers
    # set RANK, and no collective is needed to know the main process before the first fold's Accelerator exists.
    main_process = os.environ.get("RANK", "0") == "0"
    if args.overwrite and main_process:
        (args.output_dir / CV_FILE).unlink(missing_ok=True)
    for number, fold in enumerate(folds, start=1):
        fold_args = argparse.Namespace(**{**vars(args), "fold": fold, "output_dir": args.output_dir / f"fold_{fold}"})
        if args.resume and not args.overwrite and fold_problem(fold_args.output_dir) is None:
            if main_process:
                print(f"fold {fold}: finished earlier, kept ({fold_args.output_dir / 'metrics.json'})")
            continue
        if main_process:
            print(f"fold {fold} ({number} of {len(folds)}) as the test fold, into {fold_args.output_dir}")
        stopped = not train_fold(fold_args)
        if stopped:
            break
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # end_training's last step, which the folds skipped
    if main_process and not stopped:
        print(write_cv_metrics(args.output_dir, folds))


# ----------------------------------------------------------------------------- the data flags of train_audio.py


def add_data_args(parser: argparse.ArgumentParser):
    """What --data holds and how its clips are read."""
    d = parser.add_argument_group("data")
    d.add_argument("--data", required=True, help="dataset folder, a save_to_disk folder, or a Hugging Face dataset id")
    d.add_argument(
        "--format",
        choices=FORMATS,
        help="layout of --data (default: detected). urbansound8k: metadata/UrbanSound8K.csv + audio/fold*/; "
        "esc50: meta/esc50.csv + audio/; speech_commands: <label>/ + validation_list.txt + testing_list.txt "
        "(+ _background_noise_/); folders: <label>/*.wav, optionally under train/ val/ test/; hub: a Hub dataset",
    )
    d.add_argument(
        "--fold",
        type=fold_choice,
        help="UrbanSound8K/ESC-50: the official fold used as the test set (default: the first fold); 'all' trains "
        "every fold in turn into OUTPUT_DIR/fold_K/ and writes OUTPUT_DIR/cv_metrics.json (cross-validation)",
    )
    d.add_argument("--val-fold", type=int, help="UrbanSound8K/ESC-50: the validation fold (default: the one before --fold)")
    d.add_argument(
        "--wanted-words",
        type=word_list,
        metavar="W1,W2,...",
        help="Speech Commands: these words + _unknown_ (the others) + _silence_ (noise windows), e.g. yes,no,up,down,"
        "left,right,on,off,stop,go for the 12-class task (default: every word folder is a class)",
    )
    for kind, what in (("unknown", "clips of the other words"), ("silence", "clip-long windows of the noise files")):
        d.add_argument(
            f"--{kind}-percentage",
            type=float,
            default=10.0,
            help=f"with --wanted-words: _{kind}_ clips per split ({what}, drawn with a fixed seed), in percent of its "
            "wanted-word clips (default 10; 0 drops the class)",
        )
    d.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="no validation split (folders, Hub): fraction of each class held out for it, and for test in plain "
        "class folders; fixed seed (default 0.1)",
    )
    d.add_argument("--audio-column", default="audio", help="Hub data: column holding the audio (default audio)")
    d.add_argument("--label-column", default="label", help="Hub data: column holding the class (default label)")
    d.add_argument("--sample-rate", type=int, default=16000, help="clips are resampled to this rate in Hz (default 16000)")
    d.add_argument(
        "--clip-seconds",
        type=float,
        help="clips are cut or zero-padded to this length (default: 4 for UrbanSound8K, 5 for ESC-50, 1 otherwise). "
        f"Validation, test and predict take each clip's start; training takes a random window of the first "
        f"{TRAIN_SPAN} x this length of longer clips (a new place every epoch)",
    )
    add_streaming_args(d, "clips")
    cache = cache_root() / "audio"
    d.add_argument("--cache-dir", type=Path, default=cache, help=f"decoded waveforms (default {cache})")


def fold_choice(value: str):
    if value == ALL_FOLDS:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a fold number or '{ALL_FOLDS}'") from None


def word_list(value: str) -> list[str]:
    words = [w.strip() for w in value.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError(f"{value!r}: name the words to classify, comma-separated (e.g. yes,no)")
    return words


def print_start(accelerator, args, plan, data, clips, config, model, steps: str, start_note: str):
    """The run at a glance: data, clips, classes, features, model, processes, batch plan and schedule (steps)."""
    labels, frames = config["labels"], round(config["clip_seconds"] * config["sample_rate"]) // config["hop_length"] + 1
    print_summary(
        accelerator,
        "audio classification",
        {
            "data": f"{args.data} ({data.format}); " + "; ".join(data.notes),
            "clips": ", ".join(f"{name} {len(c)}" for name, c in clips.items())
            + f" (skipped {sum(len(c.skipped) for c in clips.values())})",
            "classes": f"{len(labels)}: {', '.join(labels[:12])}{' ...' if len(labels) > 12 else ''}",
            "features": f"{config['sample_rate']} Hz, {config['clip_seconds']} s, {config['n_mels']} mels x {frames} frames",
            "model": f"{config['model']} ({start_note}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters",
            "processes": f"{accelerator.num_processes} on {accelerator.device} (mixed precision: {accelerator.mixed_precision})",
            "batch": plan.describe(),
            "optimizer steps": steps,
        },
    )
