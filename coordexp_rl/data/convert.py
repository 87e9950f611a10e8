"""Convert public annotations to contract JSONL: `coordexp-rl convert {coco,voc,refcoco} ...`.

Image paths are written relative to the image root (COCO ``file_name``, VOC ``filename``), so pass the
same ``--image-root`` to `coordexp-rl validate` and to training. Boxes are clipped to the image and
boxes with no area left are dropped (counted in the summary), so the output always validates.

- coco: one record per image (images without annotations too, with no objects); desc = category name;
  ``bbox`` x,y,w,h -> x1,y1,x2,y2; crowd boxes dropped (``--crowd drop``) or kept with
  ``metadata.iscrowd`` (``--crowd mark``, a 0/1 list aligned with ``objects``).
- voc: one record per XML file (sorted by name); VOC pixel indices are 1-based and inclusive, so
  ``x1 = xmin - 1, x2 = xmax``; ``metadata.difficult`` is a 0/1 list aligned with ``objects``.
- refcoco: one record per image (training and eval pair predictions with GT by image), one object per
  referred box; desc = its first expression (whitespace collapsed), every expression kept in
  ``metadata.expressions`` (aligned with ``objects``). ``--refs`` is JSON (a list) or JSONL of
  ``{ref_id, ann_id, image_id, split, sentences: [{sent, sent_id?}]}`` (other keys ignored; see
  docs/DATA_JSONL_CONTRACT.md to turn the original ``refs(unc).p`` pickle into this).
"""

from __future__ import annotations

import argparse
import json
import logging
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from coordexp_rl.data.loader import DataError
from coordexp_rl.errors import add_force_argument, refuse_overwrite

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]


def clip_box(box: Iterable[float], width: int, height: int) -> Box | None:
    """Clip ``[x1, y1, x2, y2]`` to the image, rounded to 1e-3 px; None when no area is left.

    >>> clip_box([-2, 5, 12.00001, 8], 10, 10), clip_box([3, 3, 3, 9], 10, 10)
    ((0.0, 5.0, 10.0, 8.0), None)
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = (round(min(max(v, 0.0), float(width)), 3) for v in (x1, x2))
    y1, y2 = (round(min(max(v, 0.0), float(height)), 3) for v in (y1, y2))
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2, y2)


def _record(image: str, width: int, height: int, objects: list[dict], metadata: dict[str, Any]) -> dict:
    return {"images": [image], "width": int(width), "height": int(height), "objects": objects,
            "metadata": metadata}


def _obj(desc: str, box: Box) -> dict:
    return {"desc": desc, "bbox_2d": [_num(v) for v in box]}


def _num(v: float) -> float | int:
    # Whole numbers as ints keep the JSONL short and exact ([0, 5, 10, 8], not [0.0, 5.0, ...]).
    return int(v) if float(v).is_integer() else v


def coco_records(instances: dict, crowd: str = "drop", stats: Counter | None = None,
                 prefix: str = "") -> list[dict]:
    """COCO ``instances_*.json`` content -> records, in the order of ``instances["images"]``.

    prefix: prepended to every ``file_name`` (``"train2017/"``: one image root above both split folders).
    """
    if crowd not in ("drop", "mark"):
        raise ValueError(f"crowd must be 'drop' or 'mark', got {crowd!r}")
    stats = Counter() if stats is None else stats
    names = {c["id"]: c["name"].strip() for c in instances.get("categories", [])}
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in instances.get("annotations", []):
        by_image[ann["image_id"]].append(ann)
    records = []
    for img in instances["images"]:
        objects, ann_ids, iscrowd = [], [], []
        for ann in by_image.get(img["id"], []):
            is_crowd = int(ann.get("iscrowd", 0))
            if is_crowd and crowd == "drop":
                stats["crowd_dropped"] += 1
                continue
            x, y, w, h = ann["bbox"]
            box = clip_box([x, y, x + w, y + h], img["width"], img["height"])
            if box is None:
                stats["degenerate_dropped"] += 1
                continue
            objects.append(_obj(names[ann["category_id"]], box))
            ann_ids.append(ann["id"])
            iscrowd.append(is_crowd)
        meta: dict[str, Any] = {"id": f"coco/{img['id']}", "dataset": "coco", "image_id": img["id"],
                                "ann_ids": ann_ids}
        if crowd == "mark":
            meta["iscrowd"] = iscrowd
        records.append(_record(prefix + img["file_name"], img["width"], img["height"], objects, meta))
        stats["objects"] += len(objects)
    return records


def voc_record(xml_path: Path, image_root: Path, stats: Counter | None = None) -> dict:
    """One Pascal VOC XML file -> record (image size read from the image when the XML lacks it)."""
    stats = Counter() if stats is None else stats
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{xml_path}:{exc.position[0]}: xml: malformed XML: {exc}") from None
    filename = _text(root, "filename", xml_path)
    width, height = _voc_size(root, image_root / filename)
    objects, difficult = [], []
    for obj in root.findall("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{xml_path}: an <object> has no <bndbox>")
        xmin, ymin, xmax, ymax = (float(_text(bb, k, xml_path)) for k in ("xmin", "ymin", "xmax", "ymax"))
        box = clip_box([xmin - 1, ymin - 1, xmax, ymax], width, height)
        if box is None:
            stats["degenerate_dropped"] += 1
            continue
        objects.append(_obj(_text(obj, "name", xml_path).strip(), box))
        difficult.append(int(float(obj.findtext("difficult") or 0)))
    stats["objects"] += len(objects)
    meta = {"id": f"voc/{xml_path.stem}", "dataset": "voc", "difficult": difficult}
    return _record(filename, width, height, objects, meta)


def _text(node: ET.Element, tag: str, where: Path) -> str:
    value = node.findtext(tag)
    if value is None or not value.strip():
        raise DataError(f"{where}: missing <{tag}>")
    return value.strip()


def _voc_size(root: ET.Element, image_path: Path) -> tuple[int, int]:
    size = root.find("size")
    w = int(float(size.findtext("width") or 0)) if size is not None else 0
    h = int(float(size.findtext("height") or 0)) if size is not None else 0
    if w > 0 and h > 0:
        return w, h
    with Image.open(image_path) as im:  # some VOC-style XML files have no (or a zero) <size>
        return im.size


def refcoco_records(refs: list[dict], instances: dict, split: str | None = None,
                    stats: Counter | None = None) -> list[dict]:
    """Referring expressions -> one record per image (in the order images first appear in ``refs``), one
    object per referred box (refs of one box merged) with its first expression as desc."""
    stats = Counter() if stats is None else stats
    images = {img["id"]: img for img in instances["images"]}
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    by_image: dict[Any, dict[Any, dict]] = defaultdict(dict)  # image id -> ann id -> the box's refs
    for ref in refs:
        if split is not None and ref.get("split") != split:
            continue
        sentences = [(" ".join(str(s["sent"]).split()), s.get("sent_id")) for s in ref["sentences"]]
        kept = [(desc, sent_id) for desc, sent_id in sentences if desc]
        stats["empty_expression_dropped"] += len(sentences) - len(kept)
        if ref["image_id"] not in images or ref["ann_id"] not in anns:
            raise DataError(f"ref {ref['ref_id']}: image_id {ref['image_id']} or ann_id {ref['ann_id']} is not in the "
                            "--ann instances file (RefCOCO refs go with their own instances.json)")
        box_refs = by_image[ref["image_id"]].setdefault(ref["ann_id"], {"refs": [], "sentences": []})
        box_refs["refs"].append(ref)
        box_refs["sentences"] += kept
    records = []
    for image_id, boxes in by_image.items():
        img = images[image_id]
        splits = {ref.get("split") for b in boxes.values() for ref in b["refs"]}
        if len(splits) > 1:
            raise DataError(f"image {image_id} ({img['file_name']}) has refs in splits {sorted(map(str, splits))}: "
                            "pass --split to convert one split")
        objects, meta = [], {"ref_ids": [], "ann_ids": [], "expressions": [], "sent_ids": []}
        for ann_id, b in boxes.items():
            x, y, w, h = anns[ann_id]["bbox"]
            box = clip_box([x, y, x + w, y + h], img["width"], img["height"])
            if box is None or not b["sentences"]:
                stats["degenerate_dropped" if box is None else "box_without_expression_dropped"] += 1
                continue
            objects.append(_obj(b["sentences"][0][0], box))
            meta["ref_ids"].append([ref["ref_id"] for ref in b["refs"]])
            meta["ann_ids"].append(ann_id)
            meta["expressions"].append([desc for desc, _ in b["sentences"]])
            meta["sent_ids"].append([sent_id for _, sent_id in b["sentences"]])
        if not objects:
            stats["image_without_boxes_dropped"] += 1
            continue
        records.append(_record(img["file_name"], img["width"], img["height"], objects,
                               {"id": f"refcoco/{image_id}", "dataset": "refcoco", "image_id": image_id,
                                "split": splits.pop(), **meta}))
        stats["objects"] += len(objects)
    return records


def read_refs(path: Path) -> list[dict]:
    """A JSON list, or JSONL with one ref per line."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        return _json(text, path)
    return [_json(line, path, n) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def read_json(path: Path, encoding: str = "utf-8") -> Any:
    """A JSON file's content; DataError naming the file (and line) when it cannot be read or parsed."""
    return _json(_read_text(path, encoding), path)


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as {encoding} text: {exc}") from None


def _json(text: str, path: Path, line: int = 0) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{line or exc.lineno}: json: malformed JSON: {exc.msg} at column {exc.colno}") from None


def write_jsonl(records: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def missing_images(records: list[dict], image_root: Path, limit: int = 10) -> list[str]:
    """Up to ``limit`` image paths that are not files under ``image_root`` (one stat per image)."""
    missing = []
    for rel in dict.fromkeys(r["images"][0] for r in records):
        if not (image_root / rel).is_file():
            missing.append(rel)
            if len(missing) >= limit:
                break
    return missing


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    coco = sub.add_parser("coco", help="COCO instances_*.json (one record per image)")
    coco.add_argument("--ann", type=Path, required=True, help="instances_*.json")
    coco.add_argument("--image-root", type=Path, required=True, help="folder the file_name paths are relative to")
    coco.add_argument("--crowd", choices=("drop", "mark"), default="drop",
                      help="drop crowd boxes (default) or keep them with metadata.iscrowd")
    coco.add_argument("--prefix", default="",
                      help="prepended to every file_name, e.g. 'train2017/' to use one --image-root above both "
                           "split folders (default: none; then give each split its own image root)")
    voc = sub.add_parser("voc", help="Pascal VOC XML annotations (one record per XML file)")
    voc.add_argument("--xml-dir", type=Path, required=True, help="the Annotations folder")
    voc.add_argument("--image-root", type=Path, required=True, help="the JPEGImages folder")
    ref = sub.add_parser("refcoco", help="RefCOCO/+/g referring expressions (one record per image)")
    ref.add_argument("--refs", type=Path, required=True, help="refs as a JSON list or JSONL (see the docs)")
    ref.add_argument("--ann", type=Path, required=True, help="the matching COCO instances.json")
    ref.add_argument("--image-root", type=Path, default=None, help="image folder (only checked for missing files)")
    ref.add_argument("--split", default=None, help="keep only this split (train, val, testA, ...)")
    for p in (coco, voc, ref):
        p.add_argument("--out", type=Path, required=True, help="output JSONL")
        add_force_argument(p)


def run(args: argparse.Namespace) -> int:
    inputs = tuple(getattr(args, k, None) for k in ("ann", "refs", "xml_dir", "image_root"))
    refuse_overwrite(args.out, args.force, inputs)
    stats: Counter = Counter()
    if args.source == "coco":
        records = coco_records(read_json(args.ann, "utf-8-sig"), args.crowd, stats, args.prefix)
    elif args.source == "voc":
        xmls = sorted(args.xml_dir.glob("*.xml"))
        if not xmls:
            print(f"error: no *.xml files in {args.xml_dir}")
            return 1
        records = [voc_record(x, args.image_root, stats) for x in xmls]
    else:
        records = refcoco_records(read_refs(args.refs), read_json(args.ann), args.split, stats)
    write_jsonl(records, args.out)
    dropped = ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if k != "objects") or "nothing dropped"
    print(f"wrote {len(records)} records ({stats['objects']} objects; {dropped}) to {args.out}")
    if args.image_root is not None:
        missing = missing_images(records, args.image_root)
        if missing:
            more = "at least " if len(missing) >= 10 else ""
            print(f"warning: {more}{len(missing)} images are missing under {args.image_root} (first: {missing[0]})")
        print(f"image paths are relative to {args.image_root}: "
              f"`coordexp-rl validate {args.out} --image-root {args.image_root}`")
    return 0
