"""The sequence builder with the processor alone (no model): Stage-1 and Stage-2 sequences, the prompt check."""

import dataclasses

import pytest

from coordexp_rl.config import ConfigError, load_config
from coordexp_rl.data.loader import load_image, load_samples
from coordexp_rl.data.sequences import PromptMismatchError, SequenceBuilder
from coordexp_rl.method.coords import CoordVocab, bin_to_unit
from coordexp_rl.method.matching import MatchParams
from coordexp_rl.method.protocol import BoxObject, build_assistant_ids, canonical_order, parse_ids
from coordexp_rl.modeling.inputs import encode_prompt
from coordexp_rl.modeling.load import load_processor
from coordexp_rl.rollout.schema import RolloutRow

STRICT = MatchParams(sem_cost_weight=0.0, iou_thr=0.5, l1_thr=0.02)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def samples(synth_dir):
    return load_samples(synth_dir / "train.jsonl")[:6]


def builder(processor, *overrides) -> SequenceBuilder:
    vocab = CoordVocab.from_tokenizer(processor.tokenizer)
    return SequenceBuilder(load_config(None, list(overrides)), processor, vocab)


def rollout_of(b: SequenceBuilder, sample, objects) -> RolloutRow:
    """A rollout row whose generated ids write ``objects`` (as the rollout actor would store it)."""
    prompt = encode_prompt(b.processor, load_image(sample), b.cfg.data.prompt)["input_ids"].tolist()
    generated = build_assistant_ids(objects, b.processor.tokenizer, b.vocab)
    parsed = parse_ids(generated, b.processor.tokenizer, b.vocab)
    return RolloutRow(sample_id=sample.sample_id, prompt_ids=prompt, generated_ids=generated, objects=parsed.objects,
                      parse_status=parsed.status)


def test_stage1_sequences_write_the_canonical_gt_with_its_coord_targets(processor, samples):
    b = builder(processor)
    seqs = b.stage1(samples, step=0)
    for s, seq in zip(samples, seqs):
        gt = build_assistant_ids(canonical_order(s.objects), processor.tokenizer, b.vocab)
        assert seq.input_ids[seq.prompt_len:].tolist() == gt
        assert len(seq.coord_positions) == 4 * len(s.objects)  # Stage-1 L1 / GIoU are on by default
        assert seq.coord_targets == [bin_to_unit(v) for o in canonical_order(s.objects) for v in o.bins]
        assert float(seq.ce_weights[:seq.prompt_len].abs().sum()) == 0  # the prompt is never supervised


def test_stage1_without_geometric_terms_has_no_coord_positions(processor, samples):
    b = builder(processor, "loss.lambda_l1=0", "loss.lambda_giou=0")
    assert all(not seq.coord_positions for seq in b.stage1(samples, step=0))


def test_random_stage1_order_is_seeded_by_step_and_sample(processor, samples):
    b = builder(processor, "stage1.order=random")
    s = max(samples, key=lambda x: len(x.objects))
    assert len(s.objects) >= 2
    orders = {tuple(o.desc + str(o.bins) for o in b.stage1_order(s, step)) for step in range(8)}
    assert len(orders) > 1  # the order changes with the step
    assert b.stage1_order(s, 3) == b.stage1_order(s, 3)  # and is the same for the same step (resumes)


def test_stage2_coord_ce_weight_is_its_own_knob(processor, samples):
    b = builder(processor, "loss.lambda_coord_ce=1.0", "loss.lambda_coord_ce_stage2=0.0")
    sample = samples[0]
    seq1 = b.gt_sequence(sample, sample.objects, eos_weight=1.0)
    coord = [b.vocab.bin_of(int(t)) is not None for t in seq1.input_ids]
    w2 = b.gt_sequence(sample, sample.objects, eos_weight=1.0, stage2=True).ce_weights
    assert {float(w) for w, c in zip(seq1.ce_weights, coord) if c} == {2.0}
    assert {float(w) for w, c in zip(w2, coord) if c} == {1.0}


def test_self_context_supervises_matched_coord_positions_toward_gt(processor, samples):
    """METHOD 12: the rollout writes the GT objects slightly shifted and in reverse order."""
    b = builder(processor)
    sample = next(s for s in samples if len(s.objects) >= 2)
    shifted = [BoxObject(o.desc, tuple(min(999, v + 10) for v in o.bins)) for o in reversed(sample.objects)]
    row = rollout_of(b, sample, shifted)
    n = len(sample.objects)
    canonical = canonical_order(sample.objects)
    pairs = [(i, canonical.index(sample.objects[n - 1 - i])) for i in range(n)]  # prediction i is GT n-1-i
    batch = b.stage2([row], {sample.sample_id: sample}, STRICT)
    seq, reordered = batch.sequences
    assert batch.stats["matched"] == n and batch.stats["missed"] == 0 and len(batch.ious) == n
    assert seq.ce_weights is None  # the self-context forward carries no CE (Path B is the reordered GT)
    expected = build_assistant_ids([canonical[j] for _, j in pairs], processor.tokenizer, b.vocab)
    assert reordered.input_ids[reordered.prompt_len:reordered.prompt_len + len(expected)].tolist() == expected
    assert seq.prompt_len == len(row.prompt_ids)
    assert seq.input_ids.tolist() == row.prompt_ids + row.generated_ids
    # Context tokens are the rollout's coord tokens, targets the matched GT coordinates (no pseudo-labels).
    for k, (i, j) in enumerate(pairs):
        positions = seq.coord_positions[4 * k: 4 * k + 4]
        assert [b.vocab.bin_of(int(seq.input_ids[p])) for p in positions] == list(shifted[i].bins)
        assert seq.coord_targets[4 * k: 4 * k + 4] == [bin_to_unit(v) for v in canonical[j].bins]


def test_switches_isolate_the_gt_order_and_the_geometric_context(processor, samples):
    """stage2.gt_order=canonical: the CE path sees the canonical GT; stage2.geo_context=gt: no self-context
    sequence, the same gated pairs' GT coordinates supervised on the GT sequence instead."""
    sample = next(s for s in samples if len(s.objects) >= 2)
    canonical = canonical_order(sample.objects)
    # the rollout writes the GT reversed, and its last object far off (matched but gated out)
    far = BoxObject(canonical[0].desc, (0, 0, 5, 5))
    written = [*reversed(canonical[1:]), far]
    default = builder(processor)
    row = rollout_of(default, sample, written)
    seq, reordered = default.stage2([row], {sample.sample_id: sample}, STRICT).sequences
    gt_ids = build_assistant_ids(canonical, processor.tokenizer, default.vocab)
    assert reordered.input_ids[reordered.prompt_len:].tolist() != gt_ids  # the rollout's order by default

    (gt_seq,) = builder(processor, "stage2.gt_order=canonical", "stage2.geo_context=gt").stage2(
        [row], {sample.sample_id: sample}, STRICT).sequences
    assert gt_seq.input_ids[gt_seq.prompt_len:].tolist() == gt_ids
    gated = len(seq.coord_positions) // 4  # the self-context path's gated pairs
    assert gated == len(canonical) - 1 and len(gt_seq.coord_positions) == 4 * gated
    # the supervised GT coordinates are those of the gated pairs: every canonical object but the first
    expected = [bin_to_unit(v) for o in canonical[1:] for v in o.bins]
    assert sorted(gt_seq.coord_targets) == sorted(expected)
    for p, target in zip(gt_seq.coord_positions, gt_seq.coord_targets):  # each position holds its own GT bin
        assert bin_to_unit(default.vocab.bin_of(int(gt_seq.input_ids[p]))) == target

    (reordered_gt,) = builder(processor, "stage2.geo_context=gt").stage2([row], {sample.sample_id: sample},
                                                                          STRICT).sequences
    assert reordered_gt.input_ids.tolist() == reordered.input_ids.tolist()
    assert sorted(reordered_gt.coord_targets) == sorted(expected)


def test_gated_order_and_gt_geometry(processor, samples):
    """stage2.gt_order=gated: a gated-out pair does not move its GT (it follows the gated-in ones);
    stage2.gt_geometry: every GT box of the CE sequence is supervised too, beside the self-context path."""
    sample = next(s for s in samples if len(s.objects) >= 2)
    canonical = canonical_order(sample.objects)
    far = BoxObject(canonical[0].desc, (0, 0, 5, 5))  # written first, matched to canonical[0], gated out
    written = [far, *reversed(canonical[1:])]
    default = builder(processor)
    row = rollout_of(default, sample, written)
    rows = {sample.sample_id: sample}

    def ce_ids(objects):
        return build_assistant_ids(objects, processor.tokenizer, default.vocab)

    _, reordered = default.stage2([row], rows, STRICT).sequences
    assert reordered.input_ids[reordered.prompt_len:].tolist() == ce_ids([canonical[0], *reversed(canonical[1:])])
    batch = builder(processor, "stage2.gt_order=gated").stage2([row], rows, STRICT)
    _, gated = batch.sequences
    assert gated.input_ids[gated.prompt_len:].tolist() == ce_ids([*reversed(canonical[1:]), canonical[0]])
    assert batch.stats["reordered"] == 1  # the first GT object moved behind the others
    canonical_batch = builder(processor, "stage2.gt_order=canonical").stage2([row], rows, STRICT)
    assert canonical_batch.stats["reordered"] == 0 and canonical_batch.stats["appended"] == 0

    self_seq, plain_gt = default.stage2([row], rows, STRICT).sequences
    geo_self, geo_gt = builder(processor, "stage2.gt_geometry=true").stage2([row], rows, STRICT).sequences
    assert geo_self.coord_positions == self_seq.coord_positions and not plain_gt.coord_positions
    assert geo_gt.input_ids.tolist() == plain_gt.input_ids.tolist()
    assert len(geo_gt.coord_positions) == 4 * len(canonical)  # every box, the gated-out one included
    for p, target in zip(geo_gt.coord_positions, geo_gt.coord_targets):
        assert bin_to_unit(default.vocab.bin_of(int(geo_gt.input_ids[p]))) == target
    with pytest.raises(ConfigError, match="gt_geometry"):
        builder(processor, "stage2.gt_geometry=true", "stage2.geo_context=gt")


def test_a_row_with_nothing_parsed_falls_back_to_the_gt_sequence(processor, samples):
    b = builder(processor)
    sample = samples[0]
    row = dataclasses.replace(rollout_of(b, sample, []), generated_ids=[1, 2, 3], objects=[], parse_status="failed")
    batch = b.stage2([row], {sample.sample_id: sample}, STRICT)
    (seq,) = batch.sequences
    assert (batch.stats["parse_failed"], batch.stats["empty_answers"]) == (1, 0) and not seq.coord_positions
    gt = build_assistant_ids(canonical_order(sample.objects), processor.tokenizer, b.vocab)
    assert seq.input_ids[seq.prompt_len:seq.prompt_len + len(gt)].tolist() == gt


def test_an_answer_that_names_no_object_is_counted_apart_from_a_parse_failure(processor, samples):
    b = builder(processor)
    sample = samples[0]
    row = rollout_of(b, sample, [])  # only the end of turn: parses "ok", with no object
    assert row.parse_status == "ok" and not row.objects
    batch = b.stage2([row], {sample.sample_id: sample}, STRICT)
    assert (batch.stats["parse_failed"], batch.stats["empty_answers"]) == (0, 1) and len(batch.sequences) == 1


def test_prompt_mismatch_is_refused_with_a_clear_error(processor, samples):
    b = builder(processor)
    sample = samples[0]
    row = rollout_of(b, sample, sample.objects)
    row.prompt_ids[5] += 1
    with pytest.raises(PromptMismatchError, match=rf"{sample.sample_id}.*position 5"):
        b.stage2([row], {sample.sample_id: sample}, STRICT)
