"""`coordexp-rl validate` through the real entry point: output lines and exit codes."""

from __future__ import annotations

from pathlib import Path

from coordexp_rl.cli import main
from tests.data._util import write_jsonl, write_png

GOOD = {"images": ["a.png"], "width": 8, "height": 6, "objects": [{"desc": "x", "bbox_2d": [1, 1, 4, 4]}]}


def test_clean_file_exits_0_with_a_summary(tmp_path: Path, capsys):
    write_png(tmp_path / "a.png", 8, 6)
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: OK, 2 records, 2 objects\n"


def test_problems_exit_1_one_line_each(tmp_path: Path, capsys):
    write_png(tmp_path / "imgs" / "a.png", 8, 6)
    bad = {**GOOD, "objects": [{"desc": "x", "bbox_2d": [1, 1, 9, 4]}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "not json", bad])
    assert main(["validate", str(path), "--image-root", str(tmp_path / "imgs")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:2: json: malformed JSON: Expecting value at column 1",
        f"{path}:3: objects[0].bbox_2d: [1, 1, 9, 4] lies outside the image (0, 0, 8, 6); clip it to the image",
        f"{path}: 2 problems on 2 lines (1 valid records)",
    ]


def test_no_images_and_skip_bbox_norm_flags(tmp_path: Path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])  # a.png does not exist
    assert main(["validate", str(path)]) == 1
    assert main(["validate", str(path), "--no-images"]) == 0
    assert main(["validate", str(path), "--no-images", "--skip-bbox-norm", "true"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:1: images[0]: 'a.png' under" in out and "skip_bbox_norm is true" in out
