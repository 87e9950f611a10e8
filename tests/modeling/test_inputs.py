"""Model inputs: rendered prompt, prompt encoding, example encoding and batching."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from coordexp_rl.method.protocol import BoxObject, build_assistant_ids
from coordexp_rl.modeling.inputs import collate, encode_example, encode_prompt, render_prompt
from coordexp_rl.modeling.load import load_model_and_processor


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model_and_processor(tiny_model_dir)


def test_render_prompt(loaded):
    _, processor, _ = loaded
    assert render_prompt(processor, "Find the shapes.") == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find the shapes.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_encode_prompt_expands_the_image_placeholder(loaded):
    _, processor, _ = loaded
    tok = processor.tokenizer
    enc = encode_prompt(processor, Image.new("RGB", (128, 96), "red"), "Find the shapes.")
    ids = enc["input_ids"].tolist()
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    # The rendered text with the one placeholder replaced by 12 = (6*8)/4 of them.
    text = render_prompt(processor, "Find the shapes.").replace("<|image_pad|>", "<|image_pad|>" * 12)
    assert ids == tok.encode(text)
    assert enc["mm_token_type_ids"].tolist() == [int(i == pad) for i in ids]
    suffix = tok.encode("<|im_start|>assistant\n")
    assert ids[-len(suffix):] == suffix


def test_encode_example_appends_assistant_ids(loaded):
    _, processor, vocab = loaded
    image = Image.new("RGB", (160, 128), "white")
    prompt = encode_prompt(processor, image, "Find.")
    assistant = build_assistant_ids([BoxObject("red circle", (10, 20, 300, 400))], processor.tokenizer, vocab)
    ex = encode_example(processor, image, "Find.", assistant)
    n = ex["prompt_len"]
    assert n == prompt["input_ids"].shape[0]
    assert torch.equal(ex["input_ids"][:n], prompt["input_ids"]) and ex["input_ids"][n:].tolist() == assistant
    assert ex["mm_token_type_ids"][n:].sum() == 0
    assert torch.equal(ex["pixel_values"], prompt["pixel_values"])


def test_collate_right_pads_and_matches_single_forwards(loaded):
    model, processor, vocab = loaded
    tok = processor.tokenizer
    small, large = Image.new("RGB", (96, 96), "red"), Image.new("RGB", (160, 192), "blue")
    a = encode_example(processor, small, "Find.", build_assistant_ids([BoxObject("dog", (1, 2, 3, 4))], tok, vocab))
    b = encode_example(processor, large, "Find.", build_assistant_ids([], tok, vocab))
    batch = collate([a, b], tok.pad_token_id)
    la, lb = a["input_ids"].shape[0], b["input_ids"].shape[0]
    assert batch["input_ids"].shape == (2, max(la, lb))
    assert batch["attention_mask"].sum(1).tolist() == [la, lb]
    assert batch["pixel_values"].shape[0] == a["pixel_values"].shape[0] + b["pixel_values"].shape[0]
    with torch.no_grad():
        both = model(**batch).logits
        for i, ex in enumerate((a, b)):
            single = model(**collate([ex], tok.pad_token_id)).logits[0]
            n = ex["input_ids"].shape[0]
            assert torch.allclose(both[i, :n], single, atol=1e-4)
