"""Losses of SPEC 5.3, 7 and 8: weighted token CE (chunked), box L1/GIoU, and the stage combiners.

Boxes are (x1, y1, x2, y2) in normalised [0, 1] coordinates. Every box helper first sorts each box's
coordinates, so an unconverged CoordExp box with x2 < x1 still has a meaningful area and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from coordexp_rl.coords import NUM_BINS, CoordVocab

# Guards divisions by a zero union/hull (degenerate boxes); clamp, not add, so normal boxes -- even one
# bin wide (area 1e-6) -- get exact values.
EPS = 1e-9

# ----------------------------------------------------------------------------------------------------
# Token cross entropy
# ----------------------------------------------------------------------------------------------------


@dataclass
class TokenCE:
    """Result of :func:`weighted_token_ce`. Normalise with ``loss_sum / weight_sum`` (or per batch)."""

    loss_sum: torch.Tensor  # () sum_t w_t * nll_t, differentiable
    weight_sum: torch.Tensor  # () sum_t w_t
    token_nll: torch.Tensor  # (T,) detached per-position NLL (0 where w_t == 0), for logging
    coord_logits: torch.Tensor | None = None  # (P, K) differentiable, when coord_positions were given


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """sum_t w_t * CE(h_t @ W.T + b, y_t) chunk by chunk, plus the (P, K) coord logits at P positions.

    The CE gradients are computed inside the forward, one chunk at a time (the approach of fused
    linear-cross-entropy kernels): at most one (chunk, V) logits buffer is alive at any moment, and the
    three matmuls are the naive path's three, so nothing is recomputed. Backward scales the stored
    gradients in place and adds the coord-logit gradients into the same (V, H) buffer, so the LM head
    gets a single gradient tensor (a separate CoordExp projection would add a second (V, H) one).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, keep, coord_pos, coord_ids, chunk_size):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # softmax dtype
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        nll = torch.zeros(keep.numel(), dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for lo in range(0, keep.numel(), chunk_size):
            idx = keep[lo:lo + chunk_size]
            h, y, w = hidden[idx], targets[idx], weights[idx].to(acc)  # (C, H), (C,), (C,)
            logits = h @ weight.T  # (C, V)
            if bias is not None:
                logits = logits + bias
            logits = logits.to(acc)  # a new buffer for bf16, the same one for fp32
            # Softmax in place in the one (C, V) buffer (torch.logsumexp would allocate a second one).
            picked = logits.gather(1, y[:, None]).squeeze(1)  # (C,) logit of the target
            top = logits.amax(dim=-1)  # (C,)
            denom = logits.sub_(top[:, None]).exp_().sum(dim=-1)  # buffer now holds exp(z - max)
            chunk_nll = top + denom.log() - picked
            nll[lo:lo + chunk_size] = chunk_nll
            total += (chunk_nll * w).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(w * nll)/dlogits = w * (softmax - onehot), still in the same buffer.
            g = logits.div_(denom[:, None])
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            g = g.mul_(w[:, None]).to(hidden.dtype)
            if need_h:
                grad_h[idx] = g @ weight  # positions in keep are unique
            if need_w:
                grad_w.addmm_(g.T, h)
            if need_b:
                grad_b += g.sum(0).to(grad_b.dtype)
            del logits, g
        coord_logits = None
        if coord_pos is not None:
            coord_logits = _coord_logits(hidden[coord_pos], weight, bias, coord_ids)  # (P, K)
        ctx.grads = [grad_h, grad_w, grad_b]
        ctx.save_for_backward(hidden, weight, coord_pos, coord_ids)
        ctx.mark_non_differentiable(nll)
        return total, nll, coord_logits

    @staticmethod
    def backward(ctx, grad_total, _grad_nll, grad_coord):
        if ctx.grads is None:
            raise RuntimeError("weighted_token_ce supports one backward per forward (no retain_graph reuse)")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # drop our references so autograd can take the buffers without a copy
        hidden, weight, coord_pos, coord_ids = ctx.saved_tensors
        for g in (grad_h, grad_w, grad_b):
            if g is not None:
                g.mul_(grad_total.to(g.dtype))
        if grad_coord is not None:
            gc = grad_coord.to(hidden.dtype)  # (P, K)
            if grad_h is not None:
                grad_h.index_add_(0, coord_pos, gc @ _rows(weight, coord_ids))
            if grad_w is not None:
                _rows_add(grad_w, coord_ids, gc.T @ hidden[coord_pos])
            if grad_b is not None:
                _rows_add(grad_b, coord_ids, gc.sum(0).to(grad_b.dtype))
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _contiguous_start(ids: torch.Tensor) -> int | None:
    if ids.numel() and bool((ids[1:] - ids[:-1] == 1).all()):
        return int(ids[0])
    return None


def _rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] as a view when ids are one contiguous range (the coord tokens are)."""
    start = _contiguous_start(ids)
    return table[start:start + ids.numel()] if start is not None else table.index_select(0, ids)


def _rows_add(table: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
    start = _contiguous_start(ids)
    if start is not None:
        table[start:start + ids.numel()] += values
    else:
        table.index_add_(0, ids, values)


def _coord_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  coord_ids: torch.Tensor) -> torch.Tensor:
    logits = h @ _rows(weight, coord_ids).T
    return logits if bias is None else logits + _rows(bias, coord_ids)


def weighted_token_ce(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                      weights: torch.Tensor, *, bias: torch.Tensor | None = None, chunk_size: int = 64,
                      coord_positions: torch.Tensor | None = None,
                      coord_ids: Sequence[int] | torch.Tensor | None = None) -> TokenCE:
    """Position-weighted token CE over the full vocabulary without materialising (T, V) logits.

    hidden (T, H) are the states that *predict* ``targets`` (T,) (the caller shifts by one); weights (T,)
    come from :func:`position_weights`. Positions with weight 0 are skipped entirely (no logits, zero
    gradient). Peak extra memory is about one (chunk_size, V) fp32 buffer plus the gradients.

    With ``coord_positions`` (P,) and ``coord_ids`` (K,), the result also carries the coord logits at
    those positions (``hidden[pos] @ W[coord_ids].T``) for :func:`coordexp_rl.coordexp.coord_expectation`,
    sharing the LM head's gradient buffer with the CE (use this instead of a separate
    :func:`coordexp_rl.coordexp.coordexp` call when both losses use the same forward).

    >>> h, W = torch.randn(3, 8), torch.randn(50, 8)
    >>> out = weighted_token_ce(h, W, torch.tensor([1, 2, 3]), torch.tensor([1.0, 0.0, 2.0]))
    >>> float(out.weight_sum)
    3.0
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1] or weights.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden (T, H), targets (T,), weights (T,); got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}, {tuple(weights.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if (coord_positions is None) != (coord_ids is None):
        raise ValueError("give both coord_positions and coord_ids, or neither")
    device = hidden.device
    keep = (weights != 0).nonzero().squeeze(1)  # supervised positions only
    pos = ids = None
    if coord_positions is not None:
        pos = torch.as_tensor(coord_positions, dtype=torch.long, device=device)
        ids = torch.as_tensor(coord_ids, dtype=torch.long, device=device)
    total, nll, coord_logits = _ChunkedLMHeadLoss.apply(hidden, lm_head_weight, bias, targets.long(), weights,
                                                        keep, pos, ids, chunk_size)
    token_nll = torch.zeros(hidden.shape[0], dtype=torch.float32, device=device)
    token_nll[keep] = nll.float()
    return TokenCE(total, weights.float().sum(), token_nll, coord_logits)


def position_weights(token_ids: Sequence[int] | torch.Tensor, vocab: CoordVocab, prompt_len: int, *,
                     lambda_coord_ce: float = 0.0, eos_weight: float = 1.0,
                     text_weight: float = 1.0) -> torch.Tensor:
    """Per-position CE weights (T,) for a full sequence (prompt + assistant turn), as float32.

    weights[t] is the weight of predicting token_ids[t]: prompt positions (t < prompt_len) 0; text and
    structure tokens ``text_weight``; coord tokens ``text_weight + lambda_coord_ce`` (SPEC 5.3: CE_all
    plus the coord-focused CE); the first end-of-turn token ``eos_weight``; anything after it 0 (the
    template's trailing newline is never generated). Use ``weights[1:]`` with ``hidden[:-1]``.

    >>> v = CoordVocab(tuple(range(100, 1100)), 1, 2, 3, 4, 5, 6, eos_id=9)
    >>> position_weights([7, 7, 1, 3, 50, 4, 5, 100, 101, 102, 103, 6, 2, 9, 8], v, 2,
    ...                  lambda_coord_ce=0.5, eos_weight=2.0).tolist()
    [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5, 1.5, 1.5, 1.5, 1.0, 1.0, 2.0, 0.0]
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if not 0 <= prompt_len <= ids.numel():
        raise ValueError(f"prompt_len {prompt_len} is outside 0..{ids.numel()} (sequence length)")
    weights = torch.full(ids.shape, float(text_weight), dtype=torch.float32)
    coord_ids = torch.as_tensor(vocab.coord_ids, dtype=torch.long)
    weights[torch.isin(ids, coord_ids)] += lambda_coord_ce
    weights[:prompt_len] = 0.0
    eos = (ids[prompt_len:] == vocab.eos_id).nonzero()
    if eos.numel():
        first = prompt_len + int(eos[0])
        weights[first] = eos_weight
        weights[first + 1:] = 0.0
    return weights


# ----------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------


def _sorted(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(..., 4) -> x1, y1, x2, y2 with x1 <= x2 and y1 <= y2 (min/max keep the gradient)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.minimum(x1, x2), torch.minimum(y1, y2), torch.maximum(x1, x2), torch.maximum(y1, y2)


def _iou_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of boxes that broadcast against each other (..., 4)."""
    ax1, ay1, ax2, ay2 = _sorted(a)
    bx1, by1, bx2, by2 = _sorted(b)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    iw = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    inter = iw * ih
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=EPS)
    hull = (torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)) * (torch.maximum(ay2, by2) - torch.minimum(ay1, by1))
    giou = iou - (hull - union) / hull.clamp(min=EPS)
    return iou, giou


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: (N, 4), (M, 4) -> (N, M)."""
    return _iou_giou(a[:, None, :], b[None, :, :])[0]


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU in [-1, 1]: (N, 4), (M, 4) -> (N, M)."""
    return _iou_giou(a[:, None, :], b[None, :, :])[1]


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of row i of a with row i of b: (N, 4), (N, 4) -> (N,)."""
    return _iou_giou(a, b)[0]


def _reduce(per_box: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_box.sum()
    if reduction == "mean":
        return per_box.mean() if per_box.numel() else per_box.sum()
    if reduction == "none":
        return per_box
    raise ValueError(f"unknown reduction {reduction!r}; use 'sum', 'mean' or 'none'")


def l1_box_loss(pred: torch.Tensor, gt: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``||pred_i - gt_i||_1`` per box (sum over the 4 coordinates), then reduced over boxes."""
    return _reduce((pred - gt.to(pred.dtype)).abs().sum(-1), reduction)


def giou_loss(pred: torch.Tensor, gt: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """``1 - GIoU(pred_i, gt_i)`` per box, in [0, 2], then reduced over boxes."""
    return _reduce(1.0 - _iou_giou(pred, gt.to(pred.dtype))[1], reduction)


def geo_loss(pred: torch.Tensor, gt: torch.Tensor, *, alpha: float = 1.0, beta: float = 1.0,
             reduction: str = "sum") -> torch.Tensor:
    """SPEC 7.1 step E: ``alpha * L1 + beta * (1 - GIoU)`` per matched box, summed by default."""
    per_box = alpha * l1_box_loss(pred, gt, "none") + beta * giou_loss(pred, gt, "none")
    return _reduce(per_box, reduction)


def coord_l1(expectation: torch.Tensor, target_bins: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """SPEC 5.3 ``L_L1_coord``: ``|c_t - bin_t / 1000|`` over coord positions (P,)."""
    target = target_bins.to(expectation.dtype) / NUM_BINS
    return _reduce((expectation - target).abs(), reduction)


# ----------------------------------------------------------------------------------------------------
# Stage combiners
# ----------------------------------------------------------------------------------------------------


def _term(value: torch.Tensor | float | None) -> float:
    if value is None:
        return 0.0
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def stage1_loss(ce_all: torch.Tensor, *, ce_coord: torch.Tensor | None = None, l1_coord: torch.Tensor | None = None,
                giou_coord: torch.Tensor | None = None, lambda_coord_ce: float = 0.0, lambda_l1: float = 0.0,
                lambda_giou: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """SPEC 5.3: ``L_CE_all + lambda_coordCE * L_CE_coord + lambda_L1 * L_L1_coord``, plus the optional
    ``lambda_giou * (1 - GIoU)`` of the CoordExp boxes at the GT coord positions (the issue's "CE +
    CoordExp L1/GIoU" Stage-1 variant).

    Pass ``ce_coord=None`` when the coord weight is already folded into :func:`position_weights`.
    Returns (total, terms) where terms holds every raw term and the total as floats, for logging.
    """
    total = ce_all
    for value, lam in ((ce_coord, lambda_coord_ce), (l1_coord, lambda_l1), (giou_coord, lambda_giou)):
        if value is not None and lam:
            total = total + lam * value
    terms = {"ce_all": _term(ce_all), "ce_coord": _term(ce_coord), "l1_coord": _term(l1_coord),
             "giou_coord": _term(giou_coord), "total": _term(total)}
    return total, terms


def stage2_loss(ce_gt: torch.Tensor, geo_self: torch.Tensor | None = None, *, ce_coord: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, lambda_geo: float = 1.0, lambda_coord_ce: float = 0.0,
                lambda_ent: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """SPEC 8: ``L_CE(y_GT_reordered) + lambda_geo * L_geo_self + lambda_coordCE * L_CE_coord
    + lambda_ent * L_entropy``. A term given as None (or with weight 0) is left out of the total."""
    total = ce_gt
    for value, lam in ((geo_self, lambda_geo), (ce_coord, lambda_coord_ce), (entropy, lambda_ent)):
        if value is not None and lam:
            total = total + lam * value
    terms = {"ce_gt": _term(ce_gt), "geo_self": _term(geo_self), "ce_coord": _term(ce_coord),
             "entropy": _term(entropy), "total": _term(total)}
    return total, terms
