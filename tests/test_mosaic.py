"""The 4-image mosaic: boxes follow their pixels through the tiles, the cuts and the zoom; hidden boxes are dropped;
the same (seed, epoch, index) gives the same mosaic in any worker; close_mosaic turns it off."""

import pytest
import torch
from detection_data import (
    MIN_VISIBLE,
    PAD_VALUE,
    DetectionDataset,
    ImageCache,
    Mosaic,
    Sample,
    Tile,
    mosaic_epochs,
    mosaic_view,
    train_transform,
)
from PIL import Image
from torchvision import tv_tensors
from train_detection import RECIPE

HYP = {key: default for key, (default, _) in RECIPE.items()}  # the recipe's defaults
SIZE = 128
BACKGROUND = (20, 20, 20)  # neither a box colour nor the pad grey
# Box k is a solid rectangle of COLOURS[k] and has label k, so its pixels say which box (and label) they belong to.
COLOURS = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (128, 0, 255), (0, 128, 64), (255, 255, 255), (128, 64, 0), (64, 128, 255),
]  # fmt: skip
PALETTE = torch.tensor([*COLOURS, BACKGROUND, (PAD_VALUE,) * 3], dtype=torch.float32)


def tile(w: int, h: int, boxes: list, first_label: int = 0):
    """(image, target) as DetectionDataset.decoded returns them; box i is painted in COLOURS[first_label + i]."""
    pixels = torch.tensor(BACKGROUND, dtype=torch.uint8).view(3, 1, 1).repeat(1, h, w)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        pixels[:, y0:y1, x0:x1] = torch.tensor(COLOURS[first_label + i], dtype=torch.uint8).view(3, 1, 1)
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32).view(-1, 4), format="XYXY", canvas_size=(h, w)
        ),
        "labels": torch.arange(first_label, first_label + len(boxes)),
    }
    return tv_tensors.Image(pixels), target


@pytest.fixture
def coloured_dataset(tmp_path):
    return make_coloured_dataset(tmp_path)


def make_coloured_dataset(root, cached: bool = False, **hyp) -> DetectionDataset:
    """Seven PNG files of other sizes than SIZE (up- and down-scaled tiles), 12 boxes in all, one background image;
    cached: the images are read from an ImageCache (those larger than SIZE scaled down to it)."""
    layouts = [
        (160, 120, [(10, 10, 70, 60), (90, 40, 150, 110)]),
        (96, 144, [(20, 30, 80, 100)]),
        (200, 200, [(0, 0, 90, 90), (110, 110, 200, 200), (120, 10, 190, 60)]),
        (64, 48, [(8, 8, 40, 40)]),
        (128, 128, []),
        (180, 100, [(30, 20, 120, 80), (140, 10, 175, 95)]),
        (140, 140, [(40, 40, 100, 100), (5, 110, 60, 135), (100, 2, 138, 30)]),
    ]
    samples, label = [], 0
    for i, (w, h, boxes) in enumerate(layouts):
        image, target = tile(w, h, boxes, label)
        path = root / f"{i}.png"  # lossless: colours stay exact
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        samples.append(Sample(i, path.name, str(path), w, h, target["boxes"].numpy(), target["labels"].numpy()))
        label += len(boxes)
    hyp = {**HYP, "mosaic": 1.0, **hyp}
    cache = ImageCache(samples, None, SIZE, root / "cache") if cached else None
    return DetectionDataset(samples, train_transform(SIZE, hyp), seed=3, mosaic=Mosaic(SIZE, hyp, until_epoch=5), cache=cache)


def nearest_colour(image: torch.Tensor) -> torch.Tensor:
    """Per pixel, the index into PALETTE of the closest colour (resizing blends colours at edges)."""
    pixels = image.permute(1, 2, 0).float().reshape(-1, 1, 3)
    return (pixels - PALETTE).norm(dim=2).argmin(1).view(image.shape[1:])


def own_colour_fraction(image: torch.Tensor, box: torch.Tensor, label: int) -> float:
    x0, y0, x1, y1 = (int(v) for v in box.round())
    return (nearest_colour(image[:, y0:y1, x0:x1]) == label).float().mean().item()


def colour_extent(image: torch.Tensor, box: torch.Tensor, label: int, margin: int = 3) -> torch.Tensor:
    """The xyxy rectangle of the pixels of the box's own colour (unblended: a blend of two colours can come close to a
    third) within margin pixels around it. The box is too large (reaching into another tile) or too small (not
    clipped to what is in view) when the two differ by more than the blended edge."""
    x0, y0 = (max(0, int(v) - margin) for v in box[:2])
    region = image[:, y0 : int(box[3]) + margin, x0 : int(box[2]) + margin].float()
    own = (region - PALETTE[label].view(3, 1, 1)).norm(dim=0) < 40
    ys, xs = torch.nonzero(own, as_tuple=True)
    return torch.tensor([xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1], dtype=torch.float32)


@pytest.mark.parametrize("cached", [False, True], ids=["decoded", "cached"])
def test_boxes_follow_their_own_pixels_through_random_mosaics(tmp_path, cached):
    ds, checked, at_edge = make_coloured_dataset(tmp_path, cached), 0, 0
    for epoch in range(5):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            image, target = ds[index]
            boxes, labels = target["boxes"], target["labels"]
            assert image.shape == (3, SIZE, SIZE) and len(boxes) == len(labels)
            assert ((boxes >= 0) & (boxes <= SIZE)).all(), boxes
            assert ((boxes[:, 2:] - boxes[:, :2]) >= HYP["min_box_size"]).all(), boxes
            for box, label in zip(boxes, labels.tolist(), strict=True):
                w, h = (box[2:] - box[:2]).tolist()
                # Blended edges weigh more in small boxes; a box on another tile's pixels would score about 0.
                assert own_colour_fraction(image, box, label) > (0.8 if min(w, h) >= 8 else 0.5), (epoch, index, box, label)
                torch.testing.assert_close(colour_extent(image, box, label), box, atol=2.5, rtol=0)
                at_edge += bool(((box == 0) | (box == SIZE)).any())
                checked += 1
            # An object with more pixels in view than a tenth of the largest box can cover (64 x 64 at scale 1.5) has
            # kept its box: boxes are dropped only when little of them is left.
            counts = torch.bincount(nearest_colour(image).flatten(), minlength=len(PALETTE))
            for label in torch.nonzero(counts[: len(COLOURS)] > 0.1 * (64 * 1.5) ** 2).flatten().tolist():
                assert label in labels.tolist(), (epoch, index, label)
    assert checked > 50 and at_edge > 5, (checked, at_edge)


def test_boxes_mostly_out_of_view_are_dropped(tmp_path):
    """At scale 1 a box's full area in the view is known: its area in the file times (SIZE / long side)^2. Every kept
    box shows at least MIN_VISIBLE of it; objects cut to less lose their box even where some of them stays in view."""
    ds = make_coloured_dataset(tmp_path, scale=0.0)
    full = {
        int(label): float((b[2] - b[0]) * (b[3] - b[1])) * (SIZE / max(s.width, s.height)) ** 2
        for s in ds.samples
        for b, label in zip(s.boxes, s.labels, strict=True)
    }
    dropped = 0
    for epoch in range(5):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            image, target = ds[index]
            b, labels = target["boxes"], target["labels"].tolist()
            for area, label in zip(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).tolist(), labels, strict=True):
                assert area >= 0.97 * MIN_VISIBLE * full[label], (epoch, index, label, area, full[label])  # 0.97: rounding
            pure = (image.float().unsqueeze(0) - PALETTE[: len(COLOURS), :, None, None]).norm(dim=1) < 40
            dropped += sum(label not in labels for label in torch.nonzero(pure.sum((1, 2)) >= 4).flatten().tolist())
    assert dropped > 0


def as_tile(image: torch.Tensor, target: dict) -> Tile:
    return Tile(image.as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor), target["labels"])


def test_boxes_cut_at_tile_borders_are_clipped_to_their_visible_part():
    """A fixed centre (75, 125) on the 200 px canvas of img_size 100, seen at scale 1 shifted a quarter left: the view
    is the canvas' x 75-175, y 50-150, so the left tiles are out of view, the top-right one shows its rows 25-100 in the
    view's rows 0-75 and the bottom-right one (upscaled 2x to a long side of 100) its first 25 rows below them."""
    tiles = [
        tile(100, 100, [(10, 20, 50, 60)], 0),  # top-left: out of view
        tile(100, 100, [(60, 10, 90, 40), (10, 0, 50, 27)], 1),  # top-right: both boxes cut at the view's top edge
        tile(100, 100, [(0, 70, 20, 95), (30, 50, 60, 90)], 3),  # bottom-left: out of view
        tile(50, 50, [(5, 5, 15, 15)], 5),  # bottom-right: cut at the view's bottom edge
    ]
    image, view = mosaic_view([as_tile(*t) for t in tiles], [75, 125], 100, 1.0, [-0.25, 0.0])
    # The second top-right box keeps 40 x 2 of its 40 x 27 px in view: under a tenth of it, so it goes.
    torch.testing.assert_close(view["boxes"].as_subclass(torch.Tensor), torch.tensor([[60.0, 0, 90, 15], [10, 85, 30, 100]]))
    assert view["labels"].tolist() == [1, 5] and view["boxes"].canvas_size == (100, 100)
    assert torch.equal(image[:, :75], tiles[1][0][:, 25:])  # scale 1 on whole pixels: the tile's pixels, unchanged
    for box, label in zip(view["boxes"], view["labels"].tolist(), strict=True):
        assert own_colour_fraction(image, box, label) >= 0.99, (box, label)


def test_zoom_out_pads_grey_and_scales_boxes():
    """At scale 0.5 the 200 px canvas shrinks into the 100 px view; shifted 0.1 right, 10 grey columns appear left (the
    last of them blended with the tile beside it by the antialiased resize)."""
    tiles = [as_tile(*tile(100, 100, [(0, 0, 100, 100)], i)) for i in range(4)]
    image, view = mosaic_view(tiles, [100, 100], 100, 0.5, [0.1, 0.0])
    assert image.shape == (3, 100, 100)
    assert (image[:, :, :9] == PAD_VALUE).all() and not (image[:, :, 10:] == PAD_VALUE).all(0).any()
    assert (image[:, :, 9].float() - PAD_VALUE).abs().max() < 0.25 * (image[:, :, 10].float() - PAD_VALUE).abs().max()
    expected = [[10, 0, 60, 50], [60, 0, 100, 50], [10, 50, 60, 100], [60, 50, 100, 100]]
    torch.testing.assert_close(view["boxes"].as_subclass(torch.Tensor), torch.tensor(expected, dtype=torch.float32))


def test_same_seed_epoch_and_index_give_the_same_mosaic_in_any_worker(coloured_dataset):
    ds = coloured_dataset
    ds.set_epoch(2)
    here = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for (image, target), (again, target_again) in zip(here, loader, strict=True):
        assert torch.equal(image, again) and torch.equal(target["boxes"], target_again["boxes"])
        assert torch.equal(target["labels"], target_again["labels"]) and torch.equal(target["colour"], target_again["colour"])
    ds.set_epoch(3)
    assert any(not torch.equal(a[0], ds[i][0]) for i, a in enumerate(here))  # another epoch, another mosaic


def test_close_mosaic_turns_it_off_in_persistent_workers(coloured_dataset):
    ds = coloured_dataset
    plain = DetectionDataset(ds.samples, ds.transform, seed=ds.seed)  # the same dataset without mosaic
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, persistent_workers=True)
    for epoch in (ds.mosaic.until_epoch - 1, ds.mosaic.until_epoch):
        ds.set_epoch(epoch), plain.set_epoch(epoch)
        same = [torch.equal(image, plain[i][0]) for i, (image, _) in enumerate(loader)]
        # Before the close epoch every image is a mosaic; from it on, each is the plain transform's, draw for draw.
        assert all(same) if epoch == ds.mosaic.until_epoch else not any(same), (epoch, same)


def test_close_mosaic_epochs_scale_with_short_runs():
    on = {**HYP, "mosaic": 1.0}
    assert mosaic_epochs(300, on) == 290 and mosaic_epochs(100, on) == 90  # YOLO's last 10
    assert mosaic_epochs(30, on) == 24 and mosaic_epochs(8, on) == 6 and mosaic_epochs(2, on) == 1
    assert mosaic_epochs(8, {**on, "close_mosaic": 0}) == 8 and mosaic_epochs(8, HYP) == 0  # off by default
