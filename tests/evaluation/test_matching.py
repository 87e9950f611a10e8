import numpy as np
import pytest

from coordexp_rl.evaluation.greedy_match import iou_matrix, match_one_to_one


def test_iou_of_known_boxes():
    # Shift by 5 of a 10x10 box: intersection 50, union 150 -> 1/3. Disjoint -> 0. Degenerate -> 0.
    m = iou_matrix([(0, 0, 10, 10)], [(5, 0, 15, 10), (20, 20, 30, 30), (0, 0, 0, 10), (0, 0, 10, 10)])
    assert m[0].tolist() == pytest.approx([1 / 3, 0.0, 0.0, 1.0])


def test_empty_shapes():
    assert iou_matrix([], [(0, 0, 1, 1)]).shape == (0, 1)
    assert match_one_to_one(np.zeros((0, 3)), 0.5) == []
    assert match_one_to_one(np.zeros((2, 0)), 0.5) == []


def test_hungarian_finds_more_pairs_than_greedy():
    # Greedy would take A-X (0.9) and leave B with nothing; the optimum pairs A-Y and B-X.
    iou = np.array([[0.9, 0.6], [0.6, 0.0]])
    pairs = match_one_to_one(iou, 0.5)
    assert sorted((r, c) for r, c, _ in pairs) == [(0, 1), (1, 0)]


def test_cardinality_beats_total_iou():
    # One pair of IoU 1.0 + nothing (total 1.0) vs two pairs 0.51 + 0.51 (total 1.02) vs 0.55+0.45 invalid.
    iou = np.array([[1.0, 0.51], [0.51, 0.0]])
    assert len(match_one_to_one(iou, 0.5)) == 2
    iou = np.array([[1.0, 0.95], [0.6, 0.0]])  # two pairs also possible here: (0,1) and (1,0)
    assert sorted((r, c) for r, c, _ in match_one_to_one(iou, 0.5)) == [(0, 1), (1, 0)]


def test_pairs_below_threshold_are_dropped():
    assert match_one_to_one(np.array([[0.49]]), 0.5) == []
    assert match_one_to_one(np.array([[0.49]]), 1e-9) == [(0, 0, 0.49)]
