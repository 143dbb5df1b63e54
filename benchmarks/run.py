#!/usr/bin/env python
"""`make bench`: launchkit's training scripts against plain baselines, side by side, on this machine.

    .venv/bin/python benchmarks/run.py --output benchmarks/RESULTS.md          # full run, under 10 min on 2 cores
    .venv/bin/python benchmarks/run.py --quick --output /tmp/RESULTS_quick.md  # smoke run, about a minute

One process tree: this script writes the benchmark data once (benchmarks/.work/), then runs
scripts/train_audio.py, scripts/train_detection.py and the baselines in benchmarks/ one after the
other (never at the same time, so they do not share the 2 cores), interleaving baseline and launchkit
repetitions so a noisy neighbour hurts both alike. Throughput is the steady state: the median of
the per-epoch train samples/s of every epoch after the first, over all repetitions. Everything else
(matmul peak, FLOPs per sample, the ResNet-18 step table, the profile, COCO mAP timing) is measured
in this process. RESULTS.md gets the tables, the exact commands and the machine."""

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import compute  # noqa: E402
import datagen  # noqa: E402

PY = sys.executable
BUDGET_SECONDS = 570  # the full run must end within 10 minutes; the optional --compile probe gets what is left

FULL = {
    "reps": 4,
    # Epochs of at least 6 batches: with fewer, the first step after each evaluation (new oneDNN primitives,
    # the first batch from the workers) weighs on the epoch's throughput more than any real dataset would.
    "s1": (320, 32),
    "us8k": (192, 32),
    "det": (96, 16),
    "audio_epochs": {"s1": 3, "us8k": 2},
    "det_epochs": 3,
    "coco_images": 500,
    "coco_reps": 3,
    "knob_steps": 5,
    "compile": True,
}
QUICK = {
    "reps": 1,
    "s1": (64, 16),
    "us8k": (32, 16),
    "det": (32, 8),
    "audio_epochs": {"s1": 2, "us8k": 2},
    "det_epochs": 2,
    "coco_images": 100,
    "coco_reps": 1,
    "knob_steps": 2,
    "compile": False,
    "only_s1_complete": True,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="Markdown report to write")
    p.add_argument("--quick", action="store_true", help="tiny data, one repetition, no --compile probe: a smoke run")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work", help="benchmark data, caches and run folders")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for every run (launchkit's default here)")
    return p.parse_args(argv)


# ================================================================================= running the scripts
class Runner:
    """Runs training scripts as subprocesses and keeps the exact commands for the report."""

    def __init__(self, work: Path):
        self.work = work
        self.commands: list[str] = []
        self.env = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            TQDM_DISABLE="1",
        )

    def run(self, name: str, script: Path, *args) -> dict:
        """Run a script that writes OUTPUT_DIR/results.csv and metrics.json; return its rows, metrics and wall time."""
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [PY, str(script), *map(str, args), "--output-dir", str(out)]
        self.commands.append(" ".join(_short(c) for c in cmd))
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        with (out / "results.csv").open(newline="") as f:
            rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
        print(
            f"  {name}: {wall:.0f} s, samples/s per epoch {[round(r['train_samples_per_second'], 1) for r in rows]}", flush=True
        )
        return {"rows": rows, "metrics": json.loads((out / "metrics.json").read_text()), "wall": wall}


def _short(arg: str) -> str:
    """Commands in the report use repository-relative paths, so they can be pasted into a fresh clone."""
    for base, shown in ((str(REPO) + "/", ""), (PY, ".venv/bin/python")):
        arg = arg.replace(base, shown)
    return arg


def _number(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def steady(runs: list[dict]) -> dict | None:
    """Median train samples/s over every epoch after the first (warm-up) of every run, and the spread."""
    if not runs:
        return None
    values = [r["train_samples_per_second"] for run in runs for r in run["rows"][1:]] or [
        r["train_samples_per_second"] for run in runs for r in run["rows"]
    ]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ================================================================================= the training runs
PIPELINES = ("baseline_fp32", "launchkit_fp32", "launchkit_bf16")
TARGET_PAIR = ("baseline_fp32", "launchkit_bf16")


def training_jobs(work: Path, data: dict, cfg: dict, workers: int) -> tuple[list, list]:
    """(first round, extra repetitions) as groups of jobs (workload, pipeline, script, args) for run_jobs.

    First round per audio workload: launchkit bf16 from an empty cache (cold: it decodes and caches every
    clip), the baseline, launchkit fp32, launchkit bf16 again (warm: the cache is reused). Extra rounds
    repeat the pair the targets are about, baseline then launchkit bf16, for each workload in turn while
    the time budget allows."""
    train_audio, base_audio = REPO / "scripts" / "train_audio.py", HERE / "baseline_audio.py"
    train_det, base_det = REPO / "scripts" / "train_detection.py", HERE / "baseline_detection.py"
    first, pairs = [], []
    for key, clip_seconds in (("s1", 1.0), ("us8k", 4.0)):
        cache = work / "cache" / key
        shutil.rmtree(cache, ignore_errors=True)
        common = [
            "--data",
            data[key],
            "--epochs",
            cfg["audio_epochs"][key],
            "--batch-size",
            32,
            "--workers",
            workers,
            "--seed",
            0,
            "--clip-seconds",
            clip_seconds,
        ]
        # --nominal-batch-size 32: one optimizer step per batch of 32, as the baseline takes.
        lk = [*common, "--nominal-batch-size", 32, "--cache-dir", cache]
        jobs = {
            "baseline_fp32": (base_audio, common),
            "launchkit_fp32": (train_audio, [*lk, "--mixed-precision", "no"]),
            "launchkit_bf16": (train_audio, [*lk, "--mixed-precision", "bf16"]),
        }
        order = ("launchkit_bf16", "baseline_fp32", "launchkit_fp32", "launchkit_bf16")
        if cfg.get("only_s1_complete") and key != "s1":
            order = ("launchkit_bf16", "baseline_fp32")
        first += [(key, pipeline, *jobs[pipeline]) for pipeline in order]
        pairs.append([(key, pipeline, *jobs[pipeline]) for pipeline in TARGET_PAIR])
    common = [
        "--data",
        data["det"],
        "--epochs",
        cfg["det_epochs"],
        "--batch-size",
        16,
        "--workers",
        workers,
        "--seed",
        0,
        "--model",
        "fcos_tiny",
        "--img-size",
        224,
    ]
    jobs = {
        "baseline_fp32": (base_det, common),
        "launchkit_fp32": (train_det, [*common, "--mixed-precision", "no"]),
        "launchkit_bf16": (train_det, [*common, "--mixed-precision", "bf16"]),
    }
    order = (
        ("launchkit_bf16", "baseline_fp32")
        if cfg.get("only_s1_complete")
        else ("launchkit_bf16", "baseline_fp32", "launchkit_fp32")
    )
    first += [("det", pipeline, *jobs[pipeline]) for pipeline in order]
    pairs.append([("det", pipeline, *jobs[pipeline]) for pipeline in TARGET_PAIR])
    return [[job] for job in first], [pair for _ in range(1, cfg["reps"]) for pair in pairs]


def run_jobs(runner: Runner, groups: list[list], runs: dict, deadline: float | None = None) -> int:
    """Run groups of jobs in order; with a deadline, skip a whole group (a baseline / launchkit pair stays
    together) when its jobs' first runs took longer than the time left. Returns the number of jobs skipped."""
    skipped = 0
    for group in groups:
        needed = sum(runs[key][pipeline][0]["wall"] for key, pipeline, *_ in group if runs[key][pipeline])
        if deadline is not None and time.perf_counter() + needed > deadline:
            skipped += len(group)
            continue
        for key, pipeline, script, args in group:
            done = runs[key][pipeline]
            done.append(runner.run(f"{key}_{pipeline}_{len(done)}", script, *args))
    return skipped


def summarise_training(runs: dict) -> dict:
    out = {}
    for key, by_pipeline in runs.items():
        out[key] = {"runs": by_pipeline, "steady": {p: steady(v) for p, v in by_pipeline.items()}}
        if key != "det":
            bf16 = by_pipeline["launchkit_bf16"]
            out[key].update(cold_wall=bf16[0]["wall"], warm_wall=bf16[1]["wall"] if len(bf16) > 1 else float("nan"))
    return out


def cache_timing(data: Path, clip_seconds: float, work: Path, workers: int) -> dict:
    """launchkit's decode-once cache, timed in this process: building it (cold) and opening it again (warm)."""
    import audio_data

    splits = audio_data.load_audio_data(str(data)).splits
    cache = work / "cache" / f"timing_{data.name}"
    shutil.rmtree(cache, ignore_errors=True)
    num_samples = round(clip_seconds * 16000)
    out = {}
    for label in ("cold", "warm"):
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            for split in splits.values():
                audio_data.CachedClips(split, 16000, num_samples, cache, workers)
        out[label] = time.perf_counter() - start
    out["clips"] = sum(len(s.targets) for s in splits.values())
    return out


# ================================================================================= COCO mAP backends
def coco_benchmark(images: int, reps: int) -> dict:
    """The same synthetic predictions (jittered true boxes plus false positives, up to 100 per image, as
    evaluation at a 0.001 score threshold produces) scored by each backend; median seconds."""
    from shared.metrics import load_metric
    from shared.metrics.coco_map.coco_map import coco_dicts, evaluate_coco

    rng = np.random.default_rng(0)
    references, predictions = [], []
    for image_id in range(images):
        n = int(rng.integers(1, 8))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(10, 200, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, 5, n)
        references.append({"image_id": image_id, "boxes": boxes.tolist(), "labels": labels.tolist(), "width": 640, "height": 640})
        fp = 100 - n
        fp_xy = rng.uniform(0, 500, (fp, 2))
        pred_boxes = np.concatenate(
            [boxes + rng.normal(0, 6, boxes.shape), np.concatenate([fp_xy, fp_xy + rng.uniform(5, 150, (fp, 2))], axis=1)]
        )
        predictions.append(
            {
                "image_id": image_id,
                "boxes": pred_boxes.tolist(),
                "scores": np.concatenate([rng.uniform(0.3, 1, n), rng.uniform(0.001, 0.6, fp)]).tolist(),
                "labels": np.concatenate([labels, rng.integers(0, 5, fp)]).tolist(),
            }
        )
    gt, results = coco_dicts(predictions, references)
    metric = load_metric("coco_map")
    out = {"images": images, "detections": len(results)}
    for backend in ("pycocotools", "faster_coco_eval"):
        raw, module = [], []
        for _ in range(reps):
            start = time.perf_counter()
            value = evaluate_coco(gt, results, backend)["map"]
            raw.append(time.perf_counter() - start)
            start = time.perf_counter()
            metric.compute(predictions=predictions, references=references, backend=backend)
            module.append(time.perf_counter() - start)
        out[backend] = {"cocoeval": statistics.median(raw), "module": statistics.median(module), "map": value}
    return out


# ================================================================================= MFU knobs, compile, profile
KNOBS = [  # (label, batch, bf16, channels_last, fused AdamW, tiny-map convolutions as GEMM)
    ("fp32, NCHW, batch 32", 32, False, False, False, False),
    ("fp32, channels_last, batch 32", 32, False, True, False, False),
    ("bf16, NCHW, batch 32", 32, True, False, False, False),
    ("bf16, channels_last, batch 32", 32, True, True, False, False),
    ("bf16, channels_last, batch 32, fused AdamW", 32, True, True, True, False),
    ("bf16, channels_last, batch 32, fused AdamW, tiny-map convs as GEMM (launchkit)", 32, True, True, True, True),
    ("bf16, NCHW, batch 16", 16, True, False, False, False),
    ("bf16, NCHW, batch 64", 64, True, False, False, False),
    ("bf16, NCHW, batch 128", 128, True, False, False, False),
    ("launchkit's settings, batch 16", 16, True, True, True, True),
    ("launchkit's settings, batch 64", 64, True, True, True, True),
]
LAUNCHKIT_KNOB = 5


def knob_step(knob: tuple, compile_model: bool = False, frames: int = 101) -> "compute.ResNetStep":
    _, batch, bf16, channels_last, fused, tiny = knob
    return compute.ResNetStep(batch, bf16, channels_last, compile_model, frames=frames, fused_adamw=fused, tiny_map_convs=tiny)


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


def knob_table(flops_per_clip: float, peaks: dict, steps: int, quick: bool) -> list[dict]:
    knobs = [KNOBS[2], KNOBS[LAUNCHKIT_KNOB]] if quick else KNOBS
    steppers = [knob_step(knob) for knob in knobs]
    rows = []
    for (label, batch, bf16, *_), seconds in zip(knobs, time_steps(steppers, steps), strict=True):
        sps = batch / seconds
        rows.append({"setting": label, "clips_per_s": sps, "mfu": flops_per_clip * sps / peaks["bf16" if bf16 else "fp32"]})
        print(f"  {label}: {sps:.1f} clips/s", flush=True)
    return rows


def ceiling_4s(data: Path, steps: int, clips: int = 48) -> dict:
    """What bounds launchkit / baseline on 4 s clips, from in-process measurements that share no noisy phase
    with the training runs: the two networks alone (1x64x401 log-mels, batch 32, timed in turn) and the
    baseline's per-clip data work (decode, mix to mono, resample, log-mel) on one thread, as a worker does it."""
    import baseline_audio

    plain_fp32, launchkit = KNOBS[0], KNOBS[LAUNCHKIT_KNOB]
    steppers = [knob_step(plain_fp32, frames=401), knob_step(launchkit, frames=401)]
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


def compile_probe(steps: int, timeout: float, work: Path) -> dict:
    """torch.compile of the step with launchkit's settings, in a child process (its compile workers and caches
    stay out of this one)."""
    code = (
        f"import json, sys; sys.path[:0] = [{str(HERE)!r}, {str(REPO / 'scripts')!r}]; import run; "
        f"s = run.knob_step(run.KNOBS[run.LAUNCHKIT_KNOB], compile_model=True); "
        f"sps, warm = s.samples_per_second(warmup=2, steps={steps}); print(json.dumps({{'sps': sps, 'warm': warm}}))"
    )
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"))
    try:
        proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ================================================================================= the report
def machine() -> dict:
    lscpu = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            key, _, value = line.partition(":")
            lscpu[key.strip()] = value.strip()
    import torchaudio
    import torchvision

    flags = lscpu.get("Flags", "")
    return {
        "cpu": lscpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "cores": lscpu.get("Core(s) per socket", "?"),
        "sockets": lscpu.get("Socket(s)", "?"),
        "isa": ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torchaudio": torchaudio.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def module_overhead(c: dict) -> str:
    extra = {backend: c[backend]["module"] - c[backend]["cocoeval"] for backend in ("pycocotools", "faster_coco_eval")}
    if min(extra.values()) <= 0:
        return "the module's own cost (Arrow conversion of the inputs) is within the run-to-run noise here."
    return (
        f"the module adds {extra['pycocotools']:.2f} s (pycocotools) and {extra['faster_coco_eval']:.2f} s "
        "(faster-coco-eval) of Arrow conversion of the inputs."
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def verdict(value: float, target: float) -> str:
    return f"{value:.2f}x vs target {target:g}x: **{'met' if value >= target else 'NOT met'}**"


def write_report(path: Path, r: dict):
    m, peaks = r["machine"], r["peaks"]
    L = [
        "# launchkit benchmark results",
        "",
        f"Generated by `.venv/bin/python benchmarks/run.py{' --quick' if r['quick'] else ''} --output {_short(str(path))}` "
        f"(`make bench`) in {r['wall']:.0f} s{' (QUICK smoke run: tiny data, one repetition)' if r['quick'] else ''}.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cpus']} logical CPUs ({m['sockets']} socket x {m['cores']} cores), ISA: {m['isa']}",
        f"- torch {m['torch']} ({m['threads']} threads), torchvision {m['torchvision']}, "
        f"torchaudio {m['torchaudio']}, Python {m['python']}",
        f"- load average (1 min) at start {r['load'][0]:.2f}, at end {r['load'][1]:.2f} "
        "(other work on the machine slows every row alike; compare ratios, not absolute numbers)",
        f"- measured matmul peak (torch.utils.benchmark, square matrices, best of 1024/2048, best of the measurements at "
        f"start and end): fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s "
        f"({peaks['bf16'] / peaks['fp32']:.1f}x)",
        "",
    ]

    if max(r["load"]) > m["cpus"]:
        L += [
            f"**Warning: the machine was busy** (load average up to {max(r['load']):.1f} on {m['cpus']} CPUs): other "
            "processes took most of the cores, so every figure below is depressed and the ratios are compressed "
            "towards 1x (and bf16, whose oneDNN/AMX kernels suffer most from oversubscribed cores, can fall below fp32). "
            "The matmul peak was measured under the same load, so MFU figures (even some above 100%) and the "
            "target verdicts are not meaningful either. Rerun `make bench` on an otherwise idle machine before quoting them.",
            "",
        ]
    L += ["## Summary against the targets", ""]
    for key, title, target in (
        ("s1", "Audio, 1 s 16 kHz clips", 2),
        ("us8k", "Audio, UrbanSound8K-like clips", 4),
        ("det", "Detection", 1.5),
    ):
        s = r[key]["steady"]
        lk = {p: s[p]["median"] for p in ("launchkit_fp32", "launchkit_bf16") if s[p]}
        best = max(lk, key=lk.get)
        fp32 = f"; fp32 vs fp32: {ratio(lk['launchkit_fp32'], s['baseline_fp32']['median'])}" if "launchkit_fp32" in lk else ""
        L.append(
            f"- {title}: launchkit {best.split('_')[1]} / baseline fp32 = "
            f"{verdict(lk[best] / s['baseline_fp32']['median'], target)}"
            f"{fp32}"
        )
    L.append("")
    c4 = r["ceiling_4s"]
    L += [
        "Where the 4 s target stands on this CPU: the baseline is bound by its network, not by its data work. "
        f"The networks alone (in-process, timed in turn, random 1x64x401 log-mels, batch 32): launchkit's bf16 "
        f"{c4['launchkit_net']:.1f} vs the baseline's fp32 {c4['baseline_net']:.1f} clips/s, "
        f"{ratio(c4['launchkit_net'], c4['baseline_net'])}. The baseline's per-clip data work (decode, mix to mono, "
        f"resample, log-mel; one thread, as in a DataLoader worker) takes {c4['data_ms']:.1f} ms per clip against "
        f"{1e3 / c4['baseline_net']:.1f} ms of network time, {100 * c4['share']:.0f}% of its work. So even with no "
        f"data cost at all, launchkit / baseline is bounded by about {c4['ceiling']:.1f}x here. The 4x target assumes "
        "a machine where decoding dominates (a GPU trains the network many times faster than 2 CPU cores decode "
        "and resample).",
        "",
    ]

    L += [
        "## Training throughput (steady state) and model FLOPs utilisation",
        "",
        "Samples/s: median of the per-epoch train throughput of every epoch after the first, over all repetitions "
        "(`n` epochs; range in brackets). MFU = training FLOPs per sample (torch.utils.flop_counter, forward + backward "
        "of the network; the log-mel frontend and data work are not counted) x samples/s / matmul peak in the run's "
        "precision. Accuracy / mAP: validation, last epoch of the last repetition.",
        "",
        "| workload | pipeline | precision | samples/s | vs baseline | MFU | val accuracy / mAP |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, title, quality in (
        ("s1", "audio 1 s 16 kHz mono", "accuracy"),
        ("us8k", "audio 4 s 44.1/48 kHz stereo 24-bit", "accuracy"),
        ("det", "detection fcos_tiny 224 px", "map"),
    ):
        s, flops, base = r[key]["steady"], r[key]["flops"], r[key]["steady"]["baseline_fp32"]["median"]
        for pipeline, precision in (("baseline_fp32", "fp32"), ("launchkit_fp32", "fp32"), ("launchkit_bf16", "bf16")):
            v = s[pipeline]
            if v is None:
                continue
            q = r[key]["runs"][pipeline][-1]["metrics"]["val"].get(quality)
            L.append(
                f"| {title} | {'baseline (benchmarks/)' if pipeline.startswith('baseline') else 'launchkit'} | {precision} | "
                f"{v['median']:.1f} ({v['min']:.1f}-{v['max']:.1f}, n={v['n']}) | {ratio(v['median'], base)} | "
                f"{100 * flops * v['median'] / peaks[precision]:.1f}% | {q:.3f} |"
            )
    if r["skipped_reps"]:
        L += ["", f"{r['skipped_reps']} planned extra run(s) were skipped to stay within the time budget."]
    L += [
        "",
        f"Training FLOPs per sample: audio 1 s {r['s1']['flops'] / 1e9:.2f} GFLOP (1x64x101 log-mel), "
        f"audio 4 s {r['us8k']['flops'] / 1e9:.2f} GFLOP (1x64x401), "
        f"detection {r['det']['flops'] / 1e9:.2f} GFLOP per 224 px image.",
        "",
    ]

    L += [
        "## Cold vs warm data (launchkit's decode-once cache)",
        "",
        "| data | decode + cache (cold) | reopen cache (warm) | whole run, empty cache | whole run, cache reused | "
        "epoch 1 vs later epochs (samples/s) |",
        "|---|---|---|---|---|---|",
    ]
    for key, title in (("s1", "1 s 16 kHz"), ("us8k", "4 s 44.1/48 kHz stereo 24-bit")):
        c, a = r[key]["cache"], r[key]
        first = a["runs"]["launchkit_bf16"][0]["rows"]
        later = statistics.median(row["train_samples_per_second"] for row in first[1:]) if len(first) > 1 else float("nan")
        warm = f"{a['warm_wall']:.1f} s" if a["warm_wall"] == a["warm_wall"] else "not run"
        L.append(
            f"| {title}, {c['clips']} clips | {c['cold']:.2f} s | {c['warm']:.3f} s | {a['cold_wall']:.1f} s | "
            f"{warm} | {first[0]['train_samples_per_second']:.1f} vs {later:.1f} |"
        )
    L += [
        "",
        "The baseline pays the decode (and resampling) cost in every epoch, inside the DataLoader workers; "
        "launchkit pays it once per dataset and clip settings, before the first epoch, and every later run reuses the "
        "cache. Epoch 1 is slower for both in any case (worker start-up, oneDNN kernel selection).",
        "",
    ]

    c = r["coco"]
    L += [
        "## COCO mAP evaluation time (same predictions)",
        "",
        f"{c['images']} images, {c['detections']} detections (up to 100 per image), median of {r['cfg']['coco_reps']} runs.",
        "",
        "| backend | COCOeval (evaluate + accumulate + summarize) | through launchkit's evaluate module | mAP |",
        "|---|---|---|---|",
    ]
    for backend in ("pycocotools", "faster_coco_eval"):
        b = c[backend]
        L.append(f"| {backend} | {b['cocoeval']:.2f} s | {b['module']:.2f} s | {b['map']:.4f} |")
    L += [
        "",
        f"faster-coco-eval is {ratio(c['pycocotools']['cocoeval'], c['faster_coco_eval']['cocoeval'])} faster on COCOeval; "
        + module_overhead(c),
        "",
    ]

    L += [
        "## What moves MFU: a ResNet-18 training step on 1x64x101 log-mels",
        "",
        f"In-process, random log-mels, AdamW; each setting warmed up with 2 steps, then timed one step each in turn, "
        f"median of {r['cfg']['knob_steps']} steps.",
        "",
        "| setting | clips/s | MFU |",
        "|---|---|---|",
    ]
    for row in r["knobs"]:
        L.append(f"| {row['setting']} | {row['clips_per_s']:.1f} | {100 * row['mfu']:.1f}% |")
    comp = r.get("compile")
    if comp is not None:
        label = "launchkit's settings, batch 32, torch.compile"
        if "sps" in comp:
            L.append(
                f"| {label} | {comp['sps']:.1f} | {100 * r['s1']['flops'] * comp['sps'] / peaks['bf16']:.1f}% "
                f"(compile + 2 warm-up steps: {comp['warm']:.0f} s) |"
            )
        else:
            failed = comp.get("error") or (
                f"did not finish within {comp['timeout']:.0f} s"
                if comp.get("timeout", 0) > 30
                else "skipped: the 10-minute budget was used up by the training runs"
            )
            L.append(f"| {label} | {failed} | |")
    L += ["", "### Where a bf16 step goes (torch.profiler, self CPU time)", ""]
    for title, prof in r["profiles"].items():
        groups, top = prof
        L += [f"{title}:", "", "| part | share |", "|---|---|"]
        L += [f"| {g} | {100 * s:.1f}% |" for g, s in groups]
        L += ["", "Top ops: " + ", ".join(f"`{n}` {100 * s:.1f}%" for n, s in top), ""]

    L += ["## Exact commands", "", "Run in this order by `benchmarks/run.py` (data in benchmarks/.work/):", "", "```"]
    L += r["commands"] + ["```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))


# ================================================================================= main
def main(argv=None):
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    work = args.work_dir / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    r = {"quick": args.quick, "cfg": cfg, "machine": machine(), "load": [os.getloadavg()[0]]}
    print(f"machine: {r['machine']}", flush=True)
    peak_start = {"fp32": compute.matmul_peak(torch.float32), "bf16": compute.matmul_peak(torch.bfloat16)}

    print("data ...", flush=True)
    s1 = datagen.write_audio_set(
        work / "data" / "clips_1s_16k",
        classes=8,
        train=cfg["s1"][0],
        val=cfg["s1"][1],
        seconds=1.0,
        rates=[16000],
        channels=1,
        subtype="PCM_16",
    )
    us8k = datagen.write_audio_set(
        work / "data" / "clips_4s_44k_48k_stereo24",
        classes=8,
        train=cfg["us8k"][0],
        val=cfg["us8k"][1],
        seconds=4.0,
        rates=[44100, 48000],
        channels=2,
        subtype="PCM_24",
        seed=1,
    )
    det = datagen.write_detection_set(work / "data" / "shapes", train=cfg["det"][0], val=cfg["det"][1], size=224)

    runner = Runner(work)
    data = {"s1": s1, "us8k": us8k, "det": det}
    first, extra = training_jobs(work, data, cfg, args.workers)
    runs = {key: {p: [] for p in PIPELINES} for key in data}
    print("training runs, first round ...", flush=True)
    run_jobs(runner, first, runs)

    print("decode cache, FLOPs, COCO backends, ResNet-18 step table, profile ...", flush=True)
    cache = {"s1": cache_timing(s1, 1.0, work, args.workers), "us8k": cache_timing(us8k, 4.0, work, args.workers)}
    from detection_model import build_model

    flops = {
        "s1": compute.classifier_flops_per_sample(compute.audio_resnet18(8), (1, 64, 101), 8),
        "us8k": compute.classifier_flops_per_sample(compute.audio_resnet18(8), (1, 64, 401), 8),
        "det": compute.detection_flops_per_sample(build_model("fcos_tiny", 3, 224), 224),
    }
    r["coco"] = coco_benchmark(cfg["coco_images"], cfg["coco_reps"])
    peak_end = {"fp32": compute.matmul_peak(torch.float32), "bf16": compute.matmul_peak(torch.bfloat16)}
    r["peaks"] = {k: max(peak_start[k], peak_end[k]) for k in peak_start}
    r["knobs"] = knob_table(flops["s1"], r["peaks"], cfg["knob_steps"], args.quick)
    r["ceiling_4s"] = ceiling_4s(us8k, cfg["knob_steps"])
    r["profiles"] = {
        KNOBS[LAUNCHKIT_KNOB][0]: compute.profile_step(knob_step(KNOBS[LAUNCHKIT_KNOB])),
        "bf16, NCHW, batch 32 (plain autocast)": compute.profile_step(knob_step(KNOBS[2])),
    }

    compile_reserve = 75 if cfg["compile"] else 0  # the probe took 46-82 s here; it is skipped if less is left
    print("training runs, more repetitions while time allows ...", flush=True)
    r["skipped_reps"] = run_jobs(runner, extra, runs, deadline=started + BUDGET_SECONDS - compile_reserve)
    r.update(summarise_training(runs))
    for key in data:
        r[key]["flops"] = flops[key]
        if key in cache:
            r[key]["cache"] = cache[key]
    if cfg["compile"]:
        left = BUDGET_SECONDS - (time.perf_counter() - started)
        print(f"torch.compile probe ({left:.0f} s left) ...", flush=True)
        r["compile"] = compile_probe(cfg["knob_steps"], left, work) if left > 30 else {"timeout": max(left, 0)}
    r["commands"] = runner.commands
    r["load"].append(os.getloadavg()[0])
    r["wall"] = time.perf_counter() - started
    write_report(args.output, r)
    (work / "results.json").write_text(json.dumps(r, indent=1, default=str))
    print(f"wrote {args.output} in {r['wall']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
