"""CoordExp (METHOD 2): a differentiable coordinate from the LM's coord-token logits.

At a coord position the LM head scores the 1000 coord tokens ``s_k``; CoordExp decodes
``c = sum_k softmax(s / tau)_k * k / 1000`` in [0, 0.999]. We project the hidden states onto the
coord rows of the LM head only (1000 rows, not ~152k), so full-vocab logits never exist here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from coordexp_rl.method.coords import NUM_BINS


def bin_values(num_bins: int = NUM_BINS, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``phi``: (K,) tensor ``[0, 0.001, ..., 0.999]``."""
    return torch.arange(num_bins, device=device, dtype=dtype) / NUM_BINS


@dataclass
class CoordExpOutput:
    """CoordExp of P coord positions (all tensors keep the autograd graph)."""

    expectation: torch.Tensor  # (P,) continuous coordinate in [0, 1)
    probs: torch.Tensor  # (P, K) tempered (and top-k renormalised) coord distribution
    logits: torch.Tensor  # (P, K) raw coord logits s_k (before temperature)
    entropy: torch.Tensor  # (P,) entropy of probs in nats


def coord_logits(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                 coord_ids: Sequence[int] | torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(P, H) hidden states -> (P, K) coord logits ``hidden @ W[coord_ids].T (+ b[coord_ids])``.

    Equals ``(hidden @ W.T)[:, coord_ids]`` without building the (P, V) full-vocab logits. When the ids
    are one contiguous range (they are, once added to a tokenizer) the rows are a view, not a copy.
    """
    rows = coord_rows(lm_head_weight, coord_ids)  # (K, H)
    logits = hidden @ rows.T
    if bias is not None:
        logits = logits + coord_rows(bias, coord_ids)
    return logits


def contiguous_start(ids: torch.Tensor) -> int | None:
    """The first id when ``ids`` are one ascending contiguous range, else None."""
    if ids.numel() and bool((ids[1:] - ids[:-1] == 1).all()):
        return int(ids[0])
    return None


def coord_rows(table: torch.Tensor, coord_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``table[coord_ids]``: a view when the ids are one contiguous range (the coord tokens are), else a copy.

    >>> coord_rows(torch.arange(10.0), [3, 4, 5]).tolist(), coord_rows(torch.arange(10.0), [5, 3]).tolist()
    ([3.0, 4.0, 5.0], [5.0, 3.0])
    """
    ids = torch.as_tensor(coord_ids, dtype=torch.long)
    start = contiguous_start(ids)
    if start is not None:
        return table[start:start + ids.numel()]
    return table.index_select(0, ids.to(table.device))


def coord_expectation(logits: torch.Tensor, tau: float = 1.0, top_k: int | None = None) -> CoordExpOutput:
    """(P, K) coord logits -> CoordExp decode.

    ``top_k``: keep the k largest logits per position and renormalise (METHOD 2.5); None or K = all.

    >>> out = coord_expectation(torch.tensor([[0.0, 0.0] + [-1e4] * 998]))
    >>> round(out.expectation.item(), 4)  # half on bin 0, half on bin 1 -> 0.0005
    0.0005
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    P, K = logits.shape
    # Softmax in fp32 even for bf16/fp16 models (fp64 stays fp64).
    scaled = (logits if logits.dtype == torch.float64 else logits.float()) / tau
    keep = None
    if top_k is not None and top_k < K:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # (P, 1) k-th largest
        keep = scaled >= kth  # ties at the k-th value are all kept
        scaled = scaled.masked_fill(~keep, float("-inf"))
    log_probs = scaled.log_softmax(dim=-1)  # (P, K)
    probs = log_probs.exp()
    if keep is not None:
        # 0 * -inf would give nan in the entropy and its gradient; masked entries contribute 0.
        log_probs = log_probs.masked_fill(~keep, 0.0)
    entropy = -(probs * log_probs).sum(-1)
    phi = bin_values(K, device=logits.device, dtype=probs.dtype) if K == NUM_BINS else \
        torch.arange(K, device=logits.device, dtype=probs.dtype) / K
    return CoordExpOutput(expectation=probs @ phi, probs=probs, logits=logits, entropy=entropy)


def coordexp(hidden: torch.Tensor, lm_head_weight: torch.Tensor, coord_ids: Sequence[int] | torch.Tensor,
             *, tau: float = 1.0, top_k: int | None = None, bias: torch.Tensor | None = None) -> CoordExpOutput:
    """(P, H) hidden states at coord positions -> CoordExp (coord-row projection + expectation)."""
    return coord_expectation(coord_logits(hidden, lm_head_weight, coord_ids, bias), tau=tau, top_k=top_k)


def tau_at(step: int, tau_start: float, tau_end: float, anneal_steps: int, schedule: str = "linear") -> float:
    """Temperature at ``step``: from ``tau_start`` to ``tau_end`` over ``anneal_steps``, then constant.

    >>> tau_at(5, 2.0, 1.0, 10)
    1.5
    >>> tau_at(50, 2.0, 1.0, 10, "cosine")
    1.0
    """
    if anneal_steps <= 0 or step >= anneal_steps:
        return float(tau_end)
    frac = max(step, 0) / anneal_steps
    if schedule == "linear":
        w = frac
    elif schedule == "cosine":
        w = 0.5 * (1.0 - math.cos(math.pi * frac))
    else:
        raise ValueError(f"unknown tau schedule {schedule!r}; use 'linear' or 'cosine'")
    return float(tau_start + (tau_end - tau_start) * w)
