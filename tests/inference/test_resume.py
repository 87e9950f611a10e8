"""Resumable output: lines are appended and flushed; a rerun skips done ids and repairs a cut last line."""

from __future__ import annotations

import json

import pytest

from coordexp_rl.rollout.predict import resume_done_ids, write_predictions


def line(i: int, status: str = "ok") -> str:
    return json.dumps({"sample_id": f"s{i}", "images": [f"{i}.png"], "objects": [], "parse_status": status}) + "\n"


def test_missing_file_means_nothing_done(tmp_path):
    assert resume_done_ids(tmp_path / "none.jsonl") == set()


def test_complete_file_is_left_untouched(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(line(0) + line(1), encoding="utf-8")
    assert resume_done_ids(path) == {"s0", "s1"}
    assert path.read_text(encoding="utf-8") == line(0) + line(1)


def test_cut_last_line_is_removed(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(line(0) + line(1) + line(2)[:17], encoding="utf-8")  # a crash mid-write
    assert resume_done_ids(path) == {"s0", "s1"}
    assert path.read_text(encoding="utf-8") == line(0) + line(1)


def test_whole_last_line_without_newline_is_kept_and_terminated(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(line(0) + line(1).rstrip("\n"), encoding="utf-8")
    assert resume_done_ids(path) == {"s0", "s1"}
    assert path.read_text(encoding="utf-8") == line(0) + line(1)  # the next append starts a new line


def test_broken_middle_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    text = line(0) + "{oops\n" + line(2)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl line 2"):
        resume_done_ids(path)
    assert path.read_text(encoding="utf-8") == text  # not ours to repair


def test_a_file_that_is_not_predictions_is_refused_not_repaired(tmp_path):
    """An annotation file given as --out (one JSON line, no sample_id, maybe no final newline) is not a
    torn prediction file: refused, untouched."""
    for text in ('{"images": [], "annotations": [], "categories": []}',
                 json.dumps({"images": ["a.png"], "objects": []}) + "\n"):
        path = tmp_path / "ann.json"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=r"ann\.json line 1: not a prediction line"):
            resume_done_ids(path)
        assert path.read_text(encoding="utf-8") == text


def test_write_predictions_appends_and_counts(tmp_path):
    path = tmp_path / "p.jsonl"
    recs = [json.loads(line(i, s)) for i, s in enumerate(["ok", "failed", "ok"])]
    assert write_predictions(recs[:2], path) == {"ok": 1, "failed": 1}
    assert write_predictions(recs[2:], path) == {"ok": 1}
    assert path.read_text(encoding="utf-8") == line(0, "ok") + line(1, "failed") + line(2, "ok")


def test_lines_written_before_a_failure_survive(tmp_path):
    path = tmp_path / "p.jsonl"

    def records():
        yield json.loads(line(0))
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError):
        write_predictions(records(), path)
    assert resume_done_ids(path) == {"s0"}
