"""Add the 1000 coord tokens and the structure tokens to a tokenizer + model, and initialise their rows.

Usage: ``coordexp-rl add-coord-tokens --model DIR --out DIR [--init ordinal|mean]``.

Every added token is a NON-special added token, so it survives ``decode(..., skip_special_tokens=True)``.
Every new row of the input embedding and of the LM head is initialised here, including rows that already
existed as padding: a real Qwen3-VL has 151,936 embedding rows for 151,669 tokenizer tokens, so the first
267 coord ids land on padding rows whose values mean nothing.

Inits (``mu`` = mean of the real tokens' rows, ``sigma`` = their RMS distance from ``mu``):
- ``mean``: every coord row = ``mu`` + tiny noise (1e-3 sigma, breaks ties between identical rows).
- ``ordinal``: coord row k = ``mu + sigma * sum_j u_j cos(pi j t_k) / sqrt(J/2)`` with ``t_k = k/999``
  and ``u_1..u_J`` orthonormal random directions: a smooth curve through embedding space, so bins
  k and k+1 start almost equal and bins far apart start far apart (their logits start correlated the
  same way, which gives CoordExp a unimodal start).
Structure rows always start at ``mu`` + tiny noise.
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from transformers import AddedToken

from coordexp_rl.errors import add_force_argument, refuse_overwrite
from coordexp_rl.method.coords import COORD_TOKENS, NUM_BINS, STRUCTURE_TOKENS, CoordVocab

log = logging.getLogger(__name__)

INITS = ("ordinal", "mean")
ORDINAL_FREQUENCIES = 16  # J: cosine frequencies of the ordinal curve
NOISE = 1e-3  # tiny noise, relative to sigma


def add_coord_tokens(tokenizer, model=None, init: str = "ordinal", seed: int = 0) -> CoordVocab:
    """Add ``<|coord_0|>..<|coord_999|>`` then ``STRUCTURE_TOKENS``; resize and initialise ``model``.

    ``model`` may be None (tokenizer only). The embedding and LM head are resized to exactly
    ``len(tokenizer)`` rows when they have fewer (never shrunk). Tied weights are initialised once.
    With the real Qwen vocabulary the coord ids are 151669..152668 in bin order.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {INITS}")
    existing = tokenizer.get_vocab()  # builds a dict of the whole vocabulary: call once
    present = [t for t in (*COORD_TOKENS, *STRUCTURE_TOKENS) if t in existing]
    if present:
        raise ValueError(f"tokenizer already has {len(present)} coord/structure tokens (first: {present[0]}); "
                         "this folder was already converted")
    num_real = len(tokenizer)  # rows below this are real tokens; rows at or above it are padding
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (*COORD_TOKENS, *STRUCTURE_TOKENS)])
    vocab = CoordVocab.from_tokenizer(tokenizer)
    if model is not None:
        _resize_and_init(model, len(tokenizer), num_real, vocab, init, seed)
    log.info("added %d coord + %d structure tokens (ids %d..%d), init=%s",
             NUM_BINS, len(STRUCTURE_TOKENS), vocab.coord_ids[0], vocab.box_close, init)
    return vocab


def _resize_and_init(model, new_len: int, num_real: int, vocab: CoordVocab, init: str, seed: int) -> None:
    if model.get_input_embeddings().weight.shape[0] < new_len:
        model.resize_token_embeddings(new_len, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    matrices = [inp]
    if out is not None and out.weight.data_ptr() != inp.data_ptr():
        matrices.append(out.weight)
    coord_ids = torch.tensor(vocab.coord_ids)
    structure_ids = torch.tensor(vocab.structure_ids)
    with torch.no_grad():
        for weight in matrices:  # (V, H)
            real = weight[:num_real].float()
            mu = real.mean(0)  # (H,)
            sigma = (real - mu).norm(dim=1).pow(2).mean().sqrt()  # RMS row distance from the mean
            noise_scale = NOISE * float(sigma)
            coord_rows = (ordinal_rows(weight.shape[1], gen) * sigma if init == "ordinal"
                          else torch.zeros(NUM_BINS, weight.shape[1]))
            coord_rows += mu + noise_scale * torch.randn(coord_rows.shape, generator=gen)
            weight[coord_ids] = coord_rows.to(weight.dtype)
            struct_rows = mu + noise_scale * torch.randn(len(structure_ids), weight.shape[1], generator=gen)
            weight[structure_ids] = struct_rows.to(weight.dtype)


def ordinal_rows(hidden: int, generator: torch.Generator, num_bins: int = NUM_BINS,
                 frequencies: int = ORDINAL_FREQUENCIES) -> torch.Tensor:
    """(num_bins, hidden) smooth curve with mean row norm ~1: row k = sum_j u_j cos(pi j k/(K-1)) / sqrt(J/2).

    Neighbouring rows differ by O(J/K); rows 0 and K-1 are about sqrt(2) apart (cosines of odd j flip).
    """
    j = min(frequencies, hidden)
    basis, _ = torch.linalg.qr(torch.randn(hidden, j, generator=generator))  # (hidden, J) orthonormal columns
    t = torch.arange(num_bins, dtype=torch.float32) / (num_bins - 1)  # (K,)
    waves = torch.cos(math.pi * t[:, None] * torch.arange(1, j + 1, dtype=torch.float32))  # (K, J)
    return waves @ basis.T / math.sqrt(j / 2)


# --- CLI -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Qwen3-VL folder (weights, tokenizer, processor)")
    parser.add_argument("--out", required=True, help="folder to write the converted model to")
    add_force_argument(parser)
    parser.add_argument("--init", choices=INITS, default="ordinal", help="initialisation of the coord rows")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    src, out = Path(args.model), Path(args.out)
    refuse_overwrite(out, args.force, (src,))
    if not (src / "config.json").is_file():
        print(f"error: {src}/config.json not found: --model must be a Qwen3-VL folder")
        return 2
    processor = AutoProcessor.from_pretrained(src)
    model = Qwen3VLForConditionalGeneration.from_pretrained(src, dtype="auto")
    try:
        vocab = add_coord_tokens(processor.tokenizer, model, init=args.init, seed=args.seed)
    except ValueError as exc:
        print(f"error: {src}: {exc}")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"wrote {out}: {len(processor.tokenizer)} tokens, coord ids {vocab.coord_ids[0]}..{vocab.coord_ids[-1]}")
    return 0
