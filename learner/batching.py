"""The supervised positions of a padded batch: which hidden states feed CE and which feed CoordExp.

The sequences come from ``coordexp_rl.data.sequences`` (no model); padding them into one batch is
``coordexp_rl.modeling.inputs.collate``.
"""

from __future__ import annotations

import torch

from coordexp_rl.data.sequences import TrainSequence


def gather_supervision(seqs: list[TrainSequence], hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pick out of hidden (B, T, H) the states that predict supervised tokens.

    The state at t-1 predicts token t. Returns ce_hidden (N, H), ce_targets (N,), ce_weights (N,) for
    positions with CE weight != 0, and coord_hidden (P, H), coord_targets (P,) for CoordExp positions.
    """
    ce_rows, ce_targets, ce_weights, coord_rows, coord_targets = [], [], [], [], []
    for b, s in enumerate(seqs):
        if s.ce_weights is not None:
            keep = (s.ce_weights[1:] != 0).nonzero().squeeze(1) + 1  # token positions, never 0
            ce_rows.append(hidden[b, keep - 1])
            ce_targets.append(s.input_ids[keep])
            ce_weights.append(s.ce_weights[keep])
        if s.coord_positions:
            pos = torch.tensor(s.coord_positions)
            coord_rows.append(hidden[b, pos - 1])
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
