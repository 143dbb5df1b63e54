"""Leaf helpers for the training loop each script writes out: each does one thing when called; the script steps the
optimizer, saves checkpoints and leaves its loops itself."""

import csv
import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from shared.checkpoint import GracefulStop


@dataclasses.dataclass
class RunState:
    """Where the run stands. Saved in every checkpoint, so a resumed run continues exactly."""

    epoch: int = 0  # the epoch being trained (or the next one, at an epoch end)
    batch_in_epoch: int = 0  # batches of it already trained, over all processes' shards
    step: int = 0  # optimizer steps taken
    best_epoch: int | None = None
    best_fitness: float | list[float] | None = None
    best_val: dict | None = None  # the validation metrics of the best epoch
    stale_epochs: int = 0  # epochs since the best one
    loss_sums: dict = dataclasses.field(default_factory=dict)  # the epoch's loss sums (by sample) before a resume
    loss_samples: int = 0


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only, not on biases and normalisation weights (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_scheduler(optimizer, *, total_steps: int, warmup_steps: int, shape: str = "cosine", final_lr_ratio: float = 0.01):
    """Linear warmup from 0, then cosine or linear decay to final_lr_ratio x lr; or torch's one-cycle. Counted in
    optimizer steps (curves line up across device counts) and stepped by the loop once per optimizer step: it is not
    passed to accelerator.prepare, which would step it once per process."""
    if shape == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=max(total_steps, 2),
            pct_start=max(warmup_steps, 1) / max(total_steps, 2),
            final_div_factor=1 / (25 * final_lr_ratio) if final_lr_ratio else 1e4,
        )
    if shape not in ("cosine", "linear"):
        raise ValueError(f"unknown schedule {shape!r}: use cosine, linear or onecycle")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
        return final_lr_ratio + (1 - final_lr_ratio) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_momentum(optimizer, step: int, warmup_steps: int, start: float, end: float):
    """Ramp SGD momentum (or Adam's beta1) from start to end over the warmup, as the YOLO recipe does."""
    value = end if step >= warmup_steps else start + (end - start) * step / warmup_steps
    for group in optimizer.param_groups:
        if "momentum" in group:
            group["momentum"] = value
        elif "betas" in group:
            group["betas"] = (value, group["betas"][1])


class EpochLosses:
    """The epoch's loss sums (by sample), kept on the device so that no micro-batch waits for the host, from the sums
    a resumed epoch's checkpoint saved. Also counts non-finite losses until agree() reads them."""

    def __init__(self, accelerator: Accelerator, state: RunState):
        self.accelerator, self.state = accelerator, state
        self.names, self.sums = list(state.loss_sums), None
        self.samples = torch.zeros((), device=accelerator.device)
        self.non_finite = torch.zeros((), device=accelerator.device)
        self.started = time.perf_counter()

    def add(self, losses: dict, samples: int):
        values = torch.stack([v.detach().float() for v in losses.values()])
        self.names = list(losses)
        self.sums = values * samples if self.sums is None else self.sums + values * samples
        self.samples += samples
        self.non_finite += (~torch.isfinite(values[0])).float()

    def running_loss(self) -> float:
        """This process's mean first loss since the epoch started or resumed (a host sync: call it rarely)."""
        return self.sums[0].item() / max(self.samples.item(), 1) if self.sums is not None else float("nan")

    def totals(self) -> tuple[dict, int, int]:
        """Sums and samples of the whole epoch over all processes (one all-reduce), and the samples since a resume."""
        sums = self.sums if self.sums is not None else torch.zeros(len(self.names), device=self.samples.device)
        *reduced, trained_now = self.accelerator.reduce(torch.cat([sums, self.samples.view(1)]), "sum").tolist()
        totals = {n: s + self.state.loss_sums.get(n, 0.0) for n, s in zip(self.names, reduced, strict=True)}
        return totals, int(trained_now) + self.state.loss_samples, int(trained_now)

    def summary(self) -> dict:
        """Mean of each loss over the epoch, its wall time and the samples per second trained in it."""
        totals, samples, trained_now = self.totals()
        seconds = time.perf_counter() - self.started
        means = {f"train_{n}": s / max(samples, 1) for n, s in totals.items()}
        return {**means, "seconds": seconds, "train_samples_per_second": trained_now / seconds if seconds > 0 else 0.0}

    def step_scalars(self, lr: float, grad_norm: torch.Tensor) -> dict:
        """What the trackers get every --log-every steps: the epoch's running loss, the LR, the gradient norm before
        clipping and the samples per second of all processes since the epoch started (or resumed)."""
        seconds = time.perf_counter() - self.started
        speed = self.samples.item() * self.accelerator.num_processes / seconds if seconds > 0 else 0.0
        return {
            "step/loss": self.running_loss(),
            "step/lr": lr,
            "step/grad_norm": grad_norm.item(),
            "step/samples_per_second": speed,
        }


class RunClock:
    """The time the whole run has left, at the mean pace (training and evaluation) of the epochs this process ran."""

    def __init__(self, state: RunState, epochs: int):
        self.first, self.epochs, self.started = state.epoch, epochs, time.perf_counter()

    def left(self, epoch: int) -> str:
        seconds = (time.perf_counter() - self.started) / (epoch + 1 - self.first) * (self.epochs - epoch - 1)
        return f"{seconds / 60:.0f} min left" if seconds >= 90 else f"{seconds:.0f} s left"


def capped_warmup(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> tuple[int, str]:
    """The warmup in optimizer steps, at most half the run (a short run would otherwise never reach its peak LR), and
    a note for the start-up summary."""
    asked = round(warmup_epochs * steps_per_epoch)
    steps = min(asked, total_steps // 2)
    return steps, f"{steps} warmup" + (f" (--warmup-epochs asked {asked}: capped at half the run)" if steps < asked else "")


def agree(accelerator: Accelerator, stop: GracefulStop, losses: EpochLosses | None, *, epoch: int, step: int) -> bool:
    """One small all-reduce, at an optimizer step (before it is taken) or an epoch end: stop the run if any process
    saw a non-finite loss since the last call, and return whether any process was asked to stop."""
    bad = losses.non_finite if losses is not None else torch.zeros((), device=accelerator.device)
    flags = torch.stack([bad, torch.tensor(float(stop.requested), device=bad.device)])
    bad_count, stop_count = accelerator.reduce(flags, "sum").tolist()
    if losses is not None:
        losses.non_finite.zero_()
    if bad_count:
        raise SystemExit(
            f"the training loss became NaN or infinite at epoch {epoch + 1}, optimizer step {step} "
            f"({int(bad_count)} micro-batch(es) over all processes); the step was not taken and the last good "
            "checkpoint is kept. Lower the learning rate, check data_report.json, or train without mixed precision; "
            "then continue with --resume."
        )
    return bool(stop_count)


def progress_bar(accelerator: Accelerator, loader, state: RunState, epochs: int) -> tqdm:
    """The main process's bar over the epoch's batches, from where a resumed epoch stands. "disable" is passed only
    where it is off, so that tqdm's own TQDM_DISABLE=1 silences the main process's bar too."""
    quiet = {} if accelerator.is_local_main_process else {"disable": True}
    desc = f"epoch {state.epoch + 1}/{epochs}"
    return tqdm(total=len(loader), initial=state.batch_in_epoch, desc=desc, unit="batch", dynamic_ncols=True, **quiet)


def evaluation_bar(accelerator: Accelerator, loader, desc: str = "evaluating") -> tqdm:
    """The main process's bar over an evaluation's batches, cleared when it ends."""
    quiet = {} if accelerator.is_local_main_process else {"disable": True}
    return tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, **quiet)


def untrained_batches(accelerator: Accelerator, loader, state: RunState):
    """The epoch's batches after those a resumed run already trained on (the sampler is seeded by seed and epoch)."""
    loader.set_epoch(state.epoch)
    return accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader


def mid_epoch_progress(state: RunState, losses: EpochLosses) -> dict:
    """What a checkpoint saved inside an epoch holds: the position and the epoch's loss sums so far."""
    totals, samples, _ = losses.totals()
    return {**dataclasses.asdict(state), "loss_sums": totals, "loss_samples": samples}


def is_best(state: RunState, fitness: float | list[float], val: dict) -> bool:
    """Record the epoch as the best by fitness (a number, or a list compared in order); True when it is."""
    if state.best_fitness is None or fitness > state.best_fitness:
        state.best_epoch, state.best_fitness, state.best_val, state.stale_epochs = state.epoch, fitness, val, 0
        return True
    state.stale_epochs += 1
    return False


def next_epoch(state: RunState) -> dict:
    """Move to the start of the next epoch; returns what its checkpoint holds."""
    state.epoch, state.batch_in_epoch, state.loss_sums, state.loss_samples = state.epoch + 1, 0, {}, 0
    return dataclasses.asdict(state)


def stop_message(where: str, step: int) -> str:
    return f"stopped {where}, optimizer step {step}; checkpoint saved. Continue with the same command plus --resume."


class ResultsLog:
    """results.csv (a row per epoch) and TensorBoard scalars, written by the main process."""

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator, self.path = accelerator, Path(output_dir) / "results.csv"

    def keep_epochs_before(self, epoch: int):
        """On resume, drop the rows of epochs the checkpoint had not finished (the last rows), so no epoch appears
        twice. One truncate: a kill never loses a row."""
        if self.accelerator.is_main_process and self.path.exists():
            kept = sum(int(row["epoch"]) < epoch for row in self.rows())
            if kept:
                os.truncate(self.path, len(b"".join(self.path.read_bytes().splitlines(keepends=True)[: kept + 1])))
            else:
                self.path.unlink()

    def add(self, row: dict, step: int):
        self.accelerator.log(
            {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")}, step=step
        )
        if self.accelerator.is_main_process:
            new = not self.path.exists()
            with self.path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def mean(self, column: str) -> float:
        """Mean of a column over the epochs logged (e.g. training throughput for metrics.json)."""
        values = [float(r[column]) for r in self.rows()]
        return sum(values) / len(values) if values else 0.0

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))
