"""Bad detection input: every case is a counted skip in the data report or a stop with the file and the fix;
predict_detection.py outputs that never collide and never mix runs."""

import json
import warnings

import datasets
import numpy as np
import pytest
import yaml
from detection_data import MAX_PIXELS, from_hub_dataset, load_data, require_boxes
from detection_model import build_model, model_config, save_model
from PIL import Image, ImageFile


def write_image(path, size=(64, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 90, 90)).save(path)


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_yaml(root, **cfg):
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    return str(root / "data.yaml")


def yolo_data_yaml(root, **cfg):
    """A data.yaml of images/train and a separate one-image val folder, so each train file is counted once."""
    write_image(root / "images" / "val" / "v.jpg")
    return write_yaml(root, train="images/train", val="images/val", names=["cat"], **cfg)


def write_coco(path, images, annotations, categories=({"id": 1, "name": "cat"},)):
    write_text(path, json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return str(path)


def problems(data) -> dict:
    """The report's per-file counts, keyed by file name (or by json name and annotation id)."""
    return {k.split("/")[-1]: v for k, v in data.report.to_dict(data)["files"].items()}


def hub_dataset(bboxes, width=40, height=30):
    """A DatasetDict in the `objects{bbox, category}` convention, one image per entry of bboxes."""
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
        "image": [Image.new("RGB", (width, height)) for _ in bboxes],
        "width": [width] * len(bboxes),
        "height": [height] * len(bboxes),
        "objects": [{"bbox": b, "category": [0] * len(b)} for b in bboxes],
    }
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)})


# ----------------------------------------------------------------------------------------------- boxes
def test_non_finite_coordinates_are_counted_skips_in_every_format(tmp_path):
    write_image(tmp_path / "images" / "train" / "a.jpg")
    write_text(tmp_path / "labels" / "train" / "a.txt", "0 nan 0.5 0.2 0.2\n0 0.5 inf 0.2 0.2\n0 0.5 0.5 0.2 0.2\n")
    data = load_data(yolo_data_yaml(tmp_path))
    assert data.splits["train"][0].labels.tolist() == [0]
    assert problems(data)["a.txt"] == {"non_finite_box": 2}

    json_path = write_coco(
        tmp_path / "images" / "train" / "instances.json",
        [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 2, float("nan"), 12]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 2, float("inf"), 12]},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 12]},
        ],
    )
    data = load_data(json_path, val_fraction=0.5)
    boxes = np.concatenate([s.boxes for split in data.splits.values() for s in split])
    np.testing.assert_allclose(boxes, [[1, 2, 11, 14]])
    assert problems(data)["a.jpg"] == {"non_finite_box": 2}

    data = from_hub_dataset(hub_dataset([[[float("nan"), 2, float("nan"), 12], [1, 2, 5, float("-inf")], [1, 2, 5, 5]]]))
    assert sum(len(s.labels) for split in data.splits.values() for s in split) == 1
    assert data.report.totals["train"]["non_finite_box"] == 2


def test_a_split_without_boxes_stops_before_training(tmp_path):
    for split in ("train", "val", "test"):
        write_image(tmp_path / "images" / split / "a.jpg")
    write_text(tmp_path / "labels" / "train" / "a.txt", "0 0.5 0.5 0.2 0.2\n")
    write_text(tmp_path / "labels" / "test" / "a.txt", "5 0.5 0.5 0.2 0.2\n")  # class out of range: nothing left
    report = tmp_path / "run" / "data_report.json"
    data = load_data(write_yaml(tmp_path, train="images/train", val="images/val", names=["cat"]))
    with pytest.raises(SystemExit, match=f"the val split \\(.*images/val\\) has no boxes.*See {report}"):
        require_boxes(data, report)
    data = load_data(write_yaml(tmp_path, train="images/train", val="images/train", test="images/test", names=["cat"]))
    with pytest.raises(SystemExit, match="the test split \\(.*images/test\\) has no boxes"):
        require_boxes(data, report)
    require_boxes(load_data(write_yaml(tmp_path, train="images/train", val="images/train", names=["cat"])), report)


# ----------------------------------------------------------------------------------------------- YOLO files
def test_symlinked_images_of_a_txt_list_find_their_labels(tmp_path):
    """The label is looked up on the path as listed (images/ -> labels/), then beside the file the link points to."""
    store = tmp_path / "store"
    write_image(store / "a.jpg")
    write_image(store / "b.jpg")
    write_text(store / "b.txt", "0 0.5 0.5 0.4 0.4\n")  # b's label sits beside the real file
    ds = tmp_path / "ds"
    (ds / "images" / "train").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (ds / "images" / "train" / name).symlink_to(store / name)
    write_text(ds / "labels" / "train" / "a.txt", "0 0.5 0.5 0.2 0.2\n")
    write_text(ds / "train.txt", "images/train/a.jpg\n./images/train/b.jpg\n")
    data = load_data(write_yaml(ds, train="train.txt", val="train.txt", names=["cat"]))
    train = {s.file_name: s for s in data.splits["train"]}
    assert sorted(train) == ["images/train/a.jpg", "images/train/b.jpg"]
    np.testing.assert_allclose(train["images/train/a.jpg"].boxes, [[25.6, 19.2, 38.4, 28.8]], atol=1e-4)
    np.testing.assert_allclose(train["images/train/b.jpg"].boxes, [[19.2, 14.4, 44.8, 33.6]], atol=1e-4)


def test_orphan_labels_are_counted(tmp_path):
    write_image(tmp_path / "images" / "train" / "a.jpg")
    for name in ("a.txt", "renamed.txt", "sub/deleted.txt"):
        write_text(tmp_path / "labels" / "train" / name, "0 0.5 0.5 0.2 0.2\n")
    data = load_data(yolo_data_yaml(tmp_path))
    found = problems(data)
    assert found["renamed.txt"] == found["deleted.txt"] == {"orphan_label": 1}
    assert "a.txt" not in found
    assert "no image of the same name" in data.report.to_dict(data)["meaning"]["orphan_label"]


def test_label_files_that_are_not_utf8_skip_their_image(tmp_path):
    for name in ("latin1", "bom", "good"):
        write_image(tmp_path / "images" / "train" / f"{name}.jpg")
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "latin1.txt").write_bytes("0 0.5 0.5 0.2 0.2 # chat noté\n".encode("latin-1"))
    (tmp_path / "labels" / "train" / "bom.txt").write_bytes("0 0.5 0.5 0.2 0.2\n".encode("utf-8-sig"))
    (tmp_path / "labels" / "train" / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    data = load_data(yolo_data_yaml(tmp_path))
    train = {s.file_name.split("/")[-1]: s for s in data.splits["train"]}
    assert sorted(train) == ["bom.jpg", "good.jpg"]  # a byte-order mark is fine; latin-1 text is not UTF-8
    assert train["bom.jpg"].labels.tolist() == [0]
    assert problems(data) == {"latin1.txt": {"unreadable_label": 1}}


def test_oversized_image_is_skipped_from_its_header_without_decoding(tmp_path, monkeypatch):
    write_image(tmp_path / "images" / "train" / "small.jpg")
    huge = tmp_path / "images" / "train" / "huge.png"
    Image.new("1", (10_000, 10_000)).save(huge)  # 100 megapixels in a few KB
    assert huge.stat().st_size < 100_000
    decoded, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.filename) or load(self))
    cfg = yolo_data_yaml(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own check must not be what users see
        data = load_data(cfg)
    assert [s.file_name for s in data.splits["train"]] == ["train/small.jpg"]
    assert problems(data)["huge.png"] == {"too_large": 1}
    assert str(huge) not in decoded and str(tmp_path / "images" / "train" / "small.jpg") in decoded
    assert f"{MAX_PIXELS:,} pixels" in data.report.to_dict(data)["meaning"]["too_large"]

    data = load_data(cfg, max_pixels=3000)  # the cap is an argument: 64 x 48 = 3072 pixels is too many now
    assert data.splits["train"] == [] and problems(data)["small.jpg"] == {"too_large": 1}
    assert "3,000 pixels" in data.report.to_dict(data)["meaning"]["too_large"]
    hub = from_hub_dataset(hub_dataset([[[1, 2, 5, 5]]] * 2), max_pixels=1000)  # Hub images are held to it too
    assert hub.report.totals["train"]["too_large"] == 2


# ----------------------------------------------------------------------------------------------- configuration files
def test_data_yaml_syntax_and_inverted_names_stop_with_the_fix(tmp_path):
    write_image(tmp_path / "images" / "train" / "a.jpg")
    cfg = tmp_path / "data.yaml"
    cfg.write_text("train: images/train\nval: [images/train\nnames: [cat]\n")
    with pytest.raises(SystemExit, match=f'(?s){cfg}: not valid YAML.*in "{cfg}", line 2'):
        load_data(str(cfg))
    cfg.write_bytes(b"train: images/train\nval: images/train\nnames: [chat not\xe9]\n")
    with pytest.raises(SystemExit, match=f"{cfg}: not valid YAML"):
        load_data(str(cfg))
    inverted = write_yaml(tmp_path, train="images/train", val="images/train", names={"dog": 1, "cat": 0})
    with pytest.raises(SystemExit, match=r"`names` maps names to ids; it must map ids to names: `names: \{0: cat, 1: dog\}`"):
        load_data(inverted)


def test_coco_json_mistakes_are_counted_or_stop_with_the_fix(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", size=(100, 80))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [], "annotations": [],, "categories": []}')
    with pytest.raises(SystemExit, match=f"{broken}: not valid JSON .*line 1 column"):
        load_data(str(broken))

    path = write_coco(
        tmp_path / "instances.json",
        [
            {"id": 1, "file_name": "gone.jpg", "width": 100, "height": 80},  # first entry missing: a.jpg is still found
            {"id": 2, "file_name": "a.jpg", "width": 200, "height": 160},  # the file is 100 x 80
        ],
        [
            {"id": 7, "image_id": 2, "category_id": 1},  # no bbox
            {"id": 8, "image_id": 2, "category_id": 1, "bbox": [1, 2]},  # not 4 numbers
            {"id": 9, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"id": 10, "image_id": 2, "category_id": 1, "bbox": [150, 10, 20, 20]},  # inside 200 x 160, outside the file
        ],
    )
    data = load_data(path, val_fraction=0.5)
    (sample,) = [s for split in data.splits.values() for s in split]
    assert (sample.width, sample.height) == (100, 80)  # the file's size
    np.testing.assert_allclose(sample.boxes, [[10, 10, 30, 30]])
    found = problems(data)
    assert found["gone.jpg"] == {"missing_image": 1}
    assert found["a.jpg"] == {"size_mismatch": 1, "zero_size_box": 1}
    assert found["instances.json annotation 7"] == found["instances.json annotation 8"] == {"missing_bbox": 1}

    nowhere = write_coco(tmp_path / "elsewhere" / "instances.json", [{"id": 1, "file_name": "x.jpg"}], [])
    with pytest.raises(SystemExit, match="none of its first 1 images \\(such as x.jpg\\) is in any of"):
        load_data(nowhere)


# ----------------------------------------------------------------------------------------------- --data and --format
def test_a_missing_path_is_a_hub_id_only_with_format_hub(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: asked.append(name) or hub_dataset([[[1, 2, 5, 5]]] * 4))
    missing = tmp_path / "data.yml"
    with pytest.raises(SystemExit, match=f"no such file or folder {missing}; for a Hub dataset add --format hub"):
        load_data(str(missing))
    with pytest.raises(SystemExit, match="no such file or folder user/dataset; for a Hub dataset add --format hub"):
        load_data("user/dataset")
    assert asked == []  # no network round trip for a mistyped path
    assert load_data("user/dataset", fmt="hub").names == ["mask", "glove"] and asked == ["user/dataset"]


def test_save_to_disk_folder_loads_as_hub_data_and_format_forces_the_parser(tmp_path):
    hub_dataset([[[1, 2, 5, 5]], [[3, 3, 9, 9]]]).save_to_disk(tmp_path / "saved")
    data = load_data(str(tmp_path / "saved"), val_fraction=0.5)
    assert data.names == ["mask", "glove"] and sum(len(v) for v in data.splits.values()) == 2

    write_image(tmp_path / "images" / "a.jpg")
    coco = write_coco(
        tmp_path / "annotations.txt",
        [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 12]}],
    )
    assert load_data(coco, fmt="coco").names == ["cat"]
    cfg = tmp_path / "data.cfg"
    cfg.write_text(yaml.safe_dump({"train": "images", "val": "images", "names": ["dog"]}))
    assert load_data(str(cfg), fmt="yolo").names == ["dog"]
    with pytest.raises(SystemExit, match="expected a data.yaml, a COCO instances .json or a folder written by save_to_disk"):
        load_data(str(cfg))


# ----------------------------------------------------------------------------------------------- predict outputs
@pytest.fixture
def model_dir(tmp_path):
    """A randomly initialised fcos_tiny saved the way train_detection.py saves model/."""
    config = model_config("fcos_tiny", ["cat", "dog"], 64, {"eval_iou": 0.6, "max_det": 10})
    save_model(tmp_path / "model", build_model(config), config)
    return tmp_path / "model"


def predicted_files(out, folder):
    return sorted(str(p.relative_to(out / folder)) for p in (out / folder).rglob("*") if p.is_file())


def test_predict_outputs_mirror_input_paths_and_replace_earlier_runs_whole(tmp_path, model_dir):
    from predict_detection import main

    photos = tmp_path / "photos"
    for name in ("b/x.jpg", "c/x.jpg", "c/x_1.jpg", "d/y.jpg", "d/y.png"):
        write_image(photos / name)
    out = tmp_path / "pred"
    main(["--model-dir", str(model_dir), str(photos / "b"), str(photos / "c"), str(photos / "d"), "--output-dir", str(out)])
    assert predicted_files(out, "labels") == ["b/x.txt", "c/x.txt", "c/x_1.txt", "d/y.jpg.txt", "d/y.png.txt"]
    assert predicted_files(out, "drawn") == ["b/x.jpg", "c/x.jpg", "c/x_1.jpg", "d/y.jpg.jpg", "d/y.png.jpg"]
    assert sorted(json.loads((out / "images.json").read_text()).values()) == sorted(str(p) for p in photos.rglob("*.*"))

    with pytest.raises(SystemExit, match=f"{out} holds earlier predictions .*add --overwrite"):
        main(["--model-dir", str(model_dir), str(photos / "c" / "x.jpg"), "--output-dir", str(out)])
    main(["--model-dir", str(model_dir), str(photos / "c" / "x.jpg"), "--output-dir", str(out), "--overwrite", "--no-draw"])
    assert predicted_files(out, "labels") == ["x.txt"] and not (out / "drawn").exists()  # nothing stale is left
    main(["--model-dir", str(model_dir), str(photos), "--output-dir", str(out), "--overwrite", "--no-draw"])
    assert predicted_files(out, "labels") == ["b/x.txt", "c/x.txt", "c/x_1.txt", "d/y.jpg.txt", "d/y.png.txt"]
