import pytest

from coordexp_rl.evaluation.metrics import evaluate
from tests.evaluation.builders import gt_rec, perfect_preds, pred_rec, two_images_gt


def test_perfect_predictions_score_one_everywhere():
    gt = two_images_gt()
    m = evaluate(gt, perfect_preds(gt))
    for mode in ("constant", "coord_prob"):
        assert m["coco"][mode] == pytest.approx({"mAP": 1.0, "AP50": 1.0, "AP75": 1.0, "AR100": 1.0})
    assert (m["f1"]["f1"], m["f1"]["precision"], m["f1"]["recall"]) == (1.0, 1.0, 1.0)
    assert m["f1_class_agnostic"]["f1"] == 1.0
    assert m["mean_iou"] == 1.0 and m["iou_histogram"]["counts"] == [0] * 9 + [3]
    assert m["per_description"][0] == pytest.approx({"desc": "cat", "gt": 2, "pred": 2, "tp": 2, "precision": 1.0,
                                                     "recall": 1.0, "f1": 1.0, "AP50_constant": 1.0,
                                                     "AP50_coord_prob": 1.0})


def test_shifted_box_gives_its_known_iou_and_ap():
    # GT 10x10 at the origin, prediction shifted right by 2: intersection 80, union 120 -> IoU 2/3.
    # It is a TP at IoU thresholds 0.50, 0.55, 0.60, 0.65 and a miss at 0.70..0.95 -> mAP 4/10.
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])])]
    pred = [pred_rec("a.png", [("cat", [2, 0, 12, 10], 0.7)])]
    m = evaluate(gt, pred)
    assert m["mean_iou"] == pytest.approx(2 / 3)
    assert m["iou_histogram"]["counts"][6] == 1  # bin [0.6, 0.7)
    assert m["coco"]["coord_prob"]["mAP"] == pytest.approx(0.4)
    assert m["coco"]["coord_prob"]["AP50"] == pytest.approx(1.0)
    assert m["coco"]["coord_prob"]["AP75"] == pytest.approx(0.0)
    assert m["f1"]["tp"] == 1


def test_shift_below_threshold_is_a_miss_but_still_a_matched_pair():
    # Shift by 5: IoU 1/3 < 0.5 -> FP + FN for F1, but the mean-IoU matching (any overlap) keeps it.
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])])]
    m = evaluate(gt, [pred_rec("a.png", [("cat", [5, 0, 15, 10], 0.7)])])
    assert m["f1"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 1})
    assert m["mean_iou"] == pytest.approx(1 / 3) and m["mean_iou_tp"] is None
    assert m["iou_histogram"]["counts"][3] == 1


def test_empty_output_counts_as_misses_and_the_image_is_kept():
    gt = two_images_gt()
    pred = perfect_preds(gt)
    pred[1]["objects"] = []  # b.png: nothing predicted
    m = evaluate(gt, pred)
    assert m["num_images"] == 2
    b = next(r for r in m["per_image"] if r["image"] == "b.png")
    assert (b["gt"], b["pred"], b["tp"], b["recall"]) == (1, 0, 0, 0.0)
    assert m["f1"]["recall"] == pytest.approx(2 / 3) and m["f1"]["precision"] == 1.0
    # cat: 2 GT, 1 found -> precision 1 at the 51 of 101 COCO recall points <= 0.5, so AP 51/101;
    # dog: 1.0. AR: cat 0.5, dog 1.0 -> 0.75.
    assert m["coco"]["coord_prob"]["mAP"] == pytest.approx((51 / 101 + 1) / 2)
    assert m["coco"]["coord_prob"]["AR100"] == pytest.approx(0.75)


def test_parse_failures_are_counted_and_scored_as_empty():
    gt = two_images_gt() + [gt_rec("c.png", [("dog", [0, 0, 30, 30])])]
    pred = perfect_preds(gt)
    pred[1]["parse_status"] = "failed"  # its objects are ignored
    pred[1]["parse_reasons"] = {"no_closing_box": 1}
    pred[2]["parse_status"] = "partial"
    pred[2]["parse_reasons"] = {"no_closing_box": 2, "truncated": True}
    m = evaluate(gt, pred)
    assert m["parse"] == {"ok": 1, "partial": 1, "failed": 1, "failure_rate": pytest.approx(1 / 3),
                          "partial_rate": pytest.approx(1 / 3), "reasons": {"no_closing_box": 3, "truncated": 1}}
    assert m["num_pred_boxes"] == 3 and m["f1"]["fn"] == 1


def test_unmatched_description_with_high_score_lowers_ap():
    gt = two_images_gt()
    base = evaluate(gt, perfect_preds(gt, score=0.5))
    assert base["coco"]["coord_prob"]["mAP"] == pytest.approx(1.0)
    # A "zebra" (no such GT category) on top of a.png's cat, ranked above every TP: charged to "cat" as
    # a false positive. cat then has precision 1/2 at recall 1/2 and 2/3 at recall 1 -> AP50 2/3.
    pred = perfect_preds(gt, score=0.5)
    pred[0]["objects"].append({"desc": "zebra", "bbox_2d": [10, 10, 50, 50], "score": 0.99})
    m = evaluate(gt, pred)
    assert m["coco"]["coord_prob"]["mAP"] < 1.0
    cat = next(r for r in m["per_description"] if r["desc"] == "cat")
    assert cat["AP50_coord_prob"] == pytest.approx(2 / 3)
    assert m["unmatched_desc"]["boxes"] == 1 and m["unmatched_desc"]["top"] == [("zebra", 1)]
    assert m["f1"]["fp"] == 1 and m["f1_class_agnostic"]["tp"] == 3  # same box as a GT cat
    # Ranked below every TP it costs nothing: it is scored at its own score, not dropped or forced first.
    pred[0]["objects"][-1]["score"] = 0.01
    assert evaluate(gt, pred)["coco"]["coord_prob"]["mAP"] == pytest.approx(1.0)


def test_unmatched_description_without_overlap_is_charged_to_the_most_similar_name():
    gt = [gt_rec("a.png", [("red car", [0, 0, 10, 10]), ("dog", [50, 50, 60, 60])])]
    pred = perfect_preds(gt, score=0.5)
    pred[0]["objects"].append({"desc": "red cars", "bbox_2d": [80, 0, 90, 10], "score": 0.9})
    m = evaluate(gt, pred)
    rows = {r["desc"]: r for r in m["per_description"]}
    assert rows["red car"]["AP50_coord_prob"] < 1.0 and rows["dog"]["AP50_coord_prob"] == pytest.approx(1.0)


def test_constant_score_ap_depends_on_output_order():
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])])]
    wrong, right = ("cat", [50, 50, 60, 60], 0.2), ("cat", [0, 0, 10, 10], 0.9)
    first_wrong = evaluate(gt, [pred_rec("a.png", [wrong, right])])
    first_right = evaluate(gt, [pred_rec("a.png", [right, wrong])])
    assert first_wrong["coco"]["constant"]["AP50"] == pytest.approx(0.5)
    assert first_right["coco"]["constant"]["AP50"] == pytest.approx(1.0)
    # The coord-probability score ranks the right box first either way.
    assert first_wrong["coco"]["coord_prob"]["AP50"] == pytest.approx(1.0)
    assert "order" in first_wrong["notes"]["constant"]


def test_duplicate_rate_counts_repeats_of_the_same_description():
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])])]
    pred = [pred_rec("a.png", [("cat", [0, 0, 10, 10], 0.9), ("Cat ", [0, 0, 10, 10.5], 0.9),
                               ("dog", [0, 0, 10, 10], 0.9), ("cat", [0, 0, 20, 20], 0.9)])]
    m = evaluate(gt, pred)
    # Only the second box repeats an earlier same-desc box with IoU > 0.9 (100/105); dog differs in
    # desc and the last overlaps at IoU 0.25.
    assert m["duplicate_rate"] == pytest.approx(1 / 4)


def test_category_matching_is_case_and_space_insensitive():
    gt = [gt_rec("a.png", [("Red  Cup", [0, 0, 10, 10])])]
    m = evaluate(gt, [pred_rec("a.png", [(" red cup", [0, 0, 10, 10], 0.5)])])
    assert m["f1"]["f1"] == 1.0 and m["coco"]["constant"]["mAP"] == pytest.approx(1.0)


def test_no_predictions_at_all_and_image_without_gt():
    gt = two_images_gt() + [gt_rec("empty.png", [])]
    pred = [pred_rec(g["images"][0], []) for g in gt]
    pred[2]["objects"] = [{"desc": "cat", "bbox_2d": [0, 0, 5, 5], "score": 0.3}]
    m = evaluate(gt, pred)
    assert m["num_images"] == 3
    assert m["coco"]["coord_prob"]["mAP"] == 0.0 and m["f1"]["f1"] == 0.0 and m["f1"]["fp"] == 1
    nothing = evaluate(gt, [pred_rec(g["images"][0], []) for g in gt])
    assert nothing["coco"]["constant"]["mAP"] == 0.0 and nothing["coco"]["constant"]["AR100"] == 0.0


def test_missing_score_fails_in_coord_prob_mode_only():
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])])]
    pred = [{"images": ["a.png"], "width": 100, "height": 100, "objects": [{"desc": "cat", "bbox_2d": [0, 0, 10, 10]}]}]
    with pytest.raises(ValueError, match=r"objects\[0\]: no 'score'"):
        evaluate(gt, pred)
    assert evaluate(gt, pred, score_modes=("constant",))["coco"]["constant"]["mAP"] == pytest.approx(1.0)


def test_object_prob_mode_ranks_by_the_description_and_box_probability():
    # Two images; the wrongly-named box is the confident one by coord probability, but its name was doubtful.
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])]), gt_rec("b.png", [("dog", [0, 0, 10, 10])])]
    pred = [{"images": ["a.png"], "width": 100, "height": 100, "objects": [
                {"desc": "cat", "bbox_2d": [0, 0, 10, 10], "score": 0.5, "score_object": 0.4}]},
            {"images": ["b.png"], "width": 100, "height": 100, "objects": [
                {"desc": "cat", "bbox_2d": [0, 0, 10, 10], "score": 0.9, "score_object": 0.05},
                {"desc": "dog", "bbox_2d": [50, 50, 60, 60], "score": 0.8, "score_object": 0.3}]}]
    m = evaluate(gt, pred, score_modes=("coord_prob", "object_prob"))
    # cat category: the TP (a.png) ranks above the false "cat" on b.png only under object_prob
    assert m["coco"]["object_prob"]["AP50"] > m["coco"]["coord_prob"]["AP50"]
    with pytest.raises(ValueError, match=r"no 'score_object' for score mode 'object_prob'"):
        evaluate(gt, [pred_rec("a.png", [("cat", [0, 0, 10, 10], 0.5)]), pred_rec("b.png", [])],
                 score_modes=("object_prob",))


def test_class_agnostic_mean_iou_ignores_the_names():
    # right box, wrong name: no class-matched pair at all, but a class-agnostic IoU of 1
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10]), ("dog", [50, 50, 60, 60])])]
    pred = [pred_rec("a.png", [("dog", [0, 0, 10, 10], 0.9), ("dog", [52, 50, 62, 60], 0.9)])]
    m = evaluate(gt, pred)
    assert m["mean_iou"] == pytest.approx(2 / 3)  # only dog-dog is a class-matched pair
    assert m["mean_iou_class_agnostic"] == pytest.approx((1.0 + 2 / 3) / 2)
