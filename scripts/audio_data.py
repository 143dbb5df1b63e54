"""Audio datasets for train_audio.py: find the splits of each supported layout, decode every clip once
with soundfile, and keep fixed-length mono waveforms in an on-disk cache shared by runs and processes.

Layouts (detected in this order, or forced with --format):
  urbansound8k     metadata/UrbanSound8K.csv + audio/fold1..10/     test = --fold K, val = --val-fold
  esc50            meta/esc50.csv + audio/                          test = --fold K, val = --val-fold
  speech_commands  <label>/*.wav + validation_list.txt + testing_list.txt (+ _background_noise_/)
  folders          <label>/*.wav, or train/ val/ test/ each holding <label>/*.wav
  hub              a Hugging Face dataset id (or a dataset saved with save_to_disk) with
                   --audio-column and --label-column
"""

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm.auto import tqdm

AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff"}
FORMATS = ("urbansound8k", "esc50", "speech_commands", "folders", "hub")
DEFAULT_CLIP_SECONDS = {"urbansound8k": 4.0, "esc50": 5.0, "speech_commands": 1.0, "folders": 1.0, "hub": 1.0}
VAL_NAMES = ("val", "valid", "validation")
NOISE_FOLDER = "_background_noise_"
CACHE_VERSION = 1  # bump when the cached representation changes


class DataError(SystemExit):
    """Input the run cannot use; the message names the file and what to change."""


class BadClip(Exception):
    """A clip that cannot be decoded; it is skipped, counted and listed in data_report.json."""


@dataclass
class Split:
    sources: list  # file paths, or HubAudio for a Hub dataset
    targets: np.ndarray  # class index per clip
    names: list[str]  # what a report shows for each clip (its path)


@dataclass
class AudioData:
    format: str
    labels: list[str]
    splits: dict[str, Split]  # "train", "val" and, when the data has one, "test"
    noise_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how val and test were chosen, for the start-up summary


# ----------------------------------------------------------------------------- layouts


def detect_format(root: str) -> str:
    path = Path(root)
    if not path.exists():
        return "hub"
    if (path / "metadata" / "UrbanSound8K.csv").is_file():
        return "urbansound8k"
    if (path / "meta" / "esc50.csv").is_file():
        return "esc50"
    if (path / "validation_list.txt").is_file() or (path / "testing_list.txt").is_file():
        return "speech_commands"
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "hub"
    if path.is_dir():
        return "folders"
    raise DataError(f"--data {root}: not a folder or a Hugging Face dataset id")


def load_audio_data(
    root: str,
    fmt: str | None = None,
    *,
    fold: int | None = None,
    val_fold: int | None = None,
    audio_column: str = "audio",
    label_column: str = "label",
    val_fraction: float = 0.1,
) -> AudioData:
    """Parse the splits of a dataset; stop with a DataError naming the file to fix when the layout is broken."""
    fmt = fmt or detect_format(root)
    if fmt in ("urbansound8k", "esc50"):
        return _fold_dataset(Path(root), fmt, fold, val_fold)
    if fold is not None and fmt != "hub":
        raise DataError(f"--fold applies to UrbanSound8K and ESC-50; {root} is in the {fmt} layout")
    if fmt == "speech_commands":
        return _speech_commands(Path(root))
    if fmt == "folders":
        return _class_folders(Path(root), val_fraction)
    if fmt == "hub":
        return _hub_dataset(root, audio_column, label_column, val_fraction)
    raise DataError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")


def _fold_dataset(root: Path, fmt: str, fold: int | None, val_fold: int | None) -> AudioData:
    """UrbanSound8K and ESC-50: the official folds keep slices of one recording together, so the test
    fold is --fold K and validation is another whole fold (--val-fold, default the fold before K)."""
    if fmt == "urbansound8k":
        meta, file_col, class_col, id_col = root / "metadata" / "UrbanSound8K.csv", "slice_file_name", "class", "classID"
        audio_path = lambda row: root / "audio" / f"fold{row['fold']}" / row[file_col]  # noqa: E731
    else:
        meta, file_col, class_col, id_col = root / "meta" / "esc50.csv", "filename", "category", "target"
        audio_path = lambda row: root / "audio" / row[file_col]  # noqa: E731
    with meta.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing_cols = {file_col, class_col, "fold"} - set(rows[0] if rows else {})
    if missing_cols:
        raise DataError(f"{meta}: missing column(s) {sorted(missing_cols)}; the file must keep the official header")
    folds = sorted({int(r["fold"]) for r in rows})
    fold = folds[0] if fold is None else fold
    if val_fold is None:
        val_fold = folds[folds.index(fold) - 1] if fold in folds else None
    for flag, value in (("--fold", fold), ("--val-fold", val_fold)):
        if value not in folds:
            raise DataError(f"{flag} {value}: {meta} has folds {folds}; pick one of them")
    if val_fold == fold:
        raise DataError(f"--val-fold {val_fold} equals the test fold --fold {fold}; pick another fold for validation")
    missing = [str(audio_path(r)) for r in rows if not audio_path(r).is_file()]
    if missing:
        raise DataError(
            f"{meta} lists {len(missing)} file(s) that do not exist, first {missing[0]}. "
            "Restore the audio files or remove their rows from the metadata."
        )
    # Label order follows the official class ids, so a model's output index matches the dataset's classID.
    labels = (
        [name for _, name in sorted({(int(r[id_col]), r[class_col]) for r in rows})]
        if id_col in rows[0]
        else sorted({r[class_col] for r in rows})
    )
    index = {name: i for i, name in enumerate(labels)}
    parts = {"train": [], "val": [], "test": []}
    for r in rows:
        part = "test" if int(r["fold"]) == fold else "val" if int(r["fold"]) == val_fold else "train"
        parts[part].append((str(audio_path(r)), index[r[class_col]]))
    splits = {name: _split(items) for name, items in parts.items()}
    return AudioData(
        fmt,
        labels,
        splits,
        notes=[f"test = fold {fold}, validation = fold {val_fold}, training = the other {len(folds) - 2} folds (official folds)"],
    )


def _speech_commands(root: Path) -> AudioData:
    """Speech Commands: the official list files split speakers; everything else is training data."""
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != NOISE_FOLDER and not p.name.startswith("."))
    files = {label: _audio_files(root / label, root) for label in labels}
    listed = {}
    for part, name in (("val", "validation_list.txt"), ("test", "testing_list.txt")):
        list_file = root / name
        entries = [line.strip() for line in list_file.read_text().splitlines() if line.strip()] if list_file.is_file() else []
        for entry in entries:
            if not (root / entry).is_file():
                raise DataError(
                    f"{list_file} lists {entry}, which does not exist under {root}. Restore the file or remove the line."
                )
        listed[part] = set(entries)
    parts = {"train": [], "val": [], "test": []}
    for i, label in enumerate(labels):
        for path in files[label]:
            rel = path.relative_to(root).as_posix()
            part = "val" if rel in listed["val"] else "test" if rel in listed["test"] else "train"
            parts[part].append((str(path), i))
    noise = _audio_files(root / NOISE_FOLDER, root, required=False) if (root / NOISE_FOLDER).is_dir() else []
    splits = {name: _split(items) for name, items in parts.items() if items or name != "test"}
    _require_nonempty(splits, root)
    return AudioData(
        "speech_commands",
        labels,
        splits,
        [str(p) for p in noise],
        notes=["validation and test from validation_list.txt and testing_list.txt"]
        + ([f"{len(noise)} background noise file(s) from {NOISE_FOLDER}/"] if noise else []),
    )


def _class_folders(root: Path, val_fraction: float) -> AudioData:
    """<label>/*.wav, optionally under train/ val/ test/. Without a val/ folder, a stratified split with a
    fixed seed carves validation (and, for a plain folder tree, test) clips out of training."""
    val_dir = next((root / n for n in VAL_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir():
        labels = _label_folders(root / "train")
        parts = {"train": _labelled_files(root / "train", labels)}
        if val_dir:
            parts["val"] = _labelled_files(val_dir, labels, required=False)
        if (root / "test").is_dir():
            parts["test"] = _labelled_files(root / "test", labels, required=False)
        notes = [
            f"splits from the train/{', ' + val_dir.name + '/' if val_dir else ''}{', test/' if 'test' in parts else ''} folders"
        ]
        if not val_dir:
            parts["train"], parts["val"] = _stratified_split(parts["train"], val_fraction)
            notes.append(f"no val/ folder: {val_fraction:.0%} of train/ per class held out for validation (fixed seed)")
    else:
        labels = _label_folders(root)
        everything = _labelled_files(root, labels)
        rest, test = _stratified_split(everything, val_fraction)
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
    """A Hub dataset id (loaded through the local cache when offline) or a save_to_disk folder. Audio is
    read as raw bytes or paths and decoded with soundfile, so no torchcodec/FFmpeg is needed."""
    import datasets

    try:
        loaded = datasets.load_from_disk(name) if Path(name).exists() else datasets.load_dataset(name)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise DataError(
            f"--data {name}: not a local folder and not loadable as a Hugging Face dataset ({err}). "
            "Check the path or the dataset id; offline, the dataset must already be in the HF cache."
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    split_names = {
        "train": "train",
        "val": next((n for n in VAL_NAMES if n in loaded), None),
        "test": "test" if "test" in loaded else None,
    }
    if "train" not in loaded:
        raise DataError(f"--data {name}: no 'train' split (splits: {list(loaded)})")
    for split in loaded.values():
        for column, flag in ((audio_column, "--audio-column"), (label_column, "--label-column")):
            if column not in split.column_names:
                raise DataError(
                    f"--data {name}: column {column!r} does not exist; columns are {split.column_names}. "
                    f"Name the right one with {flag}."
                )
    feature = loaded["train"].features[label_column]
    labels = (
        list(feature.names)
        if isinstance(feature, datasets.ClassLabel)
        else sorted({str(v) for v in loaded["train"][label_column]})
    )
    index = {label: i for i, label in enumerate(labels)}

    def as_split(ds):
        raw = ds[label_column]
        targets = np.array(
            [v if isinstance(feature, datasets.ClassLabel) else index.get(str(v), -1) for v in raw], dtype=np.int64
        )
        if (targets < 0).any():
            bad = raw[int(np.argmax(targets < 0))]
            raise DataError(f"--data {name}: label {bad!r} appears outside the training split; it has no class to map to")
        audio = HubAudio(ds.cast_column(audio_column, datasets.Audio(decode=False)), audio_column)
        return Split(audio, targets, [f"{name}[{i}]" for i in range(len(ds))])

    splits = {part: as_split(loaded[source]) for part, source in split_names.items() if source}
    notes = [f"Hub splits: {', '.join(f'{p}={s}' for p, s in split_names.items() if s)}"]
    if "val" not in splits:
        train_idx, val_idx = _stratified_indices(splits["train"].targets, val_fraction)
        full = splits["train"]
        splits["train"], splits["val"] = (
            Split(full.sources.select(ix), full.targets[ix], [full.names[i] for i in ix]) for ix in (train_idx, val_idx)
        )
        notes.append(f"no validation split: {val_fraction:.0%} of train per class held out (fixed seed)")
    return AudioData("hub", labels, splits, notes=notes)


class HubAudio:
    """The audio column of a Hub dataset as a sequence of soundfile-readable sources (bytes or paths)."""

    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[int(i)][self.column]
        return io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]

    def select(self, indices):
        return HubAudio(self.dataset.select(indices), self.column)

    def fingerprint(self) -> str:
        return self.dataset._fingerprint


def _label_folders(root: Path) -> list[str]:
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not labels:
        raise DataError(
            f"{root}: no class folders found; expected {root}/<label>/*.wav (or pass --format to pick another layout)"
        )
    return labels


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


def _stratified_indices(targets: np.ndarray, fraction: float, seed: int = 0):
    """Per class, hold out round(fraction x count) items (at least one when the class has two or more)."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        n = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        held.extend(members[:n])
        keep.extend(members[n:])
    return sorted(int(i) for i in keep), sorted(int(i) for i in held)


def _stratified_split(items: list[tuple[str, int]], fraction: float):
    keep, held = _stratified_indices(np.array([t for _, t in items]), fraction)
    return [items[i] for i in keep], [items[i] for i in held]


def _split(items: list[tuple[str, int]]) -> Split:
    return Split([p for p, _ in items], np.array([t for _, t in items], dtype=np.int64), [p for p, _ in items])


def _require_nonempty(splits: dict[str, Split], root: Path):
    for name in ("train", "val"):
        if not len(splits[name].sources):
            raise DataError(f"{root}: the {name} split is empty; check the layout (see --help for the expected folders)")


# ----------------------------------------------------------------------------- decoding


def read_audio(source, sample_rate: int) -> torch.Tensor:
    """Any soundfile-readable clip (8/16/24/32-bit PCM, float, FLAC, OGG; any rate; any channels) as mono
    float32 at sample_rate. Raises BadClip for empty, corrupt or unreadable input."""
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise BadClip(f"unreadable: {err}") from None
    if data.shape[0] == 0:
        raise BadClip("empty: no audio frames")
    wave = torch.from_numpy(data.mean(axis=1))
    if not torch.isfinite(wave).all():
        raise BadClip("contains NaN or infinite samples")
    if rate != sample_rate:
        wave = AF.resample(wave, rate, sample_rate)
    return wave


def fix_length(wave: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Keep the first num_samples (the clip's start), padding short clips with silence."""
    return torch.nn.functional.pad(wave[:num_samples], (0, max(0, num_samples - wave.shape[-1])))


def to_pcm16(wave: torch.Tensor) -> np.ndarray:
    return (wave.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()


class _DecodeJob(torch.utils.data.Dataset):
    def __init__(self, sources, sample_rate, num_samples):
        self.sources, self.sample_rate, self.num_samples = sources, sample_rate, num_samples

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        try:
            return i, to_pcm16(fix_length(read_audio(self.sources[i], self.sample_rate), self.num_samples)), None
        except BadClip as err:
            return i, None, str(err)


class CachedClips(torch.utils.data.Dataset):
    """Fixed-length int16 waveforms of one split, decoded once into CACHE/<key>.npy (a memory map) and
    reused by later runs and by the other processes of this run. Items: (int16 waveform, class index)."""

    def __init__(self, split: Split, sample_rate: int, num_samples: int, cache_dir: Path, workers: int = 0, label: str = ""):
        cache_dir = Path(cache_dir)
        key = _cache_key(split, sample_rate, num_samples)
        self.array_path, manifest = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
        if not manifest.is_file():
            _build_cache(split, sample_rate, num_samples, self.array_path, manifest, workers, label)
        bad = {int(i): reason for i, reason in json.loads(manifest.read_text())["bad"].items()}
        self.skipped = [{"path": split.names[i], "reason": reason} for i, reason in sorted(bad.items())]
        self.rows = np.array([i for i in range(len(split.targets)) if i not in bad], dtype=np.int64)
        self.targets = split.targets[self.rows]
        self._array = None  # opened lazily, so DataLoader workers each map the file instead of pickling it

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        if self._array is None:
            self._array = np.load(self.array_path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[self.rows[i]])), int(self.targets[i])

    def __getstate__(self):
        return {**self.__dict__, "_array": None}


def _cache_key(split: Split, sample_rate: int, num_samples: int) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{sample_rate}|{num_samples}|".encode())
    if isinstance(split.sources, HubAudio):
        h.update(split.sources.fingerprint().encode())
    else:
        for path in split.sources:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _build_cache(split, sample_rate, num_samples, array_path: Path, manifest: Path, workers: int, label: str):
    array_path.parent.mkdir(parents=True, exist_ok=True)
    # Unique temporary names, then renames: concurrent builders (other machines on a shared disk) never
    # see a half-written cache, and the manifest appears last.
    tmp = array_path.with_name(f".{array_path.stem}.{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(len(split.sources), num_samples))
    loader = torch.utils.data.DataLoader(
        _DecodeJob(split.sources, sample_rate, num_samples),
        batch_size=16,
        num_workers=workers,
        collate_fn=list,
        generator=torch.Generator(),
    )  # leave the global RNG (weight init) untouched
    bad = {}
    for batch in tqdm(loader, desc=f"decoding {label} clips (once; cached)", unit="batch", leave=False):
        for i, pcm, reason in batch:
            if pcm is None:
                bad[i] = reason
            else:
                out[i] = pcm
    out.flush()
    del out
    os.replace(tmp, array_path)
    tmp_manifest = manifest.with_name(f".{manifest.name}.{os.getpid()}")
    tmp_manifest.write_text(
        json.dumps({"clips": len(split.sources), "sample_rate": sample_rate, "num_samples": num_samples, "bad": bad})
    )
    os.replace(tmp_manifest, manifest)


def load_noise(files: list[str], sample_rate: int) -> tuple[torch.Tensor, list[dict]]:
    """Background noise recordings concatenated into one float32 waveform, and the files skipped as unreadable."""
    waves, skipped = [], []
    for f in files:
        try:
            waves.append(read_audio(f, sample_rate))
        except BadClip as err:
            skipped.append({"path": f, "reason": str(err)})
    return (torch.cat(waves) if waves else torch.zeros(0)), skipped


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "launchkit" / "audio"
