"""GT reordering for the Stage-2 SFT path (SPEC 7.2 step F), on the SPEC 12 example and with misses/extras."""

import pytest

from coordexp_rl.matching import MatchResult, match_objects
from coordexp_rl.protocol import BoxObject
from coordexp_rl.reorder import reorder_gt

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
    # three predictions for two GT: one extra, even though both GT are found
    m = match_objects([unit(DOG), far, unit(CAT)], [unit(CAT), unit(DOG)])
    r = reorder_gt([CAT, DOG], m)
    assert r.objects == [DOG, CAT] and r.num_extras == 1 and r.over_generated
    # a hallucination with fewer predictions than GT is also an extra; the rejected GT is a completion
    m = match_objects([far], [unit(CAT), unit(DOG)])
    r = reorder_gt([CAT, DOG], m)
    assert r.objects == [CAT, DOG] and r.over_generated and r.num_completions == 2


def test_empty_rollout_and_errors():
    m = match_objects([], [unit(CAT)])
    assert reorder_gt([CAT], m).objects == [CAT]
    assert reorder_gt([], match_objects([unit(CAT)], [])).over_generated
    with pytest.raises(ValueError, match="policy"):
        reorder_gt([CAT], m, "truncate")
    with pytest.raises(ValueError, match="1 GT objects, got 2"):
        reorder_gt([CAT, DOG], m)
