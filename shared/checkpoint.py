"""One run per output folder, and resumable checkpoints that load without unpickling anything.

Not accelerate's save_state: its optimizer, scheduler and RNG files are pickles, and loading a pickle can run any code.
OUTPUT_DIR/checkpoints/step_<optimizer step, 8 digits>/ holds the modules as safetensors, state.pt (state_dicts) and
rng_<process>.pt (plain values and tensors only: read with torch.load(weights_only=True)) and progress.json. It is
renamed into place when complete and renamed again before it is deleted: a kill leaves the others as they were."""

import fcntl
import json
import os
import pickle
import random
import shutil
import signal
import time
import uuid
from fnmatch import fnmatch
from pathlib import Path
from textwrap import shorten

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from shared.runtime import write_json

PROGRESS = "progress.json"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
# What either training script writes at the top of OUTPUT_DIR (fold_K/: a run of --fold all): --overwrite deletes these
# and nothing else. BEFORE_TRAINING is all a run stopped on bad data leaves: a fresh run may take its place.
RUN_OUTPUTS = (
    RUN_FILE, LOCK_FILE, "args.json", "data_report.json", "results.csv", "metrics.json", "cv_metrics.json",
    "*.json.tmp", "results.csv.tmp", "model", "checkpoints", "logs", "fold_[0-9]*", "curves.png", "confusion_matrix.png",
    "labels.png", "val_predictions.png", "predictions_*.json", "ground_truth_*.json", "train_batch0.jpg", "pr_curves.png",
)  # fmt: skip
BEFORE_TRAINING = (RUN_FILE, LOCK_FILE, "args.json", "data_report.json", "*.json.tmp", "logs", "labels.png")


class RunFolder:
    """A fresh run never writes into a folder that holds another run, unless the user says --resume (continue it) or
    --overwrite (delete its outputs first; nothing at all when the folder holds anything else or the --data path)."""

    def __init__(self, accelerator: Accelerator, directory: Path, *, resume: str | None, overwrite: bool, data=None):
        self.directory = Path(directory)
        self._lock = run_id = None
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Held (not closed by a with-block) until this process exits; the kernel drops it if the process dies.
            self._lock = open(self.directory / LOCK_FILE, "a+")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.seek(0)
                owner = self._lock.read().strip() or "another process"
                raise SystemExit(
                    f"{directory} is in use by a live run ({owner}); wait for it to finish or pick another --output-dir"
                ) from None
            self._lock.truncate(0)
            self._lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            self._lock.flush()
            run_id = self._claim(resume, overwrite, data)
        # Every process must name the same run, and only the main process has read the folder.
        self.run_id = broadcast_object_list([run_id])[0] if accelerator.num_processes > 1 else run_id

    def _claim(self, resume: str | None, overwrite: bool, data: str | Path | None) -> str:
        if overwrite:  # checked before anything is deleted: the data trained on and files no run writes are kept
            if data is not None and Path(data).exists() and Path(data).resolve().is_relative_to(self.directory.resolve()):
                raise SystemExit(
                    f"--overwrite refused: --data {data} lies inside --output-dir {self.directory}, which --overwrite "
                    "clears. Nothing was deleted; pick an --output-dir outside the data."
                )
            others = [_shown(p, self.directory) for p in _entries(self.directory, run_outputs=False)]
            if others:
                listed = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
                raise SystemExit(
                    f"--overwrite refused: {self.directory} holds files no run writes: {listed}. --overwrite deletes only "
                    "run outputs (run.json, results.csv, model/, checkpoints/, ...). Nothing was deleted; move those files "
                    "elsewhere, or pick another --output-dir."
                )
            for entry in _entries(self.directory, run_outputs=True):
                if entry.name != LOCK_FILE:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        entries = _entries(self.directory, run_outputs=True)
        held = [_shown(p, self.directory) for p in entries if not any(fnmatch(p.name, x) for x in BEFORE_TRAINING)]
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
        write_json(run_file, {"run_id": run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S")})  # renamed when complete
        return run_id


def _entries(directory: Path, run_outputs: bool) -> list[Path]:
    """The folder's run outputs, or else the entries no run writes (also those inside its fold_K/ runs)."""
    found = []
    for entry in sorted(directory.iterdir()):
        if any(fnmatch(entry.name, pattern) for pattern in RUN_OUTPUTS) == run_outputs:
            found.append(entry)
        elif not run_outputs and entry.name.startswith("fold_") and entry.is_dir():
            found += _entries(entry, False)
    return found


def _shown(path: Path, folder: Path) -> str:
    return f"{path.relative_to(folder)}{'/' if path.is_dir() else ''}"


class Checkpoints:
    """Save and resume one run's `modules` (model, EMA) and `states` (optimizer, scheduler). A checkpoint of another
    run, or with another `fingerprint` (what fixes the sample order and the schedule), is refused."""

    def __init__(self, accelerator: Accelerator, run: RunFolder, *, keep: int, fingerprint: dict, modules=None, states=None):
        self.accelerator, self.run_id, self.fingerprint = accelerator, run.run_id, fingerprint
        self.directory = run.directory / "checkpoints"
        self.keep = max(1, keep)
        self.modules, self.states = modules or {}, states or {}

    def save(self, progress: dict) -> Path:
        """Called on every process (each writes its RNG state); the main process renames and prunes."""
        acc = self.accelerator
        final = self.directory / f"step_{progress['step']:08d}"
        tmp = final.with_name(f".tmp_{final.name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._write_state(tmp)
        kind, keys, *numpy_rest = np.random.get_state()  # its key array as a list: no numpy object in the file
        rng = [random.getstate(), [kind, keys.tolist(), *numpy_rest], torch.get_rng_state(), torch.cuda.get_rng_state_all()]
        torch.save(rng, tmp / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json(tmp / PROGRESS, {**progress, "run_id": self.run_id, "fingerprint": self.fingerprint})
            _discard(final)
            os.replace(tmp, final)
            for old in self.completed()[: -self.keep]:
                _discard(old)
            # What a kill -9 during an earlier save or prune left (this run holds the folder's lock: none is in use).
            for leftover in self.directory.glob(".*_step_*"):
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

    def completed(self, after: int = -1) -> list[Path]:
        """This run's finished checkpoints after step `after`, oldest first: others are never pruned or resumed."""
        found = []
        for path in self.directory.glob("step_*"):
            progress = _read_progress(path)
            if progress["run_id"] == self.run_id and progress["step"] > after:
                found.append((progress["step"], path))
        return [path for _, path in sorted(found)]

    def find(self, resume: str | None) -> tuple[Path, dict] | None:
        """The checkpoint --resume names and its progress. Reads progress.json only: a script calls it before it writes
        anything, so a refused --resume leaves the folder as it was."""
        if resume is None:
            return None
        paths = self.completed() if resume == "latest" else [Path(resume)]
        if not paths:
            return None
        path = paths[-1]
        if not (path / PROGRESS).is_file():
            raise SystemExit(
                f"--resume {path}: not a checkpoint folder (no {PROGRESS}); "
                f"pass one of {self.directory}/step_* or plain --resume for the latest"
            )
        progress = _read_progress(path)
        if progress["run_id"] != self.run_id:
            raise SystemExit(
                f"checkpoint {path} belongs to run {progress['run_id']}, not to run {self.run_id} of "
                f"{self.directory.parent}; resume it into its own output folder, or start this one with --overwrite"
            )
        saved, now = progress.get("fingerprint", {}), self.fingerprint
        differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        if differ:
            lines = "\n".join(
                f"  {k}: {shorten(json.dumps(saved.get(k)), 80)} in the checkpoint, {shorten(json.dumps(now.get(k)), 80)} now"
                for k in differ
            )
            raise SystemExit(
                f"--resume refused: {path} was written with other settings or data, which would change what is "
                f"trained:\n{lines}\nResume with the original arguments (see {self.directory.parent / 'args.json'}), "
                "or start a new run with --overwrite or another --output-dir."
            )
        return path, progress

    def resume(self, resume: str | None) -> dict | None:
        """Load the checkpoint --resume names; return its progress, or None to start fresh."""
        acc = self.accelerator
        found = self.find(resume)
        if found is None:
            if resume is not None:
                acc.print(f"--resume: no checkpoint in {self.directory} yet; starting from scratch")
            return None
        path, progress = found
        for name, module in self.modules.items():
            acc.unwrap_model(module, keep_torch_compile=False).load_state_dict(load_file(path / f"{name}.safetensors"))
        states = _safe_load(path / "state.pt")
        for name, obj in self.states.items():
            obj.load_state_dict(states[name])
        if acc.scaler is not None and "scaler" in states:
            acc.scaler.load_state_dict(states["scaler"])
        if not (path / f"rng_{acc.process_index}.pt").is_file():
            raise SystemExit(
                f"{path} has no RNG state for process {acc.process_index}: it was written by fewer processes, "
                "or the output folder is not on a disk that every machine shares"
            )
        rng = _safe_load(path / f"rng_{acc.process_index}.pt")
        if not isinstance(rng, list) or len(rng) != 4:  # a dict: the layout of the versions before 2026-12
            raise SystemExit(f"{path} was saved by an older version of the scripts; resume it with that version")
        python_rng, numpy_rng, torch_rng, cuda_rngs = rng
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch.set_rng_state(torch_rng)
        torch.cuda.set_rng_state_all(cuda_rngs)
        if acc.is_main_process:
            newer = self.completed(after=progress["step"])
            for old in newer:
                _discard(old)
            if newer:
                acc.print(f"discarded this run's newer checkpoints {', '.join(p.name for p in newer)}")
        acc.wait_for_everyone()
        acc.print(
            f"resumed from {path}: epoch {progress['epoch']}, batch {progress['batch_in_epoch']}, "
            f"optimizer step {progress['step']}"
        )
        return {k: v for k, v in progress.items() if k not in ("run_id", "fingerprint")}


def _read_progress(path: Path) -> dict:
    """A step_* folder is named only when complete: one that cannot be read is named, not skipped for an older one."""
    file = Path(path) / PROGRESS
    try:
        progress = json.loads(file.read_text())
        if not {"run_id", "step", "epoch", "batch_in_epoch"} <= set(progress):
            raise ValueError("a key is missing")
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


class GracefulStop:
    """SIGTERM (preemption) or a first Ctrl-C asks the run to save a checkpoint and exit; a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)
        signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
