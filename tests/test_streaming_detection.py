"""train_detection.py --streaming: shards (parquet, arrow, WebDataset) read while training. Two processes with two
DataLoader workers each see every training image in an epoch (a filler row or two aside) and every evaluation image
exactly once, each with its own ground truth; a run stopped mid-epoch (mosaic from the workers' recent images,
multi-scale, accumulation) and resumed ends as the uninterrupted run; a streamed run learns, and its mAP is the cached
path's on the same shards; arrow and WebDataset files stream the same images as parquet."""

import collections
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import datasets
import detection_data
import make_shards
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, free_port, run_script, script_env
from test_audio_train import ONE_THREAD, parameters, results_without_timing, stopped_at_first_checkpoint

SIZE = 64
COVERAGE = """
import hashlib, json, sys
sys.path[:0] = [{scripts!r}, {repo!r}]
from accelerate import Accelerator
import detection_data as dd

accelerator = Accelerator(cpu=True)
data = dd.load_data({shards!r}, streaming=True)
recipe = {{"fliplr": 0.5, "scale": 0.5, "min_box_size": 2.0, "mosaic": 1.0, "translate": 0.1}}
seen = {{}}
for name, samples in data.splits.items():
    train = name == "train"
    transform = dd.train_transform({size}, recipe) if train else dd.eval_transform({size})
    mosaic = dd.Mosaic({size}, recipe, until_epoch=5) if train else None
    images = dd.StreamedImages(samples, data.streams[name], {size} if train else None, transform=transform, mosaic=mosaic)
    loader = images.loader(accelerator, 4, 2, 8 if train else None, 0, dd.make_collate({size}, channels_last=train))
    images.set_epoch(1)
    loader.set_epoch(1)
    seen[name] = [
        [t["image_id"], hashlib.sha1(image[:, : t["size"][0], : t["size"][1]].contiguous().numpy().tobytes()).hexdigest()]
        for batch, targets in loader
        for image, t in zip(batch, targets)
        if t["image_id"] != dd.PADDING
    ]
json.dump(seen, open({out!r} + f"/{{accelerator.process_index}}.json", "w"))
accelerator.end_training()
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """30 training images in 4 shards of 7-8 rows (two processes get 16 and 14), 7 val and 3 test in one shard each
    (split by row: 4 and 3, 2 and 1)."""
    return shards_of_shapes(tmp_path_factory.mktemp("det_stream"), (30, 7, 3), size=96, rows_per_shard=8)


def shards_of_shapes(root, counts: tuple[int, int, int], size: int, rows_per_shard: int):
    """make_demo_detection.py's shapes (train, val, test counts) as make_shards.py's parquet shards."""
    splits = [arg for flag, count in zip(("--train", "--val", "--test"), counts, strict=True) for arg in (flag, count)]
    run_script("make_demo_detection.py", "--output-dir", root / "shapes", *splits, "--size", size)
    data = root / "shapes" / "data.yaml"
    make_shards.main(["detection", "--data", str(data), "--output", str(root / "shards"), "--shard-size", str(rows_per_shard)])
    return root / "shards"


def evaluation_hashes(shards) -> dict[str, list]:
    """Each val and test image as the cached path reads the same shards (as a Hub dataset): [image_id, pixel hash]."""
    data = detection_data.load_data(str(shards), fmt="hub")
    hashes = {}
    for name in ("val", "test"):
        images = detection_data.DetectionDataset(data.splits[name], detection_data.eval_transform(SIZE), data.hub[name])
        hashes[name] = [[t["image_id"], hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()] for image, t in images]
    return hashes


def test_two_processes_see_every_image_once_with_its_own_ground_truth(shards, tmp_path):
    out = tmp_path / "seen"
    out.mkdir()
    harness = tmp_path / "coverage.py"
    where = {"scripts": str(REPO / "scripts"), "repo": str(REPO), "shards": str(shards), "out": str(out)}
    harness.write_text(COVERAGE.format(size=SIZE, **where))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(harness)]
    proc = subprocess.run(cmd, env=script_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((out / f"{rank}.json").read_text()) for rank in (0, 1)]
    expected = evaluation_hashes(shards)
    for name in ("val", "test"):  # exactly once, padding dropped, and each image is the one its image_id names
        assert sorted(seen[0][name] + seen[1][name]) == sorted(expected[name]), name
    train = [image_id for rank in (0, 1) for image_id, _ in seen[rank]["train"]]
    assert len(seen[0]["train"]) == len(seen[1]["train"])  # the same steps on both processes
    assert set(train) == set(range(30))  # every image in the epoch
    assert len(train) - 30 < 4 and max(collections.Counter(train).values()) <= 2  # only batch fillers repeat


def test_a_streamed_run_stopped_mid_epoch_resumes_to_the_uninterrupted_result(shards, tmp_path):
    def args(out):
        return [
            "--data", shards, "--streaming", "--shuffle-buffer", 8, "--output-dir", out, "--epochs", 2, "--img-size", SIZE,
            "--batch-size", 4, "--nominal-batch-size", 8, "--workers", 2, "--mosaic", 1, "--multi-scale", "--seed", 1,
            "--mixed-precision", "no",
        ]  # fmt: skip

    one = tmp_path / "uninterrupted"
    # Alongside the run that is stopped: one thread each, the two cores are not shared.
    cmd = [sys.executable, str(REPO / "scripts" / "train_detection.py"), *map(str, args(one))]
    first = subprocess.Popen(cmd, env=script_env(**ONE_THREAD), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "resumed"
    latest = stopped_at_first_checkpoint([*args(out), "--checkpoint-steps", 1], out, "train_detection.py")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert "mosaic           probability 1, epochs 1-1 of 2" in stdout  # mosaic in the epoch that is stopped
    progress = json.loads((latest / "progress.json").read_text())
    assert progress["epoch"] == 0 and 0 < progress["batch_in_epoch"] < 8, progress  # stopped inside the first epoch

    resumed = run_script("train_detection.py", *args(out), "--checkpoint-steps", 1, "--resume", env=ONE_THREAD)
    assert f"resumed from {latest}" in resumed.stdout
    a, b = parameters(one), parameters(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert results_without_timing(out) == results_without_timing(one)
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (one, out)]
    assert metrics[0]["val"]["map"] == metrics[1]["val"]["map"] and metrics[0]["test"]["map"] == metrics[1]["test"]["map"]


def test_two_streaming_processes_learn_and_score_as_the_cached_path(tmp_path):
    """96 images at 64 px, 6 epochs: val mAP50 0.33 when measured (chance is about 0); 15 val and 7 test images, split
    by row, so evaluation drops a filler row. The cached path scoring the model on the same shards (read as a Hub
    dataset) gives the same mAP."""
    shards = shards_of_shapes(tmp_path, (96, 15, 7), size=SIZE, rows_per_shard=24)
    out = tmp_path / "run"
    run_script(
        "train_detection.py", "--data", shards, "--streaming", "--output-dir", out, "--epochs", 6, "--img-size", SIZE,
        "--batch-size", 8, "--nominal-batch-size", 16, "--workers", 1, "--mixed-precision", "no", nproc=2,
    )  # fmt: skip
    streamed = json.loads((out / "metrics.json").read_text())
    assert streamed["val"]["map50"] > 0.2, streamed["val"]
    scored = tmp_path / "scored"
    run_script("train_detection.py", "--data", shards, "--format", "hub", "--eval-only", "--weights", out / "model",
               "--output-dir", scored, "--mixed-precision", "no", env=ONE_THREAD)  # fmt: skip
    cached = json.loads((scored / "metrics.json").read_text())
    for split in ("val", "test"):
        assert streamed[split]["map"] == pytest.approx(cached[split]["map"], abs=1e-6), split
        assert streamed[split]["map50"] == pytest.approx(cached[split]["map50"], abs=1e-6), split


def test_streaming_refuses_what_a_stream_cannot_do(shards, tmp_path):
    proc = run_script("train_detection.py", "--data", shards, "--streaming", "--eval-only", "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0 and "drop --streaming (with --format hub)" in proc.stderr
    no_val, no_sizes = tmp_path / "no_val", tmp_path / "no_sizes"
    (no_val / "data").mkdir(parents=True)
    (no_sizes / "data").mkdir(parents=True)
    for shard in (shards / "data").glob("*.parquet"):
        if shard.name.startswith("train"):
            (no_val / "data" / shard.name).symlink_to(shard)
        datasets.Dataset.from_parquet(str(shard)).remove_columns(["width"]).to_parquet(str(no_sizes / "data" / shard.name))
    with pytest.raises(SystemExit, match="needs a train and a validation split"):
        detection_data.load_data(str(no_val), streaming=True)
    with pytest.raises(SystemExit, match=r"needs columns image, image_id, width, height and objects.*make_shards.py"):
        detection_data.load_data(str(no_sizes), streaming=True)


def streamed(data) -> dict[str, tuple[list, list]]:
    """Each split: (image_id, boxes, labels) of every image as read ahead, and (image_id, image file bytes) as streamed."""
    return {
        name: (
            [(s.image_id, s.boxes.tolist(), s.labels.tolist()) for s in samples],
            [(row["image_id"], row["image"]["bytes"]) for row in data.streams[name]],
        )
        for name, samples in data.splits.items()
    }


def test_a_hub_id_streams_offline_from_the_hub_cache(shards, hub_cache):
    """--data user/name offline, the dataset repo downloaded to the Hub cache (make_shards.py's folder as pushed): the
    same classes and, in each split, the same image_ids with the same boxes, labels and image bytes as the folder,
    read from the cache's snapshot."""
    snapshot = hub_cache(shards, "someuser/shapes")
    hub, folder = (detection_data.load_data(name, streaming=True) for name in ("someuser/shapes", str(shards)))
    assert all(f.startswith(f"{snapshot}/") for files in hub.shards.values() for f in files)
    expected = streamed(folder)
    assert [len(ahead) for ahead, _ in expected.values()] == [30, 7, 3]
    assert hub.names == folder.names and streamed(hub) == expected


def write_arrow(shards, folder):
    """The shards as arrow IPC files, with the schema metadata that holds the features (Image, ClassLabel)."""
    (folder / "data").mkdir(parents=True)
    for shard in (shards / "data").glob("*.parquet"):
        table = pq.read_table(shard)
        with pa.ipc.new_stream(str(folder / "data" / f"{shard.stem}.arrow"), table.schema) as out:
            out.write_table(table)
    return folder


def write_webdataset(shards, folder):
    """The shards as WebDataset tar files: KEY.jpg (the image's bytes) beside KEY.json (every other column)."""
    folder.mkdir(parents=True)
    for shard in (shards / "data").glob("*.parquet"):
        with tarfile.open(folder / f"{shard.stem}.tar", "w") as tar:
            for row in pq.read_table(shard).to_pylist():
                others = json.dumps({key: value for key, value in row.items() if key != "image"}).encode()
                for suffix, payload in (("jpg", row["image"]["bytes"]), ("json", others)):
                    member = tarfile.TarInfo(f"{row['image_id']:06d}.{suffix}")
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    return folder


@pytest.mark.parametrize("write, names", [(write_arrow, ["square", "circle", "triangle"]), (write_webdataset, ["0", "1", "2"])])
def test_arrow_and_webdataset_files_stream_the_same_images_as_parquet(shards, tmp_path, write, names):
    """Any data files `datasets` reads stream: the parquet shards rewritten as arrow files, or as WebDataset tar files
    (classes then named by their ids), give each val and test image, under its image_id, with the cached path's pixels
    and boxes."""
    data = detection_data.load_data(str(write(shards, tmp_path / "copy")), streaming=True)
    expected, accelerator = evaluation_hashes(shards), Accelerator(cpu=True)
    cached = detection_data.load_data(str(shards), fmt="hub")
    assert data.names == names
    for name in ("val", "test"):
        boxes = [[(s.image_id, s.boxes.tolist(), s.labels.tolist()) for s in d.splits[name]] for d in (data, cached)]
        assert boxes[0] == boxes[1] and sum(len(b) for _, b, _ in boxes[0]), name
        images = detection_data.StreamedImages(
            data.splits[name], data.streams[name], None, transform=detection_data.eval_transform(SIZE)
        )
        loader = images.loader(accelerator, 4, 0, None, 0, detection_data.make_collate(SIZE, channels_last=False))
        seen = [
            [t["image_id"], hashlib.sha1(image[:, : t["size"][0], : t["size"][1]].contiguous().numpy().tobytes()).hexdigest()]
            for batch, targets in loader
            for image, t in zip(batch, targets, strict=True)
            if t["image_id"] != detection_data.PADDING
        ]
        assert sorted(seen) == sorted(expected[name]), name


def test_shards_with_training_pixels_stream_the_image_caches_tiles_without_decoding(shards, tmp_path, monkeypatch):
    """make_shards.py --img-size stores each training image as the image cache holds it: streamed at that size, every
    training tile is the cache's, byte for byte, with no image decoded; at another size the images are decoded."""
    data_yaml = shards.parent / "shapes" / "data.yaml"
    decoded = tmp_path / "decoded"
    make_shards.main(
        ["detection", "--data", str(data_yaml), "--output", str(decoded), "--shard-size", "8", "--img-size", str(SIZE)]
    )
    cache = detection_data.ImageCache(detection_data.load_data(str(data_yaml)).splits["train"], None, SIZE, tmp_path / "cache")
    data = detection_data.load_data(str(decoded), streaming=True)
    assert all(row[f"pixels_{SIZE}"] is None for row in data.streams["val"])  # evaluation reads images at full size

    def tiles(scale_to: int) -> dict:
        images = detection_data.StreamedImages(data.splits["train"], data.streams["train"], scale_to, transform=None)
        return {r["image_id"]: images.tile_of(r, images.samples[images.position[r["image_id"]]]).image for r in images.stream}

    with monkeypatch.context() as patch:
        patch.setattr(detection_data, "open_rgb", None)  # decoding any image fails
        stored = tiles(SIZE)
    assert sorted(stored) == list(range(30)) and all(torch.equal(tile, cache.image(i)) for i, tile in stored.items())
    larger = tiles(2 * SIZE)
    assert all(max(tile.shape[1:]) == 2 * SIZE for tile in larger.values()) and len(larger) == 30
