"""Detection models: freezing, pretrained weights from the local cache (and the error without them), models that
need more than boxes refused, --hyp."""

from pathlib import Path

import pytest
import torch
import torchvision
from detection_model import (
    available_models,
    build_model,
    freeze_backbone,
    model_config,
    save_model,
    set_postprocess,
)
from detection_predictor import load_model
from torchvision.ops.misc import FrozenBatchNorm2d
from train_detection import RECIPE, parse_args


def config(name: str, classes: int, img_size: int) -> dict:
    return {"model": name, "labels": [f"c{i}" for i in range(classes)], "img_size": img_size}


def test_freeze_stops_gradients_and_batchnorm_statistics():
    model = build_model(config("fcos_tiny", 3, 96))
    assert freeze_backbone(model, 2) == ["stage1", "stage2"]
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.stage1.parameters())
    assert not any(p.requires_grad for p in body.stage2.parameters())
    assert all(p.requires_grad for p in body.stage3.parameters())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.stage2.modules())
    model.train()
    before = body.stage1[1].running_mean.clone()
    model(torch.rand(2, 3, 96, 96), [{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "labels": torch.tensor([1])}] * 2)
    assert torch.equal(before, body.stage1[1].running_mean)
    with pytest.raises(SystemExit, match="only 5 blocks"):
        freeze_backbone(build_model(config("fcos_tiny", 3, 96)), 9)


@pytest.mark.parametrize("name", ["fcos_tiny", "fcos_small"])
def test_small_fcos_trains_end_to_end_and_predicts_the_same_after_save_and_load(name, tmp_path):
    torch.manual_seed(0)
    config = model_config(name, ["a", "b", "c"], 96, {"eval_iou": 0.6, "max_det": 10})
    model = build_model(config)
    images = torch.rand(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 60]]), "labels": torch.tensor([2])}] * 2
    losses = model(images, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    sum(losses.values()).backward()
    first = next(model.backbone.body.stage1.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    save_model(tmp_path / "model", model, config)
    loaded, _ = load_model(tmp_path / "model", conf=0.0)
    model.eval()
    set_postprocess(model, 0.0, 0.6, 10)  # what load_model set from config.json, with conf 0
    with torch.no_grad():
        before, after = model(images), loaded(images)
    assert len(before[0]["boxes"]) == 10 and all(torch.equal(b[k], a[k]) for b, a in zip(before, after, strict=True) for k in b)
    residual = sum(type(m).__name__ == "BasicBlock" for m in model.modules())
    assert residual == (0 if name == "fcos_tiny" else 4)


def test_pretrained_needs_the_cached_file_and_transfers_matching_tensors(tmp_path, monkeypatch):
    name = "ssdlite320_mobilenet_v3_large"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    expected = tmp_path / "hub" / "checkpoints" / Path(url).name
    with pytest.raises(SystemExit, match=f"not cached at {expected}"):
        build_model(config(name, 3, 320), pretrained=True)

    coco = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=91)
    expected.parent.mkdir(parents=True)
    torch.save(coco.state_dict(), expected)
    model = build_model(config(name, 3, 320), pretrained=True)
    ours, theirs = model.state_dict(), coco.state_dict()
    shared = [k for k in ours if ours[k].shape == theirs[k].shape]
    assert all(torch.equal(ours[k], theirs[k]) for k in shared)
    assert any(ours[k].shape != theirs[k].shape for k in ours)  # the class layers are new
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d | FrozenBatchNorm2d)]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)  # as torchvision builds COCO-initialised models
    with pytest.raises(SystemExit, match="fcos_tiny has no pretrained weights"):
        build_model(config("fcos_tiny", 3, 96), pretrained=True)
    with pytest.raises(SystemExit, match="unknown --model"):
        build_model(config("yolo_v99", 3, 96))


def test_models_that_need_masks_or_keypoints_are_refused_and_not_listed():
    models = available_models()
    assert {"fcos_tiny", "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "ssdlite320_mobilenet_v3_large"} <= set(models)
    assert not [name for name in models if "mask" in name or "keypoint" in name]
    for name in ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", "keypointrcnn_resnet50_fpn"):
        with pytest.raises(SystemExit, match=f"--model '{name}' trains on instance masks or keypoints.*: fcos_tiny, "):
            build_model(config(name, 3, 96))


def load_hyp(path) -> dict:
    """The recipe in force with --hyp FILE (its old key names, such as lr0, read as the new ones)."""
    args = parse_args(["--data", "x", "--output-dir", "out", "--hyp", str(path)])
    return {key: getattr(args, key) for key in RECIPE}


def test_hyp_file_overrides_and_rejects_typos(tmp_path):
    good = tmp_path / "hyp.yaml"
    good.write_text("lr0: 0.05\nfliplr: 0.0\n")
    hyp = load_hyp(good)
    assert hyp["lr"] == 0.05 and hyp["fliplr"] == 0.0 and hyp["momentum"] == RECIPE["momentum"][0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr_0: 0.05\n")
    with pytest.raises(SystemExit, match=r"unknown keys \['lr_0'\]"):
        load_hyp(bad)
