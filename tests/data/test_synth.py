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
    n_objects = sum(len(r["objects"]) for r in read_jsonl(out / "val.jsonl"))
    assert capsys.readouterr().out.strip().endswith(f"val.jsonl: OK, 2 records, {n_objects} objects")


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


# ----------------------------------------------------------------------------------------------------
# Dense scenes (configs/dense_cpu.yaml): many objects, repeated descriptions, touching shapes
# ----------------------------------------------------------------------------------------------------

DENSE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dense_cpu.yaml"


def dense_options() -> dict:
    from coordexp_rl.config import load_config
    from coordexp_rl.driver.assets import synth_options

    return synth_options(load_config(DENSE_CONFIG))


@pytest.fixture(scope="module")
def dense_set(tmp_path_factory) -> dict[str, Path]:
    """300 validation images of the dense task (the config's first 300; ~3 s)."""
    return make_synthetic_set(tmp_path_factory.mktemp("dense"), 0, 300, seed=0, **dense_options())


def test_dense_statistics(dense_set):
    opts = dense_options()
    recs = read_jsonl(dense_set["val"])
    counts = np.array([len(r["objects"]) for r in recs])
    assert counts.min() >= opts["min_objects"] == 3 and counts.max() <= opts["max_objects"] == 10
    assert counts.mean() >= 6 and (counts >= 10).mean() > 0.05  # measured on 1,000: 6.48, 12 % with 10
    descs = [[o["desc"] for o in r["objects"]] for r in recs]
    assert all(len(set(d)) <= opts["distinct_descs"] == 4 for d in descs)
    assert np.mean([len(set(d)) < len(d) for d in descs]) > 0.9  # measured: 94 % repeat a description
    overlapping, max_iou = 0, 0.0
    for r in recs:
        bs = [o["bbox_2d"] for o in r["objects"]]
        ious = [iou(bs[i], bs[j]) for i in range(len(bs)) for j in range(i)]
        max_iou = max(max_iou, *ious)
        overlapping += any(v > 0 for v in ious)
    assert 0.2 < max_iou <= opts["max_pair_iou"] == 0.3  # the bound holds on the written (visible) boxes
    assert overlapping / len(recs) > 0.7  # measured: 85 % of images hold an overlapping pair
    boxes = np.array([o["bbox_2d"] for r in recs for o in r["objects"]])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    lo, hi = round(opts["min_size"] * 128), round(opts["max_size"] * 128)  # 19, 38 px
    assert (w <= hi).all() and (h <= hi).all() and max(w.max(), h.max()) == hi
    # a box is the visible part: only a shape partly painted over by a later one is narrower than lo
    assert (np.maximum(w, h) >= lo).mean() > 0.99 and (np.minimum(w, h) >= lo).mean() > 0.95
    assert validate_file(dense_set["val"], skip_bbox_norm=False) == []


def test_dense_shapes_stay_visible_and_boxes_are_their_visible_bounds(tmp_path: Path):
    """Two shapes of different colours on a plain background: each box spans exactly its colour's pixels."""
    paths = make_synthetic_set(tmp_path, 60, 0, seed=2, image_size=64, min_objects=2, max_objects=2, min_size=0.3,
                               max_size=0.5, max_pair_iou=0.3, distinct_descs=2, background="plain",
                               shapes=("square", "circle"), colours=("red", "blue"))
    overlapped = 0
    for rec in read_jsonl(paths["train"]):
        objs = rec["objects"]
        if len(objs) < 2 or objs[0]["desc"].split()[0] == objs[1]["desc"].split()[0]:
            continue  # same colour: the pixels cannot be told apart
        pixels = np.asarray(Image.open(tmp_path / rec["images"][0]).convert("RGB")).astype(int)
        for obj in objs:
            ys, xs = np.nonzero((pixels == np.array(COLOURS[obj["desc"].split()[0]])).all(axis=2))
            assert obj["bbox_2d"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        overlapped += iou(objs[0]["bbox_2d"], objs[1]["bbox_2d"]) > 0
    assert overlapped > 0


def test_dense_same_seed_same_bytes(tmp_path: Path):
    opts = dense_options()
    make_synthetic_set(tmp_path / "a", 6, 3, seed=1, **opts)
    make_synthetic_set(tmp_path / "b", 6, 3, seed=1, **opts)
    make_synthetic_set(tmp_path / "c", 6, 3, seed=2, **opts)
    assert all_bytes(tmp_path / "a") == all_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "val.jsonl").read_bytes() != (tmp_path / "c" / "val.jsonl").read_bytes()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert (meta["max_pair_iou"], meta["distinct_descs"], meta["image_size"]) == (0.3, 4, 128)


def test_default_set_is_unchanged_by_the_dense_settings(tmp_path: Path):
    """The embedded default's bytes, pinned from before the dense settings existed (the default run's
    results depend on them): JSONL, decoded pixels and meta.json. A numpy / Pillow upgrade that changes
    them changes the default set: note it in docs/RESULTS.md before re-pinning."""
    import hashlib

    from coordexp_rl.config import load_config
    from coordexp_rl.driver.assets import synth_options

    paths = make_synthetic_set(tmp_path, 20, 5, seed=0, **synth_options(load_config(None)))
    jsonl = hashlib.sha256(paths["train"].read_bytes() + paths["val"].read_bytes()).hexdigest()
    pixels = hashlib.sha256(b"".join(np.asarray(Image.open(p).convert("RGB")).tobytes()
                                     for p in sorted((tmp_path / "images").glob("*.png")))).hexdigest()
    meta = hashlib.sha256(paths["meta"].read_bytes()).hexdigest()
    assert jsonl == "d7dacdb0af2244a5d2e4ba08518c24cd02dcb00e189bac7a32516e19cee0226f"
    assert pixels == "05a60646f67ee646e8726f45c451af3b77441e3422ffc6d106a54482d1be1f89"
    assert meta == "814491529eca13ce4940720937a4e99593932c63b83884626f72851afed64b6f"


def test_dense_token_budget_fits_the_longest_gt(tiny_model_dir, dense_set):
    """The longest possible GT (max_objects x the longest description) fits data.max_target_tokens and a
    rollout of rollout.max_new_tokens can write it; the prompt + max_new_tokens fits max_model_len."""
    from coordexp_rl.config import load_config
    from coordexp_rl.data.limits import (
        OBJECT_OVERHEAD_TOKENS,
        check_prompt_budget,
        fit_targets,
        prompt_token_counter,
    )
    from coordexp_rl.modeling.load import load_processor

    cfg = load_config(DENSE_CONFIG)
    d, r = cfg.data, cfg.rollout
    processor = load_processor(tiny_model_dir, max_pixels=d.max_pixels, min_pixels=d.min_pixels)
    tok = processor.tokenizer
    longest_desc = max(len(tok.encode(f"{c} {s}", add_special_tokens=False))
                       for c in d.synth_colours for s in d.synth_shapes)
    longest_gt = d.synth_max_objects * (OBJECT_OVERHEAD_TOKENS + longest_desc) + 1
    limit = d.max_target_tokens or r.max_new_tokens
    assert (longest_desc, longest_gt, limit) == (2, 121, 160)  # the arithmetic in the config's header
    prompt = prompt_token_counter(processor, d.prompt)(d.synth_image_size, d.synth_image_size)
    assert prompt + r.max_new_tokens <= r.max_model_len and prompt == 42
    # and the generated images pass the driver's own checks
    samples = load_samples(dense_set["val"])
    check_prompt_budget(samples, processor, d.prompt, r.max_new_tokens, r.max_model_len, dense_set["val"])
    kept, counts = fit_targets(samples, tok, limit, "error", dense_set["val"])
    assert len(kept) == len(samples) and counts["data/max_target_tokens"] == 121  # a 10-object image is there


def test_dense_config_builds_its_own_cached_set(tmp_path: Path, monkeypatch):
    from coordexp_rl.config import load_config
    from coordexp_rl.driver.assets import synthetic_set

    monkeypatch.setenv("COORDEXP_CACHE", str(tmp_path))
    small = ["data.synth_train=2", "data.synth_val=20"]
    dense = synthetic_set(load_config(DENSE_CONFIG, small))
    default = synthetic_set(load_config(None, small))
    assert dense != default
    assert synthetic_set(load_config(DENSE_CONFIG, [*small, "data.synth_distinct_descs=2"])) not in (dense, default)
    recs = read_jsonl(dense / "val.jsonl")
    assert all(3 <= len(r["objects"]) <= 10 and r["width"] == 128 for r in recs)
    assert json.loads((dense / "meta.json").read_text())["max_pair_iou"] == 0.3
    assert "max_pair_iou" not in json.loads((default / "meta.json").read_text())


def test_dense_config_spells_out_every_key_and_changes_only_the_dense_ones():
    import yaml

    from coordexp_rl.config import Config, flat_settings, load_config

    assert set(flat_settings(yaml.safe_load(DENSE_CONFIG.read_text()))) == set(flat_settings(Config().model_dump()))
    base, dense = flat_settings(Config().model_dump()), flat_settings(load_config(DENSE_CONFIG).model_dump())
    assert {k for k in base if base[k] != dense[k]} == {
        "model.tiny_pretrain_steps", "data.synth_val", "data.synth_min_objects", "data.synth_max_objects",
        "data.synth_min_size", "data.synth_max_size", "data.synth_max_pair_iou", "data.synth_distinct_descs",
        "rollout.max_new_tokens", "stage1.steps", "eval.max_samples", "eval.every", "run.out_dir"}
    assert dense["eval.max_samples"] == dense["data.synth_val"] == 1000  # every validation image is scored


def test_cli_synth_dense_flags(tmp_path: Path, capsys):
    out = tmp_path / "dense"
    assert main(["synth", "--out", str(out), "--train", "30", "--val", "0", "--size", "96", "--min-objects", "6",
                 "--max-objects", "8", "--min-size", "0.1", "--max-size", "0.2", "--max-pair-iou", "0.2",
                 "--distinct-descs", "2", "--edge-prob", "0"]) == 0
    recs = read_jsonl(out / "train.jsonl")
    assert all(6 <= len(r["objects"]) <= 8 and len({o["desc"] for o in r["objects"]}) <= 2 for r in recs)
    for r in recs:
        bs = [o["bbox_2d"] for o in r["objects"]]
        assert all(iou(bs[i], bs[j]) <= 0.2 for i in range(len(bs)) for j in range(i))
        assert all(b[2] - b[0] <= round(0.2 * 96) for b in bs)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["max_pair_iou"], meta["distinct_descs"], meta["edge_prob"]) == (0.2, 2, 0.0)


def test_bad_dense_arguments_are_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="max_pair_iou"):
        make_synthetic_set(tmp_path, 1, 1, seed=0, max_pair_iou=1.0)
    with pytest.raises(ValueError, match="distinct_descs"):
        make_synthetic_set(tmp_path, 1, 1, seed=0, distinct_descs=-1)
