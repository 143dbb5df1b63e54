"""A detection set whose test images share nothing with training but the task: the peer comparison's data.

Ten classes, the digits 0-9, drawn as glyphs in a font, colour, size (small to large), slant and rotation of
their own, among unlabelled clutter (letters, strokes, rings) and partly covered by occluders. Training and
validation images use one set of sources, test images another that training never saw:

    train / val   fonts: DejaVu Sans, Sans Mono, Serif (11 faces)   backgrounds: smooth colour noise
    test          fonts: STIX General, Computer Modern (7 faces)     backgrounds: crops of photographs and terrain
                                                                       maps, and striped textures

Every font and picture ships with matplotlib (already a dependency), so the set is the same on every machine.
Boxes are the tight extent of each glyph's own pixels after rotation (occluders may then cover part of it, as
in COCO's amodal boxes). YOLO layout: data.yaml + images/{train,val,test}/ + labels/{train,val,test}/.
With `grain`, pixel noise of that standard deviation goes over each image before it is saved: the smooth
backgrounds alone make JPEGs several times smaller than photographs of the same size, and quicker to decode."""

import gzip
import shutil
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

MPL_DATA = Path(matplotlib.get_data_path())
FONT_DIR = MPL_DATA / "fonts" / "ttf"
TRAIN_FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
]  # fmt: skip
TEST_FONTS = [
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
]
CLASSES = [str(d) for d in range(10)]
CLUTTER_TEXT = "ABCEFHKLMNPRSTUVWXYZ#%&?@"


def write_heldout_set(root: Path, *, train: int, val: int, test: int, size: int, seed: int = 0, grain: float = 0) -> Path:
    """Writes root/ (once per settings) and returns root/data.yaml."""
    settings = f"heldout v1 {train} {val} {test} {size} {seed}" + (f" grain {grain}" if grain else "")
    done = root / ".complete"
    if done.exists() and done.read_text() == settings:
        return root / "data.yaml"
    shutil.rmtree(root, ignore_errors=True)
    rng, grain_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)  # the same pictures with or without grain
    photos = photographs()
    for split, count in (("train", train), ("val", val), ("test", test)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        held_out = split == "test"
        fonts = [ImageFont.truetype(str(FONT_DIR / f), 64) for f in (TEST_FONTS if held_out else TRAIN_FONTS)]
        for i in range(count):
            background = photo_background(rng, photos, size) if held_out else noise_background(rng, size)
            image, rows = compose(rng, background, fonts)
            if grain:
                noise = grain_rng.standard_normal((size, size, 3), dtype=np.float32) * grain
                image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
            image.save(root / "images" / split / f"{split}{i:05d}.jpg", quality=92)
            (root / "labels" / split / f"{split}{i:05d}.txt").write_text("".join(rows))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\ntest: images/test\nnames: {CLASSES}\n")
    done.write_text(settings)
    return root / "data.yaml"


def photographs() -> list[np.ndarray]:
    """RGB pictures from matplotlib's sample data: a photograph, a product photo, and two terrain maps
    (elevation rendered through colour maps), none resembling the training backgrounds."""
    sample = MPL_DATA / "sample_data"
    pictures = [
        np.asarray(Image.open(sample / name).convert("RGB")) for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
    ]
    for name, cmap in (("jacksboro_fault_dem.npz", "gist_earth"), ("topobathy.npz", "terrain")):
        with np.load(sample / name) as npz:
            elevation = npz[npz.files[0]].astype(np.float64)
        elevation = (elevation - elevation.min()) / max(np.ptp(elevation), 1e-9)
        pictures.append((colormaps[cmap](elevation)[..., :3] * 255).astype(np.uint8))
    with gzip.open(sample / "s1045.ima.gz") as f:  # a 256x256 16-bit MRI slice
        mri = np.frombuffer(f.read(), np.uint16).reshape(256, 256).astype(np.float64)
    pictures.append((colormaps["bone"](mri / mri.max())[..., :3] * 255).astype(np.uint8))
    return pictures


def photo_background(rng, photos: list[np.ndarray], size: int) -> Image.Image:
    if rng.random() < 0.25:
        return stripes(rng, size)
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.4, 1.0) * min(h, w))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def stripes(rng, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
    wave = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return Image.fromarray((a + (b - a) * wave[..., None]).astype(np.uint8))


def noise_background(rng, size: int) -> Image.Image:
    """Smooth colour noise: a few octaves of random values, upsampled and summed."""
    out = np.zeros((size, size, 3))
    for cells, weight in ((4, 1.0), (8, 0.5), (16, 0.25)):
        coarse = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        out += weight * np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float64)
    out /= 1.75
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def glyph(rng, font, text: str, height: int, colour) -> Image.Image:
    """The text as an RGBA patch about `height` pixels tall, rotated and cropped to its pixels."""
    left, top, right, bottom = font.getbbox(text)
    patch = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(patch).text((4 - left, 4 - top), text, font=font, fill=255)
    scale = height / patch.height
    patch = patch.resize((max(1, round(patch.width * scale * rng.uniform(0.8, 1.25))), max(1, round(height))), Image.BILINEAR)
    patch = patch.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, expand=True)
    patch = patch.crop(patch.getbbox())
    rgba = Image.new("RGBA", patch.size, tuple(int(c) for c in colour) + (0,))
    rgba.putalpha(patch)
    return rgba


def contrasting_colour(rng, background: Image.Image, box) -> np.ndarray:
    """A colour far from the background under the object, so the object is visible but not trivially so."""
    mean = np.asarray(background.crop(box), np.float64).reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - mean).sum() > 180:
            return colour
    return 255 - mean.astype(int)


def compose(rng, background: Image.Image, fonts) -> tuple[Image.Image, list[str]]:
    image = background.convert("RGB")
    size = image.width
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 7)):  # clutter under the objects: strokes and rings
        x0, y0, x1, y1 = rng.integers(0, size, 4)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 5)))
        else:
            r = int(rng.integers(5, size // 6))
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), outline=colour, width=int(rng.integers(1, 4)))
    placed, rows = [], []
    for _ in range(rng.integers(1, 9)):
        height = size * float(np.exp(rng.uniform(np.log(0.05), np.log(0.4))))  # log-uniform: many small objects
        is_clutter = rng.random() < 0.3
        text = CLUTTER_TEXT[rng.integers(len(CLUTTER_TEXT))] if is_clutter else CLASSES[rng.integers(10)]
        font = fonts[rng.integers(len(fonts))]
        probe = glyph(rng, font, text, height, (0, 0, 0))
        if probe.width >= size or probe.height >= size:
            continue
        x, y = int(rng.integers(0, size - probe.width)), int(rng.integers(0, size - probe.height))
        box = (x, y, x + probe.width, y + probe.height)
        if any(overlap(box, other) > 0.3 for other in placed):
            continue
        patch = glyph(rng, font, text, height, contrasting_colour(rng, image, box))
        box = (x, y, x + patch.width, y + patch.height)
        image.paste(patch, (x, y), patch)
        placed.append(box)
        if not is_clutter:
            cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
            rows.append(f"{text} {cx:.6f} {cy:.6f} {(box[2] - box[0]) / size:.6f} {(box[3] - box[1]) / size:.6f}\n")
    for box in placed:  # occluders over some objects, never more than a third of one
        if rng.random() < 0.25:
            occlude(rng, draw, box)
    return image, rows


def occlude(rng, draw: ImageDraw.ImageDraw, box):
    w, h = box[2] - box[0], box[3] - box[1]
    ow, oh = w * rng.uniform(0.2, 0.55), h * rng.uniform(0.2, 0.55)
    x = box[0] + (0 if rng.random() < 0.5 else w - ow)
    y = box[1] + rng.uniform(0, h - oh)
    draw.rectangle((x, y, x + ow, y + oh), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))


def overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(smaller, 1)
