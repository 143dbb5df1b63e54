"""The optimizer step every training script takes the same way."""

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import find_executable_batch_size
from tqdm.auto import tqdm


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

    return probe()


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
