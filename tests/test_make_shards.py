"""make_shards.py: the shards hold exactly the splits, labels and usable files training reads from the original layout,
load with datasets.load_dataset(folder) (also streaming), and both training scripts train on them with --format hub."""

import io
import json
import os

import datasets
import make_demo_audio
import make_demo_detection
import make_shards
import numpy as np
import pytest
import torch
from audio_data import CachedClips, Clip, KeywordTask, load_audio_data, load_noise, load_run_data, noise_items, read_audio
from conftest import run_script
from detection_data import load_data, to_coco

HUB = {"train": "train", "val": "validation", "test": "test"}


@pytest.fixture(autouse=True)
def datasets_cache_in_tmp_path(tmp_path, monkeypatch):
    """load_dataset's arrow cache in the test's folder: datasets read its cache folder when this module imported it,
    before conftest pointed the caches at the session's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def shard(*args):
    make_shards.main([str(a) for a in args])


def read_back(folder):
    """The shards as training's --format hub reads them: audio and images as the stored bytes."""
    return datasets.load_dataset(str(folder))


def demo_audio(root, layout="speech_commands", **extra):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in extra.items()]
    make_demo_audio.main(["--output", str(root), "--layout", layout, "--classes", "3", "--clips-per-class", "8", *flags])


def test_speech_commands_shards_keep_splits_labels_and_skip_what_training_skips(tmp_path):
    demo_audio(tmp_path / "sc", seconds=0.5)
    (tmp_path / "sc" / "sweep" / "broken.wav").write_bytes(b"RIFF" + bytes(60))  # a header and nothing decodable
    out = tmp_path / "shards"
    shard("audio", "--data", tmp_path / "sc", "--output", out, "--shard-size", 4, "--workers", 0)

    data = load_audio_data(str(tmp_path / "sc"))
    summary = json.loads((out / "shards.json").read_text())
    # The skip and its reason are those of training's decode cache (what data_report.json lists).
    training_skips = [
        {"split": name, **s}
        for name, split in data.splits.items()
        for s in CachedClips(split, 8000, 4000, tmp_path / "cache", label=name).skipped
    ]
    assert summary["skipped_count"] == 1 and summary["skipped"] == training_skips
    assert training_skips[0]["path"].endswith("broken.wav") and training_skips[0]["reason"].startswith("unreadable")

    train_shards = -(-summary["splits"]["train"]["rows"] // 4)  # --shard-size 4 rows
    files = sorted(p.name for p in (out / "data").iterdir())
    assert files == ["noise-00000-of-00001.parquet", "test-00000-of-00001.parquet"] + [
        f"train-{i:05d}-of-{train_shards:05d}.parquet" for i in range(train_shards)
    ] + ["validation-00000-of-00001.parquet"]
    shards = read_back(out)
    assert set(shards) == {"train", "validation", "test", "noise"}  # noise: _background_noise_, for augmentation
    assert shards["train"].features["label"].names == data.labels
    for name, split in data.splits.items():
        kept = [i for i, n in enumerate(split.names) if not n.endswith("broken.wav")]
        rows = shards[HUB[name]].cast_column("audio", datasets.Audio(decode=False))
        assert rows["label"] == split.targets[kept].tolist()
        assert [r["path"] for r in rows["audio"]] == [os.path.relpath(split.names[i], tmp_path / "sc") for i in kept]
        assert rows[0]["audio"]["bytes"] == open(split.names[kept[0]], "rb").read()  # the file itself, not decoded
        assert summary["splits"][HUB[name]]["rows"] == len(kept)
    streamed = datasets.load_dataset(str(out), streaming=True)["train"]
    assert [r["label"] for r in streamed.select_columns("label")] == shards["train"]["label"]
    assert streamed.num_shards == train_shards

    run = tmp_path / "run"
    run_script(
        "train_audio.py", "--data", out, "--format", "hub", "--sample-rate", 8000, "--n-mels", 32, "--clip-seconds", 0.5,
        "--cache-dir", tmp_path / "cache", "--output-dir", run, "--epochs", 1, "--batch-size", 4,
        "--nominal-batch-size", 4, "--workers", 0,
    )  # fmt: skip
    report = json.loads((run / "data_report.json").read_text())
    assert report["labels"] == data.labels and report["skipped_count"] == 0
    assert report["clips"] == {name: summary["splits"][HUB[name]]["rows"] for name in data.splits}
    assert (run / "model" / "model.safetensors").is_file()


def test_keyword_task_silence_windows_decode_to_the_same_samples(tmp_path):
    demo_audio(tmp_path / "sc", seconds=0.5)
    shard("audio", "--data", tmp_path / "sc", "--wanted-words", "sweep,low_hum", "--output", tmp_path / "kw", "--workers", 0)
    data = load_audio_data(str(tmp_path / "sc"), keywords=KeywordTask(("sweep", "low_hum")))
    shards = read_back(tmp_path / "kw")
    assert shards["train"].features["label"].names == ["sweep", "low_hum", "_unknown_", "_silence_"] == data.labels
    windows = 0
    for name, split in data.splits.items():
        rows = shards[HUB[name]].cast_column("audio", datasets.Audio(decode=False))
        assert rows["label"] == split.targets.tolist()
        for source, row in zip(split.sources, rows["audio"], strict=True):
            windows += isinstance(source, Clip)
            assert torch.equal(read_audio(source, 16000), read_audio(io.BytesIO(row["bytes"]), 16000))
    assert windows >= 3  # a _silence_ window per split at least


def test_fold_dataset_shards_one_fold_as_training_takes_it(tmp_path):
    demo_audio(tmp_path / "us8k", layout="urbansound8k", folds=3, seconds=0.5)
    shard("audio", "--data", tmp_path / "us8k", "--fold", 2, "--output", tmp_path / "fold2", "--workers", 0)
    data = load_audio_data(str(tmp_path / "us8k"), fold=2)
    shards, summary = read_back(tmp_path / "fold2"), json.loads((tmp_path / "fold2" / "shards.json").read_text())
    assert summary["notes"] == data.notes and summary["notes"][0].startswith("test = fold 2, validation = fold 1")
    for name, split in data.splits.items():
        assert shards[HUB[name]]["label"] == split.targets.tolist()
    with pytest.raises(SystemExit, match="once per --fold K"):
        shard("audio", "--data", tmp_path / "us8k", "--fold", "all", "--output", tmp_path / "all")
    with pytest.raises(SystemExit, match="already holds shards"):
        shard("audio", "--data", tmp_path / "us8k", "--fold", 3, "--output", tmp_path / "fold2")


def file_names(rows) -> list[str]:
    return [r["path"] for r in rows.cast_column("image", datasets.Image(decode=False))["image"]]


def boxes_of(rows) -> list:
    """Hub rows' boxes as xyxy, per image."""
    return [[[x, y, x + w, y + h] for x, y, w, h in r["bbox"]] for r in rows["objects"]]


def test_yolo_shards_keep_boxes_report_skips_and_train(tmp_path):
    root = tmp_path / "shapes"
    make_demo_detection.main(["--output-dir", str(root), "--train", "8", "--val", "2", "--test", "2", "--size", "64"])
    (root / "images" / "train" / "train_99999.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "shards"
    shard("detection", "--data", root / "data.yaml", "--output", out, "--shard-size", "1MB")

    data = load_data(str(root / "data.yaml"))
    summary = json.loads((out / "shards.json").read_text())
    assert summary["skipped"] == [{"path": str(root / "images" / "train" / "train_99999.jpg"), "reason": "corrupt_image"}]
    assert summary["data_report"]["splits"] == data.report.to_dict(data)["splits"]  # training's data_report.json
    shards = read_back(out)
    assert shards["train"].features["objects"]["category"].feature.names == data.names
    for name, samples in data.splits.items():
        rows = shards[HUB[name]]
        assert file_names(rows) == [s.file_name for s in samples]
        assert [r["category"] for r in rows["objects"]] == [s.labels.tolist() for s in samples]
        for got, s in zip(boxes_of(rows), samples, strict=True):
            np.testing.assert_allclose(np.array(got).reshape(-1, 4), s.boxes, atol=1e-4)
    # Read back as training reads --format hub: the same images, boxes and classes, nothing more to fix or skip.
    again = load_data(str(out), fmt="hub")
    assert again.names == data.names and not again.report.files
    for name, samples in data.splits.items():
        assert [s.labels.tolist() for s in again.splits[name]] == [s.labels.tolist() for s in samples]
        assert [(s.width, s.height) for s in again.splits[name]] == [(s.width, s.height) for s in samples]

    run = tmp_path / "run"
    run_script(
        "train_detection.py", "--data", out, "--format", "hub", "--img-size", 64, "--output-dir", run, "--epochs", 1,
        "--batch-size", 4, "--nominal-batch-size", 4, "--workers", 0,
    )  # fmt: skip
    report = json.loads((run / "data_report.json").read_text())
    assert {s: v["images"] for s, v in report["splits"].items()} == {"train": 8, "val": 2, "test": 2}
    assert (run / "model" / "model.safetensors").is_file()


def test_coco_json_shards_hold_the_held_out_validation(tmp_path):
    root = tmp_path / "shapes"
    make_demo_detection.main(["--output-dir", str(root), "--train", "10", "--val", "1", "--test", "0", "--size", "48"])
    train = load_data(str(root / "data.yaml")).splits["train"]
    coco = to_coco(train, ["square", "circle", "triangle"])
    coco["images"].append({"id": 99, "file_name": "images/train/gone.jpg", "width": 48, "height": 48})
    (root / "instances.json").write_text(json.dumps(coco))
    shard("detection", "--data", root / "instances.json", "--output", tmp_path / "coco", "--val-fraction", 0.2)
    data = load_data(str(root / "instances.json"), val_fraction=0.2)
    shards = read_back(tmp_path / "coco")
    assert set(shards) == {"train", "validation"} and (len(shards["train"]), len(shards["validation"])) == (8, 2)
    for name, samples in data.splits.items():
        assert file_names(shards[HUB[name]]) == [s.file_name for s in samples]
    summary = json.loads((tmp_path / "coco" / "shards.json").read_text())
    assert summary["format"] == "coco" and summary["skipped"][0]["reason"] == "missing_image"


def test_shard_size_in_rows_or_megabytes():
    assert make_shards.parse_shard_size("3") == ("rows", 3)
    assert make_shards.parse_shard_size("2MB") == ("bytes", 2_000_000)
    assert make_shards.plan_shards([1] * 7, ("rows", 3)) == [range(0, 2), range(2, 5), range(5, 7)]  # even, at most 3
    # By size: a shard closes before the file that would take it past the limit; a larger file stands alone.
    assert make_shards.plan_shards([4, 4, 9, 1, 1], ("bytes", 8)) == [range(0, 2), range(2, 3), range(3, 5)]
    assert make_shards.plan_shards([], ("bytes", 8)) == []


def test_folders_of_the_same_name_and_overwritten_shards_read_back_their_own_rows(tmp_path):
    """load_dataset's cache must not hand one shard folder's rows to another (as a README `configs` block would)."""
    for images in (4, 6):
        make_demo_detection.main(
            ["--output-dir", str(tmp_path / f"d{images}"), "--train", str(images), "--val", "1", "--test", "0", "--size", "32"]
        )
        shard("detection", "--data", tmp_path / f"d{images}" / "data.yaml", "--output", tmp_path / f"in{images}" / "shards")
    assert [len(read_back(tmp_path / f"in{n}" / "shards")["train"]) for n in (4, 6)] == [4, 6]
    shard("detection", "--data", tmp_path / "d6" / "data.yaml", "--output", tmp_path / "in4" / "shards", "--overwrite")
    assert len(read_back(tmp_path / "in4" / "shards")["train"]) == 6


def test_background_noise_is_a_split_both_modes_mix_in(tmp_path):
    """Speech Commands' _background_noise_ becomes the shards' noise split: read cached (--format hub) or streamed, the
    recordings are the folder's, sample for sample, and each enters the run's fingerprint."""
    demo_audio(tmp_path / "sc", seconds=0.5)
    out = tmp_path / "shards"
    shard("audio", "--data", tmp_path / "sc", "--output", out, "--workers", 0)
    folder = load_audio_data(str(tmp_path / "sc")).noise_files
    expected, _ = load_noise(folder, 8000)
    assert len(folder) >= 2 and len(expected) > 8000
    assert json.loads((out / "shards.json").read_text())["splits"]["noise"]["rows"] == len(folder)
    for run in ({"data": str(out), "format": "hub"}, {"data": str(out), "streaming": True}):
        noise_files = load_run_data(run).noise_files
        noise, skipped = load_noise(noise_files, 8000)
        assert skipped == [] and torch.equal(noise, expected), run
        assert len(set(noise_items(noise_files))) == len(folder), run
