"""Sequences the learner trains on, and how they are padded into one batch.

Padding into a batch is `coordexp_rl.modeling.inputs.collate`. A `TrainSequence` is one image + one token
sequence (prompt + assistant turn) with its CE weights and the coord positions that get CoordExp
supervision. Stage-1 builds GT sequences; Stage-2 builds a self-context sequence (the rollout) and a
reordered-GT sequence per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TrainSequence:
    enc: dict  # model inputs of one example (coordexp_rl.modeling.inputs): input_ids (L,), images, ...
    prompt_len: int
    ce_weights: torch.Tensor | None = None  # (T,) weight of predicting input_ids[t]; None = no CE
    # Positions t of coord tokens to decode, 4 per box in x1 y1 x2 y2 order, and the GT coordinate in
    # [0, 1] each should move toward.
    coord_positions: list[int] = field(default_factory=list)
    coord_targets: list[float] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.enc["input_ids"]


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
