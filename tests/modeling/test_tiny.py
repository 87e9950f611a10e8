"""The tiny Qwen3-VL folder: contents, determinism, sizes, and loading back with transformers."""

from __future__ import annotations

import json

import torch
from PIL import Image

from coordexp_rl import cli
from coordexp_rl.method.coords import NUM_BINS, STRUCTURE_TOKENS
from coordexp_rl.modeling.inputs import encode_prompt
from coordexp_rl.modeling.load import load_model_and_processor
from coordexp_rl.modeling.tiny import make_tiny_model


def test_folder_loads_with_matching_vocab(tiny_model_dir):
    model, processor, vocab = load_model_and_processor(tiny_model_dir)
    tok = processor.tokenizer
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert config["text_config"]["hidden_size"] == 128 and config["text_config"]["num_hidden_layers"] == 2
    assert config["vision_config"]["deepstack_visual_indexes"] == [0, 1]
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert vocab.box_close == len(tok) - 1 and vocab.coord_ids[-1] == len(tok) - 1 - len(STRUCTURE_TOKENS)
    assert len(vocab.coord_ids) == NUM_BINS and tok.eos_token == "<|im_end|>"
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == vocab.eos_id and gen["pad_token_id"] == tok.pad_token_id
    assert 0.9e6 < sum(p.numel() for p in model.parameters()) < 1.5e6


def test_96x128_image_gives_a_1x6x8_grid_and_12_image_tokens(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    enc = encode_prompt(processor, Image.new("RGB", (128, 96), "red"), "Detect.")
    assert enc["image_grid_thw"].tolist() == [[1, 6, 8]]  # 96/16 x 128/16 patches
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == image_id).sum()) == 12  # 48 patches / merge 2x2
    assert enc["pixel_values"].shape == (48, 3 * 2 * 16 * 16)
    # max_pixels = 256*256 caps large images: 1024x1024 -> 256x256 -> 16x16 patches, 64 tokens.
    big = encode_prompt(processor, Image.new("RGB", (1024, 1024), "red"), "Detect.")
    assert big["image_grid_thw"].tolist() == [[1, 16, 16]]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, tiny_model_dir):
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    assert (again / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_cli_sizes_are_overridable(tmp_path):
    out = tmp_path / "wide"
    assert cli.main(["make-tiny-model", "--out", str(out), "--seed", "3", "--hidden", "64", "--layers", "1",
                     "--intermediate", "128"]) == 0
    model, processor, _ = load_model_and_processor(out)
    assert model.config.text_config.hidden_size == 64 and model.config.text_config.num_hidden_layers == 1
    assert model.config.vision_config.out_hidden_size == 64  # vision output feeds the LM
    enc = encode_prompt(processor, Image.new("RGB", (64, 64), "blue"), "Detect.")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"][None], mm_token_type_ids=enc["mm_token_type_ids"][None],
                       pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits
    assert logits.shape == (1, enc["input_ids"].shape[0], len(processor.tokenizer))


def test_cli_shape_takes_the_real_widths_and_keeps_size_flags(monkeypatch, tmp_path):
    """`make-tiny-model --shape qwen3vl-2b --layers 2 --vision-depth 2 --no-coord-tokens`: Qwen3-VL-2B's
    widths and padded vocabulary, the given depths, deepstack on the vision layers there are; no building."""
    from coordexp_rl.modeling import tiny

    seen = {}
    monkeypatch.setattr(tiny, "make_tiny_model", lambda out, **kw: seen.update(kw) or out)
    assert cli.main(["make-tiny-model", "--out", str(tmp_path), "--shape", "qwen3vl-2b", "--tokenizer", "qwen",
                     "--layers", "2", "--vision-depth", "2", "--no-coord-tokens"]) == 0
    assert seen.pop("coord_tokens") is False and seen.pop("tokenizer") == "qwen"
    sizes = tiny.TinySize(**{k: v for k, v in seen.items() if k not in ("seed", "init")})
    assert (sizes.hidden, sizes.heads, sizes.kv_heads, sizes.head_dim, sizes.intermediate) == (2048, 16, 8, 128, 6144)
    assert (sizes.vision_hidden, sizes.vision_heads, sizes.vision_intermediate) == (1024, 16, 4096)
    assert (sizes.layers, sizes.vision_depth, sizes.deepstack, sizes.vocab_size) == (2, 2, [0, 1], 151936)
    assert sum(sizes.mrope_section) * 2 == sizes.head_dim
