import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp_rl.method.protocol import (
    COORD_COUNT,
    COORD_IN_DESC,
    EMPTY_DESC,
    INVERTED_BOX,
    MISSING_BOX,
    MISSING_DESC,
    TRAILING_TOKENS,
    TRUNCATED,
    UNCLOSED,
    BoxObject,
    ProtocolError,
    build_assistant_ids,
    canonical_order,
    parse_ids,
    random_order,
)

CAT = BoxObject("black cat", (110, 310, 410, 705))
DOG = BoxObject("yellow dog", (520, 285, 890, 660))


def test_builder_writes_the_spec_sequence(qwen_tokenizer, qwen_vocab):
    ids = build_assistant_ids([CAT, DOG], qwen_tokenizer, qwen_vocab)
    text = qwen_tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<obj><desc>black cat</desc><box><|coord_110|><|coord_310|><|coord_410|><|coord_705|></box></obj>"
                    "<obj><desc>yellow dog</desc><box><|coord_520|><|coord_285|><|coord_890|><|coord_660|></box></obj>"
                    "<|im_end|>")
    # Each coord is one token: 2 objects x (2 + desc + 2 + 4 + 2) + EOS.
    n_desc = len(qwen_tokenizer.encode("black cat")) + len(qwen_tokenizer.encode("yellow dog"))
    assert len(ids) == 2 * 10 + n_desc + 1
    # The same string tokenised as text gives the same ids: the protocol needs no special encoder.
    assert qwen_tokenizer.encode(text, add_special_tokens=False) == ids


def test_parser_returns_bins_and_exact_coord_positions(qwen_tokenizer, qwen_vocab):
    ids = build_assistant_ids([CAT, DOG], qwen_tokenizer, qwen_vocab)
    res = parse_ids(ids, qwen_tokenizer, qwen_vocab, offset=100)
    assert res.status == "ok" and res.ended and res.dropped == []
    assert [(o.desc, o.bins) for o in res.objects] == [("black cat", CAT.bins), ("yellow dog", DOG.bins)]
    for obj in res.objects:
        assert [qwen_vocab.bin_of(ids[p - 100]) for p in obj.coord_positions] == list(obj.bins)
    # <obj> <desc> black cat </desc> <box> -> the first coord sits after 2 + 2 + 2 tokens.
    n_cat = len(qwen_tokenizer.encode("black cat"))
    assert res.objects[0].coord_positions == tuple(100 + 4 + n_cat + i for i in range(4))


def _ids(tok, vocab, text):
    return tok.encode(text, add_special_tokens=False)


GOOD = "<obj><desc>cat</desc><box><|coord_1|><|coord_2|><|coord_3|><|coord_4|></box></obj>"


@pytest.mark.parametrize("bad, reason", [
    ("<obj><desc>cat</desc><box><|coord_1|><|coord_2|><|coord_3|></box></obj>", COORD_COUNT),
    ("<obj><desc>cat</desc><box><|coord_1|><|coord_2|><|coord_3|><|coord_4|><|coord_5|></box></obj>", COORD_COUNT),
    ("<obj><desc>cat</desc><box><|coord_1|>x<|coord_3|><|coord_4|></box></obj>", COORD_COUNT),
    ("<obj><box><|coord_1|><|coord_2|><|coord_3|><|coord_4|></box></obj>", MISSING_DESC),
    ("<obj><desc>cat<box><|coord_1|><|coord_2|><|coord_3|><|coord_4|></box></obj>", MISSING_DESC),
    ("<obj><desc> </desc><box><|coord_1|><|coord_2|><|coord_3|><|coord_4|></box></obj>", EMPTY_DESC),
    ("<obj><desc>c<|coord_9|>t</desc><box><|coord_1|><|coord_2|><|coord_3|><|coord_4|></box></obj>", COORD_IN_DESC),
    ("<obj><desc>cat</desc><|coord_1|><|coord_2|><|coord_3|><|coord_4|></obj>", MISSING_BOX),
    ("<obj><desc>cat</desc><box><|coord_1|><|coord_2|><|coord_3|><|coord_4|></box> ok</obj>", TRAILING_TOKENS),
    ("<obj><desc>cat</desc><box><|coord_1|><|coord_2|>", UNCLOSED),  # followed by a good record
])
def test_each_broken_record_is_dropped_alone_with_its_reason(qwen_tokenizer, qwen_vocab, bad, reason):
    ids = _ids(qwen_tokenizer, qwen_vocab, GOOD + bad + GOOD + "<|im_end|>")
    res = parse_ids(ids, qwen_tokenizer, qwen_vocab)
    assert res.dropped == [(1, reason)]
    assert [o.bins for o in res.objects] == [(1, 2, 3, 4), (1, 2, 3, 4)]
    assert res.status == "partial" and res.reasons == {reason: 1}
    with pytest.raises(ProtocolError, match=reason):
        parse_ids(ids, qwen_tokenizer, qwen_vocab, strict=True)


def test_truncated_tail_is_dropped(qwen_tokenizer, qwen_vocab):
    ids = _ids(qwen_tokenizer, qwen_vocab, GOOD + "<obj><desc>dog</desc><box><|coord_1|>")
    res = parse_ids(ids, qwen_tokenizer, qwen_vocab)
    assert res.dropped == [(1, TRUNCATED)] and len(res.objects) == 1 and not res.ended
    assert res.status == "partial"


def test_inverted_box_is_kept_and_flagged(qwen_tokenizer, qwen_vocab):
    ids = _ids(qwen_tokenizer, qwen_vocab,
               "<obj><desc>cat</desc><box><|coord_9|><|coord_2|><|coord_3|><|coord_4|></box></obj><|im_end|>")
    res = parse_ids(ids, qwen_tokenizer, qwen_vocab)
    assert res.objects[0].inverted and res.objects[0].bins == (9, 2, 3, 4)
    assert res.reasons == {INVERTED_BOX: 1} and res.dropped == []
    with pytest.raises(ProtocolError):
        parse_ids(ids, qwen_tokenizer, qwen_vocab, strict=True)


@pytest.mark.parametrize("text, status", [
    ("<|im_end|>", "ok"),  # an empty set is a valid answer
    ("", "failed"),  # nothing at all, not even the end
    ("I see a cat.<|im_end|>", "failed"),  # free text, no record
    ("<obj><desc>cat</desc></obj><|im_end|>", "failed"),
    ("hello " + GOOD + "<|im_end|>", "partial"),  # stray tokens are ignored but reported
])
def test_sequence_status(qwen_tokenizer, qwen_vocab, text, status):
    res = parse_ids(_ids(qwen_tokenizer, qwen_vocab, text), qwen_tokenizer, qwen_vocab)
    assert res.status == status


def test_parser_stops_at_eos(qwen_tokenizer, qwen_vocab):
    ids = _ids(qwen_tokenizer, qwen_vocab, GOOD + "<|im_end|>" + GOOD)
    assert len(parse_ids(ids, qwen_tokenizer, qwen_vocab).objects) == 1


def test_parser_never_raises_on_random_ids(qwen_tokenizer, qwen_vocab):
    import random

    rng = random.Random(0)
    pool = list(qwen_vocab.coord_ids[:20]) + list(qwen_vocab.structure_ids) * 5 + list(range(200, 260))
    for _ in range(300):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 60))]
        res = parse_ids(ids, qwen_tokenizer, qwen_vocab)
        assert res.num_records == ids.count(qwen_vocab.obj_open)  # the pool has no EOS: every record counts
        for obj in res.objects:
            assert [qwen_vocab.bin_of(ids[p]) for p in obj.coord_positions] == list(obj.bins)


def test_builder_rejects_invalid_objects(qwen_tokenizer, qwen_vocab):
    with pytest.raises(ProtocolError, match="empty description"):
        build_assistant_ids([BoxObject("  ", (1, 2, 3, 4))], qwen_tokenizer, qwen_vocab)
    with pytest.raises(ProtocolError, match="4 coord bins"):
        build_assistant_ids([BoxObject("cat", (1, 2, 3, 1000))], qwen_tokenizer, qwen_vocab)
    with pytest.raises(ProtocolError, match="coord or structure"):
        build_assistant_ids([BoxObject("a <box> b", (1, 2, 3, 4))], qwen_tokenizer, qwen_vocab)


# NFC-stable text: Qwen's tokenizer NFC-normalises its input (U+F900 comes back as U+8C48), by design.
descs = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20).filter(
    lambda s: s.strip() and "<" not in s and unicodedata.normalize("NFC", s) == s)
coords = st.sampled_from([0, 1, 998, 999]) | st.integers(0, 999)
boxes = st.tuples(coords, coords, coords, coords).map(lambda b: (min(b[0], b[2]), min(b[1], b[3]),
                                                                 max(b[0], b[2]), max(b[1], b[3])))
objects = st.lists(st.builds(BoxObject, descs, boxes), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(objs=objects)
def test_builder_and_parser_are_inverse(qwen_tokenizer, qwen_vocab, objs):
    ids = build_assistant_ids(objs, qwen_tokenizer, qwen_vocab)
    res = parse_ids(ids, qwen_tokenizer, qwen_vocab, strict=True)
    assert [BoxObject(o.desc, o.bins) for o in res.objects] == objs
    assert build_assistant_ids([BoxObject(o.desc, o.bins) for o in res.objects], qwen_tokenizer, qwen_vocab) == ids


def test_canonical_order_is_top_to_bottom_then_left_to_right():
    a, b, c = BoxObject("a", (500, 10, 600, 50)), BoxObject("b", (100, 10, 200, 50)), BoxObject("c", (0, 5, 9, 9))
    assert canonical_order([a, b, c]) == [c, b, a]


def test_random_order_is_seeded():
    objs = [BoxObject(str(i), (i, i, i, i)) for i in range(8)]
    assert random_order(objs, 3) == random_order(objs, 3)
    assert random_order(objs, 3) != random_order(objs, 4)
    assert sorted(random_order(objs, 3), key=lambda o: o.desc) == objs
