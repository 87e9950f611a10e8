"""GenerationResult -> prediction line, on hand-made results (known ids, known log-probs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from coordexp_rl.data.loader import Sample
from coordexp_rl.evaluation.records import to_image_record
from coordexp_rl.method.coords import CoordVocab
from coordexp_rl.method.protocol import BoxObject, build_assistant_ids, parse_ids
from coordexp_rl.rollout.engine import GenerationResult
from coordexp_rl.rollout.predict import desc_positions, mean_prob, prediction_record

OBJECTS = [BoxObject("red circle", (100, 200, 300, 400)), BoxObject("cat", (0, 500, 999, 999))]
COORD_P = [[0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.5, 0.5]]  # per object, the 4 coord tokens' probabilities
DESC_P = [0.4, 0.2]  # per object, every description token's probability
OTHER_P = 0.01  # structure tokens and EOS


@pytest.fixture(scope="module")
def tok_vocab(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tok, CoordVocab.from_tokenizer(tok)


def sample(width: int = 200, height: int = 100) -> Sample:
    return Sample(sample_id="s0", image_path=Path("/nowhere/a.png"), image_rel="images/a.png", width=width,
                  height=height, objects=[], boxes_px=[])


def hand_made(tok, vocab, ids: list[int], finish: str = "stop") -> GenerationResult:
    """Log-probs: COORD_P at each object's coords, DESC_P on its description, OTHER_P elsewhere."""
    probs = [OTHER_P] * len(ids)
    for obj, cp, dp in zip(parse_ids(ids, tok, vocab).objects, COORD_P, DESC_P):
        for t, p in zip(obj.coord_positions, cp):
            probs[t] = p
        for t in desc_positions(ids, obj, vocab):
            probs[t] = dp
    return GenerationResult("s0", [1, 2, 3], ids, [math.log(p) for p in probs], finish)


def test_bins_become_pixels_and_scores_are_mean_token_probs(tok_vocab):
    tok, vocab = tok_vocab
    ids = build_assistant_ids(OBJECTS, tok, vocab)
    res = hand_made(tok, vocab, ids)
    rec = prediction_record(sample(), res, parse_ids(ids, tok, vocab), vocab)
    assert [o["desc"] for o in rec["objects"]] == ["red circle", "cat"]
    # bin k -> k / 1000 * size: 100/1000*200 = 20, 200/1000*100 = 20, 300/1000*200 = 60, 400/1000*100 = 40
    assert rec["objects"][0]["bbox_2d"] == pytest.approx([20.0, 20.0, 60.0, 40.0])
    # 0 -> 0, 500/1000*100 = 50, 999/1000*200 = 199.8, 999/1000*100 = 99.9
    assert rec["objects"][1]["bbox_2d"] == pytest.approx([0.0, 50.0, 199.8, 99.9])
    assert rec["objects"][0]["score"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)  # 0.75
    assert rec["objects"][1]["score"] == pytest.approx(0.5)
    assert rec["objects"][0]["score_desc"] == pytest.approx(0.4)
    assert rec["objects"][1]["score_desc"] == pytest.approx(0.2)
    # score_object: every description token's and coord token's probability multiplied
    n_desc = [len(desc_positions(ids, o, vocab)) for o in parse_ids(ids, tok, vocab).objects]
    assert rec["objects"][0]["score_object"] == pytest.approx(0.4 ** n_desc[0] * 0.9 * 0.8 * 0.7 * 0.6)
    assert rec["objects"][1]["score_object"] == pytest.approx(0.2 ** n_desc[1] * 0.5 ** 4)
    assert rec["parse_status"] == "ok" and rec["parse_reasons"] == {}
    assert rec["sample_id"] == "s0" and rec["finish_reason"] == "stop" and rec["num_tokens"] == len(ids)
    assert (rec["images"], rec["width"], rec["height"]) == (["images/a.png"], 200, 100)
    json.dumps(rec)  # one JSON line


def test_constant_score_mode_writes_one(tok_vocab):
    tok, vocab = tok_vocab
    ids = build_assistant_ids(OBJECTS, tok, vocab)
    rec = prediction_record(sample(), hand_made(tok, vocab, ids), parse_ids(ids, tok, vocab), vocab,
                            score_mode="constant")
    assert [(o["score"], o["score_desc"], o["score_object"]) for o in rec["objects"]] == [(1.0, 1.0, 1.0)] * 2


def test_unit_boxes_replace_the_bins(tok_vocab):
    tok, vocab = tok_vocab
    ids = build_assistant_ids(OBJECTS, tok, vocab)
    units = [(0.1005, 0.2, 0.3, 0.4), (0.0, 0.5, 0.9994, 0.25)]
    rec = prediction_record(sample(), hand_made(tok, vocab, ids), parse_ids(ids, tok, vocab), vocab,
                            unit_boxes=units)
    assert rec["objects"][0]["bbox_2d"] == pytest.approx([20.1, 20.0, 60.0, 40.0])
    assert rec["objects"][1]["bbox_2d"] == pytest.approx([0.0, 50.0, 199.88, 25.0])


def test_desc_positions_cover_exactly_the_description(tok_vocab):
    tok, vocab = tok_vocab
    ids = build_assistant_ids(OBJECTS, tok, vocab)
    for obj, want in zip(parse_ids(ids, tok, vocab).objects, ["red circle", "cat"]):
        span = desc_positions(ids, obj, vocab)
        assert tok.decode([ids[t] for t in span]) == want
        assert ids[span.start - 1] == vocab.desc_open and ids[span.stop] == vocab.desc_close


def test_unparseable_output_is_an_empty_line_not_a_dropped_one(tok_vocab):
    tok, vocab = tok_vocab
    ids = tok.encode("hello world", add_special_tokens=False) * 3
    res = GenerationResult("s0", [1], ids, [-1.0] * len(ids), "length")
    rec = prediction_record(sample(), res, parse_ids(ids, tok, vocab), vocab)
    assert rec["objects"] == [] and rec["parse_status"] == "failed" and rec["finish_reason"] == "length"
    assert to_image_record(rec, is_pred=True).boxes == []


def test_a_cut_record_keeps_the_complete_ones(tok_vocab):
    tok, vocab = tok_vocab
    ids = build_assistant_ids(OBJECTS, tok, vocab)[:-4]  # stops inside the second box, no EOS
    res = hand_made(tok, vocab, ids, finish="length")
    rec = prediction_record(sample(), res, parse_ids(ids, tok, vocab), vocab)
    assert [o["desc"] for o in rec["objects"]] == ["red circle"]
    assert rec["parse_status"] == "partial" and rec["parse_reasons"] == {"truncated_tail": 1}


def test_the_evaluator_reads_the_line_back(tok_vocab):
    tok, vocab = tok_vocab
    ids = build_assistant_ids(OBJECTS, tok, vocab)
    rec = prediction_record(sample(), hand_made(tok, vocab, ids), parse_ids(ids, tok, vocab), vocab)
    image = to_image_record(json.loads(json.dumps(rec)), is_pred=True)
    assert image.boxes[0] == pytest.approx((20.0, 20.0, 60.0, 40.0))
    assert image.scores == pytest.approx([0.75, 0.5])


def test_mean_prob():
    assert mean_prob([math.log(0.5), 0.0, math.log(0.25)], [0, 2]) == pytest.approx(0.375)
    assert mean_prob([0.0], []) is None
