"""Up-front limits: prompt tokens at data.max_pixels + max_new_tokens vs max_model_len, GT target length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from coordexp_rl.config import ConfigError, load_config
from coordexp_rl.data.limits import (
    check_prompt_budget,
    fit_targets,
    image_token_count,
    load_checked_samples,
    prompt_token_counter,
    target_tokens,
)
from coordexp_rl.data.loader import DataError, load_samples
from coordexp_rl.method.protocol import build_assistant_ids
from coordexp_rl.modeling.inputs import encode_prompt
from coordexp_rl.modeling.load import load_processor
from tests.data._util import write_png

PROMPT = "Detect all objects."
SIZES = [(640, 480), (480, 640), (1000, 200), (96, 128), (33, 33), (1920, 1080)]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir, max_pixels=128 * 128, min_pixels=32 * 32)


@pytest.mark.parametrize("size", SIZES)
def test_prompt_count_equals_encode_prompt_without_reading_pixels(processor, size):
    n = prompt_token_counter(processor, PROMPT)(*size)
    assert n == encode_prompt(processor, Image.new("RGB", size), PROMPT)["input_ids"].shape[0]


def test_max_pixels_bounds_the_image_tokens(tiny_model_dir):
    # 1920x1080 at max_pixels 128*128 = 16 tokens of 32x32 px at most; at the folder's 256*256: <= 64.
    small = load_processor(tiny_model_dir, max_pixels=128 * 128, min_pixels=32 * 32)
    folder = load_processor(tiny_model_dir)
    assert image_token_count(small, 1920, 1080) <= 16 < image_token_count(folder, 1920, 1080) <= 64


def _sample_file(tmp_path: Path, records: list[dict]) -> Path:
    write_png(tmp_path / "a.png", 640, 480)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _rec(n_objects: int, desc: str = "red circle", sid: str = "s") -> dict:
    objects = [{"desc": desc, "bbox_2d": [10 * i, 10 * i, 10 * i + 5, 10 * i + 5]} for i in range(n_objects)]
    return {"images": ["a.png"], "width": 640, "height": 480, "objects": objects, "metadata": {"id": sid}}


def test_prompt_over_max_model_len_names_line_sample_and_settings(processor, tmp_path):
    samples = load_samples(_sample_file(tmp_path, [_rec(1, sid="a"), _rec(1, sid="b")]))
    n = prompt_token_counter(processor, PROMPT)(640, 480)
    assert check_prompt_budget(samples, processor, PROMPT, 10, n + 10, "d.jsonl") == n  # exactly fits
    with pytest.raises(DataError, match=r"d.jsonl:1: sample 'a' \(a.png, 640x480\): prompt .* image tokens at "
                                        r"data.max_pixels=16384.*rollout.max_new_tokens=10.*rollout.max_model_len"):
        check_prompt_budget(samples, processor, PROMPT, 10, n + 9, "d.jsonl")


def test_target_tokens_match_the_builder(processor, tmp_path):
    from coordexp_rl.method.coords import CoordVocab

    [s] = load_samples(_sample_file(tmp_path, [_rec(5, desc="traffic light")]))
    vocab = CoordVocab.from_tokenizer(processor.tokenizer)
    built = build_assistant_ids(s.objects, processor.tokenizer, vocab)
    desc = len(processor.tokenizer.encode("traffic light", add_special_tokens=False))
    assert target_tokens(s.objects, lambda d: desc) == len(built) == 5 * (10 + desc) + 1


def test_long_target_is_refused_or_cut_at_an_object_boundary(processor, tmp_path):
    samples = load_samples(_sample_file(tmp_path, [_rec(2, sid="short"), _rec(9, sid="long")]))
    per = 10 + len(processor.tokenizer.encode("red circle", add_special_tokens=False))
    limit = 4 * per + 1 + (per - 1)  # room for 4 whole objects and most of a 5th: the 5th must not be cut in
    with pytest.raises(DataError, match=r"d.jsonl:2: sample 'long'.*9 objects take .* > data.max_target_tokens="
                                        r".*data.too_many_objects=truncate"):
        fit_targets(samples, processor.tokenizer, limit, "error", "d.jsonl")
    out, counts = fit_targets(samples, processor.tokenizer, limit, "truncate", "d.jsonl")
    assert [len(s.objects) for s in out] == [2, 4]
    assert len(out[1].boxes_px) == 4 and out[1].boxes_px == samples[1].boxes_px[:4]  # canonical = top-left first
    assert counts["data/truncated_samples"] == 1 and counts["data/dropped_objects"] == 5
    assert counts["data/max_target_tokens"] == 4 * per + 1 <= limit


def test_load_checked_samples_uses_the_config(processor, tmp_path):
    path = _sample_file(tmp_path, [_rec(9)])
    cfg = load_config(None, ["data.max_target_tokens=40", "data.too_many_objects=truncate"])
    samples, counts = load_checked_samples(cfg, path, None, processor, check_images=True, train=True)
    assert counts["data/truncated_samples"] == 1 and 0 < len(samples[0].objects) < 9
    val, val_counts = load_checked_samples(cfg, path, None, processor, check_images=True, train=False)
    assert len(val[0].objects) == 9 and "data/truncated_samples" not in val_counts  # GT of evaluation is whole


def test_a_validation_file_with_two_records_of_one_image_is_refused_up_front(processor, tmp_path):
    """RefCOCO-style (one record per expression): evaluation would refuse it after the whole of Stage-1."""
    path = _sample_file(tmp_path, [_rec(1, sid="a"), _rec(2, sid="b")])
    cfg = load_config(None, [])
    load_checked_samples(cfg, path, None, processor, check_images=True, train=True)  # training: fine
    with pytest.raises(DataError, match=r"d.jsonl:2: images\[0\]: 'a.png' has a record already \(line 1\)"):
        load_checked_samples(cfg, path, None, processor, check_images=True, train=False)


def test_config_load_refuses_image_tokens_that_cannot_fit():
    with pytest.raises(ConfigError, match=r"data.max_pixels=1048576 allows 1024 image tokens.*"
                                          r"rollout.max_new_tokens=96.*rollout.max_model_len=1024"):
        load_config(None, ["data.max_pixels=1048576"])
    with pytest.raises(ConfigError, match="data.min_pixels=9000 > data.max_pixels=8000"):
        load_config(None, ["data.max_pixels=8000", "data.min_pixels=9000"])


def test_driver_logs_the_truncation_count_in_metrics(tiny_model_dir, tmp_path):
    """The launcher's data load (no Ray needed for it): truncated samples are counted in metrics.jsonl."""
    from coordexp_rl.driver.driver import Driver

    path = _sample_file(tmp_path, [_rec(9, sid="many"), _rec(1, sid="one")])
    val = tmp_path / "val.jsonl"  # one record per image
    val.write_text(path.read_text().splitlines()[0] + "\n")
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.train={path}", f"data.val={val}",
                             "data.max_target_tokens=40", "data.too_many_objects=truncate",
                             f"run.out_dir={tmp_path / 'run'}"])
    from coordexp_rl.driver.run_log import RunLog

    driver = Driver(cfg)
    driver.prepare()
    train, counts = driver.check_data()
    run_log = RunLog(tmp_path / "run")  # what a fresh (not resumed) run opens once the learner is up
    run_log.log("data", 0, counts)
    run_log.close()
    assert len(train[0].objects) < 9 and len(train[1].objects) == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    data = [r for r in rows if r["stage"] == "data"]
    assert data[0]["data/truncated_samples"] == 1 and data[0]["data/dropped_objects"] == 9 - len(train[0].objects)
