"""The synthetic shapes set: valid, deterministic, tight boxes, varied, fast."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coordexp_rl.cli import main
from coordexp_rl.data.loader import load_samples
from coordexp_rl.data.synth import COLOURS, SHAPES, make_synthetic_set
from coordexp_rl.data.validate import validate_file
from tests.data._util import read_jsonl


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path):
    a = make_synthetic_set(tmp_path / "a", 12, 4, seed=3)
    make_synthetic_set(tmp_path / "b", 12, 4, seed=3)
    make_synthetic_set(tmp_path / "c", 12, 4, seed=4)
    assert all_bytes(tmp_path / "a") == all_bytes(tmp_path / "b")
    assert len(all_bytes(tmp_path / "a")) == 12 + 4 + 3  # images + train/val/meta
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    meta = json.loads(a["meta"].read_text())
    assert (meta["seed"], meta["n_train"], meta["n_val"], meta["image_size"]) == (3, 12, 4, 128)


def test_output_validates_and_loads(tmp_path: Path):
    paths = make_synthetic_set(tmp_path, 30, 10, seed=0, image_size=96)
    for split, n in (("train", 30), ("val", 10)):
        assert validate_file(paths[split], skip_bbox_norm=False) == []
        samples = load_samples(paths[split])
        assert len(samples) == n and len({s.sample_id for s in samples}) == n
        assert all(s.width == s.height == 96 for s in samples)
    # train and val images are different files with different content
    train = {r["images"][0] for r in read_jsonl(paths["train"])}
    val = {r["images"][0] for r in read_jsonl(paths["val"])}
    assert not train & val


def test_boxes_are_tight_bounds_of_the_shape(tmp_path: Path):
    """One shape on a plain background: the non-background pixels span exactly the box."""
    paths = make_synthetic_set(tmp_path, 40, 0, seed=1, min_objects=1, max_objects=1, background="plain")
    for rec in read_jsonl(paths["train"]):
        pixels = np.asarray(Image.open(tmp_path / rec["images"][0]).convert("RGB")).astype(int)
        [obj] = rec["objects"]
        colour = np.array(COLOURS[obj["desc"].split()[0]])
        ys, xs = np.nonzero((pixels == colour).all(axis=2))
        assert obj["bbox_2d"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        background = pixels[0, 0] if obj["bbox_2d"][:2] != [0, 0] else pixels[-1, -1]
        other = ~(pixels == colour).all(axis=2) & ~(pixels == background).all(axis=2)
        assert not other.any(), "a plain background has one colour"


def test_variety_counts_edges_and_overlap(tmp_path: Path):
    paths = make_synthetic_set(tmp_path, 200, 0, seed=5, image_size=128, min_objects=1, max_objects=6)
    recs = read_jsonl(paths["train"])
    counts = [len(r["objects"]) for r in recs]
    assert min(counts) == 1 and max(counts) == 6
    descs = {o["desc"] for r in recs for o in r["objects"]}
    assert {d.split()[1] for d in descs} == set(SHAPES) and {d.split()[0] for d in descs} == set(COLOURS)
    boxes = [o["bbox_2d"] for r in recs for o in r["objects"]]
    assert sum(b[0] == 0 or b[1] == 0 or b[2] == 128 or b[3] == 128 for b in boxes) > 0.05 * len(boxes)
    sides = [b[2] - b[0] for b in boxes]
    assert min(sides) < 25 and max(sides) > 40
    for r in recs:  # pairwise IoU stays <= 0.1, so every object stays visible
        bs = [o["bbox_2d"] for o in r["objects"]]
        for i in range(len(bs)):
            for j in range(i):
                assert iou(bs[i], bs[j]) <= 0.1 + 1e-9


def iou(a, b) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_thousand_images_in_a_few_seconds(tmp_path: Path):
    start = time.perf_counter()
    make_synthetic_set(tmp_path, 1000, 0, seed=0, background="plain")
    assert time.perf_counter() - start < 15  # ~2 s here; generous for a shared 2-core machine


def test_bad_arguments_are_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        make_synthetic_set(tmp_path, 1, 1, seed=0, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="unknown shapes/colours"):
        make_synthetic_set(tmp_path, 1, 1, seed=0, shapes=("hexagon",))


def test_cli_synth_then_validate(tmp_path: Path, capsys):
    out = tmp_path / "shapes"
    assert main(["synth", "--out", str(out), "--train", "5", "--val", "2", "--seed", "9", "--size", "64",
                 "--max-objects", "3", "--shapes", "circle,square", "--colours", "red,blue"]) == 0
    assert "wrote 5 train and 2 val images" in capsys.readouterr().out
    recs = read_jsonl(out / "train.jsonl")
    assert len(recs) == 5 and all(1 <= len(r["objects"]) <= 3 for r in recs)
    assert {o["desc"] for r in recs for o in r["objects"]} <= {"red circle", "red square", "blue circle", "blue square"}
    assert main(["validate", str(out / "val.jsonl")]) == 0
    assert capsys.readouterr().out.strip().endswith("val.jsonl: OK, 2 records, " +
                                                    f"{sum(len(r['objects']) for r in read_jsonl(out / 'val.jsonl'))} objects")


@pytest.mark.parametrize("edge_prob", [0.0, 1.0])
def test_config_edge_prob_reaches_the_generator(tmp_path: Path, monkeypatch, edge_prob):
    """data.synth_edge_prob: 1 pushes every shape against an image edge (bin 0 or 999 in its box)."""
    from coordexp_rl.config import load_config
    from coordexp_rl.driver.assets import synthetic_set

    monkeypatch.setenv("COORDEXP_CACHE", str(tmp_path))
    cfg = load_config(None, ["data.synth_train=40", "data.synth_val=1", f"data.synth_edge_prob={edge_prob}"])
    rows = read_jsonl(synthetic_set(cfg) / "train.jsonl")
    touching = [any(v <= 0 or v >= r["width"] for v in o["bbox_2d"]) for r in rows for o in r["objects"]]
    # with 0, only shapes that land on the border by chance touch it (their position is uniform)
    assert all(touching) if edge_prob == 1.0 else sum(touching) / len(touching) < 0.2
