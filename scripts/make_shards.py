#!/usr/bin/env python
"""Turn a dataset in any layout the training scripts read into parquet shards in the Hugging Face Hub's own layout,
with the splits and labels training would use and every unusable file left out and listed.

    python scripts/make_shards.py audio --data demo_data/speech_commands --output shards/speech --shard-size 500MB --pcm
    python scripts/make_shards.py audio --data us8k --fold 3 --output shards/us8k_fold3 --shard-size 2000
    python scripts/make_shards.py detection --data demo_data/shapes/data.yaml --output shards/shapes --img-size 640
    python scripts/train_audio.py --data shards/speech --format hub --output-dir runs/audio   # or load_dataset(folder)
    python scripts/train_audio.py --data shards/speech --streaming --output-dir runs/audio    # read while training

OUTPUT gets data/{split}-{i:05d}-of-{n:05d}.parquet (splits train, validation, test, and noise: Speech Commands'
_background_noise_, mixed in by training), README.md (rows and shards per split) and shards.json (rows and shards
per split, every skipped file with its reason).
Audio rows: audio (the clip's original file bytes: decoding happens later, in the DataLoader workers) and label (a
ClassLabel); with --pcm also pcm_RATE_SAMPLES_SPAN, each training clip decoded as train_audio.py --sample-rate RATE
--clip-seconds SAMPLES/RATE trains on it (what its cache holds: int16, at most SPAN samples), so --streaming workers
copy samples instead of decoding. Detection rows: image_id (the row's number in its split), image (the original file
bytes), width and height (of the upright image), objects{bbox (COCO [x, y, w, h] pixels), category (a ClassLabel)}:
the columns `--format hub` reads; with --img-size N also pixels_N, each training image decoded and scaled as
train_detection.py --img-size N trains on it (what its image cache holds). The data flags are those of train_audio.py
and train_detection.py (audio's --cache-dir is not used); a fold dataset gives the shards of one --fold. Audio clips
are decoded whole once (at --sample-rate) to find the unreadable ones; detection images are checked as training checks
them."""

import argparse
import io
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # find `shared` from any working directory
import audio_data
import detection_data

from shared.cache import decoded_in_order
from shared.runtime import write_json

HUB_SPLITS = {"train": "train", "val": "validation", "test": "test", "noise": "noise"}  # training's split names -> the Hub's
BYTES = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}  # how Audio and Image store a file
# The DataReport kinds that drop a whole image (the others fix or drop a box or a label line).
IMAGE_SKIPS = {kind for kind, action in detection_data.DataReport.ACTIONS.items() if action.startswith("image skipped")}


@dataclass
class SplitRows:
    sizes: list[int]  # bytes of each row's file: --shard-size in MB cuts by these
    row: Callable[[int], dict]  # the k-th row, read only when its shard is written (a split need not fit in memory)


# ----------------------------------------------------------------------------- audio


class CheckClips(torch.utils.data.Dataset):
    """Decodes each clip with read_audio, as training does, so a clip is skipped for the reason training would give;
    yields (index, size of the bytes stored, None) or (index, None, reason). kept: (clip length, span) in samples when
    the row also stores the samples training keeps (--pcm)."""

    def __init__(self, sources, sample_rate: int, kept: tuple[int, int] | None):
        self.sources, self.sample_rate, self.kept = sources, sample_rate, kept

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        try:
            frames = len(audio_data.read_audio(self.sources[i], self.sample_rate))
        except audio_data.BadClip as err:
            return i, None, str(err)
        pcm_bytes = 2 * min(max(frames, self.kept[0]), self.kept[1]) if self.kept else 0
        return i, len(stored_audio(self.sources[i])) + pcm_bytes, None


def stored_audio(source) -> bytes:
    """The bytes a row keeps: the clip's file as it is (a path, or a Hub row's bytes), or for a Clip (a _silence_
    window of a long noise file) a WAV of just its frames, so the row decodes to the same samples."""
    if isinstance(source, audio_data.Clip):
        return window_wav(source)
    if isinstance(source, io.BytesIO):
        return source.getvalue()
    return Path(source).read_bytes()


def window_wav(clip: "audio_data.Clip") -> bytes:
    """The window in the noise file's own sample format where WAV has it: PCM read as int32 and written back is exact
    (as float it would not be: libsndfile scales by 2^15 reading and 2^15 - 1 writing)."""
    info = sf.info(os.fsencode(clip.path))
    subtype = info.subtype if sf.check_format("WAV", info.subtype) else "FLOAT"
    frames, _ = sf.read(
        os.fsencode(clip.path), frames=clip.frames, start=clip.start, always_2d=True,
        dtype={"FLOAT": "float32", "DOUBLE": "float64"}.get(subtype, "int32"),
    )  # fmt: skip
    out = io.BytesIO()
    sf.write(out, frames, info.samplerate, format="WAV", subtype=subtype)
    return out.getvalue()


def audio_splits(args) -> tuple[datasets.Features, dict[str, SplitRows], dict]:
    if args.fold == audio_data.ALL_FOLDS:
        raise SystemExit("--fold all: shards hold one fold's splits; run make_shards.py once per --fold K")
    data = audio_data.load_run_data(vars(args))
    root = Path(args.data)
    features = datasets.Features({"audio": datasets.Audio(), "label": datasets.ClassLabel(names=data.labels)})
    num_samples = round((args.clip_seconds or audio_data.DEFAULT_CLIP_SECONDS[data.format]) * args.sample_rate)
    kept = (num_samples, num_samples * audio_data.TRAIN_SPAN) if args.pcm else None
    pcm = audio_data.pcm_column(args.sample_rate, *kept) if kept else None
    if pcm:
        features[pcm] = datasets.Value("binary")
    splits, skipped = {}, []
    for name, split in data.splits.items():
        train_kept = kept if name == "train" else None  # evaluation decodes its clips
        job = CheckClips(split.sources, args.sample_rate, train_kept)
        checked = decoded_in_order(job, args.workers, f"checking {name} clips")
        sizes = {}
        for i, size, reason in checked:
            if reason is None:
                sizes[i] = size
            else:  # the entry training's data_report.json has for the clip
                skipped.append({"split": name, "path": split.names[i], "reason": reason})
        row = partial(audio_row, split, list(sizes), root, pcm, args.sample_rate, train_kept)
        splits[name] = SplitRows(list(sizes.values()), row)
    about = {"format": data.format, "notes": data.notes, "protocol": data.protocol, "labels": data.labels}
    about["checked_at_sample_rate"] = args.sample_rate
    if data.noise_files:  # the recordings augmentation mixes in, as the split training reads them from
        rows = SplitRows([os.path.getsize(f) for f in data.noise_files], partial(noise_row, data.noise_files, root))
        splits[audio_data.NOISE_SPLIT] = rows
    return features, splits, {**about, "skipped_count": len(skipped), "skipped": skipped}


def audio_row(split: "audio_data.Split", rows: list[int], root: Path, pcm: str | None, rate: int, kept, k: int) -> dict:
    source = split.sources[rows[k]]
    row = {"audio": {"bytes": stored_audio(source), "path": relative(split.names[rows[k]], root)}}
    row["label"] = int(split.targets[rows[k]])
    if kept:  # what train_audio.py's cache holds for the clip
        row[pcm] = audio_data.kept_pcm(source, rate, *kept).astype(audio_data.PCM_DTYPE).tobytes()
    return row


def noise_row(files: list[str], root: Path, k: int) -> dict:
    return {"audio": {"bytes": stored_audio(files[k]), "path": relative(files[k], root)}, "label": -1}  # no class


def relative(name: str, root: Path) -> str:
    """A row's file name as the dataset knows it (e.g. yes/0a7c2a8d_nohash_0.wav), not where this machine keeps it."""
    try:
        return Path(name).relative_to(root).as_posix()
    except ValueError:
        return name


# ----------------------------------------------------------------------------- detection


def detection_splits(args) -> tuple[datasets.Features, dict[str, SplitRows], dict]:
    # load_data has already skipped (and counted in its DataReport) every image training would not use.
    data = detection_data.load_data(args.data, args.val_fraction, fmt=args.format, max_pixels=args.max_pixels)
    names = datasets.ClassLabel(names=data.names)
    bbox = datasets.List(datasets.List(datasets.Value("float32"), length=4))
    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {"bbox": bbox, "category": datasets.List(names)},
        }
    )
    pixels = detection_data.pixels_column(args.img_size) if args.img_size else None
    if pixels:
        features[pixels] = datasets.Value("binary")
    splits = {}
    for name, samples in data.splits.items():
        hub = data.hub.get(name)
        hub = hub.cast_column("image", datasets.Image(decode=False)) if hub is not None else None
        sizes = [os.path.getsize(s.source) if hub is None else len(image_bytes(s, hub)) for s in samples]
        scale_to = args.img_size if name == "train" else None  # evaluation reads images at full size
        if pixels and scale_to:
            sizes = [n + 3 * math.prod(scaled_size(s, scale_to)) for n, s in zip(sizes, samples, strict=True)]
        splits[name] = SplitRows(sizes, partial(detection_row, samples, hub, pixels, scale_to))
    report = data.report.to_dict(data)
    skipped = [{"path": f, "reason": kind} for f, kinds in report["files"].items() for kind in kinds if kind in IMAGE_SKIPS]
    # The same report as training's data_report.json: boxes fixed or dropped are counted there, per file and split.
    about = {"format": args.format or detection_data.detect_format(Path(args.data)), "description": data.description}
    about |= {"labels": data.names, "skipped_count": len(skipped), "skipped": skipped, "data_report": report}
    return features, splits, about


def image_bytes(sample: "detection_data.Sample", hub) -> bytes:
    """The image file as it is: from its path, or from its row of a Hub split (bytes, or a path it points to)."""
    if hub is None:
        return Path(sample.source).read_bytes()
    stored = hub[sample.source]["image"]
    return stored["bytes"] or Path(stored["path"]).read_bytes()


def scaled_size(sample: "detection_data.Sample", img_size: int) -> tuple[int, int]:
    return detection_data.scaled_size(sample.width, sample.height, img_size)


def training_pixels(image: dict, sample: "detection_data.Sample", img_size: int) -> bytes:
    """The row's image as train_detection.py's image cache holds it for --img-size img_size."""
    return detection_data.cached_pixels(detection_data.stored_image(image), scaled_size(sample, img_size))


def detection_row(samples: list, hub, pixels: str | None, scale_to: int | None, k: int) -> dict:
    s = samples[k]
    xywh = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in s.boxes.tolist()]  # the Hub's COCO convention
    image, objects = {"bytes": image_bytes(s, hub), "path": s.file_name}, {"bbox": xywh, "category": s.labels.tolist()}
    row = {"image_id": k, "image": image, "width": s.width, "height": s.height, "objects": objects}
    if scale_to:  # evaluation reads its images at full size
        row[pixels] = training_pixels(image, s, scale_to)
    return row


# ----------------------------------------------------------------------------- shards


def parse_shard_size(value: str) -> tuple[str, int]:
    """'2000' (rows per shard) or '500MB' (about that many megabytes of files per shard)."""
    number, mb = (value[:-2], True) if value.upper().endswith("MB") else (value, False)
    if not number.strip().isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: rows per shard (e.g. 2000) or megabytes (e.g. 500MB)")
    return ("bytes", int(number) * 1_000_000) if mb else ("rows", int(number))


def plan_shards(sizes: list[int], shard_size: tuple[str, int]) -> list[range]:
    """Consecutive rows per shard, so the shards read in name order give the split in training's order. A file larger
    than the size limit gets a shard of its own."""
    kind, limit = shard_size
    if kind == "rows":  # as even as the count allows: DDP processes given whole shards then get about the same rows
        count = -(-len(sizes) // limit)
        if not count:
            return []
        edges = [round(i * len(sizes) / count) for i in range(count + 1)]
        return [range(a, b) for a, b in zip(edges, edges[1:], strict=False)]
    shards, start, total = [], 0, 0
    for k, size in enumerate(sizes):
        if k > start and total + size > limit:
            shards.append(range(start, k))
            start, total = k, 0
        total += size
    return shards + [range(start, len(sizes))] * bool(sizes)


def write_shards(folder: Path, split: str, rows: SplitRows, features: datasets.Features, shard_size) -> int:
    """The split's parquet files; returns how many. Media columns are built as their stored struct and cast, since
    datasets' Audio encoder insists on torchcodec even for bytes that need no encoding."""
    media = (datasets.Audio, datasets.Image)
    plain = datasets.Features({c: BYTES if isinstance(f, media) else f for c, f in features.items()})
    shards = plan_shards(rows.sizes, shard_size)
    for i, shard in enumerate(shards):
        # A column a split does not fill (decoded samples outside training) is null in its rows.
        table = datasets.Dataset.from_list([dict.fromkeys(features) | rows.row(k) for k in shard], features=plain)
        table = table.cast(features)
        table.to_parquet(str(folder / f"{split}-{i:05d}-of-{len(shards):05d}.parquet"))
    return len(shards)


def dataset_card(summary: dict) -> str:
    """README.md, without a `configs` block: load_dataset finds the splits from the file names, and with `configs`
    datasets 5 keys its cache by the patterns, so a second folder of the same name would read back the first's rows."""
    task = {"audio": "audio-classification", "detection": "object-detection"}[summary["task"]]
    lines = [
        f"---\ntask_categories:\n- {task}\n---\n\n# {Path(summary['output']).name}\n",
        f"{summary['task']} data from `{summary['data']}`, written by launchkit's make_shards.py. "
        f"Classes: {', '.join(summary['labels'])}.\n\n| split | rows | shards |\n|---|---|---|",
        *(f"| {s} | {c['rows']} | {c['shards']} |" for s, c in summary["splits"].items()),
        f"\n{summary['skipped_count']} file(s) skipped as unusable; shards.json lists each with the reason.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    audio = tasks.add_parser("audio", help="the layouts of train_audio.py")
    audio_data.add_data_args(audio)
    detection = tasks.add_parser("detection", help="the layouts of train_detection.py")
    detection.add_argument("--data", required=True, help="YOLO data.yaml, COCO instances .json, or a Hub id (--format hub)")
    detection.add_argument("--format", choices=detection_data.FORMATS, help="layout of --data (default: from the path)")
    detection.add_argument("--max-pixels", type=int, default=detection_data.MAX_PIXELS, help="larger images are skipped")
    detection.add_argument("--val-fraction", type=float, default=0.1, help="COCO/Hub data without val: the share held out")
    detection.add_argument(
        "--img-size",
        type=int,
        help="also store each training image decoded and scaled as train_detection.py --img-size N trains on it (column "
        "pixels_N, about 3 x N x N bytes per image): --streaming workers then copy pixels instead of decoding",
    )
    audio.add_argument(
        "--pcm",
        action="store_true",
        help="also store each training clip decoded as train_audio.py trains on it at --sample-rate and --clip-seconds "
        "(column pcm_RATE_SAMPLES_SPAN: int16, 2 bytes a sample): --streaming workers then copy samples instead of "
        "decoding",
    )
    audio.add_argument("--workers", type=int, default=4, help="processes checking that clips decode (default 4)")
    for sub in (audio, detection):
        sub.add_argument("--output", type=Path, required=True, help="folder for data/, README.md and shards.json")
        sub.add_argument("--shard-size", type=parse_shard_size, default="500MB", help="rows (2000) or MB (500MB, default)")
        sub.add_argument("--overwrite", action="store_true", help="replace the shards an earlier run wrote to --output")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    written = [args.output / name for name in ("data", "README.md", "shards.json")]
    if any(p.exists() for p in written) and not args.overwrite:
        raise SystemExit(f"{args.output} already holds shards; pass --overwrite to replace them")
    datasets.disable_progress_bars()
    features, splits, about = audio_splits(args) if args.task == "audio" else detection_splits(args)
    empty = [name for name, rows in splits.items() if not rows.sizes]
    if empty:
        raise SystemExit(f"the {', '.join(empty)} split(s) kept no usable file; repair or replace the skipped files")
    # Written beside data/ and moved in at the end: a run stopped halfway leaves no partial split for load_dataset.
    staging = args.output / "data.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    counts = {}
    for name, rows in splits.items():
        shards = write_shards(staging, HUB_SPLITS[name], rows, features, args.shard_size)
        counts[HUB_SPLITS[name]] = {"rows": len(rows.sizes), "shards": shards, "file_megabytes": sum(rows.sizes) / 1e6}
        print(f"{HUB_SPLITS[name]}: {len(rows.sizes)} rows in {shards} shard(s)")
    for path in written:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    staging.rename(args.output / "data")
    summary = {"task": args.task, "data": str(args.data), "output": str(args.output), "splits": counts, **about}
    write_json(args.output / "shards.json", summary)
    (args.output / "README.md").write_text(dataset_card(summary))
    print(f"{args.output}: {summary['skipped_count']} file(s) skipped (listed in {args.output / 'shards.json'})")


if __name__ == "__main__":
    main()
