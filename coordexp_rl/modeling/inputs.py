"""The one place where model inputs are built (learner, HF engine and inference all call these).

Image preprocessing that drifts between the rollout engine and the learner silently changes the number of
image tokens (other RL systems saw deadlocks and silently wrong training from it), so nobody else calls
the processor directly.

Shapes (one example, L tokens, N image patches):
  input_ids (L,) int64, mm_token_type_ids (L,) int64 (1 on image tokens; needed for M-RoPE),
  pixel_values (N, 3 * temporal_patch * patch * patch) float32, image_grid_thw (1, 3) int64.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image


def prompt_messages(prompt_text: str) -> list[dict]:
    """One user turn: the image, then the instruction text."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text}]}]


def render_prompt(processor, prompt_text: str) -> str:
    """Chat-template text with one unexpanded image placeholder and the assistant generation prompt.

    >>> render_prompt(processor, "Detect.")  # doctest: +SKIP
    '<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Detect.<|im_end|>\\n<|im_start|>assistant\\n'
    """
    return processor.apply_chat_template(prompt_messages(prompt_text), tokenize=False, add_generation_prompt=True)


def encode_prompt(processor, image: Image.Image, prompt_text: str) -> dict[str, torch.Tensor]:
    """Processor output for the rendered prompt + image (image placeholder expanded), batch dim dropped."""
    out = processor(text=[render_prompt(processor, prompt_text)], images=[image.convert("RGB")],
                    return_tensors="pt")
    return {
        "input_ids": out["input_ids"][0],
        "mm_token_type_ids": out["mm_token_type_ids"][0],
        "pixel_values": out["pixel_values"],
        "image_grid_thw": out["image_grid_thw"],
    }


def encode_example(processor, image: Image.Image, prompt_text: str,
                   assistant_ids: Sequence[int]) -> dict[str, torch.Tensor | int]:
    """``encode_prompt`` with ``assistant_ids`` appended, plus ``prompt_len`` (the first assistant position).

    The learner supervises positions ``prompt_len..L-1`` only.
    """
    enc = encode_prompt(processor, image, prompt_text)
    tail = torch.as_tensor(list(assistant_ids), dtype=enc["input_ids"].dtype)
    prompt_len = int(enc["input_ids"].shape[0])
    enc["input_ids"] = torch.cat([enc["input_ids"], tail])
    enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(tail)])
    enc["prompt_len"] = prompt_len
    return enc


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch encodings for a forward pass: right padding, attention mask, images concatenated in order.

    Returns input_ids / attention_mask / mm_token_type_ids (B, L_max), pixel_values (sum N, D),
    image_grid_thw (B, 3). Keys other than these (e.g. prompt_len) are left out.
    """
    length = max(int(e["input_ids"].shape[0]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    mm_types = torch.zeros((batch, length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = int(e["input_ids"].shape[0])
        input_ids[i, :n] = e["input_ids"]
        attention_mask[i, :n] = 1
        mm_types[i, :n] = e["mm_token_type_ids"]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_types,
        "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in examples]),
    }


def pack(examples: Sequence[dict], rope_index) -> dict[str, torch.Tensor]:
    """Encodings concatenated into ONE row without padding (packing), for the learner's forward.

    ``rope_index``: the inner Qwen3-VL model's ``get_rope_index`` method (M-RoPE ids need the image grid; it reads no
    weights). Returns input_ids / mm_token_type_ids (1, sum L), position_ids (4, 1, sum L), pixel_values
    (sum N, D), image_grid_thw (B, 3), use_cache False, and no attention mask. position_ids row 0 holds the
    text positions 0..L_i-1, restarting at each example: with no attention mask, transformers' masking
    (masking_utils.find_packed_sequence_indices) reads each restart as a new sequence and makes the causal
    mask block-diagonal (sdpa, eager), and flash-attention runs varlen from the same ids. Rows 1-3 are each
    example's own M-RoPE ids (as get_rope_index gives them in a padded batch), so every token sees the
    positions and the context it has alone. use_cache False: a cache (on by default in Qwen3-VL's config)
    turns that detection off, and every example would attend to the ones before it.
    """
    text, mrope = [], []
    for e in examples:
        ids = e["input_ids"][None]
        text.append(torch.arange(ids.shape[1], dtype=torch.long))
        mrope.append(rope_index(ids, e["mm_token_type_ids"][None], image_grid_thw=e["image_grid_thw"])[0])  # (3, 1, L)
    return {
        "input_ids": torch.cat([e["input_ids"] for e in examples])[None],
        "mm_token_type_ids": torch.cat([e["mm_token_type_ids"] for e in examples])[None],
        "position_ids": torch.cat([torch.cat(text)[None, None], torch.cat(mrope, dim=2)]),
        "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
        "image_grid_thw": torch.cat([e["image_grid_thw"] for e in examples]),
        "use_cache": False,
    }
