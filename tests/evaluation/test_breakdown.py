"""breakdown.py: each measurement on two or three hand-worked images (the numbers are worked in comments)."""

from __future__ import annotations

import json

import pytest

from coordexp_rl.evaluation.breakdown import breakdown, kendall_tau, summary_items
from coordexp_rl.evaluation.metrics import evaluate
from coordexp_rl.evaluation.records import pair_records
from coordexp_rl.evaluation.report import summary, write_outputs
from tests.evaluation.builders import gt_rec, pred_rec


def run(gt: list[dict], pred: list[dict], modes=("constant",)) -> dict:
    return breakdown(*pair_records(gt, pred), score_modes=modes)


def row(rows: list[dict], key: str, label: str) -> dict:
    return next(r for r in rows if r[key] == label)


def test_precision_recall_and_ap50_by_gt_count():
    # a: 1 GT (bucket 1-2), found exactly.          -> 1-2: gt 1, pred 1, tp 1: P = R = 1, AP50 = 1
    # b: 3 GT (bucket 3-5): cat, dog, cat. Written: the first cat exactly, a dog far from the dog.
    #    -> 3-5: gt 3, pred 2, tp 1: P = 1/2, R = 1/3.
    #    AP50 (101 recall points, mean over categories): cat 1 TP of 2 GT -> precision 1 up to recall 0.5,
    #    i.e. 51 of the 101 points: 51/101; dog 0 TP -> 0. Mean (51/101 + 0) / 2.
    # buckets 6-9 and 10+ hold no image: None.
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])]),
          gt_rec("b.png", [("cat", [0, 0, 10, 10]), ("dog", [20, 0, 30, 10]), ("cat", [40, 0, 50, 10])])]
    pred = [pred_rec("a.png", [("cat", [0, 0, 10, 10], 0.9)]),
            pred_rec("b.png", [("cat", [0, 0, 10, 10], 0.9), ("dog", [60, 60, 70, 70], 0.9)])]
    rows = run(gt, pred)["by_gt_count"]
    assert [r["images"] for r in rows] == [1, 1, 0, 0]
    small, mid = row(rows, "bucket", "1-2"), row(rows, "bucket", "3-5")
    assert (small["gt"], small["pred"], small["tp"], small["precision"], small["recall"]) == (1, 1, 1, 1.0, 1.0)
    assert small["AP50"]["constant"] == pytest.approx(1.0)
    assert (mid["gt"], mid["pred"], mid["tp"], mid["precision"]) == (3, 2, 1, 0.5)
    assert mid["recall"] == pytest.approx(1 / 3)
    assert mid["AP50"]["constant"] == pytest.approx((51 / 101 + 0) / 2)
    empty = row(rows, "bucket", "10+")
    assert (empty["precision"], empty["recall"], empty["AP50"]) == (None, None, {"constant": None})
    # the buckets split the headline F1 counts
    f1 = evaluate(gt, pred, score_modes=("constant",))["f1"]
    assert sum(r["tp"] for r in rows) == f1["tp"] and sum(r["pred"] for r in rows) == f1["tp"] + f1["fp"]


def test_duplicates_extras_misses_and_truncation_per_image():
    # a: GT cat A [0,0,10,10], cat B [20,0,30,10], dog C [40,0,50,10]. Written:
    #    1 cat [0,0,10,10]  -> A (IoU 1)
    #    2 cat [0,0,10,9]   -> IoU 0.9 with A, already taken by 1; B does not overlap: a duplicate
    #    3 cat [60,60,70,70] -> overlaps nothing: an extra
    #    4 dog [0,0,10,10]  -> overlaps cat A only, another description: an extra
    #    -> tp 1, duplicates 1, extras 2, misses 2 (B and C)
    # b: GT 1 cat, nothing written -> misses 1.
    # Per image over 2 images: duplicates 1/2, extras 2/2, misses 3/2. Finish reasons: a "length", b "stop"
    # -> 1 of 2 outputs cut at the token limit.
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10]), ("cat", [20, 0, 30, 10]), ("dog", [40, 0, 50, 10])]),
          gt_rec("b.png", [("cat", [0, 0, 10, 10])])]
    pred = [pred_rec("a.png", [("cat", [0, 0, 10, 10], 0.9), ("cat", [0, 0, 10, 9], 0.9),
                               ("cat", [60, 60, 70, 70], 0.9), ("dog", [0, 0, 10, 10], 0.9)]),
            pred_rec("b.png", [])]
    pred[0]["finish_reason"], pred[1]["finish_reason"] = "length", "stop"
    e = run(gt, pred)["errors"]
    assert (e["tp"], e["duplicates"], e["extras"], e["misses"]) == (1, 1, 2, 3)
    assert (e["duplicates_per_image"], e["extras_per_image"], e["misses_per_image"]) == (0.5, 1.0, 1.5)
    assert (e["truncated"], e["finish_reason_known"], e["truncated_rate"]) == (1, 2, 0.5)
    # records without a finish_reason: unknown, not "none cut"
    for p in pred:
        del p["finish_reason"]
    e = run(gt, pred)["errors"]
    assert (e["truncated"], e["truncated_rate"], e["finish_reason_known"]) == (None, None, 0)


def test_a_later_better_box_is_the_duplicate_in_written_order():
    # GT cat [0,0,10,10]. Written: 1 cat [0,0,10,6] (IoU 0.6), 2 cat [0,0,10,10] (IoU 1). The first one
    # written takes the GT (the Hungarian F1 matching would pick the second); the second is the duplicate.
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])])]
    pred = [pred_rec("a.png", [("cat", [0, 0, 10, 6], 0.9), ("cat", [0, 0, 10, 10], 0.9)])]
    b = run(gt, pred)
    assert (b["errors"]["tp"], b["errors"]["duplicates"], b["errors"]["extras"]) == (1, 1, 0)
    first, second = b["by_position"][:2]
    assert (first["matched"], first["mean_iou"], second["matched"]) == (1, pytest.approx(0.6), 0)


def test_by_output_position_and_late_recall():
    # GT: 6 cats in a row, g_k = [20k, 0, 20k+10, 10], k = 0..5. Written, position by position:
    #   1 [0,0,10,10]    -> g0, IoU 1
    #   2 [20,0,30,8]    -> g1, IoU 80/100 = 0.8
    #   3 [100,50,110,60] -> nothing (an extra)
    #   4 [40,0,50,10]   -> g2, IoU 1
    #   5 [40,0,50,10]   -> g2 again: a duplicate
    #   6 [60,0,70,5]    -> g3, IoU 50/100 = 0.5
    #   7 [80,0,90,10]   -> g4, IoU 1
    # Buckets: 1..5 one prediction each (match rates 1, 1, 0, 1, 0; IoU 1, 0.8, n/a, 1, n/a); 6-8: two
    # predictions, both matched, mean IoU (0.5 + 1) / 2 = 0.75; 9+: none.
    # Late recall@5: GT found after position 5 = g3, g4: 2 of 6; one GT (6 - 5) exceeds 5 in its image.
    gt = [gt_rec("a.png", [("cat", [20 * k, 0, 20 * k + 10, 10]) for k in range(6)])]
    boxes = [[0, 0, 10, 10], [20, 0, 30, 8], [100, 50, 110, 60], [40, 0, 50, 10], [40, 0, 50, 10], [60, 0, 70, 5],
             [80, 0, 90, 10]]
    pred = [pred_rec("a.png", [("cat", b, 0.9) for b in boxes])]
    b = run(gt, pred)
    pos = {r["position"]: r for r in b["by_position"]}
    assert [pos[k]["predictions"] for k in ("1", "2", "3", "4", "5", "6-8", "9+")] == [1, 1, 1, 1, 1, 2, 0]
    assert [pos[k]["match_rate"] for k in ("1", "2", "3", "4", "5", "6-8", "9+")] == [1, 1, 0, 1, 0, 1, None]
    assert [pos[k]["mean_iou"] for k in ("1", "2", "3", "4", "5", "9+")] == [1.0, pytest.approx(0.8), None, 1.0,
                                                                              None, None]
    assert pos["6-8"]["mean_iou"] == pytest.approx(0.75)
    late = b["late_recall"]
    assert (late["k"], late["found"], late["gt"], late["gt_beyond_k"]) == (5, 2, 6, 1)
    assert late["recall"] == pytest.approx(1 / 3)
    assert b["order"] == {"kendall_tau": 1.0, "images": 1}  # g0..g4 written in the canonical order


def test_kendall_tau_of_written_order_against_the_canonical_order():
    # Canonical order: by y1 then x1 (coord bins). a: A [0,0,10,10], B [50,0,60,10], C [0,50,10,60]
    # (GT listed C, A, B) -> ranks A 0, B 1, C 2. Written C, A, B -> ranks [2, 0, 1]: pairs (2,0) and
    # (2,1) discordant, (0,1) concordant: tau = (1 - 2) / 3 = -1/3.
    # b: written A, B -> [0, 1]: tau 1.   c: one match only: left out.   Mean over a, b: (-1/3 + 1) / 2 = 1/3.
    A, B, C = [0, 0, 10, 10], [50, 0, 60, 10], [0, 50, 10, 60]
    gt = [gt_rec("a.png", [("cat", C), ("cat", A), ("cat", B)]), gt_rec("b.png", [("cat", A), ("cat", B)]),
          gt_rec("c.png", [("cat", A), ("cat", B)])]
    pred = [pred_rec("a.png", [("cat", C, 0.9), ("cat", A, 0.9), ("cat", B, 0.9)]),
            pred_rec("b.png", [("cat", A, 0.9), ("cat", B, 0.9)]), pred_rec("c.png", [("cat", B, 0.9)])]
    assert run(gt, pred)["order"] == {"kendall_tau": pytest.approx(1 / 3), "images": 2}
    assert kendall_tau([2, 0, 1]) == pytest.approx(-1 / 3) and kendall_tau([0]) is None


def test_canonical_order_compares_bins_not_pixels():
    # 2000 px tall: y1 = 100 and 100.8 px are both bin 50 (0.05 and 0.0504 of the side), so x1 decides:
    # G2 (x1 0) before G1 (x1 500 px = bin 250), although G1 is 0.8 px higher. Written G2, G1: tau +1
    # (a pixel (y1, x1) sort would say -1).
    g1, g2 = [500, 100, 600, 200], [0, 100.8, 100, 200]
    gt = [gt_rec("a.png", [("cat", g1), ("cat", g2)], width=2000, height=2000)]
    pred = [pred_rec("a.png", [("cat", g2, 0.9), ("cat", g1, 0.9)], width=2000, height=2000)]
    assert run(gt, pred)["order"] == {"kendall_tau": 1.0, "images": 1}


def test_evaluation_writes_the_breakdown_and_the_summary_flattens_it(tmp_path):
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])]), gt_rec("b.png", [("cat", [20 * k, 0, 20 * k + 10, 10])
                                                                       for k in range(7)])]
    pred = [pred_rec("a.png", [("cat", [0, 0, 10, 10], 0.9)]),
            pred_rec("b.png", [("cat", [20 * k, 0, 20 * k + 10, 10], 0.9) for k in range(6, -1, -1)])]
    pred[1]["finish_reason"] = "length"
    gts, preds = pair_records(gt, pred)
    from coordexp_rl.evaluation.metrics import evaluate_paired

    metrics = evaluate_paired(gts, preds, score_modes=("constant", "coord_prob"))
    head = summary(metrics)
    # b (7 GT, bucket 6-9) written right to left: every pair discordant, tau -1; a has one match: left out
    assert head["breakdown/recall@6-9"] == 1.0 and head["breakdown/recall@1-2"] == 1.0
    assert head["breakdown/recall@3-5"] is None and head["breakdown/coord_prob/AP50@6-9"] == pytest.approx(1.0)
    assert head["breakdown/kendall_tau"] == -1.0
    assert head["breakdown/late_recall@5"] == pytest.approx(2 / 8)  # positions 6, 7 of b; 8 GT in all
    assert head["breakdown/duplicates_per_image"] == 0.0 and head["breakdown/truncated_rate"] == 1.0
    assert head["breakdown/match_rate@pos6-8"] == 1.0 and head["breakdown/match_rate@pos9+"] is None
    assert {k: v for k, v in head.items() if k.startswith("breakdown/")} == summary_items(metrics["breakdown"])
    # the existing headline keys are untouched
    old = {k for k in head if not k.startswith("breakdown/")}
    assert "f1@0.5/f1" in old and "constant/AP50" in old and len(old) == 3 + 2 * 4 + 3 + 6
    write_outputs(metrics, gts, preds, tmp_path / "eval", tmp_path, overlays=0)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["breakdown"]["order"]["kendall_tau"] == -1.0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Breakdown" in report and "| 6-9 | 1 | 7 | 7 | 1.0000 | 1.0000 |" in report
    assert "outputs cut at the token limit: 1 of 1" in report


def test_recall_on_crowded_images_pools_the_buckets_from_six_up():
    # a: 1 GT, found (bucket 1-2: not crowded). c: 6 GT, the first 4 written exactly (6-9: 4 of 6).
    # d: 10 GT, the first 5 written exactly (10+: 5 of 10). Recall at 6+: (4 + 5) / (6 + 10) = 9/16,
    # not the mean of the two buckets' recalls ((4/6 + 5/10) / 2 = 7/12).
    row_of = [("cat", [12 * k, 0, 12 * k + 10, 10]) for k in range(10)]
    gt = [gt_rec("a.png", [("cat", [0, 0, 10, 10])]), gt_rec("c.png", row_of[:6]), gt_rec("d.png", row_of)]
    pred = [pred_rec("a.png", [("cat", [0, 0, 10, 10], 0.9)]),
            pred_rec("c.png", [(d, b, 0.9) for d, b in row_of[:4]]),
            pred_rec("d.png", [(d, b, 0.9) for d, b in row_of[:5]])]
    head = summary_items(run(gt, pred))
    assert head["breakdown/recall@6-9"] == pytest.approx(4 / 6) and head["breakdown/recall@10+"] == 0.5
    assert head["breakdown/recall@6+"] == pytest.approx(9 / 16)
    # no image with 6 or more GT objects: no figure rather than a 0
    assert summary_items(run(gt[:1], pred[:1]))["breakdown/recall@6+"] is None
