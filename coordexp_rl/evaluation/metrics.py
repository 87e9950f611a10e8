"""``evaluate(gt_records, pred_records)``: every detection metric of one prediction file, as a JSON dict.

- COCO box mAP / AP50 / AP75 / AR@100 per score mode (see coco.py for categories, unmatched
  descriptions and why "constant" AP depends on output order).
- F1 / precision / recall at IoU >= ``iou_thr`` with one-to-one Hungarian matching per image and per
  category (matching.py), and class-agnostic (per image, descriptions ignored).
- Mean IoU of matched pairs and its histogram (bins of 0.1): pairs from a per-image, per-category
  Hungarian matching that maximises total IoU over any overlap (IoU > 0), so poor boxes show up too;
  ``mean_iou_tp`` is the mean over the F1 true positives only.
- Parse-failure rate (a failed line is an empty prediction; no image is dropped), duplicate rate, and a
  per-description table.
- ``breakdown`` (breakdown.py): the same by GT objects per image, errors per image (duplicates, extras,
  misses, outputs cut at the token limit), by output position, late recall and written order.

    >>> gt = [{"images": ["a.png"], "width": 10, "height": 10, "objects": [{"desc": "cat", "bbox_2d": [0, 0, 5, 5]}]}]
    >>> pred = [{"images": ["a.png"], "width": 10, "height": 10, "parse_status": "ok",
    ...          "objects": [{"desc": "Cat", "bbox_2d": [0, 0, 5, 5], "score": 0.9}]}]
    >>> m = evaluate(gt, pred)
    >>> m["coco"]["coord_prob"]["mAP"], m["f1"]["f1"], m["mean_iou"]
    (1.0, 1.0, 1.0)
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np

from coordexp_rl.evaluation.breakdown import breakdown
from coordexp_rl.evaluation.coco import build_coco_inputs, run_cocoeval
from coordexp_rl.evaluation.greedy_match import iou_matrix, match_one_to_one
from coordexp_rl.evaluation.records import ImageRecord, pair_records

ANY_OVERLAP = 1e-9  # threshold for "matched pair" in the mean-IoU matching
DUPLICATE_IOU = 0.9
HIST_EDGES = [round(0.1 * k, 1) for k in range(11)]

NOTES = {
    "constant": "every box scored 1.0; COCO ranks ties in input order (stable sort: image, then output "
                "order), so this AP depends on the order the model wrote its objects",
    "coord_prob": "box score = mean probability of its 4 coord tokens (the 'score' field)",
    "object_prob": "box score = probability of its description and coord tokens together (the 'score_object' "
                   "field): a box under a doubtful name ranks low",
    "unmatched_desc": "a prediction whose normalised description is no GT category is a false positive: "
                      "charged to the category of the GT box it overlaps most (else the most similar GT "
                      "name) on a shadow image without GT, so it lowers precision and can never match",
    "matching": "F1: per image and category, Hungarian assignment maximising the number of pairs with "
                "IoU >= iou_thr, then total IoU; mean_iou: same per image and category over any overlap",
    "categories": "GT descriptions, lowercased, stripped, whitespace collapsed; exact match",
}


def evaluate(
    gt_records: Iterable[dict[str, Any]],
    pred_records: Iterable[dict[str, Any]],
    iou_thr: float = 0.5,
    score_modes: Sequence[str] = ("constant", "coord_prob"),
) -> dict[str, Any]:
    """All metrics of one prediction set (records as read from JSONL; see records.py)."""
    gts, preds = pair_records(gt_records, pred_records)
    return evaluate_paired(gts, preds, iou_thr, score_modes)


def evaluate_paired(
    gts: list[ImageRecord], preds: list[ImageRecord], iou_thr: float = 0.5,
    score_modes: Sequence[str] = ("constant", "coord_prob"),
) -> dict[str, Any]:
    coco = {}
    unmatched_boxes = 0
    for mode in score_modes:
        inputs = build_coco_inputs(gts, preds, mode)
        coco[mode] = run_cocoeval(inputs, backend="faster")
        unmatched_boxes = inputs.unmatched_desc_boxes
    per_image, pairs_tp, agnostic, loc_ious, agnostic_ious = [], [], Counter(), [], []
    tp_by_desc: Counter = Counter()
    for g, p in zip(gts, preds):
        tp_pairs = category_matches(g, p, iou_thr)
        pairs_tp += tp_pairs
        for _, j, _ in tp_pairs:
            tp_by_desc[g.descs[j]] += 1
        loc_ious += [iou for _, _, iou in category_matches(g, p, ANY_OVERLAP)]
        ious = iou_matrix(p.boxes, g.boxes)
        agnostic["tp"] += len(match_one_to_one(ious, iou_thr))
        agnostic_ious += [iou for _, _, iou in match_one_to_one(ious, ANY_OVERLAP)]
        per_image.append({"image": g.image, "gt": len(g.boxes), "pred": len(p.boxes), "tp": len(tp_pairs),
                          "recall": _ratio(len(tp_pairs), len(g.boxes)), "parse_status": p.parse_status})
    n_gt = sum(len(g.boxes) for g in gts)
    n_pred = sum(len(p.boxes) for p in preds)
    tp_iou = [iou for _, _, iou in pairs_tp]
    gt_names = {d for g in gts for d in g.descs}
    unmatched_descs = Counter(d for p in preds for d in p.descs if d not in gt_names)
    return {
        "num_images": len(gts),
        "num_gt_boxes": n_gt,
        "num_pred_boxes": n_pred,
        "iou_threshold": iou_thr,
        "coco": {m: {k: v for k, v in r.items() if k != "per_category"} for m, r in coco.items()},
        "f1": prf(len(pairs_tp), n_pred, n_gt),
        "f1_class_agnostic": prf(agnostic["tp"], n_pred, n_gt),
        "mean_iou": _mean(loc_ious),
        "mean_iou_class_agnostic": _mean(agnostic_ious),
        "mean_iou_tp": _mean(tp_iou),
        "iou_histogram": {"edges": HIST_EDGES, "counts": np.histogram(loc_ious, bins=HIST_EDGES)[0].tolist()},
        "parse": parse_summary(preds),
        "duplicate_rate": _ratio(sum(duplicate_flags(p).count(True) for p in preds), n_pred),
        "unmatched_desc": {"boxes": unmatched_boxes if score_modes else sum(unmatched_descs.values()),
                           "rate": _ratio(sum(unmatched_descs.values()), n_pred),
                           "top": unmatched_descs.most_common(20)},
        "per_description": per_description(gts, preds, tp_by_desc, coco),
        "per_image": per_image,
        "notes": NOTES,
        "breakdown": breakdown(gts, preds, iou_thr, score_modes),
    }


def category_matches(g: ImageRecord, p: ImageRecord, threshold: float) -> list[tuple[int, int, float]]:
    """One-to-one (pred index, GT index, IoU) pairs of one image, only within equal descriptions."""
    pairs = []
    for desc in sorted(set(g.descs)):
        gi = [j for j, d in enumerate(g.descs) if d == desc]
        pi = [i for i, d in enumerate(p.descs) if d == desc]
        if not pi:
            continue
        iou = iou_matrix([p.boxes[i] for i in pi], [g.boxes[j] for j in gi])
        pairs += [(pi[r], gi[c], v) for r, c, v in match_one_to_one(iou, threshold)]
    return pairs


def prf(tp: int, n_pred: int, n_gt: int) -> dict[str, Any]:
    """Precision, recall, F1 (0 when undefined) plus the raw counts."""
    precision, recall = _ratio(tp, n_pred), _ratio(tp, n_gt)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": n_pred - tp, "fn": n_gt - tp}


def duplicate_flags(p: ImageRecord, iou: float = DUPLICATE_IOU) -> list[bool]:
    """True for a box that repeats an earlier box of the same description with IoU > ``iou``."""
    m = iou_matrix(p.boxes, p.boxes)
    return [any(p.descs[i] == p.descs[j] and m[i, j] > iou for i in range(j)) for j in range(len(p.boxes))]


def parse_summary(preds: list[ImageRecord]) -> dict[str, Any]:
    """Counts per parse_status and summed parse_reasons (a numeric value adds itself, any other counts 1)."""
    counts = Counter(p.parse_status for p in preds)
    reasons: Counter = Counter()
    for p in preds:
        for key, value in p.parse_reasons.items():
            reasons[str(key)] += value if isinstance(value, (int, float)) and not isinstance(value, bool) else 1
    n = len(preds)
    return {"ok": counts["ok"], "partial": counts["partial"], "failed": counts["failed"],
            "failure_rate": _ratio(counts["failed"], n), "partial_rate": _ratio(counts["partial"], n),
            "reasons": dict(reasons.most_common())}


def per_description(gts: list[ImageRecord], preds: list[ImageRecord], tp: Counter,
                    coco: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per GT category, most GT boxes first."""
    gt_n = Counter(d for g in gts for d in g.descs)
    pred_n = Counter(d for p in preds for d in p.descs)
    rows = []
    for desc, n in sorted(gt_n.items(), key=lambda kv: (-kv[1], kv[0])):
        row = {"desc": desc, "gt": n, "pred": pred_n[desc], "tp": tp[desc], **{
            k: v for k, v in prf(tp[desc], pred_n[desc], n).items() if k in ("precision", "recall", "f1")}}
        for mode, r in coco.items():
            row[f"AP50_{mode}"] = r["per_category"].get(desc, {}).get("AP50")
        rows.append(row)
    return rows


def _ratio(a: float, b: float) -> float:
    return float(a) / b if b else 0.0


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None
