"""add_coord_tokens: ids, non-special decoding, resizing, and the deliberate initialisation of every row."""

from __future__ import annotations

import copy

import pytest
import torch

from coordexp_rl import cli
from coordexp_rl.method.coords import COORD_TOKENS, NUM_BINS, STRUCTURE_TOKENS, CoordVocab
from coordexp_rl.method.protocol import BoxObject, build_assistant_ids, parse_ids
from coordexp_rl.modeling.coord_tokens import add_coord_tokens, ordinal_rows
from coordexp_rl.modeling.tiny import TinySize, tiny_config
from coordexp_rl.modeling.tokenizer import build_local_tokenizer


@pytest.fixture(scope="module")
def local_base():
    return build_local_tokenizer()


def _model(tok, *, tie: bool, vocab_size: int | None = None, seed: int = 0):
    from transformers import Qwen3VLForConditionalGeneration

    config = tiny_config(TinySize(tie_word_embeddings=tie), tok)
    if vocab_size is not None:  # like a real checkpoint: more rows than tokenizer tokens
        config.text_config.vocab_size = vocab_size
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config)


@torch.no_grad()
def _stats(weight, n):
    mu = weight[:n].mean(0)
    sigma = (weight[:n] - mu).norm(dim=1).pow(2).mean().sqrt()
    return mu, sigma


def test_tokens_are_added_in_order_as_non_special(local_base):
    tok = copy.deepcopy(local_base)
    n = len(tok)
    vocab = add_coord_tokens(tok)  # tokenizer only
    assert vocab.coord_ids == tuple(range(n, n + NUM_BINS))
    assert vocab.structure_ids == tuple(range(n + NUM_BINS, n + NUM_BINS + len(STRUCTURE_TOKENS)))
    assert vocab.eos_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = build_assistant_ids([BoxObject("red circle", (0, 5, 999, 500))], tok, vocab)
    text = tok.decode(ids, skip_special_tokens=True)  # coord/structure tokens survive, <|im_end|> does not
    assert text == "<obj><desc>red circle</desc><box><|coord_0|><|coord_5|><|coord_999|><|coord_500|></box></obj>"
    assert tok.encode("<|coord_7|><box>") == [n + 7, vocab.box_open]
    with pytest.raises(ValueError, match="already converted"):
        add_coord_tokens(tok)


@pytest.mark.parametrize("tie", [True, False])
def test_ordinal_init_resizes_and_initialises_every_matrix(local_base, tie):
    tok = copy.deepcopy(local_base)
    n = len(tok)
    model = _model(tok, tie=tie)
    before = [m.weight[:n].clone() for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    vocab = add_coord_tokens(tok, model, init="ordinal")
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert inp.shape[0] == out.shape[0] == len(tok) == n + NUM_BINS + len(STRUCTURE_TOKENS)
    assert model.config.text_config.vocab_size == len(tok)
    assert (inp.data_ptr() == out.data_ptr()) == tie
    for weight, old in zip((inp, out), before):
        assert torch.equal(weight[:n], old)  # real rows untouched
        mu, sigma = _stats(old, n)
        coord = weight[list(vocab.coord_ids)]  # (1000, H)
        # Each coord row sits about sigma from the mean, and the curve is smooth: neighbours are ~50x
        # closer than bins 0 and 999 (|d/dt| ~ pi*J/sqrt(J/2)/999 per bin vs sqrt(2) end to end).
        dist = (coord - mu).norm(dim=1)
        assert torch.allclose(dist.mean(), sigma, rtol=0.3)
        step = (coord[1:] - coord[:-1]).norm(dim=1).max()
        assert step < 0.05 * (coord[0] - coord[-1]).norm()
        assert (coord[0] - coord[1]).norm() < (coord[0] - coord[10]).norm() < (coord[0] - coord[500]).norm()
        struct = weight[list(vocab.structure_ids)]
        assert torch.allclose(struct, mu.expand_as(struct), atol=5e-3 * sigma.item())


def test_mean_init_puts_every_coord_row_at_the_mean(local_base):
    tok = copy.deepcopy(local_base)
    n = len(tok)
    model = _model(tok, tie=False)
    vocab = add_coord_tokens(tok, model, init="mean")
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        mu, sigma = _stats(weight, n)
        coord = weight[list(vocab.coord_ids)]
        assert torch.allclose(coord, mu.expand_as(coord), atol=5e-3 * sigma.item())
        assert not torch.equal(coord[0], coord[1])  # tiny noise breaks exact ties


def test_ordinal_rows_shape_and_norm():
    rows = ordinal_rows(128, torch.Generator().manual_seed(0))
    assert rows.shape == (NUM_BINS, 128)
    assert abs(rows.norm(dim=1).pow(2).mean().sqrt().item() - 1.0) < 0.05


def test_real_qwen_vocabulary_fills_padding_rows(qwen_tokenizer):
    """Real Qwen3-VL: 151,936 embedding rows for 151,669 tokens; coord ids 151669.. start on padding rows."""
    tok = copy.deepcopy(qwen_tokenizer)
    model = _model(tok, tie=True, vocab_size=151936)
    weight = model.get_input_embeddings().weight
    padding_before = weight[151669:151936].clone()
    vocab = add_coord_tokens(tok, model, init="ordinal")
    assert vocab.coord_ids == tuple(range(151669, 152669))
    assert vocab.structure_ids == tuple(range(152669, 152675))
    assert vocab.eos_id == 151645
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tok) == 152675
    # The 267 coord rows that were padding were re-initialised on the ordinal curve, like the others.
    assert not torch.allclose(weight[151669:151936], padding_before)
    mu, sigma = _stats(weight, 151669)
    dist = (weight[list(vocab.coord_ids)] - mu).norm(dim=1)
    assert torch.allclose(dist[:267].mean(), sigma, rtol=0.3) and torch.allclose(dist[267:].mean(), sigma, rtol=0.3)
    # CoordVocab from the tokenizer, protocol round trip and chat template with the real vocabulary.
    assert CoordVocab.from_tokenizer(tok) == vocab
    objects = [BoxObject("black cat", (110, 310, 410, 705)), BoxObject("yellow dog", (520, 285, 890, 660))]
    ids = build_assistant_ids(objects, tok, vocab)
    assert ids[6:10] == [151669 + 110, 151669 + 310, 151669 + 410, 151669 + 705]
    parsed = parse_ids(ids, tok, vocab, strict=True)
    assert [(o.desc, o.bins) for o in parsed.objects] == [(o.desc, o.bins) for o in objects]
    text = tok.decode(ids, skip_special_tokens=False)
    chat = tok.apply_chat_template([{"role": "user", "content": "Detect."},
                                    {"role": "assistant", "content": text.removesuffix("<|im_end|>")}], tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n<obj><desc>black cat</desc><box><|coord_110|><|coord_310|>"
                         "<|coord_410|><|coord_705|></box></obj><obj><desc>yellow dog</desc><box><|coord_520|>"
                         "<|coord_285|><|coord_890|><|coord_660|></box></obj><|im_end|>\n")
    assert tok(chat)["input_ids"][-len(ids) - 1:-1] == ids  # the template text re-encodes to the same ids


def test_cli_converts_a_folder_without_coord_tokens(tmp_path):
    from coordexp_rl.modeling.load import load_model_and_processor
    from coordexp_rl.modeling.tiny import make_tiny_model

    src = make_tiny_model(tmp_path / "stock", coord_tokens=False)
    with pytest.raises(ValueError, match="add-coord-tokens"):
        load_model_and_processor(src)
    assert cli.main(["add-coord-tokens", "--model", str(src), "--out", str(tmp_path / "conv"), "--init", "mean"]) == 0
    model, processor, vocab = load_model_and_processor(tmp_path / "conv")
    assert processor.tokenizer.convert_ids_to_tokens(list(vocab.coord_ids[:2])) == list(COORD_TOKENS[:2])
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer) == vocab.box_close + 1
    assert processor.chat_template is not None and "<|im_start|>" in processor.chat_template
    assert cli.main(["add-coord-tokens", "--model", str(tmp_path / "conv"), "--out", str(tmp_path / "x")]) == 2
