"""The synthetic shapes detection set: `coordexp-rl synth --out DIR --train N --val M --seed S`.

Coloured shapes (``"red circle"``, ``"blue cross"``, ...) on plain or noisy dark backgrounds, 1 to 6 per
image, some touching an edge, placed with little overlap so that every object stays visible. Boxes are
the tight pixel bounds of each shape's visible pixels (``[x1, y1, x2, y2]``, x2/y2 exclusive, so a
shape covering columns 3..9 has x1 = 3, x2 = 10). Writes ``DIR/images/*.png``, ``DIR/train.jsonl``,
``DIR/val.jsonl`` and ``DIR/meta.json``; the same arguments give the same bytes.

Dense scenes (``max_pair_iou``, ``distinct_descs``; off by default, and the default's bytes do not depend
on them): shapes may touch and overlap as long as every pair of *output* boxes (the visible bounds) keeps
IoU <= ``max_pair_iou`` and every shape keeps ``min_visible`` of its pixels; each image draws
``distinct_descs`` descriptions and its objects repeat them (several "red circle"s in one image).
configs/dense_cpu.yaml is the dense task: ``coordexp-rl synth --out DIR --train N --val M --size 256
--min-objects 3 --max-objects 12 --min-size 0.08 --max-size 0.2 --max-pair-iou 0.3 --distinct-descs 4
--background plain --shapes circle,square,triangle --colours red,green,blue``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from coordexp_rl.errors import add_force_argument, refuse_overwrite

log = logging.getLogger(__name__)

# Strong, well separated colours (RGB) and the word the description uses.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 255),
    "yellow": (250, 220, 20),
    "magenta": (235, 40, 220),
    "orange": (255, 140, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
BACKGROUNDS = ("plain", "noisy", "mixed")


@dataclass(frozen=True)
class SynthConfig:
    """Generation arguments (written to meta.json)."""

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 6
    min_size: float = 0.12  # shape side as a fraction of the image side
    max_size: float = 0.35
    max_overlap: float = 0.1  # intersection / smaller box area allowed between two shapes (>= their IoU)
    edge_prob: float = 0.15  # chance that a shape is pushed against an image edge
    background: str = "mixed"  # plain | noisy | mixed (half and half)
    noise: int = 18  # std of the per-pixel noise on noisy backgrounds (0..255 scale)
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    # Dense scenes; at these defaults the images are drawn exactly as before they existed.
    max_pair_iou: float | None = None  # None: squares overlap <= max_overlap; a number: dense placement (above)
    distinct_descs: int = 0  # 0: every object draws its shape and colour; N: from N drawn per image
    min_visible: float = 0.5  # dense placement: share of a shape's pixels that stay visible (not painted over)

    def check(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size {self.image_size} is too small; use at least 16")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_size <= self.max_size <= 1:
            raise ValueError(f"need 0 < min_size <= max_size <= 1, got {self.min_size}, {self.max_size}")
        if not 0 <= self.edge_prob <= 1:
            raise ValueError(f"edge_prob {self.edge_prob} must be in [0, 1]")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background {self.background!r} is not one of {BACKGROUNDS}")
        unknown = [s for s in self.shapes if s not in SHAPES] + [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"unknown shapes/colours {unknown}; known: {SHAPES}, {tuple(COLOURS)}")
        if self.max_pair_iou is not None and not 0 <= self.max_pair_iou < 1:
            raise ValueError(f"max_pair_iou {self.max_pair_iou} must be in [0, 1) (or None: no dense placement)")
        if self.distinct_descs < 0:
            raise ValueError(f"distinct_descs {self.distinct_descs} must be >= 0 (0: no repeats imposed)")
        if not 0 < self.min_visible <= 1:
            raise ValueError(f"min_visible {self.min_visible} must be in (0, 1]")


# The dense-scene fields: written to meta.json only when set, so the default's meta.json is unchanged.
DENSE_FIELDS = ("max_pair_iou", "distinct_descs", "min_visible")


@dataclass(frozen=True)
class Drawn:
    desc: str
    box: tuple[int, int, int, int]  # tight bounds of the visible pixels, x2/y2 exclusive


def make_synthetic_set(out_dir: str | Path, n_train: int, n_val: int, seed: int, image_size: int = 128,
                       min_objects: int = 1, max_objects: int = 6, **options) -> dict[str, Path]:
    """Write the set and return ``{"train": path, "val": path, "meta": path}``.

    ``options`` are the other ``SynthConfig`` fields (``background="plain"``, ``max_size=0.3``, ...).
    """
    cfg = SynthConfig(image_size=image_size, min_objects=min_objects, max_objects=max_objects, **options)
    cfg.check()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = {}
    for split_index, (split, n) in enumerate((("train", n_train), ("val", n_val))):
        lines = []
        for i in range(n):
            # One generator per image: any image can be regenerated alone, and splits never share one.
            rng = np.random.default_rng([seed, split_index, i])
            image, objects = render_image(rng, cfg)
            rel = f"images/{split}_{i:06d}.png"
            image.save(out / rel, format="PNG")
            lines.append(json.dumps({
                "images": [rel], "width": cfg.image_size, "height": cfg.image_size,
                "objects": [{"desc": o.desc, "bbox_2d": list(o.box)} for o in objects],
                "metadata": {"id": f"{split}_{i:06d}", "dataset": "synth_shapes"},
            }))
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    default = SynthConfig()
    fields = {k: v for k, v in asdict(cfg).items() if k not in DENSE_FIELDS or v != getattr(default, k)}
    meta = {"generator": "coordexp_rl.data.synth", "seed": seed, "n_train": n_train, "n_val": n_val,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}
    paths["meta"] = out / "meta.json"
    paths["meta"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %d + %d synthetic images to %s in %.1f s", n_train, n_val, out, time.perf_counter() - start)
    return paths


def render_image(rng: np.random.Generator, cfg: SynthConfig) -> tuple[Image.Image, list[Drawn]]:
    """One image and its objects (in drawing order)."""
    s = cfg.image_size
    image = Image.fromarray(_background(rng, cfg), mode="RGB")
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    palette = _palette(rng, cfg)
    if cfg.max_pair_iou is not None:
        specs = _place_dense(rng, cfg, n_target, palette)
    else:
        placed: list[tuple[int, int, int, int]] = []  # outer squares of the shapes
        specs = []
        for _ in range(n_target):
            square = _place(rng, cfg, placed)
            if square is None:
                break  # the image is full; fewer objects rather than hidden ones
            placed.append(square)
            shape, colour = _draw_desc(rng, cfg, palette)
            specs.append((shape, colour, square))
    # Masks first, so that each box covers only what stays visible after later shapes are drawn.
    masks = [_shape_mask(shape, square, s) for shape, _, square in specs]  # each (s, s) bool
    objects = []
    covered = np.zeros((s, s), dtype=bool)
    visible = []
    for mask in reversed(masks):
        visible.append(mask & ~covered)
        covered |= mask
    visible.reverse()
    for (shape, colour, _), mask, seen in zip(specs, masks, visible):
        image.paste(COLOURS[colour], mask=Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))
        ys, xs = np.nonzero(seen)
        objects.append(Drawn(f"{colour} {shape}", (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return image, objects


def _palette(rng: np.random.Generator, cfg: SynthConfig) -> list[tuple[str, str]] | None:
    """The image's ``distinct_descs`` (shape, colour) pairs, all different; None when not set (no draw)."""
    if not cfg.distinct_descs:
        return None
    pairs = [(shape, colour) for colour in cfg.colours for shape in cfg.shapes]
    picks = rng.choice(len(pairs), size=min(cfg.distinct_descs, len(pairs)), replace=False)
    return [pairs[int(k)] for k in picks]


def _draw_desc(rng: np.random.Generator, cfg: SynthConfig, palette: list[tuple[str, str]] | None) -> tuple[str, str]:
    """(shape, colour): free (the default's two draws) or one of the image's palette."""
    if palette is None:
        return str(rng.choice(cfg.shapes)), str(rng.choice(cfg.colours))
    return palette[int(rng.integers(len(palette)))]


def _place_dense(rng: np.random.Generator, cfg: SynthConfig, n_target: int, palette: list[tuple[str, str]] | None,
                 tries: int = 40) -> list[tuple[str, str, tuple[int, int, int, int]]]:
    """Specs ``(shape, colour, square)`` in drawing order, placed by rejection on the *visible* boxes.

    A candidate is kept when, with it drawn on top, every shape keeps ``min_visible`` of its pixels and
    every pair of visible tight boxes (what the JSONL will hold) has IoU <= ``max_pair_iou``. Later shapes
    only shrink earlier visible masks, and each acceptance re-checks every box that changed, so the
    bound holds for the final boxes. Touching and overlapping shapes are allowed within it.
    """
    s = cfg.image_size
    specs: list[tuple[str, str, tuple[int, int, int, int]]] = []
    full: list[int] = []  # pixel count of each shape's whole mask
    visible: list[np.ndarray] = []  # (s, s) bool, what stays visible of each shape so far
    boxes: list[tuple[int, int, int, int]] = []  # tight bounds of visible
    for _ in range(n_target):
        shape, colour = _draw_desc(rng, cfg, palette)
        for attempt in range(tries):
            square = _candidate_square(rng, cfg, attempt, tries)
            mask = _shape_mask(shape, square, s)
            new_visible, new_boxes, changed, ok = list(visible), list(boxes), [], True
            for i, seen in enumerate(visible):
                if not _boxes_touch(boxes[i], square):
                    continue
                left = seen & ~mask
                if left.sum() < cfg.min_visible * full[i]:
                    ok = False
                    break
                if left.sum() < seen.sum():
                    new_visible[i], new_boxes[i] = left, _tight_box(left)
                    changed.append(i)
            if not ok:
                continue
            new_boxes.append(_tight_box(mask))
            changed.append(len(boxes))
            if all(_iou(new_boxes[i], new_boxes[j]) <= cfg.max_pair_iou
                   for i in changed for j in range(len(new_boxes)) if j != i):
                specs.append((shape, colour, square))
                full.append(int(mask.sum()))
                visible, boxes = [*new_visible, mask], new_boxes
                break
        else:
            break  # the image is full; fewer objects rather than hidden ones
    return specs


def _boxes_touch(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    cols, rows = np.nonzero(mask.any(axis=0))[0], np.nonzero(mask.any(axis=1))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _background(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    s = cfg.image_size
    base = rng.integers(25, 95, size=3)  # a dark, slightly tinted grey: every colour stands out on it
    pixels = np.broadcast_to(base, (s, s, 3)).astype(np.float32)
    noisy = cfg.background == "noisy" or (cfg.background == "mixed" and rng.random() < 0.5)
    if noisy:
        pixels = pixels + rng.normal(0.0, cfg.noise, size=(s, s, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, cfg: SynthConfig,
           placed: list[tuple[int, int, int, int]], tries: int = 40) -> tuple[int, int, int, int] | None:
    """A square ``(x1, y1, x2, y2)`` that overlaps no placed one by more than ``max_overlap``."""
    for attempt in range(tries):
        square = _candidate_square(rng, cfg, attempt, tries)
        if all(_overlap(square, other) <= cfg.max_overlap for other in placed):
            return square
    return None


def _candidate_square(rng: np.random.Generator, cfg: SynthConfig, attempt: int,
                      tries: int) -> tuple[int, int, int, int]:
    """A random square ``(x1, y1, x2, y2)`` for placement attempt ``attempt`` of ``tries``, pushed against an
    image edge with ``edge_prob``. The size range shrinks as attempts fail, so crowded images still fit
    small shapes."""
    s = cfg.image_size
    lo, hi = max(4, round(cfg.min_size * s)), max(4, round(cfg.max_size * s))
    side = int(rng.integers(lo, max(lo, hi - (hi - lo) * attempt // tries) + 1))
    x, y = (int(v) for v in rng.integers(0, s - side + 1, size=2))
    if rng.random() < cfg.edge_prob:
        edge = int(rng.integers(4))
        x = 0 if edge == 0 else s - side if edge == 1 else x
        y = 0 if edge == 2 else s - side if edge == 3 else y
    return x, y, x + side, y + side


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area (an upper bound of IoU)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _shape_mask(shape: str, square: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` drawn in the square (x2/y2 exclusive)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = square
    r, b = x2 - 1, y2 - 1  # PIL's shape coordinates are inclusive
    cx, cy = (x1 + r) / 2, (y1 + b) / 2
    if shape == "circle":
        draw.ellipse((x1, y1, r, b), fill=255)
    elif shape == "square":
        draw.rectangle((x1, y1, r, b), fill=255)
    elif shape == "triangle":
        draw.polygon([(x1, b), (r, b), (cx, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (r, cy), (cx, b), (x1, cy)], fill=255)
    elif shape == "cross":
        t = max(1, (x2 - x1) // 3)  # arm thickness
        draw.rectangle((x1, round(cy - t / 2), r, round(cy + t / 2)), fill=255)
        draw.rectangle((round(cx - t / 2), y1, round(cx + t / 2), b), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(mask) > 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (images/, train.jsonl, val.jsonl)")
    add_force_argument(parser)
    parser.add_argument("--train", type=int, required=True, help="number of training images")
    parser.add_argument("--val", type=int, required=True, help="number of validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=6)
    parser.add_argument("--background", choices=BACKGROUNDS, default="mixed")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--colours", default=",".join(COLOURS), help="comma-separated subset of " + ",".join(COLOURS))
    d = SynthConfig()
    parser.add_argument("--min-size", type=float, default=d.min_size, help="smallest shape side / image side")
    parser.add_argument("--max-size", type=float, default=d.max_size, help="largest shape side / image side")
    parser.add_argument("--edge-prob", type=float, default=d.edge_prob, help="chance a shape is pushed to an edge")
    parser.add_argument("--max-pair-iou", type=float, default=d.max_pair_iou,
                        help="dense scenes: shapes may touch and overlap, every pair of boxes keeps IoU <= this "
                             "(default: off, shapes barely overlap)")
    parser.add_argument("--distinct-descs", type=int, default=d.distinct_descs,
                        help="dense scenes: each image draws this many descriptions and its objects repeat them "
                             "(default 0: every object draws its own)")
    parser.add_argument("--min-visible", type=float, default=d.min_visible,
                        help="with --max-pair-iou: share of each shape's pixels that stays visible")


def run(args: argparse.Namespace) -> int:
    refuse_overwrite(args.out, args.force)
    start = time.perf_counter()
    paths = make_synthetic_set(args.out, args.train, args.val, args.seed, image_size=args.size,
                               min_objects=args.min_objects, max_objects=args.max_objects,
                               background=args.background, shapes=tuple(args.shapes.split(",")),
                               colours=tuple(args.colours.split(",")), min_size=args.min_size,
                               max_size=args.max_size, edge_prob=args.edge_prob, max_pair_iou=args.max_pair_iou,
                               distinct_descs=args.distinct_descs, min_visible=args.min_visible)
    print(f"wrote {args.train} train and {args.val} val images to {args.out} in "
          f"{time.perf_counter() - start:.1f} s ({paths['train'].name}, {paths['val'].name}, meta.json)")
    return 0
