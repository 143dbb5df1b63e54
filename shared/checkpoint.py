"""Resumable checkpoints: accelerate's save_state plus where the run stood, written atomically.

A checkpoint is OUTPUT_DIR/checkpoints/step_<optimizer step, 8 digits>/ holding accelerate's files (model,
optimizer, scaler, RNG states, registered objects such as the scheduler and the EMA) and
progress.json (epoch, batches done in it, optimizer step, identity of the run). It is written
under a temporary name and renamed when complete, so a kill while saving leaves the previous
checkpoint as it was."""

import json
import os
import shutil
import signal
from pathlib import Path

from accelerate import Accelerator

PROGRESS = "progress.json"


class Checkpoints:
    def __init__(self, accelerator: Accelerator, directory: Path, *, keep: int, identity: dict):
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.identity = identity

    def save(self, progress: dict) -> Path:
        """Save on every process (each writes its RNG state); the main process renames and prunes."""
        final = self.directory / f"step_{progress['step']:08d}"
        tmp = self.directory / f".tmp_step_{progress['step']:08d}"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (tmp / PROGRESS).write_text(json.dumps({**progress, "identity": self.identity}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.completed()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def completed(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("step_*") if (p / PROGRESS).is_file())

    def resume(self, resume: str | None) -> dict | None:
        """Load the checkpoint named by --resume ('latest' or a path); return its progress, or None to start fresh."""
        if resume is None:
            return None
        if resume == "latest":
            found = self.completed()
            if not found:
                self.accelerator.print(f"--resume: no checkpoint in {self.directory} yet; starting from scratch")
                return None
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / PROGRESS).is_file():
                raise SystemExit(
                    f"--resume {path}: not a checkpoint folder (no {PROGRESS}); "
                    f"pass one of {self.directory}/step_* or plain --resume for the latest"
                )
        progress = json.loads((path / PROGRESS).read_text())
        self._refuse_foreign(path, progress.pop("identity", {}))
        self.accelerator.load_state(str(path))
        self.accelerator.print(
            f"resumed from {path}: epoch {progress['epoch']}, "
            f"batch {progress['batch_in_epoch']}, optimizer step {progress['step']}"
        )
        return progress

    def _refuse_foreign(self, path: Path, saved: dict):
        for key, value in self.identity.items():
            if key in saved and saved[key] != value:
                raise SystemExit(
                    f"checkpoint {path} was written with {key}={saved[key]!r}, but this run has "
                    f"{key}={value!r}. Resume with the same model and data, or use a new --output-dir."
                )


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

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every process once any process was asked to stop (one small all-reduce)."""
        if self.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()
