"""COCO box AP / AR of paired records with faster-coco-eval (pycocotools as the cross-check backend).

Categories come from the GT: one per normalised GT description. A prediction whose normalised
description equals a GT category is scored in that category as usual.

A prediction whose description matches no GT category must still count as a false positive. COCO
ignores categories without GT (their precision is -1 and drops out of the mean), so an extra
"unmatched" category would silently drop those boxes. Instead each such box is charged to a real GT
category and placed on a *shadow image*: an extra image id with no GT at all, one per real image, so
the box can never become a true positive but lowers that category's precision at its score. The charged
category is the one of the GT box it overlaps most in its own image (the "right box, wrong words"
case); a box that overlaps no GT is charged to the GT category with the most similar name (difflib
ratio; ties -> more GT boxes, then name). Shadow boxes get their own 100-detection budget per image.

With a constant score COCO ranks equal scores in input order (stable mergesort in both backends): by
image, then by the order in which the model wrote its objects (a shadow box after its image's other
boxes). So "constant" AP depends on output order.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordexp_rl.evaluation.greedy_match import iou_matrix
from coordexp_rl.evaluation.records import ImageRecord

log = logging.getLogger(__name__)

SCORE_MODES = ("constant", "coord_prob", "object_prob")
SCORE_FIELDS = {"coord_prob": "score", "object_prob": "score_object"}  # the prediction field each mode reads


@dataclass
class CocoInputs:
    gt: dict[str, Any]  # COCO-format GT dataset dict (images incl. shadow images, annotations, categories)
    dets: list[dict[str, Any]]  # COCO result list, in prediction output order
    category_names: list[str]  # index k -> name; category id is k + 1
    unmatched_desc_boxes: int  # predictions charged to a category through a shadow image


def _xywh(box: tuple[float, float, float, float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)]


def category_names(gts: list[ImageRecord]) -> list[str]:
    """Sorted normalised GT descriptions (category id = index + 1)."""
    return sorted({d for g in gts for d in g.descs})


def _fallback_category(desc: str, names: list[str], gt_counts: Counter) -> str:
    return min(names, key=lambda n: (-difflib.SequenceMatcher(None, desc, n).ratio(), -gt_counts[n], n))


def build_coco_inputs(gts: list[ImageRecord], preds: list[ImageRecord], score_mode: str) -> CocoInputs:
    """COCO GT dict and detections for one scoring mode; ``preds[i]`` belongs to ``gts[i]``."""
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode {score_mode!r} is not one of {SCORE_MODES}")
    names = category_names(gts)
    cat_id = {n: k + 1 for k, n in enumerate(names)}
    gt_counts = Counter(d for g in gts for d in g.descs)
    images, anns, dets = [], [], []
    for i, g in enumerate(gts):
        # Interleaved ids (real 2i+1, shadow 2i+2) keep constant-score ties in image order.
        images.append({"id": 2 * i + 1, "width": g.width, "height": g.height, "file_name": g.image})
        images.append({"id": 2 * i + 2, "width": g.width, "height": g.height, "file_name": g.image + "#shadow"})
        for box, desc in zip(g.boxes, g.descs):
            xywh = _xywh(box)
            anns.append({"id": len(anns) + 1, "image_id": 2 * i + 1, "category_id": cat_id[desc], "bbox": xywh,
                         "area": xywh[2] * xywh[3], "iscrowd": 0})
    unmatched = 0
    for i, (g, p) in enumerate(zip(gts, preds)):
        overlaps = iou_matrix(p.boxes, g.boxes)  # (P, G)
        scores = p.object_scores if score_mode == "object_prob" else p.scores
        for j, (box, desc, score) in enumerate(zip(p.boxes, p.descs, scores)):
            if score_mode != "constant" and score is None:
                raise ValueError(f"{p.where} objects[{j}]: no {SCORE_FIELDS[score_mode]!r} for score mode "
                                 f"{score_mode!r}")
            det_score = 1.0 if score_mode == "constant" else float(score)
            det = {"image_id": 2 * i + 1, "bbox": _xywh(box), "score": det_score}
            if desc in cat_id:
                det["category_id"] = cat_id[desc]
            elif names:
                unmatched += 1
                det["image_id"] = 2 * i + 2
                if overlaps.shape[1] and overlaps[j].max() > 0:
                    det["category_id"] = cat_id[g.descs[int(overlaps[j].argmax())]]
                else:
                    det["category_id"] = cat_id[_fallback_category(desc, names, gt_counts)]
            else:
                continue  # no GT categories at all: AP is undefined, nothing to charge
            dets.append(det)
    categories = [{"id": k + 1, "name": nm} for k, nm in enumerate(names)]
    gt = {"images": images, "annotations": anns, "categories": categories}
    return CocoInputs(gt, dets, names, unmatched)


def run_cocoeval(inputs: CocoInputs, backend: str = "faster") -> dict[str, Any]:
    """Box AP/AR: ``{"mAP", "AP50", "AP75", "AR100", "per_category": {name: {"AP", "AP50"}}}``.

    Values are None when undefined (no GT boxes). ``backend``: "faster" (faster-coco-eval) or
    "pycocotools" (the reference, used by the tests).
    """
    if not inputs.gt["annotations"]:
        return {"mAP": None, "AP50": None, "AP75": None, "AR100": None, "per_category": {}}
    if backend == "faster":
        from faster_coco_eval import COCO
        from faster_coco_eval.core.faster_eval_api import COCOeval_faster as COCOeval
    elif backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        raise ValueError(f"backend {backend!r} is not 'faster' or 'pycocotools'")
    # Both libraries print progress to stdout; library code must not.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        # Both libraries add keys to the dicts they get: hand them shallow copies (boxes are not mutated).
        coco_gt.dataset = {k: [dict(x) for x in v] for k, v in inputs.gt.items()}
        coco_gt.createIndex()
        if inputs.dets:
            coco_dt = coco_gt.loadRes([dict(d) for d in inputs.dets])
        else:  # pycocotools' loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(inputs.gt["images"]), "annotations": [],
                               "categories": list(inputs.gt["categories"])}
            coco_dt.createIndex()
        kwargs = {"print_function": log.debug} if backend == "faster" else {}
        ev = COCOeval(coco_gt, coco_dt, "bbox", **kwargs)
        ev.evaluate()
        ev.accumulate()
    return summarise_eval(np.asarray(ev.eval["precision"]), np.asarray(ev.eval["recall"]), inputs.category_names,
                          list(ev.params.iouThrs))


def _mean_valid(x: np.ndarray) -> float | None:
    v = x[x > -1]
    return float(v.mean()) if v.size else None


def summarise_eval(
    precision: np.ndarray, recall: np.ndarray, names: list[str], iou_thrs: list[float]
) -> dict[str, Any]:
    """COCO summary numbers from accumulate()'s arrays (area "all", maxDets 100).

    precision: (T iou thresholds, R=101 recall points, K categories, A areas, M maxDets); recall: (T, K, A, M).
    """
    t50 = int(np.argmin(np.abs(np.asarray(iou_thrs) - 0.5)))
    t75 = int(np.argmin(np.abs(np.asarray(iou_thrs) - 0.75)))
    p = precision[:, :, :, 0, -1]  # (T, R, K)
    per_category = {
        name: {"AP": _mean_valid(p[:, :, k]), "AP50": _mean_valid(p[t50, :, k])} for k, name in enumerate(names)
    }
    return {
        "mAP": _mean_valid(p),
        "AP50": _mean_valid(p[t50]),
        "AP75": _mean_valid(p[t75]),
        "AR100": _mean_valid(recall[:, :, 0, -1]),
        "per_category": per_category,
    }
