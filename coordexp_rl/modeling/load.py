"""Load a Qwen3-VL folder (weights, processor) and check it has the coord vocabulary."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from coordexp_rl.coords import CoordVocab

log = logging.getLogger(__name__)


def load_model_and_processor(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """-> (model, processor, CoordVocab). ``dtype`` is a torch dtype name ("float32", "bfloat16", ...).

    Raises ValueError naming the folder and the fix when the tokenizer lacks coord tokens, or when
    the model has fewer embedding rows than the tokenizer has tokens.
    """
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found: expected a Qwen3-VL model folder "
                                "(build one with `coordexp-rl make-tiny-model --out DIR`)")
    processor = AutoProcessor.from_pretrained(folder)
    try:
        vocab = CoordVocab.from_tokenizer(processor.tokenizer)
    except ValueError as exc:
        raise ValueError(f"{folder}: {exc}") from None
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype name (try 'float32' or 'bfloat16')")
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype).to(device)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(processor.tokenizer):
        raise ValueError(f"{folder}: the model has {rows} embedding rows but the tokenizer has "
                         f"{len(processor.tokenizer)} tokens; rebuild with `coordexp-rl add-coord-tokens`")
    log.info("loaded %s (%s on %s): %d tokens", folder, dtype, device, len(processor.tokenizer))
    return model, processor, vocab
