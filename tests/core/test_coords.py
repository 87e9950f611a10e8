import pytest

from coordexp_rl.method.coords import (
    NUM_BINS,
    bin_to_unit,
    bins_to_pixels,
    box_to_bins,
    coord_bin,
    coord_token,
    normalise_box,
    parse_coord_token,
)


@pytest.mark.parametrize("c, k", [
    (0.0, 0), (-0.3, 0),  # clamped at the near edge
    (0.0004, 0), (0.0005, 1),  # halves round up
    (0.5, 500), (0.1234, 123), (0.1235, 124),
    (0.999, 999), (0.9995, 999), (1.0, 999), (7.0, 999),  # 1000 does not exist: clamp to 999
])
def test_coord_bin(c, k):
    assert coord_bin(c) == k


def test_decode_is_k_over_1000_and_bins_round_trip():
    assert bin_to_unit(0) == 0.0 and bin_to_unit(999) == 0.999 and bin_to_unit(500) == 0.5
    assert all(coord_bin(bin_to_unit(k)) == k for k in range(NUM_BINS))


def test_pixel_box_normalised_by_width_and_height():
    # 640x480 image: x / 640, y / 480.
    assert normalise_box([64, 48, 320, 480], 640, 480) == (0.1, 0.1, 0.5, 1.0)
    assert box_to_bins(normalise_box([64, 48, 320, 480], 640, 480)) == (100, 100, 500, 999)
    assert bins_to_pixels((100, 100, 500, 999), 640, 480) == pytest.approx((64, 48, 320, 479.52))


def test_coord_token_text():
    assert coord_token(0) == "<|coord_0|>" and coord_token(999) == "<|coord_999|>"
    assert parse_coord_token("<|coord_42|>") == 42
    for bad in ("<|coord_1000|>", "<|coord_-1|>", "<coord_4>", "<|coord_|>", " <|coord_4|>"):
        assert parse_coord_token(bad) is None
    with pytest.raises(ValueError, match="outside"):
        coord_token(1000)


def test_vocab_on_real_qwen_ids(qwen_tokenizer, qwen_vocab):
    # The real Qwen vocabulary has 151,669 tokens, so the added coord tokens start at 151669, in bin order.
    assert qwen_vocab.coord_ids[0] == 151669 and qwen_vocab.coord_ids[999] == 152668
    assert list(qwen_vocab.coord_ids) == list(range(151669, 152669))
    assert qwen_vocab.structure_ids == tuple(range(152669, 152675))
    assert qwen_vocab.eos_id == qwen_tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert qwen_vocab.bin_of(151669 + 417) == 417 and qwen_vocab.bin_of(100) is None


def test_vocab_names_the_fix_when_tokens_are_missing():
    from coordexp_rl.method.coords import CoordVocab
    from coordexp_rl.modeling.tokenizer import load_qwen_tokenizer

    with pytest.raises(ValueError, match="add-coord-tokens"):
        CoordVocab.from_tokenizer(load_qwen_tokenizer())
