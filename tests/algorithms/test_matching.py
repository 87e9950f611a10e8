"""Hungarian matching: one table of cases, brute-force optimality, gating, curriculum, METHOD 12 by hand."""

import dataclasses
import itertools

import numpy as np
import pytest

from coordexp_rl.method.matching import MatchCurriculum, cost_matrix, geometry_terms, match_objects

CAT_GT, DOG_GT = (0.110, 0.310, 0.410, 0.705), (0.520, 0.285, 0.890, 0.660)  # METHOD 12, bins / 1000
CAT_PRED, DOG_PRED = (0.120, 0.300, 0.420, 0.700), (0.500, 0.280, 0.880, 0.650)
A, B = (0.1, 0.1, 0.3, 0.3), (0.6, 0.6, 0.9, 0.9)

# name, preds, gts, kwargs, (accepted pairs, rejected pairs, unmatched preds, unmatched gts)
CASES = [
    ("empty_both", [], [], {}, ([], [], [], [])),
    ("no_gt", [A, B], [], {}, ([], [], [0, 1], [])),
    ("no_pred", [], [A, B, A], {}, ([], [], [], [0, 1, 2])),
    ("identity", [A, B], [A, B], {}, ([(0, 0), (1, 1)], [], [], [])),
    ("transposed", [B, A], [A, B], {}, ([(0, 1), (1, 0)], [], [], [])),
    ("more_preds", [B, A, (0.0, 0.0, 0.05, 0.05)], [A], {}, ([(1, 0)], [], [0, 2], [])),
    ("more_gts", [B], [A, B, (0.0, 0.0, 0.05, 0.05)], {}, ([(0, 1)], [], [], [0, 2])),
    ("duplicate_preds", [A, A], [A], {}, ([(0, 0)], [], [1], [])),
    ("far_pair_rejected", [A], [B], {}, ([], [(0, 0)], [0], [0])),
    # IoU 0 but mean L1 0.01 < l1_thr 0.02: accepted by the L1 gate
    ("l1_gate", [(0.1, 0.1, 0.11, 0.11)], [(0.11, 0.11, 0.12, 0.12)], {}, ([(0, 0)], [], [], [])),
    ("spec12", [CAT_PRED, DOG_PRED], [CAT_GT, DOG_GT], {}, ([(0, 0), (1, 1)], [], [], [])),
    ("spec12_reversed", [DOG_PRED, CAT_PRED], [CAT_GT, DOG_GT], {}, ([(0, 1), (1, 0)], [], [], [])),
]


@pytest.mark.parametrize("name,preds,gts,kwargs,expected", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("overlap", ["iou", "giou"])
def test_case_table(name, preds, gts, kwargs, expected, overlap):
    r = match_objects(preds, gts, overlap=overlap, **kwargs)
    assert (r.pairs, r.rejected, r.unmatched_pred, r.unmatched_gt) == expected
    assert (r.num_pred, r.num_gt) == (len(preds), len(gts))
    assert len(r.ious) == len(r.pairs)


def test_spec12_hand_worked():
    l1, iou, giou = geometry_terms([CAT_PRED, DOG_PRED], [CAT_GT, DOG_GT])
    # cat: inter 0.290 x 0.390 = 0.1131; union 0.1185 + 0.1200 - 0.1131 = 0.1254
    # dog: inter 0.360 x 0.365 = 0.1314; union 0.13875 + 0.1406 - 0.1314 = 0.14795
    assert iou[0, 0] == pytest.approx(0.1131 / 0.1254)  # 0.9019
    assert iou[1, 1] == pytest.approx(0.1314 / 0.14795)  # 0.8881
    assert iou[0, 1] == 0.0 and iou[1, 0] == 0.0
    assert l1[0, 0] == pytest.approx((10 + 10 + 10 + 5) / 4 / 1000)
    assert l1[1, 1] == pytest.approx((20 + 5 + 10 + 10) / 4 / 1000)
    # cross pair: hull x 0.12..0.89, y 0.285..0.70 = 0.77 * 0.415; union 0.12 + 0.13875
    assert giou[0, 1] == pytest.approx(-(0.77 * 0.415 - 0.25875) / (0.77 * 0.415))
    r = match_objects([CAT_PRED, DOG_PRED], [CAT_GT, DOG_GT])
    assert r.ious == pytest.approx([0.1131 / 0.1254, 0.1314 / 0.14795])


def brute_force_min_cost(cost: np.ndarray) -> float:
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))


def random_boxes(rng, k):
    xy = rng.uniform(0, 0.7, size=(k, 2))
    wh = rng.uniform(0.02, 0.3, size=(k, 2))
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("n,m", [(n, m) for n in range(1, 6) for m in range(1, 6)])
@pytest.mark.parametrize("overlap", ["iou", "giou"])
def test_hungarian_is_optimal_against_brute_force(n, m, overlap):
    rng = np.random.default_rng(100 * n + m)
    for _ in range(3):
        preds, gts = random_boxes(rng, n), random_boxes(rng, m)
        words = ["cat", "dog", "black cat", "red cup", "cup"]
        pd, gd = [words[i % 5] for i in range(n)], [words[(2 * j) % 5] for j in range(m)]
        kw = dict(overlap=overlap, sem_cost_weight=0.3, geo_cost_weight=1.5)
        cost = cost_matrix(preds, gts, pd, gd, **kw)
        r = match_objects(preds, gts, pd, gd, iou_thr=-1.0, **kw)  # gate accepts everything
        assert len(r.pairs) == min(n, m) and not r.rejected
        assert sum(cost[i, j] for i, j in r.pairs) == pytest.approx(brute_force_min_cost(cost))


def test_semantic_term_breaks_a_geometric_tie():
    # two GT objects with the same box; the description decides who gets the prediction
    r = match_objects([A], [A, A], ["yellow dog"], ["black cat", "yellow dog"], sem_cost_weight=1.0)
    assert r.pairs == [(0, 1)] and r.unmatched_gt == [0]
    r = match_objects([A], [A, A], ["yellow dog"], ["black cat", "yellow dog"], sem_cost_weight=0.0)
    assert r.pairs == [(0, 0)]  # geometry-only: first of the tied columns
    with pytest.raises(ValueError, match="needs pred_descs"):
        match_objects([A], [A], sem_cost_weight=1.0)


def test_gating_thresholds():
    pred, gt = (0.1, 0.1, 0.3, 0.3), (0.15, 0.1, 0.35, 0.3)  # IoU = 0.03 / 0.05 = 0.6, mean L1 = 0.025
    assert match_objects([pred], [gt], iou_thr=0.5, l1_thr=0.0).pairs == [(0, 0)]
    assert match_objects([pred], [gt], iou_thr=0.7, l1_thr=0.0).rejected == [(0, 0)]
    assert match_objects([pred], [gt], iou_thr=0.7, l1_thr=0.03).pairs == [(0, 0)]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="nan"):
        match_objects([(0.1, 0.1, float("nan"), 0.2)], [A])
    with pytest.raises(ValueError, match="overlap"):
        match_objects([A], [A], overlap="dice")


def test_curriculum_starts_strict_and_relaxes_linearly():
    c = MatchCurriculum(start_step=100, ramp_steps=200, sem_cost_weight_start=0.0, sem_cost_weight_end=0.4,
                        iou_thr_start=0.5, iou_thr_end=0.1, l1_thr_start=0.02, l1_thr_end=0.1)
    for step in (0, 100):
        p = c.at(step)
        assert (p.sem_cost_weight, p.iou_thr, p.l1_thr) == (0.0, 0.5, 0.02)
    mid = c.at(200)
    assert (mid.sem_cost_weight, mid.iou_thr, mid.l1_thr) == pytest.approx((0.2, 0.3, 0.06))
    end = c.at(10_000)
    assert (end.sem_cost_weight, end.iou_thr, end.l1_thr) == pytest.approx((0.4, 0.1, 0.1))
    step_at_5 = dataclasses.replace(c, start_step=5, ramp_steps=0)  # no ramp: the end values from start_step on
    assert (step_at_5.at(4).iou_thr, step_at_5.at(5).iou_thr) == pytest.approx((0.5, 0.1))


@pytest.mark.parametrize("step", [0, 100, 200, 10_000])
def test_default_gate_never_admits_a_box_that_misses_its_gt(step):
    """METHOD 6.1 step 5 with the config's defaults: strict at every step of the curriculum (a looser L1 gate
    once let a box with IoU 0 feed the geometric loss)."""
    from coordexp_rl.config import load_config

    params = MatchCurriculum.from_config(load_config(None).matching).at(step)
    gt = [[0.40, 0.40, 0.60, 0.60]]  # 20 % of the side
    beside = [[0.61, 0.40, 0.81, 0.60]]  # the same size, just right of it: IoU 0, mean L1 0.105
    r = match_objects(beside, gt, iou_thr=params.iou_thr, l1_thr=params.l1_thr)
    assert r.pairs == [] and r.rejected == [(0, 0)]
    close = [[0.41, 0.41, 0.61, 0.61]]  # IoU 0.82: accepted
    assert match_objects(close, gt, iou_thr=params.iou_thr, l1_thr=params.l1_thr).pairs == [(0, 0)]
