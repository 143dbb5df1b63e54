"""ResNet-18 training steps timed in this process (compute.ResNetStep on random log-mels): the table of settings
that move MFU, what bounds launchkit / baseline on 4 s clips, the step profiles and the torch.compile probe.

`import baseline_audio` and compute's `import audio_model` (which imports shared/) resolve because
benchmarks/run.py puts benchmarks/, scripts/ and the repository on sys.path; compile_probe's child does the same."""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import compute
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class StepSettings(NamedTuple):
    label: str
    batch: int
    bf16: bool
    channels_last: bool
    fused_adamw: bool
    tiny_map_convs: bool  # launchkit's convolutions on tiny feature maps as one GEMM


SETTINGS = [
    StepSettings("fp32, NCHW, batch 32", 32, False, False, False, False),
    StepSettings("fp32, channels_last, batch 32", 32, False, True, False, False),
    StepSettings("bf16, NCHW, batch 32", 32, True, False, False, False),
    StepSettings("bf16, channels_last, batch 32", 32, True, True, False, False),
    StepSettings("bf16, channels_last, batch 32, fused AdamW", 32, True, True, True, False),
    StepSettings("bf16, channels_last, batch 32, fused AdamW, tiny-map convs as GEMM (launchkit)", 32, True, True, True, True),
    StepSettings("bf16, NCHW, batch 16", 16, True, False, False, False),
    StepSettings("bf16, NCHW, batch 64", 64, True, False, False, False),
    StepSettings("bf16, NCHW, batch 128", 128, True, False, False, False),
    StepSettings("launchkit's settings, batch 16", 16, True, True, True, True),
    StepSettings("launchkit's settings, batch 64", 64, True, True, True, True),
]
PLAIN_FP32, PLAIN_BF16, LAUNCHKIT = SETTINGS[0], SETTINGS[2], SETTINGS[5]


def resnet_step(settings: StepSettings, compile_model: bool = False, frames: int = 101) -> compute.ResNetStep:
    return compute.ResNetStep(
        settings.batch,
        settings.bf16,
        settings.channels_last,
        compile_model,
        frames=frames,
        fused_adamw=settings.fused_adamw,
        tiny_map_convs=settings.tiny_map_convs,
    )


def time_steps(steppers: list, steps: int) -> list[float]:
    """Median seconds per step of each stepper. All are built and warmed up first, then timed one step each
    in turn, so load from elsewhere on the machine spreads over all of them instead of landing on a few."""
    for step in steppers:
        step()
        step()
    times = [[] for _ in steppers]
    for _ in range(steps):
        for i, step in enumerate(steppers):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def settings_table(flops_per_clip: float, peaks: dict, steps: int, quick: bool) -> list[dict]:
    """Clips/s and MFU of every row of SETTINGS (a --quick run: plain bf16 and launchkit's settings only)."""
    table = [PLAIN_BF16, LAUNCHKIT] if quick else SETTINGS
    rows = []
    for settings, seconds in zip(table, time_steps([resnet_step(s) for s in table], steps), strict=True):
        sps = settings.batch / seconds
        mfu = flops_per_clip * sps / peaks["bf16" if settings.bf16 else "fp32"]
        rows.append({"setting": settings.label, "clips_per_s": sps, "mfu": mfu})
        print(f"  {settings.label}: {sps:.1f} clips/s", flush=True)
    return rows


def ceiling_4s(data: Path, steps: int, clips: int = 48) -> dict:
    """What bounds launchkit / baseline on 4 s clips, from in-process measurements that share no noisy phase
    with the training runs: the two networks alone (1x64x401 log-mels, batch 32, timed in turn) and the
    baseline's per-clip data work (decode, mix to mono, resample, log-mel) on one thread, as a worker does it."""
    import baseline_audio

    steppers = [resnet_step(PLAIN_FP32, frames=401), resnet_step(LAUNCHKIT, frames=401)]
    baseline_net, launchkit_net = (s.batch / t for s, t in zip(steppers, time_steps(steppers, steps), strict=True))
    args = baseline_audio.parse_args(["--data", str(data), "--output-dir", "-", "--clip-seconds", "4"])
    items, _ = baseline_audio.list_clips(data / "train")
    dataset = baseline_audio.ClipDataset(items[:clips], args, train=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    data_seconds = (time.perf_counter() - start) / len(dataset)
    torch.set_num_threads(threads)
    share = data_seconds / (data_seconds + 1 / baseline_net)
    print(
        f"  4 s clips: networks alone fp32 {baseline_net:.1f}, launchkit {launchkit_net:.1f} clips/s; "
        f"baseline data work {1e3 * data_seconds:.1f} ms/clip",
        flush=True,
    )
    return {
        "baseline_net": baseline_net,
        "launchkit_net": launchkit_net,
        "data_ms": 1e3 * data_seconds,
        "share": share,
        "ceiling": launchkit_net / baseline_net / (1 - share),
    }


def profiles() -> dict:
    """Where a bf16 step's time goes, with launchkit's settings and with plain autocast."""
    return {
        LAUNCHKIT.label: compute.profile_step(resnet_step(LAUNCHKIT)),
        "bf16, NCHW, batch 32 (plain autocast)": compute.profile_step(resnet_step(PLAIN_BF16)),
    }


def compile_probe(steps: int, timeout: float, work: Path) -> dict:
    """torch.compile of the step with launchkit's settings, in a child process (its compile workers and caches
    stay out of this one)."""
    code = (
        f"import json, sys; sys.path[:0] = [{str(HERE)!r}, {str(REPO / 'scripts')!r}, {str(REPO)!r}]; import resnet_steps; "
        f"s = resnet_steps.resnet_step(resnet_steps.LAUNCHKIT, compile_model=True); "
        f"sps, warm = s.samples_per_second(warmup=2, steps={steps}); print(json.dumps({{'sps': sps, 'warm': warm}}))"
    )
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"))
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
