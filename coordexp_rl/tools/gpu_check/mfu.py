"""Model FLOPs of a learner step by formula, and MFU against the device's bf16 peak.

The formula (PaLM's appendix B convention: matmul FLOPs only, 2 per multiply-add, the causal mask's half
of attention not subtracted; a trained part costs 3 forwards: its forward, the gradient of its inputs and
the gradient of its weights):

    forward = 2 * decoder_params * tokens + 4 * decoder_layers * attention_width * sum_seq tokens^2
            + 2 * hidden * (vocab * ce_positions + coord_bins * coord_positions)          # the LM head
            + 2 * vision_params * patches + 2 * merger_params * image_tokens
            + 4 * vision_layers * vision_width * sum_image patches^2
    step    = 3 * (decoder, attention and LM head forward) + v * (vision forward)

with ``tokens`` a sequence's length, image tokens included; the LM head only where the loss path computes
logits (supervised CE positions over the whole vocabulary, coord positions over the 1,000 coord rows);
``patches`` = image tokens x merge^2 (the vision blocks run before the 2 x 2 merger); v = 3 when the vision
tower trains, 1 when it is frozen (model.freeze_vision: it sits below everything that trains, so no
gradient flows into it). Embedding lookups, norms, activations and softmaxes are left out (under 1 %).
MFU = step FLOPs x steps per second / the device's dense bf16 peak.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s from NVIDIA's data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the specific names come first.
BF16_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
]


def bf16_peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a device by name; None for a device not in the table (its MFU is then None).

    >>> bf16_peak_flops("NVIDIA H100 PCIe"), bf16_peak_flops("NVIDIA H200"), bf16_peak_flops("Tesla T4")
    (756000000000000.0, 989000000000000.0, None)
    """
    for key, peak in BF16_PEAK_FLOPS:
        if key in device_name:
            return peak
    return None


@dataclass(frozen=True)
class ModelShape:
    decoder_params: int  # decoder layers + final norm (not the embedding table, not the LM head)
    decoder_layers: int
    attention_width: int  # query heads x head dim
    hidden: int
    vocab: int
    vision_params: int  # patch embedding + vision blocks: applied to every patch
    merger_params: int  # the mergers (main and deepstack): applied to every merged image token
    vision_layers: int
    vision_width: int
    vision_trained: bool
    coord_bins: int = 1000
    spatial_merge: int = 2


@dataclass(frozen=True)
class SequenceCounts:
    tokens: int  # sequence length, image tokens included
    ce_positions: int  # positions with full-vocabulary logits (CE weight != 0)
    coord_positions: int  # positions with coord-row logits (CoordExp)
    image_tokens: tuple[int, ...] = ()  # per image, merged tokens in the sequence


def forward_flops(shape: ModelShape, seq: SequenceCounts) -> tuple[float, float]:
    """(language side, vision side) forward FLOPs of one sequence, by the module docstring's formula."""
    language = (2 * shape.decoder_params * seq.tokens
                + 4 * shape.decoder_layers * shape.attention_width * seq.tokens ** 2
                + 2 * shape.hidden * (shape.vocab * seq.ce_positions + shape.coord_bins * seq.coord_positions))
    patches = [n * shape.spatial_merge ** 2 for n in seq.image_tokens]
    vision = (2 * shape.vision_params * sum(patches) + 2 * shape.merger_params * sum(seq.image_tokens)
              + 4 * shape.vision_layers * shape.vision_width * sum(p ** 2 for p in patches))
    return float(language), float(vision)


def step_flops(shape: ModelShape, seqs: list[SequenceCounts]) -> float:
    """Training FLOPs of one step over ``seqs`` (forward and backward)."""
    vision_factor = 3 if shape.vision_trained else 1
    total = 0.0
    for seq in seqs:
        language, vision = forward_flops(shape, seq)
        total += 3 * language + vision_factor * vision
    return total


# ----------------------------------------------------------------------------------------------------
# From a loaded Qwen3-VL and the learner's sequences
# ----------------------------------------------------------------------------------------------------


def model_shape(model, vision_trained: bool) -> ModelShape:
    """The counts of a Qwen3-VL (transformers' Qwen3VLForConditionalGeneration), parameters counted once."""
    inner, text = model.model, model.config.text_config
    lm = inner.language_model
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    mergers = numel(inner.visual.merger) + sum(numel(m) for m in getattr(inner.visual, "deepstack_merger_list", []))
    vision = model.config.vision_config
    return ModelShape(
        decoder_params=numel(lm) - lm.embed_tokens.weight.numel(), decoder_layers=text.num_hidden_layers,
        attention_width=text.num_attention_heads * text.head_dim, hidden=text.hidden_size,
        vocab=model.lm_head.weight.shape[0], vision_params=numel(inner.visual) - mergers, merger_params=mergers,
        vision_layers=vision.depth, vision_width=vision.hidden_size, vision_trained=vision_trained,
        spatial_merge=vision.spatial_merge_size)


def sequence_counts(seq, image_token_id: int, spatial_merge: int) -> SequenceCounts:
    """A TrainSequence's counts (coordexp_rl.data.sequences): the state at t-1 predicts token t;
    image_grid_thw counts patches, spatial_merge^2 of them per image token."""
    ids = seq.input_ids
    ce = 0 if seq.ce_weights is None else int((seq.ce_weights[1:] != 0).sum())
    grids = seq.enc.get("image_grid_thw")
    images = () if grids is None else tuple(int(g.prod()) // spatial_merge ** 2 for g in grids.reshape(-1, 3))
    if sum(images) != int((ids == image_token_id).sum()):
        raise ValueError(f"{sum(images)} image tokens by the image grids, {int((ids == image_token_id).sum())} "
                         f"in the sequence (image token id {image_token_id}, merge {spatial_merge})")
    return SequenceCounts(tokens=int(ids.numel()), ce_positions=ce, coord_positions=len(seq.coord_positions),
                          image_tokens=images)
