"""Load a Qwen3-VL folder (weights, processor) and check it has the coord vocabulary."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from coordexp_rl.method.coords import CoordVocab

log = logging.getLogger(__name__)


def load_processor(path: str | Path, max_pixels: int | None = None, min_pixels: int | None = None):
    """The folder's processor with the run's image resolution (``data.max_pixels`` / ``data.min_pixels``).

    A run must not depend on what the folder's processor file says (a real Qwen3-VL allows ~16 M pixels,
    ~16k image tokens): every reader (learner, both engines, infer, evaluation) loads through here.
    None keeps the folder's value.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(Path(path))
    return set_pixel_limits(processor, max_pixels, min_pixels)


def set_pixel_limits(processor, max_pixels: int | None, min_pixels: int | None):
    """Set the image processor's resize bounds in place (``size`` = {shortest_edge, longest_edge} pixels)."""
    if max_pixels is None and min_pixels is None:
        return processor
    image = processor.image_processor
    size = dict(image.size) if image.size is not None else {}
    size = {k: v for k, v in size.items() if v is not None}
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    if size.get("shortest_edge", 0) > size.get("longest_edge", 0):
        raise ValueError(f"min_pixels={size.get('shortest_edge')} > max_pixels={size.get('longest_edge')}: "
                         "set data.min_pixels <= data.max_pixels")
    image.size = size
    return processor


def pixel_kwargs(max_pixels: int | None, min_pixels: int | None) -> dict:
    """The same bounds as vLLM ``mm_processor_kwargs`` ({} = the folder's own).

    Given as images-only ``size`` (transformers deprecates ``min_pixels`` / ``max_pixels`` call kwargs).
    """
    if max_pixels is None and min_pixels is None:
        return {}
    size = {}
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
    return {"images_kwargs": {"size": size}}


def load_model_and_processor(path: str | Path, dtype: str = "float32", device: str = "cpu",
                             max_pixels: int | None = None, min_pixels: int | None = None,
                             attn_implementation: str = "sdpa"):
    """-> (model, processor, CoordVocab). ``dtype`` is a torch dtype name ("float32", "bfloat16", ...);
    ``attn_implementation`` the attention kernel (``model.attn_implementation``; see check_attention).

    Raises ValueError naming the folder and the fix when the tokenizer lacks coord tokens, or when
    the model has fewer embedding rows than the tokenizer has tokens.
    """
    from transformers import Qwen3VLForConditionalGeneration

    check_attention(attn_implementation, device)
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found: expected a Qwen3-VL model folder "
                                "(build one with `coordexp-rl make-tiny-model --out DIR`)")
    processor = load_processor(folder, max_pixels, min_pixels)
    try:
        vocab = CoordVocab.from_tokenizer(processor.tokenizer)
    except ValueError as exc:
        raise ValueError(f"{folder}: {exc}") from None
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype name (try 'float32' or 'bfloat16')")
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        folder, dtype=torch_dtype, attn_implementation=attn_implementation).to(device)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(processor.tokenizer):
        raise ValueError(f"{folder}: the model has {rows} embedding rows but the tokenizer has "
                         f"{len(processor.tokenizer)} tokens; rebuild with `coordexp-rl add-coord-tokens`")
    linear_patch_embed(model)
    log.info("loaded %s (%s on %s): %d tokens", folder, dtype, device, len(processor.tokenizer))
    return model, processor, vocab


ATTENTION = ("sdpa", "eager", "flash_attention_2")  # model.attn_implementation's values


def check_attention(attn_implementation: str, device: str) -> None:
    """Refuse an attention kernel that cannot run here, naming the setting and the fix: flash_attention_2
    needs a CUDA device and the flash_attn package (transformers' own error names neither the setting nor
    the way back)."""
    if attn_implementation not in ATTENTION:
        raise ValueError(f"model.attn_implementation={attn_implementation!r} is none of {list(ATTENTION)}")
    if attn_implementation != "flash_attention_2":
        return
    missing = []
    if not str(device).startswith("cuda"):
        missing.append(f"a CUDA device (the model loads on {device!r})")
    if importlib.util.find_spec("flash_attn") is None:
        missing.append("the flash_attn package (pip install flash-attn)")
    if missing:
        raise ValueError(f"model.attn_implementation=flash_attention_2 needs {' and '.join(missing)}; "
                         "set model.attn_implementation=sdpa (the default) or run where both are present")


def linear_patch_embed(model) -> None:
    """Run the vision patch embedding (a Conv3d whose kernel equals its stride) as one matmul on the
    flattened patches, as vLLM's Conv3dLayer does. Same parameter, same state dict; on CPU it took the
    embedding from 22 ms to 2 ms forward + backward (17 % of a tiny-model Stage-1 step before)."""
    embed = model.model.visual.patch_embed
    conv = embed.proj
    if tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding != (0, 0, 0):
        return  # not a plain patchify: leave transformers' forward

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = conv.weight.reshape(conv.out_channels, -1)  # (out, in * t * p * p): the input's order
        return torch.nn.functional.linear(hidden_states.to(weight.dtype).view(-1, weight.shape[1]), weight, conv.bias)

    embed.forward = forward
