"""One Stage-2 sample's targets (METHOD 6.1-7.2), pure: parsed rollout + GT -> what the two forwards learn.

    parsed rollout objects, GT objects
      -> cost and Hungarian assignment (METHOD 6.1 step 3-4, over the GT in canonical order)
      -> gate (step 5): which assigned pairs feed the geometric loss
      -> self-context targets (METHOD 7.1): the gated pairs' coord positions in the rollout, GT coordinates
      -> reordered GT (METHOD 7.2 step 11): GT j at the place of its assigned prediction i, unassigned GT
         appended in canonical order; end-of-turn weight ``extra_eos_weight`` when the rollout has more
         objects than the GT (METHOD 14.3), else ``eos_weight``. ``gt_order`` (config stage2.gt_order)
         switches the order for ablations: "gated" (only gated-in pairs move their GT) or "canonical".

No model, no Ray: the Learner only turns the result into token sequences for its forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from coordexp_rl.method.coords import bin_to_unit
from coordexp_rl.method.matching import MatchParams, MatchResult, match_objects
from coordexp_rl.method.protocol import BoxObject, ParsedObject, canonical_order
from coordexp_rl.method.reorder import ReorderedGT, reorder_gt
from coordexp_rl.method.semantic import SemanticDistance, text_distance_matrix


@dataclass(frozen=True)
class MatchSettings:
    """The fixed part of matching (config ``matching``); the curriculum supplies ``MatchParams``."""

    geo_cost_weight: float = 1.0
    overlap: str = "giou"
    missing_policy: str = "append"
    eos_weight: float = 1.0
    extra_eos_weight: float = 2.0
    gt_order: str = "reordered"  # config stage2.gt_order: "reordered", "gated" or "canonical"
    semantic: SemanticDistance = field(default=text_distance_matrix, compare=False)


@dataclass
class Stage2Targets:
    match: MatchResult  # over the canonical GT list: pairs (gated in), rejected (gated out)
    coord_positions: list[int]  # positions in the rollout's generated ids, 4 per gated pair (x1 y1 x2 y2)
    coord_targets: list[float]  # the matched GT coordinate in [0, 1] for each position
    gt_objects: list[BoxObject]  # the reordered GT (settings.gt_order), the target of the CE forward
    eos_weight: float  # CE weight of the reordered GT's end of turn
    gt_indices: list[int] = field(default_factory=list)  # canonical GT index of each entry of gt_objects
    appended: int = 0  # GT the rollout missed, appended to the reordered GT (missing policy "append")
    reordered: bool = False  # the CE target differs from the canonical order (Path B sees a new order)
    extra_eos: bool = False  # the rollout over-generated: the end of turn gets extra_eos_weight

    @property
    def stats(self) -> dict[str, float]:
        """Counts for one rollout, summed over a batch by the learner (logged as match/<key> per row)."""
        m = self.match
        return {"matched": float(len(m.pairs)), "rejected": float(len(m.rejected)),
                "missed": float(m.num_gt - len(m.assignment)), "extra": float(m.num_pred - len(m.assignment)),
                "pred_objects": float(m.num_pred), "appended": float(self.appended),
                "reordered": float(self.reordered), "extra_eos": float(self.extra_eos)}


def stage2_targets(pred: Sequence[ParsedObject], gt: Sequence[BoxObject], params: MatchParams,
                   settings: MatchSettings = MatchSettings()) -> Stage2Targets:
    """Targets of one rollout (``pred``: its parsed objects, ``coord_positions`` into the generated ids)
    against its GT objects (any order; canonicalised here). See the module docstring."""
    gt = canonical_order(gt)
    match = match_objects(
        [[bin_to_unit(b) for b in o.bins] for o in pred], [[bin_to_unit(b) for b in o.bins] for o in gt],
        [o.desc for o in pred], [o.desc for o in gt], geo_cost_weight=settings.geo_cost_weight,
        sem_cost_weight=params.sem_cost_weight, overlap=settings.overlap, iou_thr=params.iou_thr, l1_thr=params.l1_thr,
        semantic=settings.semantic)
    positions: list[int] = []
    targets: list[float] = []
    for i, j in match.pairs:
        positions += list(pred[i].coord_positions)
        targets += [bin_to_unit(b) for b in gt[j].bins]
    if settings.gt_order == "canonical":
        reordered = ReorderedGT(list(gt), list(range(len(gt))), num_completions=0,
                                over_generated=match.num_pred > match.num_gt)
    else:
        follow = "gated" if settings.gt_order == "gated" else "assignment"
        reordered = reorder_gt(gt, match, settings.missing_policy, follow=follow)
    eos = settings.extra_eos_weight if reordered.over_generated else settings.eos_weight
    return Stage2Targets(match, positions, targets, reordered.objects, eos, gt_indices=reordered.gt_indices,
                         appended=reordered.num_completions,
                         reordered=reordered.objects != gt, extra_eos=reordered.over_generated)
