"""`coordexp-rl infer` end to end with the HF engine, then `coordexp-rl eval` on its output."""

from __future__ import annotations

import json

import pytest

from coordexp_rl.cli import main
from coordexp_rl.method.coords import bins_to_pixels
from tests.inference.conftest import PROMPT, TAUGHT, read_jsonl, write_subset

FIELDS = {"images", "width", "height", "objects", "sample_id", "parse_status", "parse_reasons", "finish_reason"}


def infer(model, data, out, image_root, *extra: str) -> int:
    return main(["infer", "--model", str(model), "--data", str(data), "--out", str(out), "--engine", "hf",
                 "--image-root", str(image_root), "--prompt", PROMPT, "--batch-size", "3", *extra])


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_random_model_writes_one_line_per_record_and_eval_accepts_it(tiny_model_dir, synth_dir, tmp_path, capsys):
    data = write_subset(synth_dir, tmp_path / "gt.jsonl", 4)
    out = tmp_path / "preds.jsonl"
    assert infer(tiny_model_dir, data, out, synth_dir, "--max-new-tokens", "8") == 0
    preds, gts = read_jsonl(out), read_jsonl(data)
    assert len(preds) == len(gts)
    assert [p["images"] for p in preds] == [g["images"] for g in gts]
    assert [p["sample_id"] for p in preds] == [g["metadata"]["id"] for g in gts]
    for p in preds:
        assert FIELDS <= set(p)
        assert p["parse_status"] in ("ok", "partial", "failed")
        assert p["finish_reason"] in ("stop", "length") and p["num_tokens"] <= 8
    capsys.readouterr()
    assert main(["eval", "--gt", str(data), "--pred", str(out), "--image-root", str(synth_dir)]) == 0
    assert "parse" in capsys.readouterr().out


@pytest.fixture(scope="module")
def taught_run(taught_dir, synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("taught_run")
    data = write_subset(synth_dir, tmp / "gt.jsonl", 4)
    out = tmp / "preds.jsonl"
    assert infer(taught_dir, data, out, synth_dir, "--max-new-tokens", "20") == 0
    return data, out


def test_taught_model_predictions_are_the_taught_box_in_pixels(taught_run):
    data, out = taught_run
    for p, g in zip(read_jsonl(out), read_jsonl(data)):
        assert p["parse_status"] == "ok" and p["finish_reason"] == "stop"
        (obj,) = p["objects"]
        assert obj["desc"] == TAUGHT[0].desc
        assert obj["bbox_2d"] == pytest.approx(list(bins_to_pixels(TAUGHT[0].bins, g["width"], g["height"])))
        assert 0.5 < obj["score"] <= 1 and 0.5 < obj["score_desc"] <= 1


def test_eval_scores_the_taught_predictions(taught_run, synth_dir, capsys, tmp_path):
    """A GT made for the taught answer: image 0 holds exactly the taught box, images 1-3 one other box. The 4
    predictions (the taught box on every image) give 1 TP, 3 FP, 3 FN: precision = recall = 1 / 4."""
    data, out = taught_run
    gts = read_jsonl(data)
    for i, g in enumerate(gts):
        box = bins_to_pixels(TAUGHT[0].bins, g["width"], g["height"])
        g["objects"] = [{"desc": TAUGHT[0].desc, "bbox_2d": [round(v) for v in box]}] if i == 0 else \
            [{"desc": "blue square", "bbox_2d": [0, 0, 10, 10]}]
    gt = tmp_path / "gt.jsonl"
    gt.write_text("".join(json.dumps(g) + "\n" for g in gts))
    capsys.readouterr()
    assert main(["eval", "--gt", str(gt), "--pred", str(out), "--image-root", str(synth_dir),
                 "--out", str(tmp_path / "report"), "--overlays", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["num_images"], summary["parse_failure_rate"]) == (4, 0.0)
    assert (summary["f1@0.5/precision"], summary["f1@0.5/recall"]) == (0.25, 0.25)
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["num_images"] == 4


def test_rerun_skips_done_lines_and_repairs_a_cut_last_line(taught_run, taught_dir, synth_dir, tmp_path, capsys):
    data, first = taught_run
    full = first.read_text(encoding="utf-8")
    out = tmp_path / "preds.jsonl"
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:30], encoding="utf-8")  # crash while writing line 4
    capsys.readouterr()
    assert infer(taught_dir, data, out, synth_dir, "--max-new-tokens", "20") == 0
    summary = last_json(capsys)
    assert (summary["skipped"], summary["written"]) == (3, 1)
    assert out.read_text(encoding="utf-8") == full  # greedy: the redone line equals the first run's
    assert infer(taught_dir, data, out, synth_dir) == 0  # nothing left to do: no engine is started
    summary = last_json(capsys)
    assert (summary["skipped"], summary["written"]) == (4, 0)
    assert out.read_text(encoding="utf-8") == full
