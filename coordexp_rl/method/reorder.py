"""Reordered-GT sequence for the Stage-2 SFT path (METHOD 7.2 step F, 14.2, 14.3).

METHOD 7.2 step 11: "if predicted object i matched to GT j, place GT object j at position i". The order
follows the full Hungarian assignment; the gate (METHOD 6.1 step 5) only decides which pairs feed the
geometric loss, so a gated-out pair keeps its place here. GT objects with no partner at all (the rollout
had fewer objects than the GT) are appended as completion objects in the order given (policy
``"append"``; the caller passes the GT in canonical order) or left out (``"drop"``). When the rollout
has more objects than the GT, ``over_generated`` tells the learner to give the end of turn its extra
weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

from coordexp_rl.method.matching import MatchResult

T = TypeVar("T")
POLICIES = ("append", "drop")


@dataclass
class ReorderedGT(Generic[T]):
    objects: list[T]  # the GT objects in target order
    gt_indices: list[int]  # index into the original GT list of each entry of ``objects``
    num_completions: int  # appended misses (0 with policy "drop")
    over_generated: bool  # the rollout had more objects than the GT


def reorder_gt(gt_objects: Sequence[T], match: MatchResult, policy: str = "append") -> ReorderedGT[T]:
    """GT objects in the order of their assigned predictions, then the unassigned GT (order given).

    >>> m = MatchResult(pairs=[(0, 1)], rejected=[(1, 0)], num_pred=2, num_gt=3)  # (1, 0) gated out
    >>> reorder_gt(["cat", "dog", "cup"], m).objects
    ['dog', 'cat', 'cup']
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown reorder policy {policy!r}; use one of {POLICIES}")
    if match.num_gt != len(gt_objects):
        raise ValueError(f"match was computed for {match.num_gt} GT objects, got {len(gt_objects)}")
    order = [j for _, j in match.assignment]
    assigned = set(order)
    misses = [j for j in range(len(gt_objects)) if j not in assigned] if policy == "append" else []
    order += misses
    return ReorderedGT(objects=[gt_objects[j] for j in order], gt_indices=order, num_completions=len(misses),
                       over_generated=match.num_pred > match.num_gt)
