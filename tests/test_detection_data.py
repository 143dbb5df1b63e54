"""Detection data layer: formats, bad input, conversion, augmentation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detection_data import DetectionDataset, from_hub_dataset, label_path, load_data, to_coco, train_transform
from detection_predictor import write_yolo_labels
from PIL import Image
from train_detection import RECIPE

HYP = {key: default for key, (default, _) in RECIPE.items()}  # the recipe's defaults


def write_image(path, size=(64, 48), mode="RGB", colour=(90, 90, 90), exif_orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, colour if mode in ("RGB", "RGBA") else colour[0])
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(path, exif=exif)
    else:
        img.save(path)


def write_yaml(root, **cfg):
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    return root / "data.yaml"


@pytest.fixture
def yolo_tree(tmp_path):
    """Two classes; one image per kind of problem the loader must fix or count."""
    img, lab = tmp_path / "images", tmp_path / "labels"
    write_image(img / "train" / "good.jpg")
    (lab / "train" / "good.txt").parent.mkdir(parents=True)
    (lab / "train" / "good.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.25 0.25\n")
    write_image(img / "train" / "background.jpg")  # no label file: background
    write_image(img / "train" / "bad_lines.png")
    (lab / "train" / "bad_lines.txt").write_text(
        "0 0.5 0.5 0.5\n"  # wrong field count
        "7 0.5 0.5 0.2 0.2\n"  # class outside names
        "0 1.5 0.5 0.2 0.2\n"  # coordinate outside [0, 1]
        "1 0.5 0.5 0.0 0.2\n"  # zero width
        "1 0.4 0.4 0.2 0.2\n"
        "1 0.4 0.4 0.2 0.2\n"
    )  # duplicate of the line above
    (img / "train" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    write_image(img / "train" / "grey.png", mode="L")
    write_image(img / "train" / "rgba.png", mode="RGBA", colour=(10, 20, 30, 128))
    Image.fromarray(np.full((48, 64), 60000, dtype=np.uint16)).save(img / "train" / "deep16.png")
    write_image(img / "train" / "rotated.jpg", size=(64, 48), exif_orientation=6)  # stored landscape, shown portrait
    (lab / "train" / "rotated.txt").write_text("0 0.5 0.25 0.5 0.25\n")
    write_image(img / "val" / "v.jpg")
    return tmp_path


def test_yolo_layout_and_every_bad_input_is_fixed_or_counted(yolo_tree):
    data = load_data(str(write_yaml(yolo_tree, path=".", train="images/train", val="images/val", names={0: "cat", 1: "dog"})))
    assert data.names == ["cat", "dog"]
    train = {s.file_name.split("/")[-1]: s for s in data.splits["train"]}
    assert "corrupt.jpg" not in train and len(train) == 7
    assert len(train["background.jpg"].labels) == 0
    np.testing.assert_allclose(train["good.jpg"].boxes, [[16, 12, 48, 36], [8, 6, 24, 18]], atol=1e-4)
    assert train["good.jpg"].labels.tolist() == [0, 1]
    assert train["bad_lines.png"].labels.tolist() == [1]  # only the first of the duplicates survives
    # EXIF orientation 6: the upright image is 48 x 64 and the labels refer to it.
    assert (train["rotated.jpg"].width, train["rotated.jpg"].height) == (48, 64)
    np.testing.assert_allclose(train["rotated.jpg"].boxes, [[12, 8, 36, 24]], atol=1e-4)

    report = data.report.to_dict(data)
    files = {k.split("/")[-1]: v for k, v in report["files"].items()}
    assert files["bad_lines.txt"] == {
        "wrong_field_count": 1,
        "class_out_of_range": 1,
        "coords_outside_0_1": 1,
        "zero_size_box": 1,
        "duplicate_box": 1,
    }
    assert files["corrupt.jpg"] == {"corrupt_image": 1}
    for name in ("grey.png", "rgba.png", "deep16.png"):
        assert files[name] == {"converted_to_rgb": 1}
    assert files["rotated.jpg"] == {"exif_rotated": 1}
    assert report["splits"]["train"]["images"] == 7 and report["splits"]["train"]["background_images"] == 4

    # Every image decodes to upright 8-bit RGB; 16-bit keeps its brightness instead of clipping to white.
    ds = DetectionDataset(data.splits["train"], lambda image, target: (image, target))
    for i, s in enumerate(data.splits["train"]):
        image, target = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, s.height, s.width)
    deep = ds[list(train).index("deep16.png")][0]
    assert int(deep.float().mean()) == 60000 // 257


def test_data_yaml_mistakes_stop_with_the_fix(tmp_path):
    write_image(tmp_path / "images" / "train" / "a.jpg")
    no_names = write_yaml(tmp_path, train="images/train", val="images/train")
    with pytest.raises(SystemExit, match="no `names:`.*names: \\[cat, dog\\]"):
        load_data(str(no_names))
    missing = write_yaml(tmp_path, train="images/train", val="images/valid", names=["a"])
    with pytest.raises(SystemExit, match="`val` folder .*images/valid not found"):
        load_data(str(missing))
    with pytest.raises(SystemExit, match="no `val:` entry"):
        load_data(str(write_yaml(tmp_path, train="images/train", names=["a"])))


def test_label_path_follows_the_yolo_convention(tmp_path):
    assert label_path(tmp_path / "ds" / "images" / "train" / "x.jpg") == tmp_path / "ds" / "labels" / "train" / "x.txt"


def test_coco_json_with_sparse_category_ids(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", size=(100, 80))
    write_image(tmp_path / "images" / "b.jpg", size=(100, 80))
    coco = {
        "images": [
            {"id": 11, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 12, "file_name": "b.jpg", "width": 100, "height": 80},
            {"id": 13, "file_name": "gone.jpg", "width": 100, "height": 80},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 90, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 90, "bbox": [10, 10, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [90, 70, 20, 20], "iscrowd": 0},
            {"id": 3, "image_id": 12, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 0},
        ],
    }
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances.json"
    path.write_text(json.dumps(coco))
    data = load_data(str(path), val_fraction=0.5)
    assert data.names == ["cat", "dog"]
    samples = {s.image_id: s for split in data.splits.values() for s in split}
    assert set(samples) == {11, 12}
    assert samples[11].labels.tolist() == [1, 0]
    np.testing.assert_allclose(samples[11].boxes, [[10, 10, 30, 40], [90, 70, 100, 80]])  # second box clipped
    files = {k.split("/")[-1]: v for k, v in data.report.to_dict(data)["files"].items()}
    assert files["gone.jpg"] == {"missing_image": 1}
    assert files["b.jpg"] == {"class_out_of_range": 1}
    assert files["a.jpg"] == {"box_clipped_to_image": 1}


def test_hub_dataset_in_objects_convention(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {
                "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                "category": datasets.Sequence(datasets.ClassLabel(names=["mask", "glove"])),
            },
        }
    )
    rows = {
        "image": [Image.new("RGB", (40, 30)), Image.new("RGB", (40, 30))],
        "width": [40, 40],
        "height": [30, 30],
        "objects": [{"bbox": [[5, 5, 10, 10]], "category": [1]}, {"bbox": [[0, 0, 40, 30], [1, 1, 0, 3]], "category": [0, 0]}],
    }
    train = datasets.Dataset.from_dict(rows, features=features)
    data = from_hub_dataset(datasets.DatasetDict({"train": train, "test": train}), "in-memory", val_fraction=0.5)
    assert data.names == ["mask", "glove"]
    assert sorted(data.splits) == ["test", "train", "val"]
    test = data.splits["test"]
    np.testing.assert_allclose(test[0].boxes, [[5, 5, 15, 15]])
    assert test[1].labels.tolist() == [0]  # the zero-width box is dropped and counted
    assert data.report.totals["test"]["zero_size_box"] == 1
    image, target = DetectionDataset(test, lambda i, t: (i, t), hub_dataset=data.hub["test"])[0]
    assert image.shape == (3, 30, 40)
    from detection_data import ImageCache

    cache = ImageCache(test, data.hub["test"], 20, tmp_path / "cache")  # rows of a Hub split: keyed by its fingerprint
    assert cache.image(1).shape == (3, 15, 20) and cache.path.is_file()


def test_yolo_coco_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        write_image(tmp_path / "images" / "train" / f"{i}.jpg", size=(80, 60))
        if i:
            rows = [
                f"{rng.integers(3)} {rng.uniform(0.3, 0.7):.6f} {rng.uniform(0.3, 0.7):.6f} {rng.uniform(0.1, 0.5):.6f} "
                f"{rng.uniform(0.1, 0.5):.6f}"
                for _ in range(i)
            ]
            (tmp_path / "labels" / "train").mkdir(parents=True, exist_ok=True)
            (tmp_path / "labels" / "train" / f"{i}.txt").write_text("\n".join(rows) + "\n")
    cfg = write_yaml(tmp_path, train="images/train", val="images/train", names=["a", "b", "c"])
    original = load_data(str(cfg)).splits["train"]
    coco = to_coco(original, ["a", "b", "c"])
    (tmp_path / "coco" / "images").mkdir(parents=True)
    for s in original:
        (tmp_path / "coco" / "images" / s.file_name.split("/")[-1]).write_bytes(Path(s.source).read_bytes())
        s.file_name = s.file_name.split("/")[-1]
    (tmp_path / "coco" / "instances.json").write_text(json.dumps(to_coco(original, ["a", "b", "c"])))
    assert len(coco["annotations"]) == 10 and coco["annotations"][0]["id"] == 1

    from detection_data import DataReport, read_coco

    back, names = read_coco(tmp_path / "coco" / "instances.json", DataReport(), "train")
    assert names == ["a", "b", "c"]
    write_yolo_labels(back, tmp_path / "yolo2" / "labels" / "train")
    for s, b in zip(original, back, strict=False):
        np.testing.assert_allclose(s.boxes, b.boxes, atol=1e-4)
        assert s.labels.tolist() == b.labels.tolist()
        label = tmp_path / "yolo2" / "labels" / "train" / f"{s.file_name.split('.')[0]}.txt"
        before = tmp_path / "labels" / "train" / label.name
        assert label.exists() == before.exists()
        if before.exists():
            np.testing.assert_allclose(np.loadtxt(label, ndmin=2), np.loadtxt(before, ndmin=2), atol=2e-6)


@pytest.mark.parametrize("cached", [False, True], ids=["decoded", "cached"])
def test_augmentation_keeps_boxes_on_their_objects(tmp_path, cached):
    """A red square on grey: after flip, scale jitter, crop and padding, the box still frames the red pixels (also
    when the image comes from the cache, scaled down to 128 x 96 with its box)."""
    from detection_data import ImageCache, Sample

    img = np.full((120, 160, 3), 100, np.uint8)
    img[30:70, 90:130] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "x.png")
    sample = Sample(0, "x", str(tmp_path / "x.png"), 160, 120, np.array([[90, 30, 130, 70]], np.float32), np.array([0]))
    cache = ImageCache([sample], None, 128, tmp_path / "cache") if cached else None
    ds = DetectionDataset([sample], train_transform(128, {**HYP, "scale": 0.5}), cache=cache)
    checked = 0
    for epoch in range(40):
        ds.set_epoch(epoch)
        image, target = ds[0]
        red = (image[0] > 200) & (image[1] < 60)
        if not red.any():
            assert len(target["boxes"]) == 0  # cropped away: the box is gone too
            continue
        ys, xs = torch.nonzero(red, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert len(target["boxes"]) == 1
        assert torch.allclose(target["boxes"][0], found, atol=2.5), (target["boxes"], found)
        checked += 1
    assert checked > 20
    ds.set_epoch(3)
    first = ds[0]
    assert torch.equal(first[0], ds[0][0])  # same (seed, epoch, index): same augmentation


def noise_image(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_image_cache_holds_each_upright_image_scaled_to_img_size_and_is_built_once(tmp_path, monkeypatch):
    import detection_data
    from detection_data import ImageCache, open_rgb

    noise_image(tmp_path / "images" / "train" / "wide.png", (300, 150), 0)  # scaled down to 200 x 100
    noise_image(tmp_path / "images" / "train" / "small.png", (64, 48), 1)  # smaller than img_size: scaled up once
    write_image(tmp_path / "images" / "train" / "rotated.jpg", size=(240, 120), exif_orientation=6)  # upright 120 x 240
    write_image(tmp_path / "images" / "val" / "v.jpg")
    samples = load_data(str(write_yaml(tmp_path, path=str(tmp_path), train="images/train", val="images/val", names=["a"])))
    samples = samples.splits["train"]
    cache = ImageCache(samples, None, 200, tmp_path / "cache")
    for i, s in enumerate(samples):
        upright = open_rgb(s.source)[0]
        expected = {"wide.png": (200, 100), "small.png": (200, 150), "rotated.jpg": (100, 200)}[Path(s.source).name]
        if upright.size != expected:
            upright = upright.resize(expected, Image.BILINEAR)
        reference = torch.from_numpy(np.array(upright)).permute(2, 0, 1)  # PIL's filter; torch rounds within 1 of it
        assert cache.image(i).shape == reference.shape and (cache.image(i).int() - reference).abs().max() <= 1, s.source

    def no_rebuild(*args):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(detection_data, "build_image_cache", no_rebuild)
    again = ImageCache(samples, None, 200, tmp_path / "cache")  # another process, or a later run
    assert torch.equal(again.image(0), cache.image(0))
    with pytest.raises(AssertionError, match="built again"):  # an image file changed: its key changed
        noise_image(Path(samples[0].source), (samples[0].width, samples[0].height), 7)
        ImageCache(samples, None, 200, tmp_path / "cache")
    with pytest.raises(AssertionError, match="built again"):  # another size
        ImageCache(samples, None, 160, tmp_path / "cache")


def test_no_image_cache_when_it_would_fill_the_disk(tmp_path, monkeypatch, capsys):
    import detection_data
    import train_detection

    sample = load_data_sample(tmp_path)
    args = train_detection.parse_args(["--data", "x", "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c")])
    monkeypatch.setattr(detection_data, "disk_free", lambda folder: 2 * 3 * 224 * 168 - 1)  # just under twice its size at 224 px
    assert detection_data.training_image_cache(args, [sample], None, 224) is None
    assert "image cache off" in capsys.readouterr().out and not (tmp_path / "c").exists()
    monkeypatch.setattr(detection_data, "disk_free", lambda folder: 2 * 3 * 224 * 168)
    assert detection_data.training_image_cache(args, [sample], None, 224) is not None


def load_data_sample(root):
    from detection_data import Sample

    write_image(root / "a.png")
    return Sample(0, "a.png", str(root / "a.png"), 64, 48, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
