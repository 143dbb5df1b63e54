"""Accelerator setup, the command-line flags every training script shares, the data's fingerprint, the streams of
--streaming and the run summary."""

import argparse
import hashlib
import io
import itertools
import json
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.data_loader import DataLoaderShard
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, find_executable_batch_size, gather, set_seed

# files_fingerprint reads this much at each file's start, middle and end: enough to tell a replaced file, cheap for 100k.
SAMPLED_BYTES = 4096
# Accelerate's trackers: each logs where its own settings say (MLflow: MLFLOW_TRACKING_URI, W&B: WANDB_PROJECT, ...).
TRACKERS = tuple(LOGGER_TYPE_TO_CLASS)
# Spellings people bring from the Hugging Face examples and torchvision's references, read as this project's flags.
ALIASES = {"--resume_from_checkpoint": "--resume", "--checkpointing_steps": "--checkpoint-steps", "--test-only": "--eval-only",
           "--wd": "--weight-decay", "--num_train_epochs": "--epochs", "--learning_rate": "--lr",
           "--per_device_train_batch_size": "--batch-size", "--logging_steps": "--log-every",
           "--dataloader_num_workers": "--workers"}  # fmt: skip
SPELLINGS = (
    "Also accepted: every flag with underscores (--output_dir, --mixed_precision, --nominal_batch_size, ...), "
    + ", ".join(f"{alias} for {ours}" for alias, ours in ALIASES.items())
    + "; -b for --batch-size and -j for --workers (torchvision's)."
)


def familiar_spellings(argv: list[str] | None) -> list[str]:
    """argv (default: the command line's) with the spellings of SPELLINGS turned into this project's flags."""
    tokens = []
    for token in sys.argv[1:] if argv is None else argv:
        flag, equals, value = str(token).partition("=")
        tokens.append(ALIASES.get(flag, flag).replace("_", "-") + equals + value if flag.startswith("--") else str(token))
    return tokens


def add_common_args(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int, nominal_batch_size: int):
    """Flags with the same meaning in every training script."""
    g = parser.add_argument_group("run and hardware")
    g.add_argument("--output-dir", required=True, type=Path, help="the run's folder: args.json, results.csv, model/, ...")
    g.add_argument("--epochs", type=int, default=epochs, help=f"training epochs (default {epochs})")
    g.add_argument(
        "--batch-size",
        "-b",
        type=_batch_size,
        default=batch_size,
        help=f"per device per forward pass (default {batch_size}); auto: the largest that fits the GPU",
    )
    g.add_argument(
        "--nominal-batch-size",
        type=int,
        default=nominal_batch_size,
        help=f"per optimizer step, by gradient accumulation over batches and processes (default {nominal_batch_size})",
    )
    g.add_argument("--seed", type=int, default=0, help="seeds weights, order and augmentation (default 0)")
    workers = min(4, os.cpu_count() or 1)
    g.add_argument("--workers", "-j", type=int, default=workers, help=f"DataLoader workers per device (default {workers})")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="overrides accelerate's; fp16 needs a GPU")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slower start, faster steps)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (small per-device batches)")
    g.add_argument("--no-augment", action="store_true", help="no training augmentation (equivalence checks, debugging)")
    g.add_argument(
        "--resume", nargs="?", const="latest", metavar="PATH", help="continue from the latest checkpoint, or from PATH"
    )
    g.add_argument(
        "--weights",
        type=Path,
        metavar="MODEL_DIR",
        help="start from an earlier run's model/ (or a .safetensors): all of it, or all but the class layer",
    )
    g.add_argument("--eval-only", action="store_true", help="score --weights on the val and test splits, then stop")
    g.add_argument("--overwrite", action="store_true", help="delete the run's outputs in OUTPUT_DIR and start again")
    g.add_argument("--checkpoint-steps", type=int, default=0, help="also checkpoint every N optimizer steps (default 0: off)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep (default 2)")
    g.add_argument(
        "--report-to",
        type=_trackers,
        default="tensorboard",
        metavar="TRACKERS",
        help=f"where to log, comma-separated: {', '.join(TRACKERS)}, all or none (default tensorboard, in OUTPUT_DIR/logs)",
    )
    g.add_argument(
        "--log-every", type=int, default=10, help="log loss, LR, gradient norm and samples/s every N steps (default 10)"
    )
    s = parser.add_argument_group("smoke tests (default: all)")
    s.add_argument("--max-train-steps", type=int, help="end training after N optimizer steps (the schedule is fitted to them)")
    s.add_argument("--max-train-samples", type=int, help="train on N samples spread evenly over the training split")
    s.add_argument("--max-eval-samples", type=int, help="evaluate on N samples spread evenly over each evaluation split")


def _trackers(value: str):
    """--report-to as Accelerate's log_with takes it: a list of tracker names, "all", or None for none."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in (*TRACKERS, "all", "none")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: use {', '.join(TRACKERS)}, all or none (comma-separated)")
    return None if names == ["none"] else "all" if "all" in names else names


def _batch_size(value: str):
    if value != "auto" and (not value.isdigit() or int(value) < 1):
        raise argparse.ArgumentTypeError(f"{value!r}: a positive integer or 'auto'")
    return value if value == "auto" else int(value)


def add_recipe_args(parser: argparse.ArgumentParser, recipe: dict[str, tuple]):
    """recipe: {key: (default, help)}, the dict at the top of a training script. Each key becomes a flag (warmup_epochs:
    --warmup-epochs); --recipe FILE.yaml overrides the defaults, and a flag given overrides both."""
    g = parser.add_argument_group("recipe (defaults: the RECIPE dict at the top of the script)")
    g.add_argument(
        "--recipe", "--hyp", type=Path, default=None, metavar="FILE.yaml", help="YAML of recipe keys (as below, with _)"
    )
    for key, (default, text) in recipe.items():
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {"type": type(default)}
        g.add_argument("--" + key.replace("_", "-"), **kind, default=None, help=f"{text} (default {default})")


def resolve_recipe(args, recipe: dict[str, tuple], renamed: dict[str, str] | None = None) -> dict:
    """The recipe in force, also set on args: the script's defaults, then the --recipe file (its old key names in
    `renamed` still accepted), then the flags given."""
    values = {key: default for key, (default, _) in recipe.items()}
    if args.recipe is not None:
        override = yaml.safe_load(Path(args.recipe).read_text()) or {}
        override = {(renamed or {}).get(k, k): v for k, v in override.items()}
        unknown = sorted(set(override) - set(recipe))
        if unknown:
            raise SystemExit(f"--recipe {args.recipe}: unknown keys {unknown}; valid keys are {', '.join(recipe)}")
        # As the flags are: YAML reads 1e-3 as a string and 2000 as an int where the default is a float.
        values.update({k: v if isinstance(values[k], bool) else type(values[k])(v) for k, v in override.items()})
    values.update({key: getattr(args, key) for key in recipe if getattr(args, key) is not None})
    vars(args).update(values)
    return values


@dataclass(frozen=True)
class BatchPlan:
    """Samples per device per forward pass, processes, accumulation steps: what setup_accelerator decided."""

    batch_size: int
    processes: int
    accumulation_steps: int

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.processes * self.accumulation_steps

    def describe(self) -> str:
        return (
            f"{self.batch_size} per device x {self.processes} processes x {self.accumulation_steps} "
            f"accumulation steps = {self.effective_batch_size} per optimizer step"
        )


def setup_accelerator(args, probe_step=None) -> tuple[Accelerator, BatchPlan]:
    """The Accelerator (device, precision, processes) and the batch plan: gradient accumulation follows from the
    process count so the effective batch stays --nominal-batch-size. probe_step(batch_size, device, dtype) runs
    one training step, for --batch-size auto."""
    # accelerate's multi-GPU launcher does not pass a config's use_cpu on, and PartialState does not
    # read ACCELERATE_USE_CPU: settle "CPU or not" once, from the flag or the environment.
    cpu = args.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    _refuse_impossible_launch(cpu)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=args.mixed_precision,  # None: the accelerate config or launcher decides
        # Shuffling seeded by (seed, epoch) gives every process count the same sample order,
        # so 1 device x 2 accumulation steps sees the same batches as 2 devices x 1 step.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(args.output_dir), logging_dir=str(args.output_dir / "logs")),
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise SystemExit(
            "fp16 mixed precision needs a GPU; on a CPU use --mixed-precision bf16 (or the preset accelerate_configs/cpu.yaml)."
        )
    batch = largest_batch_size(accelerator, args.nominal_batch_size, probe_step) if args.batch_size == "auto" else args.batch_size
    plan = BatchPlan(
        batch, accelerator.num_processes, max(1, round(args.nominal_batch_size / (batch * accelerator.num_processes)))
    )
    accelerator.gradient_accumulation_steps = plan.accumulation_steps
    if plan.effective_batch_size != args.nominal_batch_size:
        accelerator.print(
            f"note: nominal batch {args.nominal_batch_size} is not a multiple of {batch} x {plan.processes} processes; "
            f"the effective batch is {plan.effective_batch_size}"
        )
    set_seed(args.seed)
    return accelerator, plan


def largest_batch_size(accelerator: Accelerator, start: int, probe_step) -> int:
    """--batch-size auto: the largest batch, halving from start, for which one training step fits in GPU memory,
    agreed by all processes. A CPU has no memory limit to probe."""
    if accelerator.device.type == "cpu":
        return start
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)

    @find_executable_batch_size(starting_batch_size=start)
    def probe(batch_size):
        probe_step(batch_size, accelerator.device, dtype)
        return batch_size

    return smallest_over_processes(probe())


def smallest_over_processes(value: int) -> int:
    """Cards differ in free memory: every process must use the batch the tightest one found."""
    state = PartialState()
    if state.num_processes == 1:
        return value
    found = torch.tensor([value], device=state.device)
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
    return int(found.item())


def seed_per_process(accelerator: Accelerator, seed: int):
    """Once the weights exist (drawn alike everywhere): each process draws its own augmentation, restored on resume."""
    set_seed(seed, device_specific=True)


def _refuse_impossible_launch(cpu: bool):
    """Stop, with the fix, when the launch asks for hardware this machine does not have."""
    world_size, local_rank, gpus = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")), 0
    if not cpu:
        gpus = torch.cuda.device_count()
    if not cpu and world_size > 1 and gpus == 0:
        raise SystemExit(
            f"{world_size} processes were launched for GPUs, but this machine has none. "
            "To train with several CPU processes add --cpu (or set ACCELERATE_USE_CPU=true), e.g. "
            "accelerate launch --config_file accelerate_configs/cpu_2proc.yaml SCRIPT --cpu ..."
        )
    if gpus and local_rank >= gpus:
        raise SystemExit(
            f"process with LOCAL_RANK {local_rank} has no GPU: this machine has {gpus}. "
            f"Launch at most {gpus} processes per machine (--num_processes / --nproc_per_node); "
            "the effective batch stays the same because accumulation grows."
        )


def flat_config(args) -> dict:
    """The arguments as TensorBoard's hparams accept them."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


def files_fingerprint(groups: dict[str, list]) -> dict[str, str]:
    """{"<group> files": "<count> items, <hash>"} for each group (a split, the noise files), for a run's fingerprint.
    An item is a tuple of parts, or one part: a Path by its content (its path relative to the folder all the files
    share, its size, its first, middle and last SAMPLED_BYTES), a NumPy array by its bytes, anything else by its text.
    Content, not place or time: the same data copied to node-local scratch (new paths, new times) is the same data; a
    file replaced under its name is not, even with its size and time kept."""
    items = {name: [item if isinstance(item, tuple) else (item,) for item in group] for name, group in groups.items()}
    files = sorted({os.path.abspath(p) for group in items.values() for item in group for p in item if isinstance(p, Path)})
    root = len(os.path.commonpath(files)) if files else 0
    # 16 threads overlap the waits of a cold disk or a network file system, each on a run of files (a task per file
    # costs more than a warm read); each file is read once, however many items name it.
    run = max(1, -(-len(files) // 16))
    with ThreadPoolExecutor(16) as pool:
        read = pool.map(
            lambda start: [_file_identity(path, root) for path in files[start : start + run]], range(0, len(files), run)
        )
        content = dict(zip(files, (identity for part in read for identity in part), strict=True))
    fingerprint = {}
    for name, group in items.items():
        h = hashlib.sha1()
        for item in group:
            h.update(b"\x1f".join(_item_bytes(part, content) for part in item) + b"\n")
        fingerprint[f"{name} files"] = f"{len(group)} items, {h.hexdigest()[:16]}"
    return fingerprint


def _file_identity(path: str, root: int) -> bytes:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        starts = (0, (size - SAMPLED_BYTES) // 2, size - SAMPLED_BYTES)
        blocks = b"".join(os.pread(f.fileno(), SAMPLED_BYTES, max(0, start)) for start in starts)
    return os.fsencode(path[root:]) + f"|{size}|".encode() + hashlib.sha1(blocks).digest()


def _item_bytes(part, content: dict) -> bytes:
    if isinstance(part, Path):
        return content[os.path.abspath(part)]
    if isinstance(part, np.ndarray):
        return f"{part.dtype}{part.shape}".encode() + part.tobytes()
    return str(part).encode()


def make_loader(dataset, *, batch_size, shuffle, workers, collate_fn=None, drop_last=False, generator=None):
    """A DataLoader that keeps the device fed. A torch.Generator keeps the global RNG (augmentation) untouched when an
    iteration starts, so a resumed run draws the same numbers as an uninterrupted one."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        generator=generator,
    )


class EvenBatches(torch.utils.data.IterableDataset):
    """--streaming: one process's share of a stream in batches, its rows prepared in DataLoader workers and batched here.
    DDP needs every process to take the same number of steps, and datasets' split_dataset_by_node may give processes a
    few rows more or fewer: after each batch the processes agree on the largest, and one short of rows fills its batch
    from its own first rows (training: every row once per epoch, a few of them twice) or with pad(row) rows that
    evaluation drops (every row counted once)."""

    def __init__(self, stream, batch_size: int, workers: int, share: int, collate, pad=None):
        self.stream, self.batch_size, self.workers, self.share, self.collate, self.pad = (
            stream, batch_size, workers, share, collate, pad
        )  # fmt: skip

    def set_epoch(self, epoch: int):
        self.stream.set_epoch(epoch)  # a new shuffle of shards and buffer each epoch, the same on a resume

    def __len__(self):
        return -(-self.share // self.batch_size)

    def __iter__(self):
        workers = min(self.workers, self.stream.n_shards)  # datasets gives each worker whole shards
        # Rows cross from a worker a batch's worth at a time, their tensors as numpy arrays pickled with them: a tensor
        # would cost a shared-memory segment of its own, half of what a worker spends on a one-second clip, and for a
        # streamed image (five tensors) 40% of the images per second a worker delivers.
        chunks = torch.utils.data.DataLoader(
            self.stream, batch_size=self.batch_size, collate_fn=as_arrays, num_workers=workers, generator=torch.Generator()
        )
        rows = itertools.chain.from_iterable(map(as_tensors, chunks))
        first = []
        while True:
            batch = list(itertools.islice(rows, self.batch_size))
            first = first or batch
            largest = int(gather(torch.tensor([len(batch)], device=PartialState().device)).max())
            if not largest:
                return
            if not first:
                raise SystemExit("--streaming: this process was given no rows; use fewer processes or more shards")
            fill = list(itertools.islice(itertools.cycle(first), largest - len(batch)))
            yield self.collate(batch + (fill if self.pad is None else [self.pad(row) for row in fill]))


def as_arrays(rows: list):
    """A worker's rows with their tensors as numpy arrays (pickled with the rows), as_tensors undoes it. A walk of
    our own: accelerate's recursively_apply, which handles every container, cost 5-10 us a row on each side, and
    streamed clips came 20% faster without it."""
    return _converted(rows, torch.Tensor, torch.Tensor.numpy)


def as_tensors(rows: list):
    return _converted(rows, np.ndarray, torch.from_numpy)


def _converted(value, kind: type, convert):
    if isinstance(value, kind):
        return convert(value)
    if isinstance(value, dict):
        return {key: _converted(item, kind, convert) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_converted(item, kind, convert) for item in value)
    return value


def prepared_share(accelerator: Accelerator, stream, prepare, shuffle_buffer: int | None, seed: int, size: int):
    """--streaming: this process's share of a `datasets` IterableDataset (split_dataset_by_node), for training shuffled
    through a seeded buffer (reshuffled by set_epoch), each row turned by prepare, in the DataLoader workers, into the
    dict a batch takes (the stream's own columns are not passed on), or None for a row to leave out."""
    from datasets.distributed import split_dataset_by_node

    columns = stream.column_names
    stream = split_dataset_by_node(stream, accelerator.process_index, accelerator.num_processes)
    if shuffle_buffer:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)

    def prepared(batch: dict) -> dict:
        count = len(next(iter(batch.values())))
        rows = (prepare({column: values[i] for column, values in batch.items()}) for i in range(count))
        kept = [row for row in rows if row is not None]
        return {key: [row[key] for row in kept] for key in kept[0]} if kept else {}

    # `size` rows at a time: a row-by-row map and filter cost as much per row as a cached worker spends on a 1 s clip
    return stream.map(prepared, batched=True, batch_size=size, remove_columns=columns)


def stream_loader(accelerator: Accelerator, stream, batch_size: int, workers: int, rows: int, collate, pad=None):
    """EvenBatches over this process's share of a stream of `rows` rows, in Accelerate's own DataLoader (not prepared,
    which would split the stream again): batches on the device, the end of the epoch known to gradient accumulation,
    skip_first_batches for a resume."""
    share = -(-rows // accelerator.num_processes)
    batches = EvenBatches(stream, batch_size, workers, share, collate, pad)
    # Own generators, as make_loader's: starting an iteration must not draw from the RNG augmentation uses.
    return DataLoaderShard(batches, device=accelerator.device, batch_size=None, generator=torch.Generator())


VAL_NAMES = ("val", "valid", "validation")  # what a dataset may call its validation split


def hub_split_names(available) -> dict[str, str]:
    """Training's split names -> a dataset's (train, the first of VAL_NAMES, test), for those it has."""
    sources = {"train": "train", "val": next((n for n in VAL_NAMES if n in available), None), "test": "test"}
    return {part: source for part, source in sources.items() if source in available}


def dataset_source(name: str) -> str:
    """What --streaming hands `datasets` for --data: a local folder as it is; offline, a Hub id's snapshot in the Hub
    cache (HF_HUB_CACHE, where `hf download --repo-type dataset ID` and load_dataset put its files), when there is one;
    otherwise the name. Offline, `datasets` looks a Hub id up in its own Arrow cache only, which streaming never fills."""
    import datasets
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if os.path.isdir(name) or not datasets.config.HF_HUB_OFFLINE:
        return name
    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):  # not in the Hub cache (or known to be there in part), or not an id
        return name


def open_streams(name: str) -> tuple[dict, dict, dict]:
    """--streaming: a shard folder's or Hub id's splits as `datasets` IterableDatasets, the data files of each, and
    training's split names -> the dataset's. One dataset builder gives the streams and their files."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(dataset_source(name))
        streams, files = builder.as_streaming_dataset(), builder.config.data_files or {}
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise SystemExit(
            f"--data {name} --streaming: not a folder of data files nor a Hugging Face dataset id ({err}). "
            "Make shards with scripts/make_shards.py, or name a Hub dataset that is reachable or cached."
        ) from None
    sources = hub_split_names(streams)
    if {"train", "val"} - set(sources):
        raise SystemExit(
            f"--data {name} --streaming: needs a train and a validation split (has {list(streams)}); a stream cannot "
            "hold part of train out. scripts/make_shards.py writes both."
        )
    return streams, files, sources


def columns_ahead(name: str, columns: list[str], streams: dict) -> dict:
    """Each split's `columns` alone (read ahead, or streamed to the workers): parquet reads those columns only (a 46 MB
    shard folder: 0.04 s instead of 3.6 s); other formats take no column list, and are read whole."""
    import datasets

    try:
        return datasets.load_dataset_builder(dataset_source(name), columns=columns).as_streaming_dataset()
    except (TypeError, ValueError):  # builders without the option refuse it with either
        return {split: stream.select_columns(columns) for split, stream in streams.items()}


def shard_identities(files: list[str]) -> list[tuple]:
    """A stream's data files as files_fingerprint takes them: a local file by its content, a remote one by its name."""
    return [(Path(f),) if Path(f).is_file() else (f,) for f in files]


def stream_order(args) -> dict:
    """What fixes a stream's order besides the seed, for a run's fingerprint: its shuffle buffer, and how its shards
    meet the DataLoader workers. Nothing for a run that does not stream."""
    return {"shuffle_buffer": args.shuffle_buffer, "workers": args.workers} if args.streaming else {}


def stored_file(item: dict):
    """An undecoded Audio or Image value ({"bytes", "path"}) as a file to read: its bytes, or the file it names."""
    return io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]


def add_streaming_args(group, rows: str):
    """--streaming and --shuffle-buffer; rows: what the data holds (clips, images), for the help."""
    group.add_argument(
        "--streaming",
        action="store_true",
        help="read --data's shards while training (scripts/make_shards.py's folder, other data files, or a Hub id) "
        "through datasets' iterable datasets: nothing decoded ahead, no cache",
    )
    shuffle = f"--streaming: training shuffles through this many {rows}"
    group.add_argument("--shuffle-buffer", type=int, default=1000, help=shuffle)


def write_args_json(args, accelerator: Accelerator, plan: BatchPlan, **extra):
    """Every argument as resolved, the batch plan, library versions and the command line."""
    if not accelerator.is_main_process:
        return
    versions = {
        name: sys.modules[name].__version__
        for name in ("torch", "accelerate", "torchvision", "torchaudio")
        if name in sys.modules
    }
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record.update(
        batch_size=plan.batch_size,
        num_processes=plan.processes,
        accumulation_steps=plan.accumulation_steps,
        effective_batch_size=plan.effective_batch_size,
        python=platform.python_version(),
        **versions,
        device=str(accelerator.device),
        distributed_type=str(accelerator.distributed_type),
        mixed_precision=accelerator.mixed_precision,
        command=" ".join(sys.argv),
    )
    write_json(args.output_dir / "args.json", {**record, **extra})


def write_json(path: Path, obj):
    """Write through a temporary file so a crash never leaves half a file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def print_summary(accelerator: Accelerator, title: str, rows: dict):
    width = max(len(k) for k in rows)
    accelerator.print("\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows.items()]))
