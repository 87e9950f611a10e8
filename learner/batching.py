"""How a rank's sequences become micro-batches, and the supervised positions of one micro-batch's forward:
which hidden states feed CE and which feed CoordExp.

The sequences come from ``coordexp_rl.data.sequences`` (no model); padding them into one batch is
``coordexp_rl.modeling.inputs.collate``, packing them into one row ``coordexp_rl.modeling.inputs.pack``.
"""

from __future__ import annotations

from typing import Literal

import torch

from coordexp_rl.data.sequences import TrainSequence
from learner.distributed import split


def forward_tokens(seqs: list[TrainSequence], packed: bool = False) -> int:
    """Tokens one forward of ``seqs`` computes: padded, count x the longest; packed, the sum."""
    lengths = [len(s.input_ids) for s in seqs]
    return sum(lengths) if packed else len(lengths) * max(lengths, default=0)


def micro_batches(seqs: list[TrainSequence], parts: int, order: Literal["given", "length"] = "given",
                  max_tokens: int = 0, packed: bool = False) -> list[list[TrainSequence]]:
    """This rank's sequences as micro-batches (learner.micro_batch_order, learner.micro_batch_tokens).

    ``max_tokens`` 0: ``parts`` contiguous near-equal micro-batches (``split``), in the given order or
    sorted by length (stable), so that each pads to similar lengths. ``max_tokens`` > 0: in length order,
    each micro-batch takes the next sequence while its ``forward_tokens`` stays within ``max_tokens``; a
    sequence longer than that goes alone. Any split gives the same loss and gradients (every loss is a sum
    over the micro-batch / a global normaliser); only the padding, and so the time, differs.
    """
    if order == "length" or max_tokens:
        seqs = sorted(seqs, key=lambda s: len(s.input_ids))
    if not max_tokens:
        return split(seqs, parts)
    out: list[list[TrainSequence]] = []
    for s in seqs:
        if out and forward_tokens(out[-1] + [s], packed) <= max_tokens:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def gather_supervision(seqs: list[TrainSequence], hidden: torch.Tensor, packed: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Pick out of hidden (B, T, H) the states that predict supervised tokens.

    The state at t-1 predicts token t. Returns ce_hidden (N, H), ce_targets (N,), ce_weights (N,) for
    positions with CE weight != 0, and coord_hidden (P, H), coord_targets (P,) for CoordExp positions.
    ``packed``: hidden is (1, sum L, H), the sequences one after another in one row (inputs.pack).
    """
    ce_rows, ce_targets, ce_weights, coord_rows, coord_targets = [], [], [], [], []
    start = 0  # packed: the first position of sequence b in row 0
    for b, s in enumerate(seqs):
        row = hidden[0, start:start + len(s.input_ids)] if packed else hidden[b]
        start += len(s.input_ids)
        if s.ce_weights is not None:
            keep = (s.ce_weights[1:] != 0).nonzero().squeeze(1) + 1  # token positions, never 0
            ce_rows.append(row[keep - 1])
            ce_targets.append(s.input_ids[keep])
            ce_weights.append(s.ce_weights[keep])
        if s.coord_positions:
            pos = torch.tensor(s.coord_positions)
            coord_rows.append(row[pos - 1])
            coord_targets.append(torch.tensor(s.coord_targets, dtype=torch.float32))
    H = hidden.shape[-1]
    empty = hidden.new_zeros((0, H))
    return {
        "ce_hidden": torch.cat(ce_rows) if ce_rows else empty,
        "ce_targets": torch.cat(ce_targets) if ce_targets else torch.zeros(0, dtype=torch.long),
        "ce_weights": torch.cat(ce_weights) if ce_weights else torch.zeros(0),
        "coord_hidden": torch.cat(coord_rows) if coord_rows else empty,
        "coord_targets": torch.cat(coord_targets) if coord_targets else torch.zeros(0),
    }
