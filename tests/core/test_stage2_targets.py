"""The pure Stage-2 step (coordexp_rl/method/stage2_targets.py) on METHOD 12's worked example and its variants:
token ids in, matched coord positions / GT coordinates / reordered GT / end-of-turn weight out."""

import pytest

from coordexp_rl.method.losses import position_weights
from coordexp_rl.method.matching import MatchParams
from coordexp_rl.method.protocol import BoxObject, build_assistant_ids, parse_ids
from coordexp_rl.method.stage2_targets import MatchSettings, stage2_targets

CAT = BoxObject("black cat", (110, 310, 410, 705))
DOG = BoxObject("yellow dog", (520, 285, 890, 660))
STRICT = MatchParams(sem_cost_weight=0.0, iou_thr=0.5, l1_thr=0.02)
SETTINGS = MatchSettings(eos_weight=1.0, extra_eos_weight=3.0)


def rollout(objects, tokenizer, vocab):
    """The model's output as token ids, parsed the way the rollout actors parse it."""
    ids = build_assistant_ids(objects, tokenizer, vocab)
    return ids, parse_ids(ids, tokenizer, vocab).objects


def test_spec12_worked_example(qwen_tokenizer, qwen_vocab):
    # METHOD 12: the rollout writes cat then dog, each box a few bins off its GT
    ids, pred = rollout([BoxObject("black cat", (120, 300, 420, 700)), BoxObject("yellow dog", (500, 280, 880, 650))],
                        qwen_tokenizer, qwen_vocab)
    t = stage2_targets(pred, [DOG, CAT], STRICT, SETTINGS)  # GT given in any order
    # Matching: predicted #1 -> cat, #2 -> dog (indices into the canonical GT: cat (y1 310) after dog (285))
    assert t.match.assignment == [(0, 1), (1, 0)] and t.match.pairs == t.match.assignment
    # Self-context: the rollout's own 8 coord tokens move toward the GT boxes
    coord_positions = [i for i, tok in enumerate(ids) if qwen_vocab.bin_of(tok) is not None]
    assert t.coord_positions == coord_positions
    assert t.coord_targets == pytest.approx([0.110, 0.310, 0.410, 0.705, 0.520, 0.285, 0.890, 0.660])
    # Reordered GT follows the rollout's order; nothing over-generated -> the plain end-of-turn weight
    assert t.gt_objects == [CAT, DOG] and t.eos_weight == 1.0
    # the canonical GT is dog (y1 285) then cat: the rollout's order (cat, dog) is a new order for Path B
    assert t.stats == {"matched": 2.0, "rejected": 0.0, "missed": 0.0, "extra": 0.0, "pred_objects": 2.0,
                       "appended": 0.0, "reordered": 1.0, "extra_eos": 0.0}
    # The CE target of Path B: the reordered GT's ids, weighted per token (desc 4, coords 2, structure 1)
    target = build_assistant_ids(t.gt_objects, qwen_tokenizer, qwen_vocab)
    weights = position_weights(target, qwen_vocab, 0, lambda_coord_ce=1.0, eos_weight=t.eos_weight, desc_weight=4.0)
    n_desc = len(qwen_tokenizer.encode("black cat")) + len(qwen_tokenizer.encode("yellow dog"))
    assert weights.sum().item() == 4 * n_desc + 2 * 6 + 8 * 2 + 1


def test_rollout_order_decides_the_reordered_gt(qwen_tokenizer, qwen_vocab):
    _, pred = rollout([BoxObject("yellow dog", (500, 280, 880, 650)), BoxObject("black cat", (120, 300, 420, 700))],
                      qwen_tokenizer, qwen_vocab)
    t = stage2_targets(pred, [CAT, DOG], STRICT, SETTINGS)
    assert t.gt_objects == [DOG, CAT]
    assert t.coord_targets[:4] == pytest.approx([0.520, 0.285, 0.890, 0.660])


def test_gated_out_pair_keeps_its_place_but_gets_no_geometric_loss(qwen_tokenizer, qwen_vocab):
    # the first predicted box is far from everything: assigned to the dog by Hungarian, rejected by the gate
    ids, pred = rollout([BoxObject("yellow dog", (0, 0, 40, 40)), BoxObject("black cat", (120, 300, 420, 700))],
                        qwen_tokenizer, qwen_vocab)
    t = stage2_targets(pred, [CAT, DOG], STRICT, SETTINGS)
    assert t.match.rejected == [(0, 0)] and t.match.pairs == [(1, 1)]
    assert t.gt_objects == [DOG, CAT]  # the dog stays at the place of the prediction it was assigned to
    assert t.coord_positions == list(pred[1].coord_positions)  # only the cat's coords feed Path A
    assert t.eos_weight == 1.0  # a gated-out pair is not over-generation


def test_more_objects_than_gt_gets_the_extra_eos_weight(qwen_tokenizer, qwen_vocab):
    _, pred = rollout([BoxObject("black cat", (120, 300, 420, 700)), BoxObject("black cat", (125, 305, 420, 700)),
                       BoxObject("yellow dog", (500, 280, 880, 650))], qwen_tokenizer, qwen_vocab)
    t = stage2_targets(pred, [CAT, DOG], STRICT, SETTINGS)
    assert t.eos_weight == 3.0 and t.stats["extra"] == 1.0
    assert (t.stats["extra_eos"], t.stats["pred_objects"], t.stats["reordered"]) == (1.0, 3.0, 1.0)
    assert len(t.gt_objects) == 2


def test_missed_gt_are_appended_in_canonical_order(qwen_tokenizer, qwen_vocab):
    low = BoxObject("red cup", (50, 900, 100, 950))  # lowest: last in canonical (y1, x1) order
    high = BoxObject("blue mug", (700, 50, 750, 100))
    _, pred = rollout([BoxObject("black cat", (120, 300, 420, 700))], qwen_tokenizer, qwen_vocab)
    t = stage2_targets(pred, [low, CAT, high], STRICT, SETTINGS)
    assert t.gt_objects == [CAT, high, low] and t.stats["missed"] == 2.0 and t.stats["appended"] == 2.0
    assert t.stats["reordered"] == 1.0  # the matched cat first; canonical is high (y1 50), cat (310), low (900)
    dropped = stage2_targets(pred, [low, CAT, high], STRICT, MatchSettings(missing_policy="drop"))
    assert dropped.gt_objects == [CAT] and dropped.stats["appended"] == 0.0 and dropped.stats["missed"] == 2.0
