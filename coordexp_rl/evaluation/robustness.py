"""Quantisation-boundary robustness: is localisation worse for GT boxes near a norm1000 bin edge?

Bin k covers normalised c in [(k - 0.5)/1000, (k + 0.5)/1000) (coord_bin rounds), so the bin edges are
the half-bin points (k + 0.5)/1000. A GT box is "near" when any of its 4 coordinates lies within
``margin`` bins (default 0.1) of an edge, i.e. ``|1000 c - (floor(1000 c - 0.5) + 0.5)|`` or its
complement is < margin. Pairs come from the same matching as ``mean_iou`` (per category, any overlap).

    >>> near_bin_edge(0.1005), near_bin_edge(0.1)
    (True, False)
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from coordexp_rl.evaluation.metrics import ANY_OVERLAP, category_matches
from coordexp_rl.evaluation.records import ImageRecord, pair_records
from coordexp_rl.method.coords import NUM_BINS


def near_bin_edge(c: float, margin: float = 0.1) -> bool:
    """Is normalised coordinate ``c`` within ``margin`` bins of a half-bin boundary of norm1000?"""
    x = c * NUM_BINS - 0.5  # edges are at integer x
    return abs(x - math.floor(x + 0.5)) < margin


def quantisation_boundary_report(
    gt_records: Iterable[dict[str, Any]], pred_records: Iterable[dict[str, Any]], margin: float = 0.1
) -> dict[str, Any]:
    """``{"near": {"pairs", "mean_iou"}, "far": {...}, "margin_bins": margin}`` over matched pairs."""
    return boundary_report_paired(*pair_records(gt_records, pred_records), margin=margin)


def boundary_report_paired(gts: list[ImageRecord], preds: list[ImageRecord], margin: float = 0.1) -> dict[str, Any]:
    groups: dict[str, list[float]] = {"near": [], "far": []}
    for g, p in zip(gts, preds):
        for _, j, iou in category_matches(g, p, ANY_OVERLAP):
            x1, y1, x2, y2 = g.boxes[j]
            unit = (x1 / g.width, y1 / g.height, x2 / g.width, y2 / g.height)
            near = any(near_bin_edge(c, margin) for c in unit)
            groups["near" if near else "far"].append(iou)
    return {
        "margin_bins": margin,
        **{k: {"pairs": len(v), "mean_iou": sum(v) / len(v) if v else None} for k, v in groups.items()},
    }
