"""A tiny randomly initialised Qwen3-VL folder, built offline, that transformers and vLLM both load.

Usage: ``coordexp-rl make-tiny-model --out DIR [--seed S] [--tokenizer local|qwen] [--shape qwen3vl-2b]``.

The default size (docs/PLATFORM.md) is about 1.2 M parameters and a few MB on disk; every size knob
is a keyword of ``make_tiny_model``. The folder holds weights (``model.safetensors``), config,
generation config, tokenizer (with coord + structure tokens), image/video processor and chat template.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from coordexp_rl.errors import add_force_argument, refuse_overwrite
from coordexp_rl.modeling.coord_tokens import add_coord_tokens
from coordexp_rl.modeling.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    build_local_tokenizer,
    load_qwen_tokenizer,
)

log = logging.getLogger(__name__)

# Images in the synthetic set are ~128..256 px a side: 256x256 -> 16x16 patches -> 64 image tokens.
MIN_PIXELS = 32 * 32 * 4  # the resize factor is patch 16 x merge 2 = 32
MAX_PIXELS = 256 * 256
# Qwen3-VL's image normalisation.
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass
class TinySize:
    """Sizes of the tiny model. head_dim must be one vLLM's CPU attention accepts (32, 64, 80, ...)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 2
    head_dim: int = 64
    kv_heads: int = 1
    intermediate: int = 256
    mrope_section: list[int] = field(default_factory=lambda: [12, 10, 10])  # sums to head_dim / 2
    vision_depth: int = 2
    vision_hidden: int = 64
    vision_heads: int = 2
    vision_intermediate: int = 128
    vision_position_embeddings: int = 256
    deepstack: list[int] = field(default_factory=lambda: [0, 1])  # vision layers fed into the LM
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True  # as Qwen3-VL-2B/4B
    vocab_size: int = 0  # embedding rows; 0 = the tokenizer's length (real checkpoints pad: 151,936)


# Real models' widths (their config.json), for a random model shaped like one with fewer layers:
# `make-tiny-model --shape qwen3vl-2b --tokenizer qwen --layers 2 --vision-depth 2 --no-coord-tokens`.
SHAPES = {
    "qwen3vl-2b": dict(hidden=2048, heads=16, head_dim=128, kv_heads=8, intermediate=6144,
                       mrope_section=[24, 20, 20], vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
                       vision_position_embeddings=2304, tie_word_embeddings=True, vocab_size=151936,
                       max_position_embeddings=262144),
}


def make_tiny_model(out_dir: str | Path, seed: int = 0, tokenizer: str = "local", init: str = "ordinal",
                    max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS, coord_tokens: bool = True,
                    **size) -> Path:
    """Build and save the tiny model folder; returns its path. Same seed -> same weight bytes.

    ``size`` overrides fields of ``TinySize`` (e.g. ``hidden=256, layers=4``). ``coord_tokens=False``
    leaves the coord/structure tokens out (a stand-in for a stock Qwen3-VL folder).
    """
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    out = Path(out_dir)
    sizes = TinySize(**size)
    if sum(sizes.mrope_section) * 2 != sizes.head_dim:
        raise ValueError(f"mrope_section {sizes.mrope_section} must sum to head_dim/2 = {sizes.head_dim // 2}")
    tok = _make_tokenizer(tokenizer)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_config(sizes, tok))
    if coord_tokens:
        add_coord_tokens(tok, model, init=init, seed=seed)
    ids = tok.convert_tokens_to_ids([EOS_TOKEN, PAD_TOKEN])
    model.generation_config = GenerationConfig(eos_token_id=ids[0], pad_token_id=ids[1], bos_token_id=None)
    # Extra rows would let sampling emit ids that decode to '' (a padded stock folder is converted first).
    if model.config.text_config.vocab_size != len(tok) and (coord_tokens or not sizes.vocab_size):
        raise RuntimeError(f"vocab_size {model.config.text_config.vocab_size} != len(tokenizer) {len(tok)}")
    processor = tiny_processor(tok, max_pixels=max_pixels, min_pixels=min_pixels)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("tiny Qwen3-VL: %d parameters, %d tokens, written to %s",
             sum(p.numel() for p in model.parameters()), len(tok), out)
    return out


def tiny_config(sizes: TinySize, tokenizer):
    from transformers import Qwen3VLConfig

    tid = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=sizes.vocab_size or len(tokenizer), hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.head_dim, max_position_embeddings=sizes.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                         "mrope_section": list(sizes.mrope_section), "mrope_interleaved": True},
        pad_token_id=tid(PAD_TOKEN), tie_word_embeddings=sizes.tie_word_embeddings,
    )
    vision = dict(
        depth=sizes.vision_depth, hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_intermediate,
        num_heads=sizes.vision_heads, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=sizes.hidden, num_position_embeddings=sizes.vision_position_embeddings,
        deepstack_visual_indexes=list(sizes.deepstack),
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=sizes.tie_word_embeddings,
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
    )


def tiny_processor(tokenizer, max_pixels: int = MAX_PIXELS, min_pixels: int = MIN_PIXELS):
    """Qwen3-VL processor: Qwen2-VL image processor (the class AutoProcessor reloads; patch 16, merge 2) +
    video processor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    common = dict(patch_size=16, merge_size=2, temporal_patch_size=2,
                  image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    image = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **common)
    video = Qwen3VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": 4 * max_pixels}, **common)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=CHAT_TEMPLATE)


def _make_tokenizer(kind: str):
    if kind == "local":
        return build_local_tokenizer()
    if kind == "qwen":
        return load_qwen_tokenizer()
    raise ValueError(f"tokenizer={kind!r}: choose 'local' or 'qwen'")


# --- CLI -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write")
    add_force_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", choices=("local", "qwen"), default="local",
                        help="local: a small BPE trained here (fast); qwen: the real Qwen vocabulary (large)")
    parser.add_argument("--init", choices=("ordinal", "mean"), default="ordinal")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a real model's widths (the size flags still apply)")
    parser.add_argument("--no-coord-tokens", action="store_true",
                        help="a stock folder without coord tokens (convert it with `coordexp-rl add-coord-tokens`)")
    for name, default in asdict(TinySize()).items():
        if isinstance(default, int) and not isinstance(default, bool):  # None: the shape's or TinySize's
            parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {default}")


def run(args: argparse.Namespace) -> int:
    refuse_overwrite(args.out, args.force)
    size = dict(SHAPES[args.shape]) if args.shape else {}
    size.update({k: getattr(args, k) for k, v in asdict(TinySize()).items()
                 if isinstance(v, int) and not isinstance(v, bool) and getattr(args, k) is not None})
    if args.shape and "deepstack" not in size:  # one deepstack layer per vision layer, up to Qwen3-VL's 3
        size["deepstack"] = list(range(min(3, size.get("vision_depth", TinySize.vision_depth))))
    out = make_tiny_model(args.out, seed=args.seed, tokenizer=args.tokenizer, init=args.init,
                          coord_tokens=not args.no_coord_tokens, **size)
    print(f"wrote {out}")
    return 0
