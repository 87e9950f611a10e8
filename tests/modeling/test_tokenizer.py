"""The local BPE tokenizer and the real Qwen tokenizer: specials, compact words, chat template."""

from __future__ import annotations

import pytest

from coordexp_rl.modeling.tokenizer import CHAT_TEMPLATE, COLOURS, QWEN_SPECIAL_TOKENS, SHAPES, build_local_tokenizer

RENDERED = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Detect.<|im_end|>\n"
            "<|im_start|>assistant\n")
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect."}]}]


@pytest.fixture(scope="module")
def local():
    return build_local_tokenizer()


def test_local_specials_follow_the_bpe_in_qwen_order(local):
    ids = local.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    first = ids[0]
    assert ids == list(range(first, first + len(QWEN_SPECIAL_TOKENS)))
    assert len(local) == first + len(QWEN_SPECIAL_TOKENS)
    assert local.eos_token == "<|im_end|>" and local.eos_token_id == first + 2
    assert local.pad_token == "<|endoftext|>" and local.pad_token_id == first
    # Specials are matched whole, never split by BPE.
    assert local.encode("<|vision_start|><|image_pad|>") == [first + 9, first + 12]


def test_local_shape_and_colour_words_are_one_token_each(local):
    for word in COLOURS + SHAPES:
        assert len(local.encode(word)) == 1, word
        assert len(local.encode(" " + word)) == 1, word
    assert local.tokenize("small red circle") == ["small", "Ġred", "Ġcircle"]


def test_local_round_trips_arbitrary_text(local):
    text = "Zebra #42 naïve 東京\n  tabs\tand émojis 🙂"
    assert local.decode(local.encode(text)) == text


def test_local_is_deterministic(local):
    again = build_local_tokenizer()
    assert again.get_vocab() == local.get_vocab()
    assert again.encode("a yellow dog near the big tree") == local.encode("a yellow dog near the big tree")


def test_local_chat_template_keeps_newlines(local):
    assert local.chat_template == CHAT_TEMPLATE
    assert local.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == RENDERED
    full = local.apply_chat_template(MESSAGES + [{"role": "assistant", "content": "ok"}], tokenize=False)
    assert full == RENDERED.removesuffix("<|im_start|>assistant\n") + "<|im_start|>assistant\nok<|im_end|>\n"


def test_real_qwen_tokenizer(qwen_tokenizer):
    tok = qwen_tokenizer
    assert len(tok) == 151669  # 151,643 BPE tokens + 26 added
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>"]) == [151643, 151645, 151655]
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == RENDERED
