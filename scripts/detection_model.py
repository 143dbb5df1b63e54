"""Detection models by name: torchvision's detectors, plus `fcos_tiny`, a small FCOS that learns in minutes on a CPU.
All follow torchvision's detection interface, whose labels are 1..num_classes (0 is background)."""

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from shared.model_io import load_hub_weights, save_pretrained, write_model_card

# Detectors whose training targets need instance masks or keypoints, which boxes-only detection data cannot give.
NEEDS_MASKS_OR_KEYPOINTS = ("maskrcnn_", "keypointrcnn_")


def available_models() -> list[str]:
    detectors = torchvision.models.list_models(module=torchvision.models.detection)
    return ["fcos_tiny", "fcos_small"] + sorted(name for name in detectors if not name.startswith(NEEDS_MASKS_OR_KEYPOINTS))


TASK = "detection"
PREDICT_CONF = 0.25  # the score a predict script keeps by default; mAP is computed at the recipe's eval_conf
# Where each detector family keeps its class layer: new when starting from weights of other labels.
CLASS_LAYERS = ("head.classification_head.cls_logits", "head.classification_head.module_list", "roi_heads.box_predictor")


# ==================================================================== the model: replace this to change it
def build_model(config: dict, *, pretrained: bool = False) -> nn.Module:
    """config["model"] for config["labels"] (background is added) at config["img_size"]."""
    name, num_classes, img_size = config["model"], len(config["labels"]), config["img_size"]
    if name in SMALL_FCOS:
        if pretrained:
            raise SystemExit(
                f"{name} has no pretrained weights: drop --pretrained, or pick a torchvision model "
                "such as fcos_resnet50_fpn whose weights are cached."
            )
        model = small_fcos(num_classes + 1, img_size, SMALL_FCOS[name])
    else:
        if name.startswith(NEEDS_MASKS_OR_KEYPOINTS):
            raise SystemExit(
                f"--model {name!r} trains on instance masks or keypoints, which detection data (boxes only) does not "
                f"have; choose one of: {', '.join(available_models())}"
            )
        if name not in available_models():
            raise SystemExit(f"unknown --model {name!r}; choose one of: {', '.join(available_models())}")
        kwargs = {} if name.startswith("ssd") else {"min_size": img_size, "max_size": img_size}
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes + 1, **kwargs)
        if pretrained:
            transfer_coco_weights(model, name)
            # As torchvision builds COCO-initialised detectors: the backbone's BatchNorm keeps its statistics.
            freeze_batchnorm(model.backbone)
    # Batches arrive letterboxed to their size (multi-scale included), in training, evaluation and predict alike:
    # torchvision's own switch (its detection references set it for multi-scale training) skips a second resize.
    model.transform._skip_resize = True
    return model


def model_config(model: str, labels: list[str], img_size: int, recipe: dict) -> dict:
    """Everything build_model and a predict script need, saved as model/config.json."""
    return {
        "task": TASK,
        "model": model,
        "labels": labels,
        "img_size": img_size,
        "conf": PREDICT_CONF,
        "iou": recipe["eval_iou"],
        "max_det": recipe["max_det"],
    }


save_model = save_pretrained  # model/: weights as safetensors beside config.json


def probe_step(config: dict, multi_scale: bool):
    """One training step on random images at the largest training size, for --batch-size auto."""
    size = int(config["img_size"] * (1.5 if multi_scale else 1))

    def step(batch_size, device, dtype):
        model = build_model(config).to(device).train()
        box = {
            "boxes": torch.tensor([[4.0, 4.0, size / 2, size / 2]], device=device),
            "labels": torch.ones(1, dtype=torch.int64, device=device),
        }
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = sum(model(torch.rand(batch_size, 3, size, size, device=device), [box] * batch_size).values())
        loss.backward()

    return step


def head_parameters(model: nn.Module) -> list[str]:
    return [name for name in model.state_dict() if name.startswith(CLASS_LAYERS)]


def make_ema(model: nn.Module, decay: float = 0.9999, tau: float = 2000.0) -> AveragedModel:
    """EMA of the weights and buffers, decay ramped as decay x (1 - exp(-updates / tau)) so early weights fade fast.
    Pass the unwrapped model (not the DDP wrapper)."""

    @torch.no_grad()
    def update(ema_tensors, tensors, num_averaged):
        # num_averaged stays on the device: no host sync per step.
        d = decay * (1 - torch.exp(-(num_averaged.float() + 1) / tau))
        for e, t in zip(ema_tensors, tensors, strict=True):
            if e.is_floating_point():
                e.lerp_(t.to(e.dtype), (1 - d).to(e.dtype))
            else:
                e.copy_(t)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


# The small FCOS models by name: residual blocks (torchvision's ResNet BasicBlock) per stage after its stride-2 conv,
# or None for fcos_tiny's one plain conv there. fcos_tiny: about 1.5 M parameters, at 224 px about 60 images/s with
# bf16 on 2 CPU cores; fcos_small: 2.3 M, learns more per epoch for 1.15-1.3x the time per step.
SMALL_FCOS = {"fcos_tiny": None, "fcos_small": (0, 1, 1, 1, 1)}


def small_fcos(num_classes: int, img_size: int, blocks: tuple | None, width: int = 32, fpn_channels: int = 64) -> FCOS:
    """FCOS on a 5-stage conv backbone (strides 2..32, widths 16..8*width) with a 3-level FPN and a 2-conv head. Each
    stage halves the resolution, then refines: with one more 3x3 conv (none in stage 1) when blocks is None, else with
    blocks[i] residual blocks."""

    def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    stages, cin = OrderedDict(), 3
    for i, cout in enumerate([16, width, 2 * width, 4 * width, 8 * width]):
        if blocks is None:
            refine = [conv_bn(cout, cout, 1)] if i > 0 else []
        else:
            refine = [BasicBlock(cout, cout) for _ in range(blocks[i])]
        # A stage without refinement is the bare conv: fcos_tiny's saved weights keep their names.
        stages[f"stage{i + 1}"] = nn.Sequential(conv_bn(cin, cout, 2), *refine) if refine else conv_bn(cin, cout, 2)
        cin = cout
    fpn = BackboneWithFPN(
        nn.Sequential(stages),
        return_layers={"stage3": "0", "stage4": "1", "stage5": "2"},
        in_channels_list=[2 * width, 4 * width, 8 * width],
        out_channels=fpn_channels,
    )
    # Levels P3, P4, P5 and the max-pooled P6; FCOS assigns objects to levels by size relative to these strides.
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((1.0,),) * 4)
    head = FCOSHead(fpn_channels, num_anchors=1, num_classes=num_classes, num_convs=2)
    return FCOS(fpn, num_classes, min_size=img_size, max_size=img_size, anchor_generator=anchors, head=head)


def transfer_coco_weights(model: nn.Module, name: str):
    """Copy every tensor of the cached COCO checkpoint whose name and shape match (the class layers are new)."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise SystemExit(
            f"--pretrained: {name} weights are not cached at {path}. Download {weights.url} to that "
            "path on a machine with internet access (or set TORCH_HOME), or train without --pretrained."
        )
    state = load_hub_weights(path, weights.url)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matched, strict=False)
    print(f"--pretrained: transferred {len(matched)}/{len(own)} tensors from {path}")


def freeze_backbone(model: nn.Module, stages: int) -> list[str]:
    """Freeze the first `stages` parameter-holding top-level blocks of the backbone body; returns their names."""
    if stages <= 0:
        return []
    body = getattr(model.backbone, "body", model.backbone)
    blocks = [(n, m) for n, m in body.named_children() if any(True for _ in m.parameters())]
    if stages > len(blocks):
        raise SystemExit(f"--freeze {stages}: the backbone has only {len(blocks)} blocks ({', '.join(n for n, _ in blocks)})")
    for _, block in blocks[:stages]:
        block.requires_grad_(False)
        freeze_batchnorm(block)
    return [n for n, _ in blocks[:stages]]


def freeze_batchnorm(module: nn.Module):
    """Frozen layers keep their normalisation statistics too (torchvision's FrozenBatchNorm2d)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.load_state_dict(child.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


def set_postprocess(model: nn.Module, score_thresh: float, nms_thresh: float, max_detections: int = 100):
    """Score threshold, NMS IoU and detections per image, wherever this detector family keeps them."""
    for part in (model, getattr(model, "roi_heads", None)):
        if part is not None and hasattr(part, "score_thresh"):
            part.score_thresh, part.nms_thresh, part.detections_per_img = score_thresh, nms_thresh, max_detections


def input_size(model: nn.Module, img_size: int) -> int:
    """SSD models resize to a fixed size; the others take --img-size."""
    fixed = getattr(model.transform, "fixed_size", None)
    return max(fixed) if fixed else img_size


def make_optimizer(groups: list[dict], args) -> torch.optim.Optimizer:
    """The recipe's optimizer: SGD with Nesterov momentum (YOLO's and FCOS's), or AdamW with momentum as beta1."""
    if args.optimizer == "SGD":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    if args.optimizer == "AdamW":
        return torch.optim.AdamW(groups, lr=args.lr, betas=(args.momentum, 0.999))
    raise SystemExit(f"--optimizer {args.optimizer!r}: use SGD or AdamW")


def write_card(args, model_dir: Path, data_description: str, config: dict, summary: dict):
    """model/README.md: what the model detects, how well, how it was trained and how to use it."""
    metrics = {split: {k: summary[split][k] for k in ("map", "map50", "map75")} for split in ("val", "test") if split in summary}
    usage = f"""From the launchkit folder, with this folder as `model/`:

```python
import sys

sys.path[:0] = ["scripts", "."]
from PIL import Image
from detection_predictor import DetectionPredictor

predictor = DetectionPredictor.load("model")
inputs, target = predictor.letterbox(Image.open("photo.jpg").convert("RGB"))
found = predictor.in_file_pixels(predictor.detect(inputs)[0], target)
print(predictor.entries(0, "photo.jpg", found))  # COCO boxes [x, y, w, h] in the file's pixels, with label names
```

```bash
python scripts/predict_detection.py --model-dir model photos/ --conf 0.25   # COCO json, YOLO txt, drawn images
python scripts/train_detection.py --eval-only --weights model --data OTHER.yaml --output-dir runs/eval
python scripts/export_model.py --model-dir model --format onnx              # image -> boxes, scores, labels
python scripts/serve.py --model-dir model --port 8000                       # POST /v1/predict
```
Input: RGB images letterboxed to {config["img_size"]} x {config["img_size"]} px (the predictor and the server do it)."""
    described = data_description.replace(str(Path(args.data).parent), ".")  # paths from the data's folder on
    write_model_card(
        model_dir,
        pipeline_tag="object-detection",
        title=f"{config['model']} object detector ({len(config['labels'])} classes)",
        labels=config["labels"],
        data=f"{described}. Best epoch {summary['best_epoch']} of {args.epochs}, picked by 0.1 mAP50 + 0.9 mAP50-95.",
        metrics=metrics,
        arguments=vars(args),
        usage=usage,
        dataset=args.data if args.format == "hub" else None,
        metric_ids={"map": ("mAP", "IoU=0.50:0.95"), "map50": ("mAP", "IoU=0.50"), "map75": ("mAP", "IoU=0.75")},
    )
