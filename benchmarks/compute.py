"""Compute-side measurements: this machine's matmul peak, training FLOPs per sample, a ResNet-18
step under different settings (precision, memory format, batch size, torch.compile), and a profile."""

import statistics
import time
from collections import defaultdict

import torch
import torchvision
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048), min_run_time: float = 0.6) -> float:
    """Best FLOP/s of a square matrix product over a few sizes (torch.utils.benchmark, all threads)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        timer = benchmark.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
        best = max(best, 2 * n**3 / timer.blocked_autorange(min_run_time=min_run_time).median)
    return best


def audio_resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 with a 1-channel stem, the backbone both audio pipelines train."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def training_flops_per_sample(step, batch: int) -> float:
    """FLOPs of one forward + backward (torch.utils.flop_counter), divided by the batch size."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


def classifier_flops_per_sample(model: nn.Module, input_shape, num_classes: int = 10, batch: int = 4) -> float:
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, num_classes, (batch,))

    def step():
        nn.functional.cross_entropy(model(x), y).backward()

    flops = training_flops_per_sample(step, batch)
    model.zero_grad(set_to_none=True)
    return flops


def detection_flops_per_sample(model: nn.Module, img_size: int, batch: int = 2) -> float:
    """A detector in train mode on img_size images with one box each (loss computation included)."""
    images = [torch.rand(3, img_size, img_size) for _ in range(batch)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, img_size / 2, img_size / 2 + 20]]), "labels": torch.tensor([1])}
        for _ in range(batch)
    ]
    model.train()

    def step():
        sum(model(images, targets).values()).backward()

    flops = training_flops_per_sample(step, batch)
    model.zero_grad(set_to_none=True)
    return flops


class ResNetStep:
    """One optimizer step of the audio ResNet-18 on random log-mels, configurable the ways that move MFU."""

    def __init__(
        self,
        batch: int,
        bf16: bool,
        channels_last: bool,
        compile_model: bool,
        frames: int = 101,
        n_mels: int = 64,
        fused_adamw: bool = False,
        tiny_map_convs: bool = False,
    ):
        torch.manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = audio_resnet18().to(memory_format=fmt)
        if tiny_map_convs:
            from audio_model import use_tiny_map_convs  # scripts/ is on sys.path in benchmarks/run.py

            use_tiny_map_convs(self.model)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=fused_adamw or None)
        self.x = torch.randn(batch, 1, n_mels, frames).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 10, (batch,))
        self.bf16, self.batch = bf16, batch

    def __call__(self):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = nn.functional.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def samples_per_second(self, warmup: int, steps: int) -> tuple[float, float]:
        """(median samples/s over `steps` timed steps after `warmup` untimed ones, seconds spent warming up)."""
        start = time.perf_counter()
        for _ in range(warmup):
            self()
        warm = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self()
            times.append(time.perf_counter() - start)
        return self.batch / statistics.median(times), warm


# Where a training step's time goes, by the aten ops that make up each part.
PROFILE_GROUPS = [
    ("convolutions (fwd + bwd)", ("conv", "mkldnn_convolution", "convolution_backward")),
    ("batch norm (fwd + bwd)", ("batch_norm",)),
    ("matmul / linear (with launchkit, also the tiny-map convolutions)", ("addmm", "aten::mm", "aten::bmm", "linear")),
    ("tiny-map convolutions: stacking taps, and its backward", ("aten::stack", "aten::cat", "slice_backward")),
    ("ReLU, pooling, adds", ("relu", "threshold", "pool", "aten::add", "aten::mean", "aten::sum")),
    ("dtype casts and copies (autocast)", ("aten::to", "_to_copy", "copy_", "clone", "contiguous")),
    ("optimizer (AdamW)", ("foreach", "adam", "aten::mul", "aten::div", "aten::sqrt", "aten::lerp", "addcmul", "addcdiv")),
]


def profile_step(step, steps: int = 3) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Self CPU time per group (share of the total) and the top ops, over `steps` profiled steps."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    groups = defaultdict(float)
    for name, t in events:
        lowered = name.lower()
        group = next((g for g, keys in PROFILE_GROUPS if any(k in lowered for k in keys)), "other")
        groups[group] += t / total
    top = sorted(events, key=lambda e: -e[1])[:8]
    return sorted(groups.items(), key=lambda g: -g[1]), [(n, t / total) for n, t in top]
