"""launchkit against the detector users would pick instead, ultralytics' `yolo train model=yolov8n.yaml`, on data
neither was tuned on (heldout_detection.py), at equal epochs and at equal wall-clock, and their input pipelines
per worker.

The peer runs in its own virtual environment, benchmarks/.peer-venv, installed here from the package registry
with the pins of benchmarks/peer_requirements.txt and driven through benchmarks/peer_ultralytics.py: launchkit
never imports it. Both tools train from scratch on the same images at the same size with their default
recipes; both tools' test predictions are scored by one evaluator (pycocotools, through launchkit's COCO metric
module) against ground truth built here from the YOLO label files."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from training_runs import repo_relative, timed

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER_VENV = HERE / ".peer-venv"
PEER_PY = PEER_VENV / "bin" / "python"
PEER_PINS = HERE / "peer_requirements.txt"


def ensure_peer_venv() -> Path:
    """The peer's interpreter, (re)installed when its pins changed."""
    stamp = PEER_VENV / ".installed"
    if stamp.exists() and stamp.read_text() == PEER_PINS.read_text():
        return PEER_PY
    shutil.rmtree(PEER_VENV, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)  # a venv of its own, not one inside launchkit's
    subprocess.run([base, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(PEER_PY), "-m", "pip", "install", "--quiet", "-r", str(PEER_PINS)], check=True)
    stamp.write_text(PEER_PINS.read_text())
    return PEER_PY


def peer_env(work: Path) -> dict:
    return dict(os.environ, YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(work / "peer-settings"), PYTHONPATH="")


def launchkit_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")


def fresh_run_dir(work: Path, name: str) -> Path:
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def train_launchkit(work: Path, data_yaml: Path, epochs: int, img_size: int, commands: list) -> dict:
    """launchkit's default command: data, output, epochs (and the shared image size)."""
    out = fresh_run_dir(work, f"launchkit_{epochs}ep")
    cmd = [sys.executable, str(REPO / "scripts" / "train_detection.py"), "--data", str(data_yaml), "--output-dir", str(out),
           "--epochs", str(epochs), "--img-size", str(img_size)]  # fmt: skip
    commands.append(cmd)
    wall = timed(cmd, launchkit_env(), out.parent / f"launchkit_{epochs}ep.log")
    images = {im["id"]: Path(im["file_name"]).name for im in json.loads((out / "ground_truth_test.json").read_text())["images"]}
    predictions = [{**p, "file_name": images[p["image_id"]]} for p in json.loads((out / "predictions_test.json").read_text())]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    curve = [(int(r["epoch"]) + 1, float(r["seconds"]), float(r["val_map"]), float(r["val_map50"])) for r in rows]
    return {"tool": "launchkit", "epochs": epochs, "wall": wall, "predictions": predictions, "curve": spread_over(curve, wall)}


def train_peer(work: Path, data_yaml: Path, epochs: int, img_size: int, commands: list) -> dict:
    out = fresh_run_dir(work, f"peer_{epochs}ep")
    cmd = [str(ensure_peer_venv()), str(HERE / "peer_ultralytics.py"), "train", "--data", str(data_yaml), "--out", str(out),
           "--epochs", str(epochs), "--imgsz", str(img_size)]  # fmt: skip
    commands.append(cmd)
    wall = timed(cmd, peer_env(work), out.parent / f"peer_{epochs}ep.log")
    with (out / "results.csv").open() as f:
        rows = [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]
    # Its `time` column is cumulative; per-epoch durations make it the same shape as launchkit's.
    times = [float(r["time"]) for r in rows]
    durations = [t - prev for t, prev in zip(times, [0.0, *times[:-1]], strict=True)]
    curve = [
        (int(r["epoch"]), d, float(r["metrics/mAP50-95(B)"]), float(r["metrics/mAP50(B)"]))
        for r, d in zip(rows, durations, strict=True)
    ]
    predictions = json.loads((out / "test_predictions.json").read_text())
    return {"tool": "ultralytics", "epochs": epochs, "wall": wall, "predictions": predictions, "curve": spread_over(curve, wall)}


def spread_over(curve: list[tuple], wall: float) -> list[dict]:
    """Per-epoch validation points at the time they were reached: each epoch's own duration (the peer counts its
    validation in it, launchkit does not) scaled so the last point lands on the measured wall time of the run."""
    total = sum(seconds for _, seconds, _, _ in curve) or 1.0
    points, elapsed = [], 0.0
    for epoch, seconds, val_map, val_map50 in curve:
        elapsed += seconds
        points.append({"epoch": epoch, "seconds": wall * elapsed / total, "val_map": val_map, "val_map50": val_map50})
    return points


def test_ground_truth(data_yaml: Path) -> dict:
    """COCO instances of the test split, from the YOLO label files (read once: loading probes every image)."""
    from detection_data import load_data, to_coco

    data = load_data(str(data_yaml))
    return to_coco(data.splits["test"], data.names)


def score(gt: dict, predictions: list[dict]) -> dict:
    """pycocotools mAP of test predictions, matched to images by file name."""
    from metrics.coco_map.coco_map import evaluate_coco

    ids = {Path(im["file_name"]).name: im["id"] for im in gt["images"]}
    results = [
        {"image_id": ids[p["file_name"]], "category_id": p["category_id"], "bbox": p["bbox"], "score": p["score"]}
        for p in predictions
    ]
    summary = evaluate_coco(gt, results, backend="pycocotools")
    return {"map": summary["map"], "map50": summary["map50"]}


def scored(run: dict, gt: dict) -> dict:
    """The run with its test predictions replaced by their score."""
    run["test"] = score(gt, run.pop("predictions"))
    return run


def comparison(work: Path, data_yaml: Path, epochs_list: list[int], img_size: int) -> dict:
    """Both tools at each epoch count, then launchkit again at the peer's shortest run's wall time."""
    commands, runs, gt = [], [], test_ground_truth(data_yaml)
    for epochs in epochs_list:
        for train in (train_peer, train_launchkit):
            print(f"  {train.__name__} {epochs} epochs ...", flush=True)
            runs.append(scored(train(work, data_yaml, epochs, img_size, commands), gt))
    budget_runs = equal_wall_clock_runs(work, data_yaml, gt, runs, img_size, commands)
    plot_curves(runs + budget_runs, work / "peer_curves.png")
    return {"img_size": img_size, "runs": runs, "budget_runs": budget_runs, "plot": str(work / "peer_curves.png"),
            "commands": [" ".join(repo_relative(str(a)) for a in c) for c in commands]}  # fmt: skip


def equal_wall_clock_runs(work, data_yaml, gt, runs, img_size, commands) -> list[dict]:
    """launchkit given the wall time of each peer run: as many epochs as its own seconds per epoch allow."""
    per_epoch = max((r for r in runs if r["tool"] == "launchkit"), key=lambda r: r["epochs"])
    seconds_per_epoch = per_epoch["wall"] / per_epoch["epochs"]
    out = []
    for peer in (r for r in runs if r["tool"] == "ultralytics"):
        epochs = int(peer["wall"] // seconds_per_epoch)
        if epochs <= max(r["epochs"] for r in runs if r["tool"] == "launchkit"):
            continue
        print(f"  launchkit at the peer's {peer['wall']:.0f} s: {epochs} epochs ...", flush=True)
        out.append({**scored(train_launchkit(work, data_yaml, epochs, img_size, commands), gt), "budget_of": peer["epochs"]})
    return out


def plot_curves(runs: list[dict], path: Path):
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        label = f"{run['tool']} {run['epochs']} epochs"
        style = "-" if run["tool"] == "launchkit" else "--"
        xs = [p["epoch"] for p in run["curve"]]
        by_epoch.plot(xs, [p["val_map"] for p in run["curve"]], style, label=label)
        by_time.plot([p["seconds"] for p in run["curve"]], [p["val_map"] for p in run["curve"]], style, label=label)
    by_epoch.set(xlabel="epoch", ylabel="validation mAP50-95", title="per epoch")
    by_time.set(xlabel="seconds of training (2 CPU cores)", ylabel="validation mAP50-95", title="per second")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def launchkit_loader_rate(data_yaml: Path, img_size: int, images: int, cache_dir: Path | None) -> float:
    """Images/s that one worker of train_detection.py's training loader delivers (mosaic, as `--recipe` with `mosaic: 1.0`,
    and every per-image augmentation; colour jitter is not in it: launchkit applies it batched on the device), reading
    its image cache in cache_dir, or with --no-cache when None. The cache is built before the clock starts, as it is
    once per data set and image size."""
    from types import SimpleNamespace

    import audio_loaders
    import train_detection
    from detection_data import detection_datasets, image_loader, load_data

    argv = ["--data", str(data_yaml), "--output-dir", "/nonexistent", "--img-size", str(img_size), "--workers", "1"]
    argv += ["--no-cache"] if cache_dir is None else ["--cache-dir", str(cache_dir)]
    args = train_detection.parse_args(argv)  # the recipe resolved into args
    recipe = {**vars(args), "mosaic": 1.0}  # the same work as the peer's loader, whose mosaic is on
    datasets = detection_datasets(args, load_data(str(data_yaml)), img_size, recipe)
    plan, config = SimpleNamespace(batch_size=16), {"img_size": img_size}
    loader = image_loader(datasets["train"], args, plan, config, shuffle=True)
    return audio_loaders.rate(loader, images)


def peer_loader_rate(work: Path, data_yaml: Path, img_size: int, images: int, cache: str = "off") -> float:
    """The peer's training loader with its image cache "off" (cache=False), in "ram" or on "disk"."""
    cmd = [str(ensure_peer_venv()), str(HERE / "peer_ultralytics.py"), "loader",
           "--data", str(data_yaml), "--imgsz", str(img_size), "--images", str(images), "--cache", cache]  # fmt: skip
    out = subprocess.run(cmd, env=peer_env(work), capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_second"]


def npy_twin(data_yaml: Path) -> Path:
    """A copy of the set for the peer's cache="disk": it writes image.npy beside each image, and reads any it finds in
    every cache mode, so the runs without it must read a folder that never gets one."""
    root = data_yaml.parent
    twin, settings = root.with_name(root.name + "_npy"), (root / ".complete").read_text()
    if not (twin / ".copied").exists() or (twin / ".copied").read_text() != settings:
        shutil.rmtree(twin, ignore_errors=True)
        shutil.copytree(root, twin, ignore=shutil.ignore_patterns("*.cache"))
        (twin / "data.yaml").write_text(data_yaml.read_text().replace(f"path: {root}\n", f"path: {twin}\n"))
        (twin / ".copied").write_text(settings)
    return twin / "data.yaml"


LOADERS = ("launchkit cache", "launchkit no cache", "ultralytics off", "ultralytics ram", "ultralytics disk")


def loader_table(work: Path, sets: dict[str, tuple[Path, int]], img_size: int, images: int, reps: int) -> dict:
    """sets: kind -> (data.yaml, side of its square source images). In each set the loaders of LOADERS (both tools
    with their image caches on and off) in turn, interleaved so that a busy moment hurts all of them; medians of the
    repetitions; ratios of launchkit with its cache to the peer with its faster one, and of both without a cache."""
    import statistics
    from functools import partial

    table = {}
    for kind, (data_yaml, side) in sets.items():
        twin, cache_dir = npy_twin(data_yaml), work / "cache" / f"loader_{kind}"
        measure = {
            "ultralytics off": partial(peer_loader_rate, work, data_yaml, img_size, images, "off"),
            "launchkit no cache": partial(launchkit_loader_rate, data_yaml, img_size, images, None),
            "ultralytics ram": partial(peer_loader_rate, work, data_yaml, img_size, images, "ram"),
            "launchkit cache": partial(launchkit_loader_rate, data_yaml, img_size, images, cache_dir),
            "ultralytics disk": partial(peer_loader_rate, work, twin, img_size, images, "disk"),
        }
        rates = {name: [] for name in LOADERS}
        for rep in range(reps):
            print(f"  {kind} sources, repetition {rep + 1} of {reps} ...", flush=True)
            for name, rate in measure.items():
                rates[name].append(rate())
        m = {name: statistics.median(r) for name, r in rates.items()}
        best_peer = max(("ultralytics ram", "ultralytics disk"), key=m.get)
        jpegs = list((data_yaml.parent / "images" / "train").glob("*.jpg"))
        source = {"side": side, "train": len(jpegs), "kb": sum(f.stat().st_size for f in jpegs) / len(jpegs) / 1024}
        table[kind] = {"source": source, "rates": rates, "median": m, "best_peer_cache": best_peer,
                       "ratio_cached": m["launchkit cache"] / m[best_peer],
                       "ratio_uncached": m["launchkit no cache"] / m["ultralytics off"]}  # fmt: skip
    return {"img_size": img_size, "images": images, "reps": reps, "sets": table}
