"""`validate_file`: every kind of bad input gives the right ``FILE:LINE: field: message``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from coordexp_rl.data.validate import Problem, path_escape_reason, validate_file
from tests.data._util import write_jsonl, write_png

W, H = 20, 10
GOOD = {"images": ["images/a.png"], "width": W, "height": H,
        "objects": [{"desc": "cat", "bbox_2d": [0, 0, 20, 10]},
                    {"desc": "dog", "poly": [1, 1, 5, 1, 3, 4]}],
        "summary": "a cat and a dog", "metadata": {"anything": {"goes": [1, 2]}}}


def variant(**changes) -> dict:
    rec = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is _DELETE:
            del rec[key]
        else:
            rec[key] = value
    return rec


_DELETE = object()


def obj(**kw) -> dict:
    return {"desc": "cat", **kw}


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    write_png(tmp_path / "images" / "a.png", W, H)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return tmp_path


def check_one(root: Path, bad, **kwargs) -> list[str]:
    """Write GOOD on line 1 and ``bad`` on line 2; return the problems as strings."""
    path = write_jsonl(root / "data.jsonl", [GOOD, bad])
    return [str(p) for p in validate_file(path, **kwargs)]


def test_good_record_is_clean(root: Path):
    path = write_jsonl(root / "data.jsonl", [GOOD, GOOD, ""])  # trailing blank line is fine
    assert validate_file(path) == []


def test_problem_str_format():
    assert str(Problem("x.jsonl", 3, "objects[2].bbox_2d", "bad")) == "x.jsonl:3: objects[2].bbox_2d: bad"


# (bad line 2, expected field, a phrase of the expected message)
CASES = [
    ('{"images": ["images/a.png"], "width": 20', "json", "malformed JSON"),
    ("[1, 2, 3]", "json", "must be a JSON object"),
    (variant(width=_DELETE), "width", "required key is missing"),
    (variant(objects=_DELETE), "objects", "required key is missing"),
    (variant(width=0), "width", "greater than 0"),
    (variant(height=10.0), "height", "valid integer"),
    (variant(width="20"), "width", "valid integer"),
    (variant(images=[]), "images", "exactly one image"),
    (variant(images=["images/a.png", "images/a.png"]), "images", "exactly one image"),
    (variant(images="images/a.png"), "images", "valid list"),
    (variant(score=1), "score", "unknown key"),
    (variant(summary="two\nlines"), "summary", "single line"),
    (variant(metadata=[1]), "metadata", "valid dictionary"),
    (variant(objects=[obj(bbox_2d=[0, 0, 5, 5], score=0.9)]), "objects[0].score", "unknown key"),
    (variant(objects=[{"desc": "  ", "bbox_2d": [0, 0, 5, 5]}]), "objects[0].desc", "non-empty"),
    (variant(objects=[{"desc": 5, "bbox_2d": [0, 0, 5, 5]}]), "objects[0].desc", "valid string"),
    (variant(objects=[{"bbox_2d": [0, 0, 5, 5]}]), "objects[0].desc", "required key is missing"),
    (variant(objects=[obj(bbox_2d=[0, 0, 5, 5]), {"desc": "a <box> b", "bbox_2d": [0, 0, 5, 5]}]),
     "objects[1].desc", "structure tokens"),
    (variant(objects=[obj(bbox_2d=[0, 0, 5, 5], poly=[0, 0, 5, 0, 5, 5])]), "objects[0]", "exactly one geometry"),
    (variant(objects=[obj()]), "objects[0]", "exactly one geometry"),
    (variant(objects=[obj(bbox_2d=[0, 0, 5])]), "objects[0].bbox_2d", "needs 4 values"),
    (variant(objects=[obj(bbox_2d=[0, 0, 5, 5]), obj(poly=[0, 0, 5, 5])]), "objects[1].poly", "even number (>= 6)"),
    (variant(objects=[obj(poly=[0, 0, 5, 5, 6])]), "objects[0].poly", "even number (>= 6)"),
    (variant(objects=[obj(bbox_2d=[0, 0, "<|coord_1000|>", 5])]),
     "objects[0].bbox_2d", "neither a number nor a coord token"),
    (variant(objects=[obj(bbox_2d=[0, 0, "5", 5])]), "objects[0].bbox_2d", "neither a number nor a coord token"),
    (variant(objects=[obj(bbox_2d=[0, True, 5, 5])]), "objects[0].bbox_2d", "must be a number"),
    ('{"images": ["images/a.png"], "width": 20, "height": 10, "objects": [{"desc": "c", "bbox_2d": [0, 0, NaN, 5]}]}',
     "objects[0].bbox_2d", "not a finite number"),
    (variant(objects=[obj(bbox_2d=[0, 0, "<|coord_5|>", "<|coord_9|>"])]),
     "objects[0].bbox_2d", "mixes pixel numbers and coord tokens"),
    (variant(objects=[obj(bbox_2d=[0, 0, 21, 5])]),
     "objects[0].bbox_2d", "[0, 0, 21, 5] lies outside the image (0, 0, 20, 10)"),
    (variant(objects=[obj(bbox_2d=[-0.5, 0, 5, 5])]), "objects[0].bbox_2d", "lies outside the image"),
    (variant(objects=[obj(bbox_2d=[0, 0, 5, 10.01])]), "objects[0].bbox_2d", "lies outside the image"),
    (variant(objects=[obj(bbox_2d=[1, 1, 3, 3]), obj(poly=[0, 0, 5, 0, 25, 5])]),
     "objects[1].poly", "lies outside the image"),
    (variant(objects=[obj(bbox_2d=[5, 0, 5, 5])]), "objects[0].bbox_2d", "[5, 0, 5, 5] has zero or negative area"),
    (variant(objects=[obj(bbox_2d=[0, 6, 5, 2])]), "objects[0].bbox_2d", "zero or negative area"),
    (variant(objects=[obj(poly=[1, 1, 4, 1, 7, 1])]),
     "objects[0].poly", "polygon's enclosing box [1, 1, 7, 1] has zero"),
    (variant(objects=[obj(bbox_2d=["<|coord_5|>", "<|coord_1|>", "<|coord_5|>", "<|coord_9|>"])]),
     "objects[0].bbox_2d", "zero or negative area"),
    (variant(objects=[obj(bbox_2d=[0, 0, 5, 5]),
                      obj(bbox_2d=["<|coord_0|>", "<|coord_0|>", "<|coord_5|>", "<|coord_5|>"])]),
     "objects[1].bbox_2d", "uses token coordinates but objects[0] uses pixel"),
    (variant(images=["images/missing.png"]), "images[0]", "'images/missing.png' under"),
    (variant(images=["images/broken.png"]), "images[0]", "does not open as an image"),
    (variant(images=["images"]), "images[0]", "no such file"),
    (variant(images=["/etc/hostname"]), "images[0]", "is absolute"),
    (variant(images=["images/../images/a.png"]), "images[0]", "contains '..'"),
    (variant(width=30), "width", "is 30 but 'images/a.png' is 20x10 pixels"),
    (variant(height=11, objects=[]), "height", "is 11 but 'images/a.png' is 20x10 pixels"),
]


@pytest.mark.parametrize("bad, field, phrase", CASES)
def test_bad_line_is_reported_at_its_line_and_field(root: Path, bad, field: str, phrase: str):
    problems = check_one(root, bad)
    prefix = f"{root / 'data.jsonl'}:2: {field}: "
    assert any(p.startswith(prefix) and phrase in p for p in problems), problems
    assert all(":2: " in p for p in problems), "line 1 is valid and must not be reported"


def test_duplicate_metadata_id(root: Path):
    a = variant(metadata={"id": "s1"})
    path = write_jsonl(root / "data.jsonl", [a, variant(metadata={"id": "s2"}), a])
    assert [str(p) for p in validate_file(path)] == [
        f"{path}:3: metadata.id: 's1' repeats the id of line 1; sample ids must be unique"]


def test_blank_lines_keep_real_line_numbers(root: Path):
    path = write_jsonl(root / "data.jsonl", [GOOD, "", "   ", "{oops"])
    problems = validate_file(path)
    assert [(p.line, p.field) for p in problems] == [(4, "json")]


def test_empty_file_is_a_problem(root: Path):
    path = write_jsonl(root / "data.jsonl", [])
    assert [str(p) for p in validate_file(path)] == [f"{path}:0: file: holds no records"]


def test_image_root_defaults_to_the_jsonl_folder(root: Path, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("out") / "data.jsonl"
    write_jsonl(elsewhere, [GOOD])
    assert [p.field for p in validate_file(elsewhere)] == ["images[0]"]
    assert validate_file(elsewhere, image_root=root) == []
    assert validate_file(elsewhere, check_images=False) == []


def test_several_problems_on_one_line_are_all_reported(root: Path):
    bad = variant(width=30, objects=[obj(bbox_2d=[0, 0, 40, 5]), obj(bbox_2d=[3, 3, 3, 3])])
    fields = sorted(p.field for p in validate_file(write_jsonl(root / "d.jsonl", [bad])))
    # Box checks use the declared width (30): x2 = 40 is outside, [3, 3, 3, 3] is empty; then 30 != 20.
    assert fields == ["objects[0].bbox_2d", "objects[1].bbox_2d", "width"]


TOKENS = variant(objects=[obj(bbox_2d=["<|coord_0|>", "<|coord_100|>", "<|coord_999|>", "<|coord_500|>"])])


def test_coord_token_records_and_skip_bbox_norm(root: Path):
    tokens = write_jsonl(root / "tokens.jsonl", [TOKENS, TOKENS])
    pixels = write_jsonl(root / "pixels.jsonl", [GOOD])
    assert validate_file(tokens) == [] and validate_file(tokens, skip_bbox_norm=True) == []
    assert validate_file(pixels, skip_bbox_norm=False) == []
    [p] = validate_file(tokens, skip_bbox_norm=False)[:1]
    assert (p.line, p.field) == (1, "objects[0].bbox_2d")
    assert "skip_bbox_norm: true" in p.message
    [p] = validate_file(pixels, skip_bbox_norm=True)
    assert (p.line, p.field) == (1, "objects[0].bbox_2d") and "skip_bbox_norm is true" in p.message


def test_a_file_holds_one_coordinate_kind(root: Path):
    empty = variant(objects=[])
    path = write_jsonl(root / "mixed.jsonl", [empty, GOOD, TOKENS])
    assert [str(p) for p in validate_file(path)] == [
        f"{path}:3: objects[0].bbox_2d: token coordinates, but line 2 uses pixel; a file holds one kind"]


@pytest.mark.parametrize("rel, ok", [("a.png", True), ("sub/dir/a.png", True), ("./a.png", True),
                                     ("/abs/a.png", False), ("C:/x.png", False), ("a/../../b.png", False),
                                     ("..\\b.png", False)])
def test_path_escape_reason(rel: str, ok: bool):
    assert (path_escape_reason(rel) is None) == ok


def test_images_are_decoded_whole_and_extreme_aspect_ratios_refused(root: Path):
    """A truncated JPEG opens (its header is whole) but fails when decoded; a 3000x10 image would stop
    Qwen3-VL's processor mid-run. Both are found up front, at their line."""
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(root / "images" / "whole.jpg", quality=90)
    data = (root / "images" / "whole.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (3000, 10)).save(root / "images" / "strip.png")
    cut = variant(images=["images/cut.jpg"], width=64, height=48, objects=[obj(bbox_2d=[0, 0, 5, 5])])
    strip = variant(images=["images/strip.png"], width=3000, height=10, objects=[obj(bbox_2d=[0, 0, 5, 5])])
    problems = [str(p) for p in validate_file(write_jsonl(root / "d.jsonl", [GOOD, cut, strip]))]
    assert len(problems) == 2
    assert problems[0].startswith(f"{root / 'd.jsonl'}:2: images[0]:") and "does not open as an image" in problems[0]
    assert problems[1].startswith(f"{root / 'd.jsonl'}:3: images[0]:") and "aspect ratio 300:1" in problems[1]


def test_sixteen_bit_images_keep_their_range(tmp_path: Path):
    """A 16-bit grey PNG becomes the 8-bit image it shows, not white (PIL's own conversion clips)."""
    import numpy as np
    from PIL import Image

    from coordexp_rl.data.loader import load_rgb

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)  # 0 .. 64512
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert rgb.shape == (8, 8, 3) and rgb[0, 0, 0] == 0 and rgb[7, 7, 0] == 252 and len(np.unique(rgb)) == 64
