"""Official COCO box mAP: `coordexp-rl eval --coco-ann instances_val2017.json --pred preds.jsonl`.

What "COCO val2017 box mAP" means in the papers (Qwen3-VL, Vision-R1, Perception-R1): a COCO results
file (``image_id``, ``category_id``, ``bbox`` as x, y, w, h, ``score``) scored by COCOeval against the
official annotation file itself: crowd regions are ignored regions (a detection on one is neither a
true nor a false positive), areas split small / medium / large, 100 detections per image.

Mapping a prediction line: ``images[0]`` -> the annotation file's image whose ``file_name`` equals it (or
its last path part, for JSONL converted with a ``--prefix``); each object's description, lower-cased
with whitespace collapsed, -> the category of that name. A description that is no category is not
scored: such boxes are counted and the most frequent descriptions listed, so that a reader sees what
the number leaves out. A ``parse_status: failed`` line is an image with no detections.

Scored images: those with a prediction line (``imgIds``); the summary says how many of the annotation
file's images that is, so a subset number is never mistaken for a full val2017 number.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from coordexp_rl.evaluation.coco import SCORE_FIELDS, SCORE_MODES
from coordexp_rl.evaluation.records import normalise_desc, object_box

# COCOeval.stats order (pycocotools' summarize()).
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def load_annotations(path: str | Path) -> dict[str, Any]:
    try:
        ann = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a COCO annotation file ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if key not in ann:
            raise ValueError(f"{path}: no '{key}' list; expected a COCO instances_*.json file")
    return ann


def to_results(preds: list[dict], ann: dict[str, Any], score_mode: str) -> tuple[list[dict], list[int], dict]:
    """Prediction lines -> (COCO results, scored image ids, report of what was not scored)."""
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score mode {score_mode!r} is not one of {SCORE_MODES}")
    by_name = {img["file_name"]: img["id"] for img in ann["images"]}
    cat_of = {normalise_desc(c["name"]): c["id"] for c in ann["categories"]}
    results, image_ids, other = [], [], Counter()
    for n, rec in enumerate(preds):
        where = rec.get("_where") or f"prediction {n}"
        rel = (rec.get("images") or [""])[0]
        image_id = by_name.get(rel, by_name.get(PurePosixPath(rel).name))
        if image_id is None:
            raise ValueError(f"{where}: image {rel!r} is not in the annotation file; check that --pred and "
                             "--coco-ann come from the same split")
        image_ids.append(image_id)
        if rec.get("parse_status") == "failed":
            continue
        for j, obj in enumerate(rec.get("objects") or []):
            desc = normalise_desc(obj.get("desc", ""))
            if desc not in cat_of:
                other[desc] += 1
                continue
            x1, y1, x2, y2 = object_box(obj, rec["width"], rec["height"], f"{where} objects[{j}]")
            score = 1.0 if score_mode == "constant" else obj.get(SCORE_FIELDS[score_mode])
            if score is None:
                raise ValueError(f"{where} objects[{j}]: no {SCORE_FIELDS[score_mode]!r} for score mode "
                                 f"{score_mode!r}")
            results.append({"image_id": image_id, "category_id": cat_of[desc],
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": float(score)})
    if len(set(image_ids)) != len(image_ids):
        dup = next(i for i, c in Counter(image_ids).items() if c > 1)
        raise ValueError(f"image id {dup} has more than one prediction line; write one line per image")
    report = {"non_category_boxes": sum(other.values()), "scored_boxes": len(results),
              "non_category_descs": dict(other.most_common(20))}
    return results, sorted(image_ids), report


def score(ann_path: str | Path, results: list[dict], image_ids: list[int], backend: str = "faster") -> dict:
    """COCOeval "bbox" on the official file, restricted to ``image_ids``: the 12 summary numbers."""
    if backend == "faster":
        from faster_coco_eval import COCO
        from faster_coco_eval.core.faster_eval_api import COCOeval_faster as COCOeval
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        raise ValueError(f"backend {backend!r} is not 'faster' or 'pycocotools'")
    if not results:  # both libraries refuse an empty results list; nothing detected scores 0
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # both libraries print progress
        gt = COCO(str(ann_path))
        dt = gt.loadRes([dict(r) for r in results])
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


def evaluate_official(ann_path: str | Path, preds: list[dict], modes=SCORE_MODES, backend: str = "faster",
                      out: Path | None = None) -> dict:
    """Per score mode the 12 COCO numbers; with ``out`` the results files ``coco_results_<mode>.json``."""
    ann = load_annotations(ann_path)
    metrics: dict[str, Any] = {"annotations": str(ann_path), "backend": backend}
    for mode in modes:
        results, image_ids, report = to_results(preds, ann, mode)
        metrics[mode] = score(ann_path, results, image_ids, backend)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"coco_results_{mode}.json").write_text(json.dumps(results))
    metrics.update(report)  # the same for every mode
    metrics["images_scored"] = len(image_ids)
    metrics["images_in_annotations"] = len(ann["images"])
    metrics["subset"] = len(image_ids) < len(ann["images"])
    return metrics
