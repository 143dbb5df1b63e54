"""Learning-rate schedules counted in optimizer steps, so curves line up across device counts."""

import math

import torch


def build_scheduler(optimizer, *, total_steps: int, warmup_steps: int, shape: str = "cosine", final_lr_ratio: float = 0.01):
    """Linear warmup from 0, then cosine or linear decay to final_lr_ratio x lr; or torch's one-cycle.

    The scheduler is stepped once per optimizer step by the training loop (it is not passed to
    accelerator.prepare, which would step it once per process)."""
    if shape == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=max_lrs,
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
