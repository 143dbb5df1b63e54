"""Leaf helpers for the training loop each script writes out: where the run stands (RunState, saved in every
checkpoint), the epoch's running losses, the one all-reduce before each optimizer step (non-finite losses, stop
requests), the progress bar, the batches a resume skips, and the best-epoch record. Each does one thing when called;
the script steps the optimizer, saves checkpoints and leaves its loops itself."""

import dataclasses
import time

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


class EpochLosses:
    """The epoch's loss sums (by sample), kept on the device so that no micro-batch waits for the host; a resumed
    epoch starts from the sums its checkpoint saved. Also counts non-finite losses until agree() reads them."""

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
    """The main process's bar over the epoch's batches, starting where a resumed epoch stands."""
    return tqdm(
        total=len(loader),
        initial=state.batch_in_epoch,
        desc=f"epoch {state.epoch + 1}/{epochs}",
        unit="batch",
        dynamic_ncols=True,
        # Passed only where it is off, so that tqdm's own TQDM_DISABLE=1 silences the main process's bar too.
        **({} if accelerator.is_local_main_process else {"disable": True}),
    )


def evaluation_bar(accelerator: Accelerator, loader, desc: str = "evaluating") -> tqdm:
    """The main process's bar over an evaluation's batches, cleared when it ends (TQDM_DISABLE=1 silences it)."""
    quiet = {} if accelerator.is_local_main_process else {"disable": True}
    return tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, **quiet)


def untrained_batches(accelerator: Accelerator, loader, state: RunState):
    """The epoch's batches after those a resumed run already trained on. The sampler is seeded by (seed, epoch):
    the same order for any process count and after a resume."""
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
