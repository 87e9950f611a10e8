"""`load_samples`: bins from pixels and from coord tokens, sample ids, errors before training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from coordexp_rl.data.loader import DataError, image_sha256, load_image, load_samples
from coordexp_rl.method.protocol import BoxObject
from tests.data._util import write_jsonl, write_png

W, H = 640, 480


def rec(objects: list[dict], **extra) -> dict:
    return {"images": ["img.png"], "width": W, "height": H, "objects": objects, **extra}


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    write_png(tmp_path / "img.png", W, H)
    return tmp_path


def test_pixel_boxes_become_bins(root: Path):
    path = write_jsonl(root / "train.jsonl", [rec([
        {"desc": "whole image", "bbox_2d": [0, 0, 640, 480]},  # 0 -> bin 0; == width -> 1.0 -> clamped 999
        # 123.4 / 640 = 0.1928125 -> round(192.8125) = 193; 120 / 480 = 0.25 -> 250; 320 / 640 -> 500;
        # 479.9 / 480 = 0.99979 -> round(999.79) = 1000 -> clamped to 999.
        {"desc": "middle", "bbox_2d": [123.4, 120, 320, 479.9]},
        # Halves round up (Python's round() would round to even): 0.32 / 640 -> 0.5 bins -> 1;
        # 1.2 / 480 -> 2.5 bins -> 3; 1.6 / 640 -> 2.5 bins -> 3; 4.8 / 480 -> 10 bins.
        {"desc": "halves", "bbox_2d": [0.32, 1.2, 1.6, 4.8]},
    ])])
    [s] = load_samples(path)
    assert s.objects == [BoxObject("whole image", (0, 0, 999, 999)),
                         BoxObject("middle", (193, 250, 500, 999)),
                         BoxObject("halves", (1, 3, 3, 10))]
    assert s.boxes_px == [(0.0, 0.0, 640.0, 480.0), (123.4, 120.0, 320.0, 479.9), (0.32, 1.2, 1.6, 4.8)]
    assert all(isinstance(v, float) for box in s.boxes_px for v in box)
    assert (s.width, s.height, s.image_rel) == (W, H, "img.png")
    assert s.image_path == (root / "img.png").resolve() and s.image_path.is_absolute()


def test_polygon_becomes_its_enclosing_box(root: Path):
    path = write_jsonl(root / "train.jsonl", [rec([{"desc": "tri", "poly": [64, 96, 320, 48, 192, 240]}])])
    [s] = load_samples(path)
    # box (64, 48, 320, 240) -> (0.1, 0.1, 0.5, 0.5) -> bins (100, 100, 500, 500)
    assert s.boxes_px == [(64.0, 48.0, 320.0, 240.0)]
    assert s.objects == [BoxObject("tri", (100, 100, 500, 500))]


def test_coord_token_records_keep_their_bins(root: Path):
    box = ["<|coord_0|>", "<|coord_250|>", "<|coord_500|>", "<|coord_999|>"]
    path = write_jsonl(root / "tok.jsonl", [rec([{"desc": "pre", "bbox_2d": box}])])
    [s] = load_samples(path, skip_bbox_norm=True)
    assert s.objects == [BoxObject("pre", (0, 250, 500, 999))]
    # bins decode back to pixels for evaluation: 250/1000*480 = 120, 999/1000*480 = 479.52
    assert s.boxes_px == [(0.0, 120.0, 320.0, pytest.approx(479.52))]


def test_skip_bbox_norm_must_match_the_data(root: Path):
    tok = write_jsonl(root / "tok.jsonl", [rec([{"desc": "a", "bbox_2d": ["<|coord_1|>"] * 2 + ["<|coord_9|>"] * 2}])])
    pix = write_jsonl(root / "pix.jsonl", [rec([{"desc": "a", "bbox_2d": [1, 1, 9, 9]}])])
    with pytest.raises(DataError, match=r"tok.jsonl:1: objects\[0\].bbox_2d: .*skip_bbox_norm: true"):
        load_samples(tok)
    with pytest.raises(DataError,
                       match=r"pix.jsonl:1: objects\[0\].bbox_2d: pixel coordinates, but skip_bbox_norm is true"):
        load_samples(pix, skip_bbox_norm=True)


def test_sample_ids(root: Path):
    path = write_jsonl(root / "val.jsonl", [rec([]), "", rec([], metadata={"id": 17}), rec([])])
    assert [s.sample_id for s in load_samples(path)] == ["val:1", "17", "val:4"]


def test_errors_list_the_first_20_problems(root: Path):
    bad = rec([{"desc": "a", "bbox_2d": [0, 0, 700, 10]}])
    path = write_jsonl(root / "bad.jsonl", [rec([])] + [bad] * 25)
    with pytest.raises(DataError) as err:
        load_samples(path)
    text = str(err.value)
    assert f"{path}: 25 problems" in text
    assert f"{path}:2: objects[0].bbox_2d: [0, 0, 700, 10] lies outside the image" in text
    assert f"{path}:21:" in text and f"{path}:22:" not in text  # lines 2..21 are the first 20
    assert "... and 5 more" in text
    assert f"coordexp-rl validate {path}" in text


def test_missing_image_stops_loading(root: Path, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "train.jsonl"
    write_jsonl(other, [rec([])])
    with pytest.raises(DataError, match=r"train.jsonl:1: images\[0\]: 'img.png' under .*: no such file"):
        load_samples(other)
    [s] = load_samples(other, image_root=root)
    assert s.image_path == (root / "img.png").resolve()


def test_load_image_is_rgb(root: Path):
    write_png(root / "grey.png", 7, 5, colour=(90, 0, 0), mode="L")
    path = write_jsonl(root / "g.jsonl", [{"images": ["grey.png"], "width": 7, "height": 5, "objects": []}])
    [s] = load_samples(path)
    im = load_image(s)
    assert im.mode == "RGB" and im.size == (7, 5) and im.getpixel((3, 2)) == (90, 90, 90)


def test_image_sha256(tmp_path: Path):
    (tmp_path / "abc").write_bytes(b"abc")
    assert image_sha256(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    write_png(tmp_path / "x.png", 3, 3)
    assert image_sha256(tmp_path / "x.png") == hashlib.sha256((tmp_path / "x.png").read_bytes()).hexdigest()
