#!/usr/bin/env python
"""`make bench`: launchkit's training scripts against plain baselines and the peer tools, side by side, on this machine.

    .venv/bin/python benchmarks/run.py --output benchmarks/RESULTS.md          # full run: 10 min, then the peers (hours)
    .venv/bin/python benchmarks/run.py --quick --output /tmp/RESULTS_quick.md  # smoke run, a few minutes
    .venv/bin/python benchmarks/run.py --only peer --peer-epochs 20 --peer-scale 0.5 --output /tmp/RESULTS_peer.md
                                                                               # the peer comparisons only, ~30 min
    .venv/bin/python benchmarks/run.py --only chaos --output /tmp/RESULTS_chaos.md  # kill -9 x 20 only, a few minutes
    .venv/bin/python benchmarks/run.py --only loaders --output /tmp/RESULTS_loaders.md  # input pipelines only, ~20 min
    .venv/bin/python benchmarks/run.py --only streaming --output benchmarks/RESULTS_streaming.md  # 100 k clips, 20 k images

One process tree: this script writes the benchmark data once (benchmarks/.work/), then runs
scripts/train_audio.py, scripts/train_detection.py and the baselines in benchmarks/ one after the
other (never at the same time, so they do not share the 2 cores), interleaving baseline and launchkit
repetitions so a noisy neighbour hurts both alike. Throughput is the steady state: the median of
the per-epoch train samples/s of every epoch after the first, over all repetitions. Everything else
(matmul peak, FLOPs per sample, the ResNet-18 step table, the profile, COCO mAP timing) is measured
in this process. The raw results go to WORK_DIR/{full,quick}/results.json; RESULTS.md (the tables, the
exact commands and the machine) is rendered from that file by benchmarks/report.py.

Modules: training_runs.py (the subprocess runs and the decode cache), resnet_steps.py (in-process step
tables, the 4 s ceiling, profiles, torch.compile), coco_timing.py, serving.py (serve.py under load, export_model.py
parity and latency), compute.py, datagen.py, chaos.py (an audio run SIGKILLed 20 times), streaming.py (the decode
caches against --streaming on 100 k clips and 20 k images), report.py; after those,
the comparisons with the tools users would pick instead on held-out data: peer.py with peer_ultralytics.py and
heldout_detection.py (ultralytics, in its own venv benchmarks/.peer-venv), speech_comparison.py with heldout_speech.py
(the walk-through's audio pipeline)."""

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# benchmarks/ for the modules below, scripts/ and the repository for the launchkit code they import.
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import audio_loaders
import chaos
import coco_timing
import compute
import datagen
import heldout_detection
import heldout_speech
import peer
import report
import resnet_steps
import serving
import speech_comparison
import streaming
import training_runs

BUDGET_SECONDS = 570  # the full run must end within 10 minutes; the optional --compile probe gets what is left
COMPILE_RESERVE_SECONDS = 75  # the probe took 46-82 s here; it is skipped if less is left

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
    "chaos_kills": 20,
    # 100 k one-second clips (3.2 GB as files) and 20 k images of 320 px
    "streaming": {"clips": 100_000, "images": 20_000, "steps": 60, "loader_samples": 1024},
    "serve_clients": 64,  # the serving load: concurrent clients and requests in all, per server
    "serve_requests": 512,
    "peer": {"train": 800, "val": 150, "test": 250, "size": 320, "epochs": [20, 50]},
    # Sources of two kinds, photo-like grain on both; more training images than the peer's mosaic buffer (8 batches).
    "loader": {"train": 400, "sources": {"small": 320, "large": 1600}, "size": 640, "images": 256, "clips": 320, "reps": 3},
    "speech": {"train_speakers": 30, "test_speakers": 20, "takes": 3, "epochs": 15},
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
    "chaos_kills": 3,
    "streaming": {"clips": 600, "images": 240, "steps": 15, "loader_samples": 128},
    "serve_clients": 16,
    "serve_requests": 64,
    "only_s1_complete": True,
    "peer": {"train": 32, "val": 8, "test": 16, "size": 320, "epochs": [1]},
    "loader": {"train": 32, "sources": {"small": 320, "large": 1600}, "size": 640, "images": 32, "clips": 32, "reps": 1},
    "speech": {"train_speakers": 4, "test_speakers": 3, "takes": 2, "epochs": 1},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="Markdown report to write")
    p.add_argument("--quick", action="store_true", help="tiny data, one repetition, no --compile probe: a smoke run")
    p.add_argument("--work-dir", type=Path, default=HERE / ".work", help="benchmark data, caches and run folders")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for every run (launchkit's default here)")
    p.add_argument(
        "--only",
        choices=["all", "peer", "chaos", "loaders", "streaming"],
        default="all",
        help="peer: only the comparisons with the peer tools; chaos: only the kill -9 run; loaders: only the input "
        "pipelines per worker (a part of peer); streaming: only the cached vs --streaming table",
    )
    p.add_argument("--peer-epochs", type=int, nargs="+", help="the detection comparison's epoch counts (default 20 50)")
    p.add_argument("--peer-scale", type=float, default=1.0, help="scale the held-out detection set's image counts")
    return p.parse_args(argv)


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


def matmul_peaks() -> dict:
    return {"fp32": compute.matmul_peak(torch.float32), "bf16": compute.matmul_peak(torch.bfloat16)}


def write_data(work: Path, cfg: dict) -> dict:
    """Each workload's data under WORK/data/, written only when missing or written with other settings."""
    root = work / "data"
    (s1_train, s1_val), (us8k_train, us8k_val), (det_train, det_val) = cfg["s1"], cfg["us8k"], cfg["det"]
    return {
        "s1": datagen.write_audio_set(
            root / "clips_1s_16k",
            classes=8,
            train=s1_train,
            val=s1_val,
            seconds=1.0,
            rates=[16000],
            channels=1,
            subtype="PCM_16",
        ),
        "us8k": datagen.write_audio_set(
            root / "clips_4s_44k_48k_stereo24",
            classes=8,
            train=us8k_train,
            val=us8k_val,
            seconds=4.0,
            rates=[44100, 48000],
            channels=2,
            subtype="PCM_24",
            seed=1,
        ),
        "det": datagen.write_detection_set(root / "shapes", train=det_train, val=det_val, size=224),
    }


def training_flops() -> dict:
    """Training FLOPs per sample of each workload's network at the input size its runs use."""
    from detection_model import build_model

    return {
        "s1": compute.classifier_flops_per_sample(compute.audio_resnet18(8), (1, 64, 101), 8),
        "us8k": compute.classifier_flops_per_sample(compute.audio_resnet18(8), (1, 64, 401), 8),
        "det": compute.detection_flops_per_sample(
            build_model({"model": "fcos_tiny", "labels": ["a", "b", "c"], "img_size": 224}), 224
        ),
    }


def measure_launchkit(args, cfg: dict, work: Path, started: float, results: dict):
    """launchkit's scripts against the plain baselines: throughput, caches, COCO backends, step tables, serving."""
    peaks_at_start = matmul_peaks()

    print("data ...", flush=True)
    data = write_data(work, cfg)
    runner = training_runs.Runner(work)
    first_round, extra_rounds = training_runs.training_jobs(work, data, cfg, args.workers)
    runs = {key: {pipeline: [] for pipeline in training_runs.PIPELINES} for key in data}
    print("training runs, first round ...", flush=True)
    training_runs.run_jobs(runner, first_round, runs)

    print("decode cache, FLOPs, COCO backends, ResNet-18 step table, profile ...", flush=True)
    cache = {
        "s1": training_runs.cache_timing(data["s1"], 1.0, work, args.workers),
        "us8k": training_runs.cache_timing(data["us8k"], 4.0, work, args.workers),
    }
    flops = training_flops()
    results["coco"] = coco_timing.coco_benchmark(cfg["coco_images"], cfg["coco_reps"])
    peaks_at_end = matmul_peaks()
    results["peaks"] = {k: max(peaks_at_start[k], peaks_at_end[k]) for k in peaks_at_start}
    results["knobs"] = resnet_steps.settings_table(flops["s1"], results["peaks"], cfg["knob_steps"], args.quick)
    results["ceiling_4s"] = resnet_steps.ceiling_4s(data["us8k"], cfg["knob_steps"])
    results["profiles"] = resnet_steps.profiles()

    compile_reserve = COMPILE_RESERVE_SECONDS if cfg["compile"] else 0
    print("training runs, more repetitions while time allows ...", flush=True)
    results["skipped_reps"] = training_runs.run_jobs(
        runner, extra_rounds, runs, deadline=started + BUDGET_SECONDS - compile_reserve
    )
    results.update(training_runs.summarise_training(runs))
    for key in data:
        results[key]["flops"] = flops[key]
        if key in cache:
            results[key]["cache"] = cache[key]
    if cfg["compile"]:
        left = BUDGET_SECONDS - (time.perf_counter() - started)
        print(f"torch.compile probe ({left:.0f} s left) ...", flush=True)
        results["compile"] = resnet_steps.compile_probe(cfg["knob_steps"], left, work) if left > 30 else {"timeout": max(left, 0)}
    # After the training budget: the saved models served under load, and exported with a parity check.
    print("serving under load, export with parity ...", flush=True)
    results["serving"] = serving.serving_table(work, data, cfg["serve_clients"], cfg["serve_requests"])
    results["export"] = serving.export_table(work)
    results["commands"] = runner.commands


def compare_with_peers(args, cfg: dict, work: Path, results: dict):
    """The tools users would pick instead, on held-out data: ultralytics for detection (its own venv), the
    walk-through pipeline for audio. Run after everything else: these runs are the long ones."""
    c = dict(cfg["peer"], epochs=args.peer_epochs or cfg["peer"]["epochs"])
    c.update({split: round(c[split] * args.peer_scale) for split in ("train", "val", "test")})
    results["cfg"] = {**cfg, "peer": c}
    print("detection against ultralytics on held-out data ...", flush=True)
    data_yaml = heldout_detection.write_heldout_set(
        work / "data" / "heldout", train=c["train"], val=c["val"], test=c["test"], size=c["size"]
    )
    results["peer"] = peer.comparison(work, data_yaml, c["epochs"], c["size"])
    compare_loaders(cfg, work, results)
    c = cfg["speech"]
    print("audio on unseen speakers ...", flush=True)
    speech = heldout_speech.write_speech_set(
        work / "data" / "speech", train_speakers=c["train_speakers"], test_speakers=c["test_speakers"], takes=c["takes"]
    )
    env = training_runs.Runner(work).env
    results["speech"] = speech_comparison.comparison(work, speech, c["epochs"], args.workers, env)


def compare_loaders(cfg: dict, work: Path, results: dict):
    """The input pipelines per worker: detection on small and large source JPEGs against ultralytics' loader, both
    tools' caches on and off; audio against the walk-through's."""
    c = cfg["loader"]
    print("input pipelines per worker ...", flush=True)
    sets = {}
    for kind, side in c["sources"].items():
        root = work / "data" / f"loader_{side}"
        sets[kind] = (heldout_detection.write_heldout_set(root, train=c["train"], val=8, test=8, size=side, grain=8), side)
    results["loader"] = peer.loader_table(work, sets, c["size"], c["images"], c["reps"])
    results["audio_loader"] = audio_loaders.audio_loader_table(write_data(work, cfg), work, c["clips"], c["reps"])


def main(argv=None):
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    started = time.perf_counter()
    work = args.work_dir / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "quick": args.quick,
        "only": args.only,
        "cfg": cfg,
        "output": training_runs.repo_relative(str(args.output)),
        "machine": machine(),
        "load": [os.getloadavg()[0]],
    }
    print(f"machine: {results['machine']}", flush=True)
    results["commands"] = []
    if args.only == "all":
        measure_launchkit(args, cfg, work, started, results)
    if args.only in ("all", "chaos"):  # after the 10-minute budget, before the long peer runs
        results["chaos"] = chaos.benchmark(work, cfg["chaos_kills"])
    if args.only in ("all", "streaming"):
        results["streaming"] = streaming.benchmark(work, **cfg["streaming"])
    if args.only in ("all", "peer"):
        compare_with_peers(args, cfg, work, results)
    if args.only == "loaders":
        compare_loaders(cfg, work, results)
    results["load"].append(os.getloadavg()[0])
    results["wall"] = time.perf_counter() - started

    # Saved first, so a failing report loses no measurement, and the report is rendered from the saved file,
    # so benchmarks/report.py on it reproduces RESULTS.md exactly.
    saved = work / "results.json"
    saved.write_text(json.dumps(results, indent=1, default=str))
    report.write_report(args.output, json.loads(saved.read_text()))
    print(f"wrote {args.output} in {results['wall']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
