"""Reordered-GT sequence for the Stage-2 SFT path (SPEC 7.2 step F, 14.2, 14.3).

Matched GT objects take the order of their predicted partners, so the CE target follows the order the
model chose; unmatched GT (misses) are appended as completion objects (policy ``"append"``) or left out
(``"drop"``). When the rollout produced extras (unmatched predictions, which includes every rollout
with more predictions than GT), ``over_generated`` tells the learner to give the EOS position its
configured extra weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

from coordexp_rl.matching import MatchResult

T = TypeVar("T")
POLICIES = ("append", "drop")


@dataclass
class ReorderedGT(Generic[T]):
    objects: list[T]  # the GT objects in target order
    gt_indices: list[int]  # index into the original GT list of each entry of ``objects``
    num_completions: int  # appended misses (0 with policy "drop")
    num_extras: int  # predictions with no accepted GT partner

    @property
    def over_generated(self) -> bool:
        return self.num_extras > 0


def reorder_gt(gt_objects: Sequence[T], match: MatchResult, policy: str = "append") -> ReorderedGT[T]:
    """GT objects in the order of their matched predictions, then the misses (original GT order).

    >>> m = MatchResult(pairs=[(0, 1), (1, 0)], unmatched_gt=[2], num_pred=2, num_gt=3)
    >>> reorder_gt(["cat", "dog", "cup"], m).objects
    ['dog', 'cat', 'cup']
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown reorder policy {policy!r}; use one of {POLICIES}")
    if match.num_gt != len(gt_objects):
        raise ValueError(f"match was computed for {match.num_gt} GT objects, got {len(gt_objects)}")
    order = [j for _, j in sorted(match.pairs)]
    matched = set(order)
    misses = [j for j in range(len(gt_objects)) if j not in matched] if policy == "append" else []
    order += misses
    return ReorderedGT(objects=[gt_objects[j] for j in order], gt_indices=order,
                      num_completions=len(misses), num_extras=len(match.unmatched_pred))
