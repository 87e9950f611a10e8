"""GT reordering for the Stage-2 SFT path (METHOD 7.2 step F), on the METHOD 12 example and with misses/extras."""

import pytest

from coordexp_rl.method.matching import match_objects
from coordexp_rl.method.protocol import BoxObject
from coordexp_rl.method.reorder import reorder_gt

CAT = BoxObject("black cat", (110, 310, 410, 705))
DOG = BoxObject("yellow dog", (520, 285, 890, 660))
CUP = BoxObject("red cup", (10, 10, 60, 90))


def unit(obj: BoxObject):
    return [b / 1000 for b in obj.bins]


def test_spec12_same_order_is_unchanged():
    preds = [(120, 300, 420, 700), (500, 280, 880, 650)]
    m = match_objects([[b / 1000 for b in p] for p in preds], [unit(CAT), unit(DOG)])
    r = reorder_gt([CAT, DOG], m)
    assert r.objects == [CAT, DOG] and r.gt_indices == [0, 1]
    assert not r.over_generated and r.num_completions == 0


def test_spec12_predicted_dog_first_puts_dog_first():
    m = match_objects([[b / 1000 for b in (500, 280, 880, 650)], [b / 1000 for b in (120, 300, 420, 700)]],
                      [unit(CAT), unit(DOG)])
    assert reorder_gt([CAT, DOG], m).objects == [DOG, CAT]


def test_misses_are_appended_in_gt_order_or_dropped():
    # the rollout found only the dog; cat and cup are misses
    m = match_objects([unit(DOG)], [unit(CAT), unit(CUP), unit(DOG)])
    appended = reorder_gt([CAT, CUP, DOG], m, "append")
    assert appended.objects == [DOG, CAT, CUP] and appended.gt_indices == [2, 0, 1]
    assert appended.num_completions == 2 and not appended.over_generated
    dropped = reorder_gt([CAT, CUP, DOG], m, "drop")
    assert dropped.objects == [DOG] and dropped.num_completions == 0


def test_extras_flag_over_generation():
    far = [0.95, 0.95, 0.99, 0.99]
    # three predictions for two GT: the rollout has more objects than the GT -> extra end-of-turn weight
    m = match_objects([unit(DOG), far, unit(CAT)], [unit(CAT), unit(DOG)])
    r = reorder_gt([CAT, DOG], m)
    assert r.objects == [DOG, CAT] and r.over_generated
    # one bad prediction for two GT is not over-generation: it is assigned (to the nearer dog) and gated
    # out, the dog keeps the prediction's place, the unassigned cat is a completion
    m = match_objects([far], [unit(CAT), unit(DOG)])
    assert m.pairs == [] and m.rejected == [(0, 1)]
    r = reorder_gt([CAT, DOG], m)
    assert r.objects == [DOG, CAT] and not r.over_generated and r.num_completions == 1


def test_gated_out_pair_keeps_its_place():
    """METHOD 7.2 step 11 places GT j at position i for every assigned pair; the gate only guards Path A."""
    off = [b / 1000 for b in (400, 20, 700, 110)]  # assigned to the cup (IoU 0) but gated out
    m = match_objects([off, unit(CAT)], [unit(CUP), unit(CAT)], iou_thr=0.5, l1_thr=0.02)
    assert m.pairs == [(1, 1)] and m.rejected == [(0, 0)]
    assert reorder_gt([CUP, CAT], m).objects == [CUP, CAT]  # not [CAT, CUP]


def test_gated_order_moves_only_the_gt_of_trusted_pairs():
    """follow="gated": a gated-out pair does not move its GT; it follows the gated-in ones (order given),
    before the misses."""
    off = [b / 1000 for b in (400, 20, 700, 110)]  # assigned to the cup (IoU 0), gated out
    m = match_objects([off, unit(DOG)], [unit(CAT), unit(CUP), unit(DOG)], iou_thr=0.5, l1_thr=0.02)
    assert m.pairs == [(1, 2)] and m.rejected == [(0, 1)]
    assert reorder_gt([CAT, CUP, DOG], m).objects == [CUP, DOG, CAT]  # every assigned pair sets the order
    gated = reorder_gt([CAT, CUP, DOG], m, follow="gated")
    assert gated.objects == [DOG, CUP, CAT] and gated.gt_indices == [2, 1, 0] and gated.num_completions == 1
    dropped = reorder_gt([CAT, CUP, DOG], m, "drop", follow="gated")  # the gated-out cup is no miss: kept
    assert dropped.objects == [DOG, CUP] and dropped.num_completions == 0
    # every pair trusted: the same order as the full assignment
    m = match_objects([unit(DOG), unit(CAT)], [unit(CAT), unit(DOG)])
    assert reorder_gt([CAT, DOG], m, follow="gated").objects == reorder_gt([CAT, DOG], m).objects == [DOG, CAT]


def test_empty_rollout_and_errors():
    m = match_objects([], [unit(CAT)])
    assert reorder_gt([CAT], m).objects == [CAT]
    assert reorder_gt([], match_objects([unit(CAT)], [])).over_generated
    with pytest.raises(ValueError, match="policy"):
        reorder_gt([CAT], m, "truncate")
    with pytest.raises(ValueError, match="follow"):
        reorder_gt([CAT], m, follow="iou")
    with pytest.raises(ValueError, match="1 GT objects, got 2"):
        reorder_gt([CAT, DOG], m)
