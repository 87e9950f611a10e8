"""Losses of METHOD 5.3, 7 and 8: weighted token CE (chunked), box L1/GIoU, and the stage combiners.

Boxes are (x1, y1, x2, y2) in normalised [0, 1] coordinates. An inverted box (x2 < x1 or y2 < y1) has
area 0, as evaluation counts it (IoU 0 with anything); :func:`giou_loss` adds the inversion depth so its
gradient un-inverts the box instead of pushing the crossed coordinates further apart.

Normalisation (one rule for both stages, METHOD 5.3 / 8 in their sum form). With W the batch's total CE
weight, ``W = sum_t w_t`` over every supervised token of the batch's GT (Stage-1) or reordered-GT
(Stage-2) sequences, and ``w_t`` from :func:`position_weights`:

    Stage-1:  L = ( sum_t w_t nll_t + lambda_L1 sum_coords |c_t - c*_t| + lambda_GIoU sum_boxes giou_t
                    + lambda_softCE sum_coords softCE_t + lambda_W1 sum_coords W1_t ) / W
    Stage-2:  L = ( sum_t w_t nll_t + lambda_geo sum_{gated pairs} (alpha ||b - b*||_1 + beta giou)
                    + lambda_ent sum_coords H_t ) / W

where ``w_t`` = ``desc_weight`` inside ``<desc> ... </desc>``, ``1 + lambda_coord_ce`` on coord tokens, 1 on
other structure/text tokens, ``eos_weight`` on the end of turn, 0 on the prompt, and ``giou = 1 - GIoU
+ inversion``. Every term is a sum; the single divisor W makes a lambda mean "weight of one unit of this
term against one unit of CE weight" in both stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from coordexp_rl.method import coordexp  # coord-row gathering (the CoordExp decode's, one copy)
from coordexp_rl.method.coords import NUM_BINS, CoordVocab

if TYPE_CHECKING:
    from coordexp_rl.config import LossConfig

# Guards divisions by a zero union/hull (degenerate boxes); clamp, not add, so normal boxes -- even one
# bin wide (area 1e-6) -- get exact values.
EPS = 1e-9
# Rows of a bf16 chunk's logits converted to float32 at a time in the CE's softmax: a (32, V) float32 block
# is 20 MB at Qwen3-VL's vocabulary, against 78 MB for a 256-row chunk's bf16 logits.
FLOAT32_BLOCK_ROWS = 32

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
        need_grad = need_h or need_w or need_b
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # softmax dtype
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        nll = torch.zeros(keep.numel(), dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for lo in range(0, keep.numel(), chunk_size):
            idx = keep[lo:lo + chunk_size]
            h, y, w = hidden[idx], targets[idx], weights[idx].to(acc)  # (C, H), (C,), (C,)
            logits = h @ weight.T  # (C, V) in the hidden dtype
            if bias is not None:
                logits = logits + bias
            if logits.dtype == acc:
                chunk_nll = _nll_and_grad_(logits, y, w, need_grad)  # logits now hold the gradient
            else:
                # bf16: the float32 softmax runs on row blocks and writes each block's gradient back into the
                # bf16 buffer, so at most a (rows, V) float32 copy exists beside the (C, V) bf16 logits (a
                # whole-chunk float32 copy is 2x the bf16 logits, and another bf16 one held the gradient).
                # Rows are independent: the values equal a whole-chunk float32 pass.
                chunk_nll = torch.empty(len(y), dtype=acc, device=hidden.device)
                for r in range(0, len(y), FLOAT32_BLOCK_ROWS):
                    rows = slice(r, r + FLOAT32_BLOCK_ROWS)
                    block = logits[rows].to(acc)  # (rows, V)
                    chunk_nll[rows] = _nll_and_grad_(block, y[rows], w[rows], need_grad)
                    if need_grad:
                        logits[rows] = block
                    del block
            nll[lo:lo + chunk_size] = chunk_nll
            total += (chunk_nll * w).sum()
            if not need_grad:
                continue
            g = logits.to(hidden.dtype)  # (C, V) d(w * nll)/dlogits; the same buffer unless fp32 logits of bf16
            if need_h:
                grad_h[idx] = g @ weight  # positions in keep are unique
            if need_w:
                grad_w.addmm_(g.T, h)
            if need_b:
                grad_b += g.sum(0).to(grad_b.dtype)
            del logits, g
        coord_logits = None
        if coord_pos is not None:
            coord_logits = coordexp.coord_logits(hidden[coord_pos], weight, coord_ids, bias)  # (P, K)
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
                grad_h.index_add_(0, coord_pos, gc @ coordexp.coord_rows(weight, coord_ids))
            if grad_w is not None:
                _rows_add(grad_w, coord_ids, gc.T @ hidden[coord_pos])
            if grad_b is not None:
                _rows_add(grad_b, coord_ids, gc.sum(0).to(grad_b.dtype))
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _nll_and_grad_(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """(C,) NLL of ``y`` under ``logits`` (C, V); with ``need_grad`` the buffer ends holding
    ``w * (softmax - onehot)``, the gradient of ``sum w * nll``. In place: torch.logsumexp would allocate a
    second (C, V) buffer."""
    picked = logits.gather(1, y[:, None]).squeeze(1)  # (C,) logit of the target
    top = logits.amax(dim=-1)  # (C,)
    denom = logits.sub_(top[:, None]).exp_().sum(dim=-1)  # buffer now holds exp(z - max)
    nll = top + denom.log() - picked
    if need_grad:
        logits.div_(denom[:, None])
        logits[torch.arange(len(y), device=logits.device), y] -= 1.0
        logits.mul_(w[:, None])
    return nll


def _rows_add(table: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
    start = coordexp.contiguous_start(ids)
    if start is not None:
        table[start:start + ids.numel()] += values
    else:
        table.index_add_(0, ids, values)


def weighted_token_ce(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                      weights: torch.Tensor, *, bias: torch.Tensor | None = None, chunk_size: int = 64,
                      coord_positions: torch.Tensor | None = None,
                      coord_ids: Sequence[int] | torch.Tensor | None = None) -> TokenCE:
    """Position-weighted token CE over the full vocabulary without materialising (T, V) logits.

    hidden (T, H) are the states that *predict* ``targets`` (T,) (the caller shifts by one); weights (T,)
    come from :func:`position_weights`. Positions with weight 0 are skipped entirely (no logits, zero
    gradient). Logits are computed in the hidden dtype, the log-sum-exp in float32 (float64 for float64):
    peak extra memory is one (chunk_size, V) logits buffer in the hidden dtype, plus a (32, V) float32
    block when that dtype is bf16/fp16, plus the gradients. Up to ``chunk_size`` supervised positions run as
    one chunk, exactly the naive path's three matmuls; longer sequences are chunked.

    With ``coord_positions`` (P,) and ``coord_ids`` (K,), the result also carries the coord logits at
    those positions (``hidden[pos] @ W[coord_ids].T``) for :func:`coordexp_rl.method.coordexp.coord_expectation`,
    sharing the LM head's gradient buffer with the CE (use this instead of a separate
    :func:`coordexp_rl.method.coordexp.coordexp` call when both losses use the same forward).

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
                     text_weight: float = 1.0, desc_weight: float | None = None) -> torch.Tensor:
    """Per-position CE weights (T,) for a full sequence (prompt + assistant turn), as float32.

    weights[t] is the weight of predicting token_ids[t]: prompt positions (t < prompt_len) 0; structure
    and other text tokens ``text_weight``; description tokens (strictly between ``<desc>`` and
    ``</desc>``) ``desc_weight`` (None = ``text_weight``); coord tokens ``text_weight + lambda_coord_ce``
    (METHOD 5.3: CE_all plus the coord-focused CE); the first end-of-turn token ``eos_weight``; anything
    after it 0 (the template's trailing newline is never generated). Use ``weights[1:]`` with
    ``hidden[:-1]``.

    >>> v = CoordVocab(tuple(range(100, 1100)), 1, 2, 3, 4, 5, 6, eos_id=9)
    >>> position_weights([7, 7, 1, 3, 50, 4, 5, 100, 101, 102, 103, 6, 2, 9, 8], v, 2,
    ...                  lambda_coord_ce=0.5, eos_weight=2.0, desc_weight=3.0).tolist()
    [0.0, 0.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.5, 1.5, 1.5, 1.5, 1.0, 1.0, 2.0, 0.0]
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    if not 0 <= prompt_len <= ids.numel():
        raise ValueError(f"prompt_len {prompt_len} is outside 0..{ids.numel()} (sequence length)")
    weights = torch.full(ids.shape, float(text_weight), dtype=torch.float32)
    coord_ids = torch.as_tensor(vocab.coord_ids, dtype=torch.long)
    weights[torch.isin(ids, coord_ids)] += lambda_coord_ce
    if desc_weight is not None:
        weights[_inside_desc(ids, vocab)] = float(desc_weight)
    weights[:prompt_len] = 0.0
    eos = (ids[prompt_len:] == vocab.eos_id).nonzero()
    if eos.numel():
        first = prompt_len + int(eos[0])
        weights[first] = eos_weight
        weights[first + 1:] = 0.0
    return weights


def _inside_desc(ids: torch.Tensor, vocab: CoordVocab) -> torch.Tensor:
    """(T,) bool: tokens strictly between a ``<desc>`` and the next ``</desc>``."""
    depth = torch.cumsum((ids == vocab.desc_open).long() - (ids == vocab.desc_close).long(), 0)
    return (depth > 0) & (ids != vocab.desc_open)


# ----------------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------------


def _iou_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of boxes that broadcast against each other (..., 4); inverted boxes have area 0."""
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    area_a = (ax2 - ax1).clamp(min=0) * (ay2 - ay1).clamp(min=0)
    area_b = (bx2 - bx1).clamp(min=0) * (by2 - by1).clamp(min=0)
    iw = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    inter = iw * ih
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=EPS)
    # The hull spans every corner, so it also encloses an inverted box's crossed coordinates.
    hull_w = torch.maximum(torch.maximum(ax1, ax2), torch.maximum(bx1, bx2)) - \
        torch.minimum(torch.minimum(ax1, ax2), torch.minimum(bx1, bx2))
    hull_h = torch.maximum(torch.maximum(ay1, ay2), torch.maximum(by1, by2)) - \
        torch.minimum(torch.minimum(ay1, ay2), torch.minimum(by1, by2))
    hull = hull_w * hull_h
    giou = iou - (hull - union) / hull.clamp(min=EPS)
    return iou, giou


def inversion(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) -> (...): ``relu(x1 - x2) + relu(y1 - y2)``, how far a box is turned inside out."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return (x1 - x2).clamp(min=0) + (y1 - y2).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: (N, 4), (M, 4) -> (N, M)."""
    return _iou_giou(a[:, None, :], b[None, :, :])[0]


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU in [-1, 1]: (N, 4), (M, 4) -> (N, M)."""
    return _iou_giou(a[:, None, :], b[None, :, :])[1]


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
    """``1 - GIoU(pred_i, gt_i) + inversion(pred_i)`` per box, then reduced over boxes.

    A proper box gets the plain GIoU loss in [0, 2]. An inverted one counts as empty (IoU 0, as in
    evaluation) and pays its inversion depth, whose gradient moves x1 left of x2 (and y1 above y2).
    """
    return _reduce(1.0 - _iou_giou(pred, gt.to(pred.dtype))[1] + inversion(pred), reduction)


def geo_loss(pred: torch.Tensor, gt: torch.Tensor, *, alpha: float = 1.0, beta: float = 1.0,
             reduction: str = "sum") -> torch.Tensor:
    """METHOD 7.1 step E: ``alpha * L1 + beta * (1 - GIoU)`` per matched box, summed by default."""
    per_box = alpha * l1_box_loss(pred, gt, "none") + beta * giou_loss(pred, gt, "none")
    return _reduce(per_box, reduction)


def coord_l1(expectation: torch.Tensor, target_bins: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """METHOD 5.3 ``L_L1_coord``: ``|c_t - bin_t / 1000|`` over coord positions (P,)."""
    target = target_bins.to(expectation.dtype) / NUM_BINS
    return _reduce((expectation - target).abs(), reduction)


def coord_soft_ce(logits: torch.Tensor, target_bins: torch.Tensor, sigma: float = 2.0,
                  reduction: str = "sum") -> torch.Tensor:
    """Soft CE over neighbouring bins: ``-sum_k q_k log softmax(s)_k`` per coord position, where
    ``q_k ~ exp(-(k - bin)^2 / (2 sigma^2))`` (sigma in bins) spreads the target over its neighbours
    (the CoordExp reference's Stage-1 distribution loss). logits (P, K) over the coord tokens.

    >>> round(coord_soft_ce(torch.zeros(1, 1000), torch.tensor([500])).item(), 4)  # uniform: log 1000
    6.9078
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 bins, got {sigma}")
    k = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    q = torch.softmax(-(k[None, :] - target_bins.to(k)[:, None]) ** 2 / (2 * sigma ** 2), dim=-1)  # (P, K)
    return _reduce(-(q * logits.float().log_softmax(-1)).sum(-1), reduction)


def coord_w1(logits: torch.Tensor, target_bins: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Wasserstein-1 between the coord distribution and the target bin: ``sum_k p_k |k - bin| / 1000``
    per position, in the same [0, 1] units as L1. Unlike L1 of the expectation, a distribution split
    around the target pays for its spread.

    >>> two_peaks = torch.tensor([[0.0, -1e4, 0.0]])  # half on bin 0, half on bin 2; target bin 1
    >>> round(coord_w1(two_peaks, torch.tensor([1])).item() * 1000, 4)
    1.0
    """
    k = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    dist = (k[None, :] - target_bins.to(k)[:, None]).abs() / NUM_BINS  # (P, K)
    return _reduce((logits.float().softmax(-1) * dist).sum(-1), reduction)


# ----------------------------------------------------------------------------------------------------
# Stage combiners
# ----------------------------------------------------------------------------------------------------


def coord_terms(stage: str, loss: LossConfig, out: coordexp.CoordExpOutput | None = None,
                targets: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor | None, float]]:
    """The geometric terms of ``stage`` ("stage1" / "stage2") as in the module docstring, each a SUM over
    this batch's coord positions (the caller divides by W): ``{name: (sum, lambda)}``.

    ``out``: CoordExp at the coord positions (P = 4 per box, box-major); ``targets``: (P,) target
    coordinates in [0, 1]. Without ``out`` (no coord position in this batch) every sum is None.
    """
    if stage == "stage1":
        lambdas = {"l1_coord": loss.lambda_l1, "giou_coord": loss.lambda_giou,
                   "soft_ce_coord": loss.lambda_soft_ce, "w1_coord": loss.lambda_w1}
    else:
        lambdas = {"geo_self": loss.lambda_geo, "entropy": loss.lambda_entropy}
    if out is None:
        return {k: (None, lam) for k, lam in lambdas.items()}
    boxes, gt = out.expectation.view(-1, 4), targets.view(-1, 4)
    if stage == "stage1":
        bins = (targets * NUM_BINS).round()
        # The distribution terms cost a (P, 1000) pass each: computed only when weighed.
        values = {"l1_coord": coord_l1(out.expectation, bins), "giou_coord": giou_loss(boxes, gt),
                  "soft_ce_coord": coord_soft_ce(out.logits, bins, loss.soft_ce_sigma) if loss.lambda_soft_ce else None,
                  "w1_coord": coord_w1(out.logits, bins) if loss.lambda_w1 else None}
    else:
        values = {"geo_self": geo_loss(boxes, gt, alpha=loss.alpha_l1, beta=loss.beta_giou),
                  "entropy": out.entropy.sum()}
    return {k: (values[k], lam) for k, lam in lambdas.items()}


def _term(value: torch.Tensor | float | None) -> float:
    if value is None:
        return 0.0
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def weighted_total(base: torch.Tensor, terms: dict[str, tuple[torch.Tensor | None, float]],
                   base_name: str = "ce") -> tuple[torch.Tensor, dict[str, float]]:
    """``base + sum lambda * value`` over ``terms = {name: (value, lambda)}``; a term given as None (or
    with lambda 0) is left out. Returns (total, every raw term and the total as floats, for logging).

    >>> total, logged = weighted_total(torch.tensor(2.0), {"l1": (torch.tensor(0.5), 2.0), "w1": (None, 1.0)})
    >>> float(total), logged
    (3.0, {'ce': 2.0, 'l1': 0.5, 'w1': 0.0, 'total': 3.0})
    """
    total = base
    for value, lam in terms.values():
        if value is not None and lam:
            total = total + lam * value
    logged = {base_name: _term(base), **{k: _term(v) for k, (v, _) in terms.items()}, "total": _term(total)}
    return total, logged
