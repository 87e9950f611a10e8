"""Reordered-GT sequence for the Stage-2 SFT path (METHOD 7.2 step F, 14.2, 14.3).

METHOD 7.2 step 11: "if predicted object i matched to GT j, place GT object j at position i". By default
(``follow="assignment"``) the order follows the full Hungarian assignment; the gate (METHOD 6.1 step 5)
only decides which pairs feed the geometric loss, so a gated-out pair keeps its place here. With
``follow="gated"`` only the gated-in pairs set the order and the gated-out GT follow them in the order
given: a pair the gate does not trust (its box far from the GT) does not move its GT either. GT objects
with no partner at all (the rollout had fewer objects than the GT) are appended as completion objects in
the order given (policy ``"append"``; the caller passes the GT in canonical order) or left out
(``"drop"``). When the rollout has more objects than the GT, ``over_generated`` tells the learner to give
the end of turn its extra weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

from coordexp_rl.method.matching import MatchResult

T = TypeVar("T")
POLICIES = ("append", "drop")
FOLLOWS = ("assignment", "gated")


@dataclass
class ReorderedGT(Generic[T]):
    objects: list[T]  # the GT objects in target order
    gt_indices: list[int]  # index into the original GT list of each entry of ``objects``
    num_completions: int  # appended misses (0 with policy "drop")
    over_generated: bool  # the rollout had more objects than the GT


def reorder_gt(gt_objects: Sequence[T], match: MatchResult, policy: str = "append",
               follow: str = "assignment") -> ReorderedGT[T]:
    """GT objects in the order of their assigned (``follow="gated"``: gated-in) predictions, then the
    other assigned GT and then the unassigned GT (each in the order given).

    >>> m = MatchResult(pairs=[(1, 0)], rejected=[(0, 2)], num_pred=2, num_gt=3)  # (0, 2) gated out
    >>> reorder_gt(["cat", "dog", "cup"], m).objects
    ['cup', 'cat', 'dog']
    >>> reorder_gt(["cat", "dog", "cup"], m, follow="gated").objects
    ['cat', 'cup', 'dog']
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown reorder policy {policy!r}; use one of {POLICIES}")
    if follow not in FOLLOWS:
        raise ValueError(f"unknown reorder follow {follow!r}; use one of {FOLLOWS}")
    if match.num_gt != len(gt_objects):
        raise ValueError(f"match was computed for {match.num_gt} GT objects, got {len(gt_objects)}")
    assigned = {j for _, j in match.assignment}
    order = [j for _, j in (match.assignment if follow == "assignment" else sorted(match.pairs))]
    placed = set(order)
    order += [j for j in range(len(gt_objects)) if j in assigned and j not in placed]  # gated out ("gated")
    misses = [j for j in range(len(gt_objects)) if j not in assigned] if policy == "append" else []
    order += misses
    return ReorderedGT(objects=[gt_objects[j] for j in order], gt_indices=order, num_completions=len(misses),
                       over_generated=match.num_pred > match.num_gt)
