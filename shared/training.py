"""The optimizer step every training script takes the same way, and the checks made at each one."""

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import find_executable_batch_size
from tqdm.auto import tqdm

from shared.checkpoint import GracefulStop


class StepGuard:
    """Non-finite losses and stop requests, agreed by all processes with one small all-reduce per optimizer
    step. Checked before the step is taken, so a NaN never reaches the weights or a checkpoint."""

    def __init__(self, accelerator: Accelerator, stop: GracefulStop):
        self.accelerator, self.stop = accelerator, stop
        self.non_finite = torch.zeros((), device=accelerator.device)  # on the device: no host sync per micro-batch

    def add(self, loss: torch.Tensor):
        self.non_finite += (~torch.isfinite(loss.detach())).float()

    def stop_agreed(self, *, epoch: int, step: int) -> bool:
        """Raise if any process saw a non-finite loss since the last call; True when any process was asked to stop."""
        flags = torch.stack([self.non_finite, torch.tensor(float(self.stop.requested), device=self.non_finite.device)])
        bad, stop = self.accelerator.reduce(flags, "sum").tolist()
        self.non_finite.zero_()
        if bad:
            raise SystemExit(
                f"the training loss became NaN or infinite at epoch {epoch + 1}, optimizer step {step} "
                f"({int(bad)} micro-batch(es) over all processes); the step was not taken and the last good checkpoint "
                "is kept. Lower the learning rate, check data_report.json, or train without mixed precision; "
                "then continue with --resume."
            )
        return bool(stop)


def optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, ema=None, max_grad_norm: float | None = None) -> bool:
    """Call after accelerator.backward inside accelerator.accumulate(model).

    On the last micro-batch of an accumulation window: clip (after unscaling fp16 gradients), step,
    advance the schedule, update the EMA and zero the gradients. Returns True when a step was taken."""
    if not accelerator.sync_gradients:
        return False
    if max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in place
        scheduler.step()
    if ema is not None:
        ema.update_parameters(accelerator.unwrap_model(model))
    return True


def throughput(samples: int, seconds: float) -> float:
    return samples / seconds if seconds > 0 else 0.0


def unwrap_for_saving(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def largest_batch_size(args, training_step) -> int:
    """--batch-size auto: the largest batch, halving from --nominal-batch-size, for which
    training_step(batch_size, device, autocast_dtype) -- one forward and backward pass -- fits in GPU memory
    (accelerate's find_executable_batch_size). A CPU has no memory limit to probe: there the start value is used."""
    device = PartialState(cpu=args.cpu).device
    if device.type == "cpu":
        return args.nominal_batch_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision or "no", torch.float32)

    @find_executable_batch_size(starting_batch_size=args.nominal_batch_size)
    def probe(batch_size):
        training_step(batch_size, device, dtype)
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


def epoch_bar(accelerator: Accelerator, *, epoch: int, epochs: int, total: int, done: int = 0):
    """The per-epoch progress bar, on the first process of each machine only; `done` batches were resumed past."""
    return tqdm(
        total=total,
        initial=done,
        desc=f"epoch {epoch + 1}/{epochs}",
        unit="batch",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
