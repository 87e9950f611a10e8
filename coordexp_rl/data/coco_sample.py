"""A small data set in COCO's own layout, for trying the COCO walk-through (docs/COCO.md) offline:
`python -m coordexp_rl.data.coco_sample --out coco_mini [--train 64 --val 16]`.

Writes what the COCO 2017 download unpacks to, with synthetic shapes for pictures::

    coco_mini/train2017/000000000001.jpg ...     (file_name in the annotations: no split folder)
    coco_mini/val2017/000000100001.jpg ...
    coco_mini/annotations/instances_train2017.json, instances_val2017.json

Categories are the shape names ("red circle", ...); every 8th image's last object is a crowd region
(``iscrowd: 1``), as COCO has them; ``area`` is the box area (COCO's is the mask's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from coordexp_rl.data.synth import SynthConfig, render_image
from coordexp_rl.errors import add_force_argument, refuse_overwrite

SPLITS = (("train2017", 1), ("val2017", 100_001))  # (folder, first image id): ids never collide


def coco_split(out: Path, folder: str, first_id: int, n: int, cfg: SynthConfig, seed: int) -> dict:
    """Render ``n`` images into ``out/folder`` and return their COCO instances dict."""
    names = [f"{c} {s}" for c in cfg.colours for s in cfg.shapes]
    cat_id = {name: k + 1 for k, name in enumerate(names)}
    images, annotations = [], []
    (out / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image_id = first_id + i
        image, objects = render_image(np.random.default_rng([seed, first_id, i]), cfg)
        file_name = f"{image_id:012d}.jpg"
        image.save(out / folder / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for j, obj in enumerate(objects):
            x1, y1, x2, y2 = obj.box
            crowd = int(i % 8 == 7 and j == len(objects) - 1)
            annotations.append({"id": len(annotations) + 1 + first_id * 10, "image_id": image_id,
                                "category_id": cat_id[obj.desc], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd})
    categories = [{"id": k, "name": name, "supercategory": "shape"} for name, k in cat_id.items()]
    return {"info": {"description": "coordexp_rl COCO-layout sample"}, "images": images,
            "annotations": annotations, "categories": categories}


def make_coco_sample(out: str | Path, n_train: int = 64, n_val: int = 16, seed: int = 0,
                     image_size: int = 128) -> Path:
    out = Path(out)
    # The embedded default's shapes (config.DataConfig.synth_*): the tiny model learns them in minutes.
    cfg = SynthConfig(image_size=image_size, min_objects=1, max_objects=3, min_size=0.2, max_size=0.4,
                      background="plain", colours=("red", "green", "blue"), shapes=("circle", "square", "triangle"))
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for (folder, first_id), n in zip(SPLITS, (n_train, n_val)):
        instances = coco_split(out, folder, first_id, n, cfg, seed)
        (out / "annotations" / f"instances_{folder}.json").write_text(json.dumps(instances))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordexp_rl.data.coco_sample", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    add_force_argument(parser)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    refuse_overwrite(args.out, args.force)
    out = make_coco_sample(args.out, args.train, args.val, args.seed)
    print(f"wrote {args.train} + {args.val} images in COCO's layout to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
