"""One run per output folder, resumable checkpoints without pickles, and preemption that ends in a checkpoint.

OUTPUT_DIR/run.json names the run (a random id) that owns the folder; OUTPUT_DIR/.lock is held by the
run's main process while it lives. A checkpoint is OUTPUT_DIR/checkpoints/step_<optimizer step, 8 digits>/:

    model.safetensors, ema.safetensors   the nn.Modules (safetensors: tensors only, nothing to execute)
    state.pt                              optimizer, scheduler and grad-scaler state_dicts
    rng_<process>.pt                      each process's Python, NumPy and torch RNG states
    progress.json                         where the run stood, its run id and its fingerprint

The .pt files hold plain tensors, numbers and containers and are read with torch.load(weights_only=True),
which refuses anything else; nothing on the load path unpickles arbitrary objects. A checkpoint is written
under a temporary name and renamed when complete, and renamed again before it is deleted, so a kill while saving or
pruning leaves the others as they were, and a step_* folder that cannot be read was changed afterwards."""

import fcntl
import json
import os
import pickle
import random
import shutil
import signal
import socket
import time
import uuid
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

PROGRESS = "progress.json"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# Everything either training script writes at the top of OUTPUT_DIR (fold_K/: a run of --fold all), as fnmatch
# patterns: --overwrite deletes these and nothing else.
RUN_OUTPUTS = (
    RUN_FILE, LOCK_FILE, "args.json", "data_report.json", "results.csv", "metrics.json", "cv_metrics.json",
    "*.json.tmp", "results.csv.tmp", "model", "checkpoints", "logs", "fold_[0-9]*", "curves.png", "confusion_matrix.png",
    "labels.png", "val_predictions.png", "predictions_*.json", "ground_truth_*.json",
)  # fmt: skip
# Written before the first epoch, so all a run stopped on bad data leaves: a fresh run may take their place.
BEFORE_TRAINING = (RUN_FILE, LOCK_FILE, "args.json", "data_report.json", "*.json.tmp", "logs", "labels.png")


class RunFolder:
    """The output folder of one run. A fresh run never writes into a folder that holds another run:
    it stops unless the user says --resume (continue that run) or --overwrite (delete it first). --overwrite deletes
    only run outputs, and nothing at all when the folder holds anything else or `data` (the --data path)."""

    def __init__(
        self, accelerator: Accelerator, directory: Path, *, resume: str | None, overwrite: bool, data: str | Path | None = None
    ):
        self.directory = Path(directory)
        self._lock = None
        run_id = None
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = _hold_lock(self.directory)
            run_id = self._claim(resume, overwrite, data)
        # Every process must name the same run, and only the main process has read the folder.
        self.run_id = broadcast_object_list([run_id])[0] if accelerator.num_processes > 1 else run_id

    def _claim(self, resume: str | None, overwrite: bool, data: str | Path | None) -> str:
        if overwrite:
            self._refuse_to_delete_others(data)
            self._clear()
        held = self.held_run()
        if held and resume is None:
            raise SystemExit(
                f"{self.directory} already holds a run ({', '.join(held)}). Continue it with --resume, "
                "start it again from scratch with --overwrite (deletes its outputs), or pick another --output-dir."
            )
        run_file = self.directory / RUN_FILE
        if resume is not None and run_file.is_file():
            return json.loads(run_file.read_text())["run_id"]
        if held:  # outputs without a run.json (a model/ copied in, an older version's run): nothing to resume
            raise SystemExit(f"{self.directory} holds a run ({', '.join(held)}) that --resume cannot continue; use --overwrite")
        run_id = uuid.uuid4().hex[:12]
        tmp = run_file.with_suffix(".json.tmp")  # renamed when complete: a kill never leaves half a run.json
        tmp.write_text(json.dumps({"run_id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2) + "\n")
        os.replace(tmp, run_file)
        return run_id

    def held_run(self) -> list[str]:
        """The run outputs in the folder that show a run got past its start (see BEFORE_TRAINING)."""
        return [_shown(p, self.directory) for p in _run_outputs(self.directory) if not _matches(p.name, BEFORE_TRAINING)]

    def _refuse_to_delete_others(self, data: str | Path | None):
        """Checked before anything is deleted: the data trained on, and files no run writes, are never deleted."""
        if data is not None and Path(data).exists() and _inside(Path(data), self.directory):
            raise SystemExit(
                f"--overwrite refused: --data {data} lies inside --output-dir {self.directory}, which --overwrite clears. "
                "Nothing was deleted; pick an --output-dir outside the data."
            )
        others = _not_run_outputs(self.directory)
        if others:
            names = [_shown(p, self.directory) for p in others]
            listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise SystemExit(
                f"--overwrite refused: {self.directory} holds files no run writes: {listed}. --overwrite deletes only run "
                "outputs (run.json, results.csv, model/, checkpoints/, ...). Nothing was deleted; move those files "
                "elsewhere, or pick another --output-dir."
            )

    def _clear(self):
        for entry in _run_outputs(self.directory):
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)


def _run_outputs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if _matches(p.name, RUN_OUTPUTS))


def _not_run_outputs(directory: Path) -> list[Path]:
    """Entries of the folder no run writes, also inside its fold_K/ runs."""
    found = []
    for entry in sorted(directory.iterdir()):
        if not _matches(entry.name, RUN_OUTPUTS):
            found.append(entry)
        elif entry.name.startswith("fold_") and entry.is_dir():
            found += _not_run_outputs(entry)
    return found


def _shown(path: Path, folder: Path) -> str:
    return f"{path.relative_to(folder)}{'/' if path.is_dir() else ''}"


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _hold_lock(directory: Path):
    """An exclusive lock on OUTPUT_DIR/.lock for the life of this process (the kernel drops it if we die)."""
    handle = open(directory / LOCK_FILE, "a+")  # held open (not closed by a with-block) until the process exits
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        raise SystemExit(
            f"{directory} is in use by a live run ({owner}); wait for it to finish or pick another --output-dir"
        ) from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


class Checkpoints:
    """Save and resume the state of one run. `modules` are saved as safetensors (model, EMA), `states`
    through their state_dict (optimizer, scheduler). `fingerprint` holds everything that fixes the sample
    order and the schedule; a checkpoint written with a different one is refused, with the differences."""

    def __init__(self, accelerator: Accelerator, run: RunFolder, *, keep: int, fingerprint: dict, modules: dict, states: dict):
        self.accelerator = accelerator
        self.run_id = run.run_id
        self.directory = run.directory / "checkpoints"
        self.keep = max(1, keep)
        self.fingerprint = fingerprint
        self.modules, self.states = modules, states

    def save(self, progress: dict) -> Path:
        """Save on every process (each writes its RNG state); the main process renames and prunes."""
        acc = self.accelerator
        final = self.directory / f"step_{progress['step']:08d}"
        tmp = self.directory / f".tmp_step_{progress['step']:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._write_state(tmp)
        torch.save(_rng_state(), tmp / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            record = {**progress, "run_id": self.run_id, "fingerprint": self.fingerprint}
            (tmp / PROGRESS).write_text(json.dumps(record, indent=2) + "\n")
            _discard(final)
            os.replace(tmp, final)
            for old in self.completed()[: -self.keep]:
                _discard(old)
            # What a kill -9 during an earlier save or prune left (this run holds the folder's lock: none is in use).
            for leftover in [*self.directory.glob(".tmp_step_*"), *self.directory.glob(".discarded_step_*")]:
                shutil.rmtree(leftover, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _write_state(self, folder: Path):
        for name, module in self.modules.items():
            state = self.accelerator.unwrap_model(module, keep_torch_compile=False).state_dict()
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / f"{name}.safetensors")
        states = {name: obj.state_dict() for name, obj in self.states.items()}
        if self.accelerator.scaler is not None:
            states["scaler"] = self.accelerator.scaler.state_dict()
        torch.save(states, folder / "state.pt")

    def completed(self) -> list[Path]:
        """This run's finished checkpoints, oldest first. Interrupted saves and other runs' checkpoints are ignored,
        so pruning and "latest" never touch them; an unreadable step_* folder stops the run, named."""
        found = []
        for path in self.directory.glob("step_*"):
            progress = _read_progress(path)
            if progress["run_id"] == self.run_id:
                found.append((progress["step"], path))
        return [path for _, path in sorted(found)]

    def resume(self, resume: str | None) -> dict | None:
        """Load the checkpoint named by --resume ('latest' or a path); return its progress, or None to start fresh."""
        if resume is None:
            return None
        path = self._find(resume)
        if path is None:
            self.accelerator.print(f"--resume: no checkpoint in {self.directory} yet; starting from scratch")
            return None
        progress = _read_progress(path)
        self._refuse_other_runs(path, progress)
        self._load_state(path)
        if self.accelerator.is_main_process:
            self._discard_newer_than(progress["step"])
        self.accelerator.wait_for_everyone()
        self.accelerator.print(
            f"resumed from {path}: epoch {progress['epoch']}, batch {progress['batch_in_epoch']}, "
            f"optimizer step {progress['step']}"
        )
        return {k: v for k, v in progress.items() if k not in ("run_id", "fingerprint")}

    def _find(self, resume: str) -> Path | None:
        if resume == "latest":
            found = self.completed()
            return found[-1] if found else None
        path = Path(resume)
        if not (path / PROGRESS).is_file():
            raise SystemExit(
                f"--resume {path}: not a checkpoint folder (no {PROGRESS}); "
                f"pass one of {self.directory}/step_* or plain --resume for the latest"
            )
        return path

    def _refuse_other_runs(self, path: Path, progress: dict):
        if progress.get("run_id") != self.run_id:
            raise SystemExit(
                f"checkpoint {path} belongs to run {progress.get('run_id')}, not to run {self.run_id} of "
                f"{self.directory.parent}; resume it into its own output folder, or start this one with --overwrite"
            )
        saved = progress.get("fingerprint", {})
        differ = sorted(k for k in saved.keys() | self.fingerprint.keys() if saved.get(k) != self.fingerprint.get(k))
        if differ:
            lines = "\n".join(
                f"  {k}: {_short(saved.get(k))} in the checkpoint, {_short(self.fingerprint.get(k))} now" for k in differ
            )
            raise SystemExit(
                f"--resume refused: {path} was written with other settings or data, which would change what is "
                f"trained:\n{lines}\nResume with the original arguments (see {self.directory.parent / 'args.json'}), "
                "or start a new run with --overwrite or another --output-dir."
            )

    def _load_state(self, path: Path):
        acc = self.accelerator
        for name, module in self.modules.items():
            acc.unwrap_model(module, keep_torch_compile=False).load_state_dict(load_file(path / f"{name}.safetensors"))
        states = _safe_load(path / "state.pt")
        for name, obj in self.states.items():
            obj.load_state_dict(states[name])
        if acc.scaler is not None and "scaler" in states:
            acc.scaler.load_state_dict(states["scaler"])
        rng = path / f"rng_{acc.process_index}.pt"
        if not rng.is_file():
            raise SystemExit(
                f"{path} has no RNG state for process {acc.process_index}: it was written by fewer processes, "
                "or the output folder is not on a disk that every machine shares"
            )
        _set_rng_state(_safe_load(rng))

    def _discard_newer_than(self, step: int):
        newer = [p for p in self.completed() if _read_progress(p)["step"] > step]
        for path in newer:
            _discard(path)
        if newer:
            self.accelerator.print(f"discarded this run's newer checkpoints {', '.join(p.name for p in newer)}")


def refuse_other_checkpoint(run: RunFolder, resume: str | None, fingerprint: dict):
    """What Checkpoints.resume refuses, refused from progress.json alone: a script calls this before it decodes data
    or writes anything (logs/, data_report.json), so that a refused --resume leaves the folder as it was."""
    if resume is None:
        return
    checkpoints = Checkpoints(None, run, keep=1, fingerprint=fingerprint, modules={}, states={})
    path = checkpoints._find(resume)
    if path is not None:
        checkpoints._refuse_other_runs(path, _read_progress(path))


def _read_progress(path: Path) -> dict:
    """A step_* folder gets its name only when its save is complete, so a progress.json that cannot be read was
    changed afterwards (or written by another version): stop and name it, rather than fall back to an older one."""
    file = Path(path) / PROGRESS
    try:
        progress = json.loads(file.read_text())
        missing = [k for k in ("run_id", "step", "epoch", "batch_in_epoch") if k not in progress]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (OSError, ValueError, TypeError) as err:
        raise SystemExit(
            f"checkpoint {path} is damaged: {file} cannot be read ({err}). Checkpoints are named step_* only once "
            "complete, so it was changed after it was saved. Delete the folder (or restore the file), then run again."
        ) from None
    return progress


def _discard(checkpoint: Path):
    """Rename, then delete: a kill half way through never leaves a damaged step_* folder."""
    doomed = checkpoint.with_name(f".discarded_{checkpoint.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    if checkpoint.exists():
        os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _safe_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SystemExit(
            f"{path} holds objects other than tensors and plain values, so it was not loaded (loading it could run "
            f"code). It was not written by this version of the scripts; start the run again with --overwrite. ({err})"
        ) from None


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rng_state() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(saved: dict):
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


class GracefulStop:
    """SIGTERM (preemption) or a first Ctrl-C asks the run to save a checkpoint and exit; a second Ctrl-C aborts.
    Before it is installed SIGTERM ends the process at once; shared.preemption, called first by each training
    script, has a one-process `accelerate launch` send it to the script when the launcher dies."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)
        signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
