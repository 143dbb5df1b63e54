"""Exponential moving average of the weights, on torch.optim.swa_utils.AveragedModel."""

import torch
from torch.optim.swa_utils import AveragedModel


def make_ema(model: torch.nn.Module, decay: float = 0.9999, tau: float = 2000.0) -> AveragedModel:
    """EMA whose decay ramps up as decay x (1 - exp(-updates / tau)), so early weights fade fast.

    Pass the unwrapped model (not the DDP wrapper); buffers (BatchNorm statistics) are averaged too."""

    @torch.no_grad()
    def update(ema_tensors, tensors, num_averaged):
        # num_averaged stays on the device: no host sync per step.
        d = decay * (1 - torch.exp(-(num_averaged.float() + 1) / tau))
        for e, t in zip(ema_tensors, tensors, strict=True):
            if e.is_floating_point():
                e.lerp_(t.to(e.dtype), (1 - d).to(e.dtype))
            else:
                e.copy_(t)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
