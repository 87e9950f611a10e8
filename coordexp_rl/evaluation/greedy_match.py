"""Box IoU and one-to-one matching for F1 / mean-IoU metrics (numpy + scipy, pixel boxes x1y1x2y2).

Matching rule (documented in metrics.json too): Hungarian assignment (scipy ``linear_sum_assignment``)
that first maximises the *number* of pairs with IoU >= threshold and, among those, the total IoU. A
greedy-by-IoU matcher can miss a pair (A-X 0.9, A-Y 0.6, B-X 0.6 -> greedy 1 pair, optimal 2).

    >>> iou_matrix([(0, 0, 10, 10)], [(5, 0, 15, 10)]).round(4).tolist()
    [[0.3333]]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

Box = Sequence[float]


def iou_matrix(a: Sequence[Box], b: Sequence[Box]) -> np.ndarray:
    """(len(a), len(b)) IoU; degenerate boxes (x2 <= x1 or y2 <= y1) have area 0 and IoU 0."""
    A = np.asarray(a, dtype=np.float64).reshape(-1, 4)  # (N, 4)
    B = np.asarray(b, dtype=np.float64).reshape(-1, 4)  # (M, 4)
    # np.maximum, not np.clip: clip's overhead dominates on the small per-image matrices.
    wa = np.maximum(A[:, 2] - A[:, 0], 0) * np.maximum(A[:, 3] - A[:, 1], 0)  # (N,)
    wb = np.maximum(B[:, 2] - B[:, 0], 0) * np.maximum(B[:, 3] - B[:, 1], 0)  # (M,)
    iw = np.maximum(np.minimum(A[:, None, 2], B[None, :, 2]) - np.maximum(A[:, None, 0], B[None, :, 0]), 0)
    ih = np.maximum(np.minimum(A[:, None, 3], B[None, :, 3]) - np.maximum(A[:, None, 1], B[None, :, 1]), 0)
    inter = iw * ih  # (N, M)
    union = wa[:, None] + wb[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_one_to_one(iou: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Pairs ``(row, col, iou)`` with iou >= threshold: most pairs first, then largest total IoU.

    ``threshold`` must be > 0 for "overlapping pairs only" (pass a tiny epsilon for "any overlap").
    """
    if iou.size == 0:
        return []
    valid = iou >= threshold
    if not valid.any():
        return []
    # A weight > any possible IoU sum makes cardinality dominate: k+1 pairs always beat k pairs.
    big = float(min(iou.shape) + 1)
    cost = np.where(valid, -(big + iou), 0.0)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols) if valid[r, c]]
