"""Exposure-bias arithmetic (coordexp_rl/evaluation/exposure.py), worked by hand."""

import pytest

from coordexp_rl.evaluation.exposure import exposure_metrics, recall_ious, teacher_forced_box_ious


def test_teacher_forced_box_ious_by_hand():
    # Box 1: (0, 0, .5, .5) vs GT (.25, 0, .75, .5): intersection .25 x .5 = .125, union .25 + .25 - .125
    #   = .375 -> 1/3. Box 2: equal -> 1. Box 3: inverted (x2 < x1) -> area 0 -> 0.
    coords = [0.0, 0.0, 0.5, 0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.0, 0.4, 0.5]
    targets = [0.25, 0.0, 0.75, 0.5, 0.1, 0.2, 0.3, 0.4, 0.4, 0.0, 0.6, 0.5]
    assert teacher_forced_box_ious(coords, targets) == pytest.approx([1 / 3, 1.0, 0.0])
    with pytest.raises(ValueError):
        teacher_forced_box_ious(coords[:6], targets[:6])


def test_recall_ious_take_the_best_prediction_per_gt_box():
    gts = [(0, 0, 10, 10), (20, 0, 30, 10), (50, 50, 60, 60)]
    # pred A covers half of GT 1 (IoU 50 / 100 = .5); pred B equals GT 1 -> GT 1's best is 1.0 (the
    # same prediction may serve two GT boxes: not one-to-one). GT 2: pred C shifted by 5 -> 50 / 150 = 1/3.
    # GT 3: no overlap -> 0.
    preds = [(0, 0, 10, 5), (0, 0, 10, 10), (25, 0, 35, 10)]
    assert recall_ious(gts, preds) == pytest.approx([1.0, 1 / 3, 0.0])
    assert recall_ious(gts, []) == [0.0, 0.0, 0.0]
    assert recall_ious([], preds) == []


def test_exposure_metrics_count_every_gt_box():
    # Image 1: 2 GT boxes, teacher-forced IoUs .8 and .6; the free run wrote one box equal to GT 1 and missed
    # GT 2 -> recall IoUs 1.0, 0.0. Image 2: 1 GT box, teacher-forced .7; nothing predicted -> 0.
    # teacher-forced mean (.8 + .6 + .7) / 3 = .7; recall mean (1 + 0 + 0) / 3 = 1/3; gap .7 - 1/3.
    gts = [[(0, 0, 10, 10), (20, 20, 30, 30)], [(0, 0, 4, 4)]]
    preds = [[(0, 0, 10, 10)], []]
    m = exposure_metrics([[0.8, 0.6], [0.7]], gts, preds, free_running_mean_iou=1.0)
    assert m == pytest.approx({"exposure/teacher_forced_mean_iou": 0.7, "exposure/free_running_mean_iou": 1.0,
                               "exposure/free_running_recall_iou": 1 / 3, "exposure/gap": 0.7 - 1 / 3})


def test_exposure_metrics_with_no_box_and_mismatched_images():
    m = exposure_metrics([[]], [[]], [[(0, 0, 1, 1)]], free_running_mean_iou=None)
    assert set(m.values()) == {None}
    with pytest.raises(ValueError, match="image 0"):
        exposure_metrics([[0.5]], [[]], [[]], None)
    with pytest.raises(ValueError, match="images differ"):
        exposure_metrics([[0.5]], [], [], None)
