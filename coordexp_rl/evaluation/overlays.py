"""Box overlays: GT (green) and predicted (red, with score) boxes and descriptions drawn on the image.

An image that cannot be opened is drawn on a grey canvas of its recorded size (and the overlay says
so), so a missing image folder still gives a useful picture of the boxes.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from coordexp_rl.data.paths import ImagePathError, resolve_image_path
from coordexp_rl.evaluation.records import ImageRecord

log = logging.getLogger(__name__)

GT_COLOR = (0, 200, 0)
PRED_COLOR = (230, 30, 30)
MIN_SIDE = 480  # small images are upscaled so the labels stay readable


def draw_overlay(gt: ImageRecord, pred: ImageRecord, image_root: str | Path) -> Image.Image:
    path = Path(image_root) / gt.image
    try:
        path = resolve_image_path(Path(image_root), gt.image)  # never outside the root (symlinks too)
        img = Image.open(path).convert("RGB")
        missing = False
    except (OSError, ImagePathError):
        log.warning("overlay: cannot open %s; drawing on a blank canvas", path)
        img, missing = Image.new("RGB", (gt.width, gt.height), (128, 128, 128)), True
    # Boxes are in the record's pixel frame; the file may differ in size (or be upscaled below).
    scale = max(1.0, MIN_SIDE / max(1, min(gt.width, gt.height)))
    out_size = (round(gt.width * scale), round(gt.height * scale))
    img = img.resize(out_size)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, out_size[1] // 40))

    def box(b, color, label, below):
        x1, y1, x2, y2 = (v * scale for v in b)
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=max(2, out_size[0] // 300))
        ty = y2 + 2 if below else y1 - font.size - 4
        ty = min(max(ty, 0), out_size[1] - font.size - 4)
        tb = draw.textbbox((x1 + 2, ty), label, font=font)
        draw.rectangle(tb, fill=(0, 0, 0))
        draw.text((x1 + 2, ty), label, fill=color, font=font)

    for b, d in zip(gt.boxes, gt.raw_descs):
        box(b, GT_COLOR, d, below=False)
    for b, d, s in zip(pred.boxes, pred.raw_descs, pred.scores):
        box(b, PRED_COLOR, d if s is None else f"{d} {s:.2f}", below=True)
    header = f"{gt.image}  GT {len(gt.boxes)} (green)  pred {len(pred.boxes)} (red)  parse {pred.parse_status}"
    if missing:
        header += "  [image not found]"
    draw.rectangle(draw.textbbox((4, 4), header, font=font), fill=(255, 255, 255))
    draw.text((4, 4), header, fill=(0, 0, 0), font=font)
    return img


def write_overlays(gts: list[ImageRecord], preds: list[ImageRecord], image_root: str | Path, out_dir: str | Path,
                   n: int, seed: int = 0) -> list[Path]:
    """Overlays of a seeded random sample of ``n`` images as ``out_dir/NNN_<name>.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = sorted(random.Random(seed).sample(range(len(gts)), min(n, len(gts))))
    written = []
    for k, i in enumerate(picks):
        name = Path(gts[i].image).stem.replace(" ", "_")[:60]
        path = out_dir / f"{k:03d}_{name}.png"
        draw_overlay(gts[i], preds[i], image_root).save(path)
        written.append(path)
    return written
