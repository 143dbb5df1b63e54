"""The training loop's bookkeeping, the same for every script: where the run stands, the epoch's running losses,
the checks made at each optimizer step, checkpoints when due, and stopping on request. The script keeps the
forward pass, the loss and the evaluation; this module never sees a model's inputs."""

import dataclasses
import time

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from shared.checkpoint import Checkpoints, GracefulStop


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


class TrainingLoop:
    """Used as:

        for epoch in loop.epochs():
            for batch in loop.batches(train_dl):
                with accelerator.accumulate(model):
                    ...forward, loss...
                    accelerator.backward(loss)
                    loop.after_backward({"loss": loss, ...}, samples)
                    optimizer_step(...)
            if loop.stopped:
                break
            ...evaluate; loop.end_epoch(fitness, val); loop.next_epoch()...

    loop.batches skips what a resumed run already trained on, counts optimizer steps, saves a checkpoint every
    --checkpoint-steps, and ends the epoch early once a stop was requested and saved: the script then leaves its
    epoch loop when loop.stopped is set."""

    def __init__(
        self,
        accelerator: Accelerator,
        checkpoints: Checkpoints,
        state: RunState,
        *,
        epochs: int,
        checkpoint_steps: int,
        stop: GracefulStop | None = None,
    ):
        self.accelerator, self.checkpoints, self.state = accelerator, checkpoints, state
        self.num_epochs, self.checkpoint_steps = epochs, checkpoint_steps
        # Several runs in one process share one: a stop asked for between two runs reaches the next one.
        self.stop = stop or GracefulStop()
        self.stopped = False
        self._stop_agreed = False
        self._non_finite = torch.zeros((), device=accelerator.device)  # on the device: no host sync per micro-batch
        self._reset_sums()

    def _reset_sums(self):
        """The loss sums of the micro-batches trained since the epoch started (or was resumed), on the device."""
        self._sums, self._samples, self._started = None, torch.zeros((), device=self.accelerator.device), time.perf_counter()
        self._names = list(self.state.loss_sums)

    def epochs(self):
        """The epochs left to train; a stop requested during an epoch's evaluation ends the run after it."""
        for epoch in range(self.state.epoch, self.num_epochs):
            yield epoch
            if self._agree(epoch=epoch, step=self.state.step):
                self._report_stop(f"after epoch {epoch + 1}")
                return

    def _report_stop(self, where: str):
        self.stopped = True
        self.accelerator.print(
            f"stopped {where}, optimizer step {self.state.step}; checkpoint saved. Continue with the same command plus --resume."
        )

    def batches(self, loader):
        """The epoch's batches after those a resumed run already trained on (the sampler is seeded by (seed, epoch):
        the same order for any process count and after a resume)."""
        epoch, skip = self.state.epoch, self.state.batch_in_epoch
        loader.set_epoch(epoch)
        self._reset_sums()
        bar = tqdm(
            total=len(loader),
            initial=skip,
            desc=f"epoch {epoch + 1}/{self.num_epochs}",
            unit="batch",
            dynamic_ncols=True,
            # One bar, the main process's; passed only where it is off, so that tqdm's TQDM_DISABLE=1 silences it too.
            **({} if self.accelerator.is_local_main_process else {"disable": True}),
        )
        for batch in self.accelerator.skip_first_batches(loader, skip) if skip else loader:
            yield batch
            self.state.batch_in_epoch += 1
            bar.update(1)
            if not self.accelerator.sync_gradients:
                continue
            self.state.step += 1
            if self.state.step % 10 == 0:
                bar.set_postfix(loss=f"{self._sums[0].item() / max(self._samples.item(), 1):.3f}")
            due = bool(self.checkpoint_steps) and self.state.step % self.checkpoint_steps == 0
            if due or self._stop_agreed:
                self.save_checkpoint()
            if self._stop_agreed:
                self._report_stop(f"at epoch {epoch + 1}")
                break
        bar.close()

    def after_backward(self, losses: dict, samples: int):
        """Add the micro-batch's losses to the epoch's sums; on the last micro-batch before an optimizer step,
        agree with every process on non-finite losses (raising before the step is taken) and stop requests."""
        values = torch.stack([v.detach().float() for v in losses.values()])
        self._names = list(losses)
        self._sums = values * samples if self._sums is None else self._sums + values * samples
        self._samples += samples
        self._non_finite += (~torch.isfinite(values[0])).float()
        if self.accelerator.sync_gradients:
            self._stop_agreed = self._agree(epoch=self.state.epoch, step=self.state.step + 1)

    def _agree(self, *, epoch: int, step: int) -> bool:
        """One small all-reduce: did any process see a non-finite loss, or get asked to stop?"""
        flags = torch.stack([self._non_finite, torch.tensor(float(self.stop.requested), device=self._non_finite.device)])
        bad, stop = self.accelerator.reduce(flags, "sum").tolist()
        self._non_finite.zero_()
        if bad:
            raise SystemExit(
                f"the training loss became NaN or infinite at epoch {epoch + 1}, optimizer step {step} "
                f"({int(bad)} micro-batch(es) over all processes); the step was not taken and the last good checkpoint "
                "is kept. Lower the learning rate, check data_report.json, or train without mixed precision; "
                "then continue with --resume."
            )
        return bool(stop)

    def _trained_since_start(self) -> tuple[list[float], int]:
        """Loss sums and samples since the epoch started or resumed, over all processes: one all-reduce."""
        sums = self._sums if self._sums is not None else torch.zeros(len(self._names), device=self._samples.device)
        *reduced, samples = self.accelerator.reduce(torch.cat([sums, self._samples.view(1)]), "sum").tolist()
        return reduced, int(samples)

    def epoch_totals(self) -> tuple[dict, int, int]:
        """Loss sums and sample count of the epoch over all processes, including those before a resume, and the
        samples trained since then."""
        sums, trained_now = self._trained_since_start()
        totals = {n: s + self.state.loss_sums.get(n, 0.0) for n, s in zip(self._names, sums, strict=True)}
        return totals, trained_now + self.state.loss_samples, trained_now

    def epoch_summary(self) -> dict:
        """Mean of each loss over the epoch, with its wall time and the samples per second trained in it."""
        totals, samples, trained_now = self.epoch_totals()
        seconds = time.perf_counter() - self._started
        means = {f"train_{n}": s / max(samples, 1) for n, s in totals.items()}
        return {**means, "seconds": seconds, "train_samples_per_second": trained_now / seconds if seconds > 0 else 0.0}

    def end_epoch(self, fitness: float | list[float], val: dict) -> bool:
        """Track the best epoch by fitness (a number, or a list compared in order); True when this one is the best."""
        state = self.state
        improved = state.best_fitness is None or fitness > state.best_fitness
        if improved:
            state.best_epoch, state.best_fitness, state.best_val, state.stale_epochs = state.epoch, fitness, val, 0
        else:
            state.stale_epochs += 1
        return improved

    def next_epoch(self):
        """Checkpoint at the epoch end: position at the start of the next epoch, no running losses."""
        self.state.epoch += 1
        self.state.batch_in_epoch, self.state.loss_sums, self.state.loss_samples = 0, {}, 0
        self.checkpoints.save(dataclasses.asdict(self.state))

    def save_checkpoint(self):
        """Mid-epoch: the running losses so far go into the checkpoint with the position."""
        totals, samples, _ = self.epoch_totals()
        self.checkpoints.save({**dataclasses.asdict(self.state), "loss_sums": totals, "loss_samples": samples})


def optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, max_grad_norm: float | None = None) -> bool:
    """Call after accelerator.backward inside accelerator.accumulate(model).

    On the last micro-batch of an accumulation window: clip (after unscaling fp16 gradients), step, advance the
    schedule and zero the gradients. Returns True when a step was taken."""
    if not accelerator.sync_gradients:
        return False
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in place
        scheduler.step()
    return True


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only, not on biases and normalisation weights (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- leaf helpers for a loop written in the script
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
