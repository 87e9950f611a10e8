"""Converters: tiny hand-written COCO / VOC / RefCOCO inputs -> exact contract records that validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordexp_rl.cli import main
from coordexp_rl.data.convert import clip_box, coco_records, refcoco_records, voc_record
from coordexp_rl.data.loader import DataError
from coordexp_rl.data.validate import validate_file
from tests.data._util import read_jsonl, write_jsonl, write_png
from tests.evaluation.builders import pred_rec

COCO = {
    "images": [
        {"id": 7, "file_name": "train/a.png", "width": 40, "height": 30},
        {"id": 3, "file_name": "train/b.png", "width": 20, "height": 20},  # no annotations: kept, empty
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "traffic light"}],
    "annotations": [
        {"id": 100, "image_id": 7, "category_id": 18, "bbox": [10.5, 2, 5, 8.25], "iscrowd": 0},
        {"id": 101, "image_id": 7, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1},  # crowd
        {"id": 102, "image_id": 7, "category_id": 1, "bbox": [30, 20, 12.3, 10], "iscrowd": 0},  # past the edge
        {"id": 103, "image_id": 7, "category_id": 1, "bbox": [5, 5, 0, 4], "iscrowd": 0},  # zero width: dropped
        {"id": 104, "image_id": 7, "category_id": 1, "bbox": [-1, 3, 4, 4]},  # no iscrowd key, left edge
    ],
}


@pytest.fixture()
def coco_dir(tmp_path: Path) -> Path:
    write_png(tmp_path / "img" / "train" / "a.png", 40, 30)
    write_png(tmp_path / "img" / "train" / "b.png", 20, 20)
    (tmp_path / "instances.json").write_text(json.dumps(COCO))
    return tmp_path


def test_clip_box():
    clipped = clip_box([-2, 5, 12.00001, 8], 10, 10)
    assert clipped == (0.0, 5.0, 10.0, 8.0) and all(type(v) is float for v in clipped)
    assert clip_box([1.23456, 0, 2, 1], 10, 10) == (1.235, 0.0, 2.0, 1.0)
    assert clip_box([3, 3, 3, 9], 10, 10) is None
    assert clip_box([12, 0, 15, 5], 10, 10) is None  # entirely right of the image


def test_coco_drop_crowd(coco_dir: Path):
    out = coco_dir / "out" / "coco.jsonl"
    assert main(["convert", "coco", "--ann", str(coco_dir / "instances.json"),
                 "--image-root", str(coco_dir / "img"), "--out", str(out)]) == 0
    assert read_jsonl(out) == [
        {"images": ["train/a.png"], "width": 40, "height": 30,
         "objects": [{"desc": "traffic light", "bbox_2d": [10.5, 2, 15.5, 10.25]},
                     {"desc": "person", "bbox_2d": [30, 20, 40, 30]},
                     {"desc": "person", "bbox_2d": [0, 3, 3, 7]}],
         "metadata": {"id": "coco/7", "dataset": "coco", "image_id": 7, "ann_ids": [100, 102, 104]}},
        {"images": ["train/b.png"], "width": 20, "height": 20, "objects": [],
         "metadata": {"id": "coco/3", "dataset": "coco", "image_id": 3, "ann_ids": []}},
    ]
    assert validate_file(out, image_root=coco_dir / "img") == []


def test_coco_mark_crowd():
    [a, b] = coco_records(COCO, crowd="mark")
    assert [o["desc"] for o in a["objects"]] == ["traffic light", "person", "person", "person"]
    assert a["objects"][1]["bbox_2d"] == [0, 0, 40, 30]
    assert a["metadata"]["iscrowd"] == [0, 1, 0, 0] and a["metadata"]["ann_ids"] == [100, 101, 102, 104]
    assert b["metadata"]["iscrowd"] == []


VOC_A = """<annotation>
  <folder>VOC2007</folder><filename>000001.png</filename>
  <size><width>50</width><height>40</height><depth>3</depth></size>
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>20</xmax><ymax>40</ymax></bndbox></object>
  <object><name> person </name><truncated>1</truncated><difficult>1</difficult>
    <bndbox><xmin>30.0</xmin><ymin>10</ymin><xmax>51</xmax><ymax>25</ymax></bndbox></object>
</annotation>"""
VOC_B = """<annotation><filename>000002.png</filename>
  <object><name>cat</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>6</ymax></bndbox></object>
</annotation>"""  # no <size>: read from the image; no <difficult>: 0


def test_voc(tmp_path: Path):
    xml_dir, img_dir = tmp_path / "Annotations", tmp_path / "JPEGImages"
    xml_dir.mkdir()
    (xml_dir / "000002.xml").write_text(VOC_B)
    (xml_dir / "000001.xml").write_text(VOC_A)
    write_png(img_dir / "000001.png", 50, 40)
    write_png(img_dir / "000002.png", 12, 8)
    out = tmp_path / "voc.jsonl"
    assert main(["convert", "voc", "--xml-dir", str(xml_dir), "--image-root", str(img_dir), "--out", str(out)]) == 0
    # 1-based inclusive VOC pixels: x1 = xmin - 1, x2 = xmax; xmax 51 > width 50 is clipped.
    assert read_jsonl(out) == [
        {"images": ["000001.png"], "width": 50, "height": 40,
         "objects": [{"desc": "dog", "bbox_2d": [0, 1, 20, 40]}, {"desc": "person", "bbox_2d": [29, 9, 50, 25]}],
         "metadata": {"id": "voc/000001", "dataset": "voc", "difficult": [0, 1]}},
        {"images": ["000002.png"], "width": 12, "height": 8,
         "objects": [{"desc": "cat", "bbox_2d": [4, 4, 9, 6]}],
         "metadata": {"id": "voc/000002", "dataset": "voc", "difficult": [0]}},
    ]
    assert validate_file(out, image_root=img_dir) == []


def test_voc_missing_bndbox_names_the_file(tmp_path: Path):
    (tmp_path / "x.xml").write_text("<annotation><filename>x.png</filename><size><width>5</width>"
                                    "<height>5</height></size><object><name>a</name></object></annotation>")
    with pytest.raises(ValueError, match=r"x.xml: an <object> has no <bndbox>"):
        voc_record(tmp_path / "x.xml", tmp_path)


REFS = [
    {"ref_id": 11, "ann_id": 100, "image_id": 7, "split": "train", "category_id": 18, "file_name": "ignored",
     "sentences": [{"sent": "the  traffic light ", "sent_id": 5}, {"sent": "green light"}]},
    {"ref_id": 12, "ann_id": 102, "image_id": 7, "split": "train",
     "sentences": [{"sent": "man at the bottom right", "sent_id": 9}, {"sent": "   "}]},
    {"ref_id": 13, "ann_id": 100, "image_id": 7, "split": "train",  # a second ref of the traffic light
     "sentences": [{"sent": "light on the left", "sent_id": 10}]},
    {"ref_id": 14, "ann_id": 104, "image_id": 3, "split": "val", "sentences": [{"sent": "box", "sent_id": 11}]},
]
LIGHT, MAN = [10.5, 2, 15.5, 10.25], [30, 20, 40, 30]


def test_refcoco_one_record_per_image(coco_dir: Path):
    """Eval and training pair predictions with GT by image: one record per image, one object per box."""
    refs = coco_dir / "refs.json"
    refs.write_text(json.dumps(REFS[:3]))
    out = coco_dir / "refcoco.jsonl"
    assert main(["convert", "refcoco", "--refs", str(refs), "--ann", str(coco_dir / "instances.json"),
                 "--image-root", str(coco_dir / "img"), "--out", str(out)]) == 0
    assert read_jsonl(out) == [{  # the blank expression of ref 12 is dropped; refs 11 and 13 are one box
        "images": ["train/a.png"], "width": 40, "height": 30,
        "objects": [{"desc": "the traffic light", "bbox_2d": LIGHT},
                    {"desc": "man at the bottom right", "bbox_2d": MAN}],
        "metadata": {"id": "refcoco/7", "dataset": "refcoco", "image_id": 7, "split": "train",
                     "ref_ids": [[11, 13], [12]], "ann_ids": [100, 102],
                     "expressions": [["the traffic light", "green light", "light on the left"],
                                     ["man at the bottom right"]],
                     "sent_ids": [[5, None, 10], [9]]}}]
    assert validate_file(out, image_root=coco_dir / "img") == []


def test_refcoco_output_is_accepted_by_eval(coco_dir: Path, tmp_path: Path, capsys):
    """The records eval refused before (several per image) now score: the GT as predictions give F1 1."""
    refs = write_jsonl(coco_dir / "refs.jsonl", REFS)
    out = coco_dir / "refcoco.jsonl"
    assert main(["convert", "refcoco", "--refs", str(refs), "--ann", str(coco_dir / "instances.json"),
                 "--out", str(out)]) == 0
    preds = [pred_rec(r["images"][0], [(o["desc"], o["bbox_2d"], 1.0) for o in r["objects"]], "ok", r["width"],
                      r["height"]) for r in read_jsonl(out)]
    capsys.readouterr()
    assert main(["eval", "--gt", str(out), "--pred", str(write_jsonl(tmp_path / "p.jsonl", preds))]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == 2 and summary["f1@0.5/f1"] == 1.0


def test_refcoco_split_and_mixed_splits():
    [only] = refcoco_records(REFS, COCO, split="val")
    assert only["objects"] == [{"desc": "box", "bbox_2d": [0, 3, 3, 7]}] and only["metadata"]["split"] == "val"
    assert refcoco_records(REFS, COCO, split="testA") == []
    mixed = [REFS[0], {**REFS[1], "split": "val"}]
    with pytest.raises(DataError, match="image 7 .* splits .*pass --split"):
        refcoco_records(mixed, COCO)
    with pytest.raises(DataError, match="ref 14: image_id 3 or ann_id 999"):
        refcoco_records([{**REFS[3], "ann_id": 999}], COCO)


def test_coco_prefix_puts_the_split_folder_in_front(coco_dir: Path, capsys):
    """COCO's file_name has no split folder: --prefix makes one root above the split folders work."""
    out = coco_dir / "out" / "prefixed.jsonl"
    assert main(["convert", "coco", "--ann", str(coco_dir / "instances.json"), "--prefix", "img/",
                 "--image-root", str(coco_dir), "--out", str(out)]) == 0
    assert [r["images"] for r in read_jsonl(out)] == [["img/train/a.png"], ["img/train/b.png"]]
    assert "missing" not in capsys.readouterr().out
    assert validate_file(out, image_root=coco_dir) == []
