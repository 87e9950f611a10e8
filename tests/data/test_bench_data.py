"""`coordexp-rl bench data` at a small size: every step sees the same records, and the JSON has the numbers."""

from __future__ import annotations

import json

from coordexp_rl.cli import main
from coordexp_rl.tools.bench.data import make_instances


def test_instances_are_coco_shaped():
    inst = make_instances(20, 150, seed=1)
    assert (len(inst["images"]), len(inst["annotations"]), len(inst["categories"])) == (20, 150, 80)
    for a in inst["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and x + w <= 640.01 and 0 <= y and y + h <= 480.01 and 1 <= a["image_id"] <= 20


def test_bench_data_small(tmp_path, capsys):
    assert main(["bench", "data", "--images", "60", "--boxes", "400", "--dir", str(tmp_path / "w")]) == 0
    out = json.loads(capsys.readouterr().out)
    crowd = sum(a["iscrowd"] for a in make_instances(60, 400)["annotations"])  # converter drops crowd boxes
    assert out["convert"]["records"] == out["validate_images"]["records"] == out["load_no_images"]["samples"] == 60
    assert out["convert"]["objects"] == out["load_images"]["objects"] == 400 - crowd
    assert out["validate_images"]["problems"] == 0
    for step in ("convert", "validate_images", "load_images", "load_no_images"):
        assert out[step]["seconds"] > 0 and out[step]["peak_rss_mb"] >= out[step]["start_rss_mb"] > 0
    assert out["load_speedup"] > 0
