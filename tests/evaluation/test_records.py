import json

import pytest

from coordexp_rl.evaluation.records import load_jsonl, normalise_desc, object_box, pair_records, to_image_record
from tests.evaluation.builders import gt_rec, pred_rec


def test_normalise_desc_lowercases_strips_and_collapses_whitespace():
    assert normalise_desc("  Red \t  CUP\n") == "red cup"


def test_coord_tokens_become_pixels_with_k_over_1000():
    # bin 500 of width 200 -> 100 px; bin 250 of height 100 -> 25 px; bin 999 -> 0.999 * size
    box = object_box({"bbox_2d": ["<|coord_0|>", "<|coord_250|>", "<|coord_500|>", "<|coord_999|>"]}, 200, 100)
    assert box == pytest.approx((0.0, 25.0, 100.0, 99.9))


def test_poly_becomes_enclosing_box():
    assert object_box({"poly": [10, 5, 30, 8, 20, 40]}, 100, 100) == (10.0, 5.0, 30.0, 40.0)


def test_bad_geometry_names_the_object():
    with pytest.raises(ValueError, match=r"record 0 objects\[0\].*neither 'bbox_2d' nor 'poly'"):
        to_image_record({"images": ["a"], "width": 1, "height": 1, "objects": [{"desc": "x"}]}, is_pred=False)
    with pytest.raises(ValueError, match="<\\|coord_k\\|>"):
        object_box({"bbox_2d": ["<|coord_1000|>", 0, 1, 1]}, 10, 10)


def test_failed_parse_is_an_empty_prediction_even_if_objects_are_present():
    rec = pred_rec("a.png", [("cat", [0, 0, 5, 5], 0.9)], status="failed")
    assert to_image_record(rec, is_pred=True).boxes == []


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_missing_prediction_names_gt_file_and_line(tmp_path):
    gt = load_jsonl(_write(tmp_path / "gt.jsonl", [gt_rec("a.png", []), gt_rec("b.png", [])]))
    pred = load_jsonl(_write(tmp_path / "pred.jsonl", [pred_rec("a.png", [])]))
    with pytest.raises(ValueError, match=r"'b.png' \(.*gt.jsonl line 2\)"):
        pair_records(gt, pred)


def test_duplicate_prediction_names_both_lines(tmp_path):
    gt = load_jsonl(_write(tmp_path / "gt.jsonl", [gt_rec("a.png", [])]))
    pred = load_jsonl(_write(tmp_path / "pred.jsonl", [pred_rec("a.png", []), pred_rec("a.png", [])]))
    with pytest.raises(ValueError, match=r"predictions: image 'a.png' appears twice .*line 1 and .*line 2"):
        pair_records(gt, pred)


def test_prediction_for_unknown_image_is_an_error():
    with pytest.raises(ValueError, match="absent from the GT, first 'z.png'"):
        pair_records([gt_rec("a.png", [])], [pred_rec("a.png", []), pred_rec("z.png", [])])


def test_pairs_follow_gt_order():
    gt = [gt_rec("a.png", []), gt_rec("b.png", [])]
    gts, preds = pair_records(gt, [pred_rec("b.png", []), pred_rec("a.png", [])])
    assert [p.image for p in preds] == ["a.png", "b.png"]


def test_invalid_json_line_is_named(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"images": []}\n{oops\n')
    with pytest.raises(ValueError, match="x.jsonl line 2: not valid JSON"):
        load_jsonl(p)
