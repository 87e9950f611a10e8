"""Where a detector gains or loses on crowded images: ``breakdown(gts, preds)``, a JSON dict in metrics.json.

- By GT objects per image (buckets 1-2, 3-5, 6-9, 10+; images without GT are in none): precision and
  recall with the F1 matching of metrics.py (per image and description, Hungarian at IoU >= 0.5, so the
  buckets split the headline F1 counts exactly) and COCO AP50 over the bucket's images alone, per score
  mode (coco.py; a bucket is scored as if its images were the whole set).
- Errors per image: duplicates, extras, misses, and outputs cut at the token limit (finish reason
  "length"; None when the prediction records carry no ``finish_reason``).
- By output position (the 1st, 2nd, ... object written): the share of predictions that match a GT and
  the mean IoU of those matches; late recall, the share of all GT found by predictions after position k.
- Order: the mean Kendall tau between the order in which matched predictions were written and the
  canonical (Stage-1) order of their GT (``coordexp_rl.method.protocol.canonical_order``: by the y1 then
  x1 bin), over images with >= 2 matched predictions; 1 = written in the canonical order, -1 = reversed.

Errors, positions, late recall and order read the *written-order* matching: the predictions in the
order the model wrote them, each taking the unmatched GT of its description with the highest IoU >=
0.5 (COCO's rule with equal scores). An unmatched prediction is then a *duplicate* when a GT of its
description overlaps it at IoU >= 0.5 (each such GT was taken by an earlier prediction), else an
*extra*; a GT nobody took is a *miss*. So per image TP + duplicates + extras = predictions and TP +
misses = GT. (Its TP can differ from the Hungarian F1 TP in rare crossing cases: A-X 0.9, A-Y 0.6,
B-X 0.6 gives one pair here, two there.)

    >>> from coordexp_rl.evaluation.records import ImageRecord
    >>> g = ImageRecord("a", 100, 100, [(0, 0, 10, 10)], ["cat"], ["cat"])
    >>> p = ImageRecord("a", 100, 100, [(0, 0, 10, 10), (1, 0, 10, 10)], ["cat", "cat"], ["cat", "cat"])
    >>> written_order_matches(g, p)
    [(0, 1.0), (None, 0.0)]
    >>> error_counts(g, p)["duplicates"]
    1
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from coordexp_rl.evaluation.coco import build_coco_inputs, run_cocoeval
from coordexp_rl.evaluation.greedy_match import iou_matrix
from coordexp_rl.evaluation.records import ImageRecord

# (label, lowest, highest or None = no upper end), GT objects per image / 1-based output position
COUNT_BUCKETS = (("1-2", 1, 2), ("3-5", 3, 5), ("6-9", 6, 9), ("10+", 10, None))
POSITION_BUCKETS = (("1", 1, 1), ("2", 2, 2), ("3", 3, 3), ("4", 4, 4), ("5", 5, 5), ("6-8", 6, 8),
                    ("9+", 9, None))
LATE_K = 5
CROWDED = 6  # summary_items pools the buckets from here up: recall on crowded images
TRUNCATED = "length"  # the engines' finish reason of an output cut at max_new_tokens

NOTES = {
    "by_gt_count": "images grouped by their number of GT boxes; precision / recall with the F1 matching "
                   "(Hungarian per image and description at IoU >= iou_thr); AP50 = COCO over those images only",
    "written_order": "errors, positions, late recall and order: predictions in written order each take the "
                     "unmatched same-description GT of highest IoU >= iou_thr (COCO's rule at equal scores)",
    "errors": "duplicate = unmatched prediction overlapping a same-description GT at IoU >= iou_thr (already "
              "taken by an earlier prediction); extra = any other unmatched prediction; miss = unmatched GT; "
              "truncated = output cut at the token limit (finish_reason 'length')",
    "late_recall": "share of all GT boxes found by predictions written after position k",
    "kendall_tau": "mean over images with >= 2 matched predictions of Kendall's tau between the written order "
                   "and the canonical (y1, x1) order of the matched GT",
}


def bucket_of(n: int, buckets: Sequence[tuple[str, int, int | None]]) -> str | None:
    """The label of the bucket holding ``n`` (None if none does)."""
    for label, lo, hi in buckets:
        if n >= lo and (hi is None or n <= hi):
            return label
    return None


def written_order_matches(g: ImageRecord, p: ImageRecord, iou_thr: float = 0.5) -> list[tuple[int | None, float]]:
    """Per prediction in written order, ``(GT index or None, IoU with it)``: each takes the not yet taken GT
    of its description with the highest IoU >= ``iou_thr`` (ties: the lower GT index)."""
    ious = iou_matrix(p.boxes, g.boxes)  # (P, G)
    taken: set[int] = set()
    out: list[tuple[int | None, float]] = []
    for i, desc in enumerate(p.descs):
        free = [j for j, d in enumerate(g.descs) if d == desc and j not in taken and ious[i, j] >= iou_thr]
        if not free:
            out.append((None, 0.0))
            continue
        j = max(free, key=lambda k: (ious[i, k], -k))
        taken.add(j)
        out.append((j, float(ious[i, j])))
    return out


def error_counts(g: ImageRecord, p: ImageRecord, iou_thr: float = 0.5,
                 matches: list[tuple[int | None, float]] | None = None) -> dict[str, int]:
    """``{"tp", "duplicates", "extras", "misses"}`` of one image (written-order matching)."""
    matches = written_order_matches(g, p, iou_thr) if matches is None else matches
    ious = iou_matrix(p.boxes, g.boxes)
    duplicates = extras = 0
    for i, (j, _) in enumerate(matches):
        if j is not None:
            continue
        if any(d == p.descs[i] and ious[i, k] >= iou_thr for k, d in enumerate(g.descs)):
            duplicates += 1
        else:
            extras += 1
    tp = sum(j is not None for j, _ in matches)
    return {"tp": tp, "duplicates": duplicates, "extras": extras, "misses": len(g.boxes) - tp}


def canonical_ranks(g: ImageRecord) -> list[int]:
    """Rank of each GT box in the canonical (Stage-1) order: ``canonical_order`` on its bins."""
    from coordexp_rl.method.coords import box_to_bins, normalise_box
    from coordexp_rl.method.protocol import BoxObject, canonical_order

    objects = [BoxObject(d, box_to_bins(normalise_box(b, g.width, g.height))) for b, d in zip(g.boxes, g.descs)]
    rank = {id(o): r for r, o in enumerate(canonical_order(objects))}
    return [rank[id(o)] for o in objects]


def kendall_tau(ranks: Sequence[float]) -> float | None:
    """Kendall's tau-a between positions 0..n-1 and ``ranks`` (distinct); None below 2 items."""
    n = len(ranks)
    if n < 2:
        return None
    s = sum(np.sign(ranks[b] - ranks[a]) for a in range(n) for b in range(a + 1, n))
    return float(s) / (n * (n - 1) / 2)


def by_gt_count(gts: list[ImageRecord], preds: list[ImageRecord], iou_thr: float = 0.5,
                score_modes: Sequence[str] = ("constant",)) -> list[dict[str, Any]]:
    """Per bucket of GT objects per image: precision and recall (the F1 matching), AP50 per score mode."""
    from coordexp_rl.evaluation.metrics import category_matches, prf  # metrics imports this module

    rows = []
    for label, _, _ in COUNT_BUCKETS:
        idx = [k for k, g in enumerate(gts) if bucket_of(len(g.boxes), COUNT_BUCKETS) == label]
        row: dict[str, Any] = {"bucket": label, "images": len(idx)}
        if idx:
            tp = sum(len(category_matches(gts[k], preds[k], iou_thr)) for k in idx)
            r = prf(tp, sum(len(preds[k].boxes) for k in idx), sum(len(gts[k].boxes) for k in idx))
            row.update({"gt": r["tp"] + r["fn"], "pred": r["tp"] + r["fp"], "tp": tp,
                        "precision": r["precision"], "recall": r["recall"]})
            sub_g, sub_p = [gts[k] for k in idx], [preds[k] for k in idx]
            row["AP50"] = {m: run_cocoeval(build_coco_inputs(sub_g, sub_p, m))["AP50"] for m in score_modes}
        else:
            row.update({"gt": 0, "pred": 0, "tp": 0, "precision": None, "recall": None,
                        "AP50": {m: None for m in score_modes}})
        rows.append(row)
    return rows


def breakdown(gts: list[ImageRecord], preds: list[ImageRecord], iou_thr: float = 0.5,
              score_modes: Sequence[str] = ("constant",), late_k: int = LATE_K) -> dict[str, Any]:
    """Every measurement of the module docstring for paired records (``preds[i]`` belongs to ``gts[i]``)."""
    n = len(gts)
    by_count = by_gt_count(gts, preds, iou_thr, score_modes)

    # written-order matching: errors, positions, late recall, order
    totals = {"tp": 0, "duplicates": 0, "extras": 0, "misses": 0}
    pos: dict[str, dict[str, Any]] = {label: {"predictions": 0, "matched": 0, "ious": []}
                                      for label, _, _ in POSITION_BUCKETS}
    found_late = n_gt = beyond_k = 0
    taus = []
    for g, p in zip(gts, preds):
        matches = written_order_matches(g, p, iou_thr)
        for key, v in error_counts(g, p, iou_thr, matches).items():
            totals[key] += v
        n_gt += len(g.boxes)
        beyond_k += max(0, len(g.boxes) - late_k)
        for i, (j, iou) in enumerate(matches):
            cell = pos[bucket_of(i + 1, POSITION_BUCKETS)]
            cell["predictions"] += 1
            if j is not None:
                cell["matched"] += 1
                cell["ious"].append(iou)
                found_late += i >= late_k
        ranks = canonical_ranks(g)
        tau = kendall_tau([ranks[j] for j, _ in matches if j is not None])
        if tau is not None:
            taus.append(tau)
    known = [p.finish_reason for p in preds if p.finish_reason is not None]
    truncated = sum(r == TRUNCATED for r in known) if known else None
    errors = {**totals, "images": n, "truncated": truncated, "finish_reason_known": len(known),
              **{f"{k}_per_image": _ratio(totals[k], n) for k in ("duplicates", "extras", "misses")},
              "truncated_rate": None if truncated is None else _ratio(truncated, len(known))}
    by_position = [{"position": label, "predictions": c["predictions"], "matched": c["matched"],
                    "match_rate": _ratio(c["matched"], c["predictions"]) if c["predictions"] else None,
                    "mean_iou": float(np.mean(c["ious"])) if c["ious"] else None} for label, c in pos.items()]
    return {
        "iou_threshold": iou_thr,
        "by_gt_count": by_count,
        "errors": errors,
        "by_position": by_position,
        "late_recall": {"k": late_k, "recall": _ratio(found_late, n_gt) if n_gt else None, "found": found_late,
                        "gt": n_gt, "gt_beyond_k": beyond_k},
        "order": {"kendall_tau": float(np.mean(taus)) if taus else None, "images": len(taus)},
        "notes": NOTES,
    }


def summary_items(b: dict[str, Any]) -> dict[str, Any]:
    """The key figures, flat, for the headline summary (``breakdown/...``; the driver logs ``eval/<key>``)."""
    out: dict[str, Any] = {}
    for row in b["by_gt_count"]:
        out[f"breakdown/recall@{row['bucket']}"] = row["recall"]
        out[f"breakdown/precision@{row['bucket']}"] = row["precision"]
        for mode, ap in row["AP50"].items():
            out[f"breakdown/{mode}/AP50@{row['bucket']}"] = ap
    # recall over every image with >= CROWDED GT objects (the buckets above, pooled): the "recall at 6+"
    crowded = [row for row in b["by_gt_count"] if row["gt"] and _lowest(row["bucket"]) >= CROWDED]
    gt = sum(row["gt"] for row in crowded)
    out[f"breakdown/recall@{CROWDED}+"] = _ratio(sum(row["tp"] for row in crowded), gt) if gt else None
    e = b["errors"]
    for key in ("duplicates_per_image", "extras_per_image", "misses_per_image", "truncated_rate"):
        out[f"breakdown/{key}"] = e[key]
    for row in b["by_position"]:
        out[f"breakdown/match_rate@pos{row['position']}"] = row["match_rate"]
    out[f"breakdown/late_recall@{b['late_recall']['k']}"] = b["late_recall"]["recall"]
    out["breakdown/kendall_tau"] = b["order"]["kendall_tau"]
    return out


def render_markdown(b: dict[str, Any]) -> list[str]:
    """Report lines (a section of report.md)."""
    f = _fmt
    modes = list(b["by_gt_count"][0]["AP50"]) if b["by_gt_count"] else []
    lines = ["## Breakdown: crowded images, errors, output position, order", "",
             "| GT per image | images | GT | pred | precision | recall | " +
             " | ".join(f"AP50 {m}" for m in modes) + " |", "|---|---|---|---|---|---|" + "---|" * len(modes)]
    for r in b["by_gt_count"]:
        aps = " | ".join(f(r["AP50"][m]) for m in modes)
        lines.append(f"| {r['bucket']} | {r['images']} | {r['gt']} | {r['pred']} | {f(r['precision'])} | "
                     f"{f(r['recall'])} | {aps} |")
    e = b["errors"]
    cut = ("n/a (no finish_reason in the predictions)" if e["truncated"] is None else
           f"{e['truncated']} of {e['finish_reason_known']} ({f(e['truncated_rate'])})")
    lines += ["", f"Per image over {e['images']} images (written-order matching): duplicates "
              f"{f(e['duplicates_per_image'])}, extras {f(e['extras_per_image'])}, misses {f(e['misses_per_image'])} "
              f"(totals {e['duplicates']}, {e['extras']}, {e['misses']}; matched {e['tp']}); outputs cut at the "
              f"token limit: {cut}.", "",
              "| position written | predictions | matched | match rate | mean IoU of matches |",
              "|---|---|---|---|---|"]
    for r in b["by_position"]:
        lines.append(f"| {r['position']} | {r['predictions']} | {r['matched']} | {f(r['match_rate'])} | "
                     f"{f(r['mean_iou'])} |")
    late, order = b["late_recall"], b["order"]
    lines += ["", f"- late recall@{late['k']}: {f(late['recall'])} ({late['found']} of {late['gt']} GT boxes found "
              f"after position {late['k']}; {late['gt_beyond_k']} GT boxes exceed {late['k']} in their image)",
              f"- order: mean Kendall tau {f(order['kendall_tau'])} over {order['images']} images with >= 2 matches",
              *[f"- {k}: {v}" for k, v in b["notes"].items()]]
    return lines


def _lowest(label: str) -> int:
    return next(lo for name, lo, _ in COUNT_BUCKETS if name == label)


def _ratio(a: float, b: float) -> float:
    return float(a) / b if b else 0.0


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
