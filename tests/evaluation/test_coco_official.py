"""`coordexp-rl eval --coco-ann`: official COCO results files scored against the annotation file, checked
by hand on crowd regions and against pycocotools run directly on the same files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from coordexp_rl.cli import main
from coordexp_rl.evaluation.coco_official import STAT_NAMES

CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 10, "name": "traffic light"}]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def write_preds(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def pred_line(file_name: str, w: int, h: int, objects: list[tuple], status: str = "ok") -> dict:
    return {"images": [file_name], "width": w, "height": h, "parse_status": status, "sample_id": file_name,
            "objects": [{"desc": d, "bbox_2d": list(b), "score": s} for d, b, s in objects]}


def run_eval(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_crowd_region_is_ignored_and_results_file_is_official(tmp_path, capsys):
    ann = write_json(tmp_path / "ann.json", {
        "images": [{"id": 7, "file_name": "000007.jpg", "width": 200, "height": 100}],
        "categories": CATS,
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 60], "area": 3000, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [120, 10, 70, 80], "area": 5600, "iscrowd": 1}]})
    # The crowd box has the higher score: were it a false positive, AP would be 0.5, not 1.
    preds = write_preds(tmp_path / "p.jsonl", [pred_line("val2017/000007.jpg", 200, 100, [
        ("Person ", (10, 10, 60, 70), 0.9), ("person", (120, 10, 190, 90), 0.95),
        ("zebra crossing", (0, 0, 9, 9), 1.0)])])
    out = run_eval(capsys, "--coco-ann", str(ann), "--pred", str(preds), "--out", str(tmp_path / "o"),
                   "--score-modes", "coord_prob")
    assert out["coord_prob"]["AP"] == pytest.approx(1.0)
    assert (out["non_category_boxes"], out["non_category_descs"], out["scored_boxes"]) == (1, {"zebra crossing": 1}, 2)
    assert (out["images_scored"], out["images_in_annotations"], out["subset"]) == (1, 1, False)
    results = json.loads((tmp_path / "o" / "coco_results_coord_prob.json").read_text())
    assert results[0] == {"image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 60], "score": 0.9}


def random_case(tmp_path: Path, seed: int) -> tuple[Path, Path]:
    """Images with small / medium / large boxes, crowd regions, jittered and wrong predictions, a failed line."""
    rng = random.Random(seed)
    images, anns, lines = [], [], []
    for i in range(12):
        w, h = rng.choice([(640, 480), (480, 640), (320, 240)])
        images.append({"id": 100 + i, "file_name": f"{100 + i:012d}.jpg", "width": w, "height": h})
        objects = []
        for _ in range(rng.randint(0, 9)):
            side = rng.choice([12, 20, 50, 90, 200])  # areas below 32^2, between, above 96^2
            x, y = rng.uniform(0, w - side), rng.uniform(0, h - side)
            bw, bh = side * rng.uniform(0.6, 1.0), side * rng.uniform(0.6, 1.0)
            cat = rng.choice(CATS)
            crowd = int(rng.random() < 0.1)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat["id"], "bbox": [x, y, bw, bh],
                         "area": bw * bh * rng.uniform(0.5, 1.0), "iscrowd": crowd})
            if rng.random() < 0.8:
                j = rng.uniform(-0.2, 0.2) * bw
                name = cat["name"] if rng.random() < 0.85 else rng.choice(["bicycle", "car", "person"])
                objects.append((name, (x + j, y, x + bw + j, y + bh), round(rng.random(), 1)))
        for _ in range(rng.randint(0, 3)):
            x, y = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            objects.append((rng.choice(["person", "car", "traffic light"]), (x, y, x + 40, y + 30),
                            round(rng.random(), 1)))
        rng.shuffle(objects)
        lines.append(pred_line(f"{100 + i:012d}.jpg", w, h, objects, "failed" if i == 5 else "ok"))
    ann = write_json(tmp_path / "instances.json", {"images": images, "annotations": anns, "categories": CATS})
    return ann, write_preds(tmp_path / "preds.jsonl", lines)


def pycocotools_stats(ann: Path, results: Path) -> list[float]:
    """The reference, run by hand on the two files (nothing of ours in between)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(str(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools_on_the_same_files(tmp_path, capsys, seed):
    ann, preds = random_case(tmp_path, seed)
    out = run_eval(capsys, "--coco-ann", str(ann), "--pred", str(preds), "--out", str(tmp_path / "o"))
    for mode in ("constant", "coord_prob"):
        ours = [out[mode][k] for k in STAT_NAMES]
        ref = pycocotools_stats(ann, tmp_path / "o" / f"coco_results_{mode}.json")
        assert ours == pytest.approx(ref, abs=1e-6), mode
        assert 0 < ours[0] < 1  # a non-trivial case
    assert out["non_category_boxes"] > 0  # "bicycle" is no category here: counted, not scored


def test_prediction_for_an_unknown_image_names_the_line(tmp_path, capsys):
    ann, _ = random_case(tmp_path, 0)
    preds = write_preds(tmp_path / "p.jsonl", [pred_line("nope.jpg", 10, 10, [])])
    capsys.readouterr()
    assert main(["eval", "--coco-ann", str(ann), "--pred", str(preds)]) == 1
    assert "p.jsonl line 1: image 'nope.jpg' is not in the annotation file" in capsys.readouterr().err
