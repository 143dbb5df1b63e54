"""The optimizer step every training script takes the same way."""

import torch
from accelerate import Accelerator


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
