"""Hungarian matching of predicted to GT objects with gating and a curriculum (METHOD 6.1 step B, 14.1).

Cost of predicted box i against GT box j (both (x1, y1, x2, y2) in [0, 1]):

    C[i, j] = geo_cost_weight * (L1[i, j] + 1 - IoU[i, j])  (or 1 - GIoU)  +  sem_cost_weight * D_sem(desc_i, desc_j)

where L1 is the *mean* absolute coordinate difference (in [0, 1], the same scale as 1 - IoU).
A Hungarian assignment is accepted only if ``IoU > iou_thr`` or ``L1 < l1_thr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from coordexp_rl.method.losses import box_iou, generalized_box_iou
from coordexp_rl.method.semantic import SemanticDistance, text_distance_matrix


@dataclass
class MatchResult:
    """Outcome of :func:`match_objects`. Indices refer to the prediction / GT lists given."""

    pairs: list[tuple[int, int]] = field(default_factory=list)  # accepted (pred, gt), by pred index
    rejected: list[tuple[int, int]] = field(default_factory=list)  # assigned but gated out
    unmatched_pred: list[int] = field(default_factory=list)  # extras: no accepted partner
    unmatched_gt: list[int] = field(default_factory=list)  # misses: no accepted partner
    ious: list[float] = field(default_factory=list)  # IoU of each accepted pair
    num_pred: int = 0
    num_gt: int = 0

    @property
    def assignment(self) -> list[tuple[int, int]]:
        """The full Hungarian assignment (accepted and gated-out pairs), by pred index."""
        return sorted(self.pairs + self.rejected)


@dataclass(frozen=True)
class MatchParams:
    sem_cost_weight: float
    iou_thr: float
    l1_thr: float


@dataclass(frozen=True)
class MatchCurriculum:
    """METHOD 11 / 14.1: geometry-only and strict until ``start_step``, then linear relaxation over
    ``ramp_steps`` to the end values (semantic term switched in, looser gates). No defaults here: a run
    builds it with ``from_config`` (the values' one home is ``coordexp_rl.config.MatchingConfig``)."""

    ramp_steps: int
    sem_cost_weight_start: float
    sem_cost_weight_end: float
    iou_thr_start: float
    iou_thr_end: float
    l1_thr_start: float
    l1_thr_end: float
    start_step: int = 0

    @classmethod
    def from_config(cls, m) -> "MatchCurriculum":
        """From the config's ``matching`` section (coordexp_rl.config.MatchingConfig), the one home of defaults."""
        return cls(ramp_steps=m.curriculum_steps, sem_cost_weight_start=m.sem_cost_weight_start,
                   sem_cost_weight_end=m.sem_cost_weight_end, iou_thr_start=m.iou_thr_start, iou_thr_end=m.iou_thr_end,
                   l1_thr_start=m.l1_thr_start, l1_thr_end=m.l1_thr_end)

    def at(self, step: int) -> MatchParams:
        """Parameters at ``step``.

        >>> c = MatchCurriculum(ramp_steps=10, sem_cost_weight_start=0.0, sem_cost_weight_end=0.5, iou_thr_start=0.5,
        ...                     iou_thr_end=0.1, l1_thr_start=0.02, l1_thr_end=0.1, start_step=10)
        >>> round(c.at(15).iou_thr, 6)  # half way from 0.5 to 0.1
        0.3
        """
        if self.ramp_steps <= 0:
            frac = 1.0 if step >= self.start_step else 0.0
        else:
            frac = min(max((step - self.start_step) / self.ramp_steps, 0.0), 1.0)
        lerp = lambda a, b: a + (b - a) * frac  # noqa: E731
        return MatchParams(sem_cost_weight=lerp(self.sem_cost_weight_start, self.sem_cost_weight_end),
                           iou_thr=lerp(self.iou_thr_start, self.iou_thr_end),
                           l1_thr=lerp(self.l1_thr_start, self.l1_thr_end))


def _as_boxes(boxes, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4) if len(boxes) else \
        torch.zeros((0, 4), dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: boxes contain nan/inf")
    return t


def geometry_terms(pred_boxes, gt_boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairwise (mean L1, IoU, GIoU), each (N, M) float64, for boxes in [0, 1]."""
    p, g = _as_boxes(pred_boxes, "pred_boxes"), _as_boxes(gt_boxes, "gt_boxes")
    l1 = (p[:, None, :] - g[None, :, :]).abs().mean(-1)
    return l1.numpy(), box_iou(p, g).numpy(), generalized_box_iou(p, g).numpy()


def cost_matrix(pred_boxes, gt_boxes, pred_descs: Sequence[str] | None = None,
                gt_descs: Sequence[str] | None = None, *, geo_cost_weight: float = 1.0, sem_cost_weight: float = 0.0,
                overlap: str = "iou", semantic: SemanticDistance = text_distance_matrix) -> np.ndarray:
    """(N, M) matching cost (see the module docstring). ``overlap``: ``"iou"`` or ``"giou"``."""
    return _cost(geometry_terms(pred_boxes, gt_boxes), pred_descs, gt_descs, geo_cost_weight=geo_cost_weight,
                 sem_cost_weight=sem_cost_weight, overlap=overlap, semantic=semantic)


def _cost(terms: tuple[np.ndarray, np.ndarray, np.ndarray], pred_descs, gt_descs, *, geo_cost_weight: float,
          sem_cost_weight: float, overlap: str, semantic: SemanticDistance) -> np.ndarray:
    l1, iou, giou = terms
    if overlap not in ("iou", "giou"):
        raise ValueError(f"overlap must be 'iou' or 'giou', got {overlap!r}")
    cost = geo_cost_weight * (l1 + 1.0 - (iou if overlap == "iou" else giou))
    if sem_cost_weight and cost.size:
        if pred_descs is None or gt_descs is None:
            raise ValueError("sem_cost_weight > 0 needs pred_descs and gt_descs")
        cost = cost + sem_cost_weight * np.asarray(semantic(list(pred_descs), list(gt_descs)), dtype=np.float64)
    return cost


def match_objects(pred_boxes, gt_boxes, pred_descs: Sequence[str] | None = None,
                  gt_descs: Sequence[str] | None = None, *, geo_cost_weight: float = 1.0, sem_cost_weight: float = 0.0,
                  overlap: str = "iou", iou_thr: float = 0.5, l1_thr: float = 0.02,
                  semantic: SemanticDistance = text_distance_matrix) -> MatchResult:
    """Hungarian matching (rectangular) of N predicted to M GT objects, then gating.

    >>> r = match_objects([[0.5, 0.5, 0.9, 0.9], [0.1, 0.1, 0.3, 0.3]], [[0.1, 0.1, 0.3, 0.3]])
    >>> r.pairs, r.unmatched_pred, r.unmatched_gt
    ([(1, 0)], [0], [])
    """
    n, m = len(pred_boxes), len(gt_boxes)
    result = MatchResult(num_pred=n, num_gt=m)
    terms = geometry_terms(pred_boxes, gt_boxes)  # once: the cost and the gate both read it
    l1, iou, _ = terms
    if n and m:
        cost = _cost(terms, pred_descs, gt_descs, geo_cost_weight=geo_cost_weight, sem_cost_weight=sem_cost_weight,
                     overlap=overlap, semantic=semantic)
        rows, cols = linear_sum_assignment(cost)
        for i, j in sorted(zip(rows.tolist(), cols.tolist())):
            if iou[i, j] > iou_thr or l1[i, j] < l1_thr:
                result.pairs.append((i, j))
                result.ious.append(float(iou[i, j]))
            else:
                result.rejected.append((i, j))
    matched_p = {i for i, _ in result.pairs}
    matched_g = {j for _, j in result.pairs}
    result.unmatched_pred = [i for i in range(n) if i not in matched_p]
    result.unmatched_gt = [j for j in range(m) if j not in matched_g]
    return result
