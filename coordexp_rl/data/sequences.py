"""Training sequences: samples and rollout rows in, token sequences with their supervision out. No model.

A ``TrainSequence`` is one image + one token sequence (prompt + assistant turn) with its CE weights and
the coord positions that get CoordExp supervision. ``SequenceBuilder`` makes them with the processor
alone:

- Stage-1 (METHOD 5.2): the GT in canonical (or seeded random) order, CE weights, and the coord positions
  when a geometric Stage-1 term is on;
- Stage-2 (METHOD 6-7), per rollout row: the self-context sequence (the rollout's own tokens, coord
  positions of the gated pairs, the matched GT coordinates as targets) and the reordered-GT sequence;
  a row with nothing parsed falls back to the GT sequence (METHOD 6.1);
- the prompt check: a row whose prompt ids differ from the learner's own is refused (the engine and the
  learner must preprocess alike, or training is silently wrong).

The learner (``learner.learner.Learner``) only runs forwards and backwards on what this returns.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from PIL import Image

from coordexp_rl.config import Config
from coordexp_rl.data.loader import Sample, load_image
from coordexp_rl.method.coords import CoordVocab, bin_to_unit
from coordexp_rl.method.losses import position_weights
from coordexp_rl.method.matching import MatchParams
from coordexp_rl.method.protocol import BoxObject, build_assistant_ids, canonical_order, random_order
from coordexp_rl.method.semantic import make_semantic_distance
from coordexp_rl.method.stage2_targets import MatchSettings, stage2_targets
from coordexp_rl.modeling.inputs import encode_example, encode_prompt

# What a Stage-2 batch counts (summed over rows): the match (Stage2Targets.stats), and the rows that fell
# back to the GT sequence because nothing parsed (parse_failed) or the answer named no object (empty_answers).
STAGE2_STATS = ("matched", "missed", "extra", "rejected", "pred_objects", "appended", "reordered", "extra_eos",
                "parse_failed", "empty_answers")


class PromptMismatchError(ValueError):
    """The learner's rebuilt prompt ids differ from the ones the rollout engine used."""


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


@dataclass
class Stage2Batch:
    """A Stage-2 batch's sequences (self-context + reordered GT per row) and its match statistics."""

    sequences: list[TrainSequence]
    stats: dict[str, float]  # summed over rows: Stage2Targets.stats, parse_failed, empty_answers
    ious: list[float]  # IoU of every gated pair


class SequenceBuilder:
    """Every training sequence of a run, from its config and processor (``load_processor``'s)."""

    def __init__(self, cfg: Config, processor, vocab: CoordVocab):
        self.cfg, self.processor, self.vocab = cfg, processor, vocab
        m = cfg.matching
        self.match_settings = MatchSettings(
            geo_cost_weight=m.geo_cost_weight, overlap=m.geometry, missing_policy=m.missing_policy,
            eos_weight=cfg.loss.eos_weight, extra_eos_weight=cfg.loss.extra_eos_weight,
            gt_order=cfg.stage2.gt_order, semantic=make_semantic_distance(m.semantic))
        self._prompt_ids: dict[str, list[int]] = {}  # sample id -> the prompt's ids (the check's reference)

    def stage1(self, samples: list[Sample], step: int) -> list[TrainSequence]:
        """The GT sequences of a Stage-1 batch at optimizer step ``step`` (the step seeds a random order)."""
        loss = self.cfg.loss
        geometric = any((loss.lambda_l1, loss.lambda_giou, loss.lambda_soft_ce, loss.lambda_w1))
        return [self.gt_sequence(s, self.stage1_order(s, step), eos_weight=loss.eos_weight, with_coords=geometric)
                for s in samples]

    def stage2(self, rows: list, samples: dict[str, Sample], params: MatchParams) -> Stage2Batch:
        """Per rollout row (``coordexp_rl.rollout.schema.RolloutRow``, its GT looked up by sample id): a
        self-context sequence and a reordered-GT sequence, or the GT sequence when nothing parsed."""
        out = Stage2Batch([], dict.fromkeys(STAGE2_STATS, 0.0), [])
        for row in rows:
            sample = samples[row.sample_id]
            image = load_image(sample)
            self.check_prompt(row, sample, image)
            if not row.objects:  # METHOD 6.1: nothing usable -> the Stage-1 loss for this sample
                # an answer that parsed but named no object (end of turn at once) is not a parse failure
                out.stats["parse_failed" if row.parse_status == "failed" else "empty_answers"] += 1
                out.sequences.append(self.gt_sequence(sample, canonical_order(sample.objects), image=image,
                                                      eos_weight=self.cfg.loss.eos_weight, stage2=True))
                continue
            targets = stage2_targets(row.objects, sample.objects, params, self.match_settings)
            for k, v in targets.stats.items():
                out.stats[k] += v
            out.ious += targets.match.ious
            out.sequences += self._stage2_pair(sample, image, row, targets)
        return out

    def _stage2_pair(self, sample: Sample, image: Image.Image, row, targets) -> list[TrainSequence]:
        """METHOD 7.1 + 7.2: the self-context sequence (the gated pairs' coord positions in the rollout, the
        matched GT coordinates) and the GT sequence in the rollout's order; ``stage2.gt_order`` (in
        ``targets``), ``stage2.geo_context`` and ``stage2.gt_geometry`` switch parts for ablations (the
        config says how)."""
        s2 = self.cfg.stage2
        with_coords = s2.geo_context == "gt" or s2.gt_geometry
        gt = self.gt_sequence(sample, targets.gt_objects, image=image, eos_weight=targets.eos_weight,
                              stage2=True, with_coords=with_coords)
        if s2.geo_context == "gt":  # the gated pairs' GT boxes only, teacher-forced: 4 coord positions each
            gated = {j for _, j in targets.match.pairs}
            keep = [t for k, j in enumerate(targets.gt_indices) if j in gated for t in range(4 * k, 4 * k + 4)]
            gt.coord_positions = [gt.coord_positions[t] for t in keep]
            gt.coord_targets = [gt.coord_targets[t] for t in keep]
            return [gt]
        enc = encode_example(self.processor, image, self.cfg.data.prompt, row.generated_ids)
        prompt_len = enc.pop("prompt_len")
        return [TrainSequence(enc, prompt_len, coord_positions=[prompt_len + p for p in targets.coord_positions],
                              coord_targets=targets.coord_targets), gt]

    def stage1_order(self, sample: Sample, step: int) -> list[BoxObject]:
        if self.cfg.stage1.order == "random":
            # A stable seed (not hash(), which changes per process) so resumed runs see the same orders.
            seed = zlib.crc32(f"{self.cfg.run.seed}:{step}:{sample.sample_id}".encode())
            return random_order(sample.objects, seed=seed)
        return canonical_order(sample.objects)

    def gt_sequence(self, sample: Sample, objects: list[BoxObject], *, eos_weight: float,
                    image: Image.Image | None = None, with_coords: bool = False,
                    stage2: bool = False) -> TrainSequence:
        """A GT sequence with CE weights (METHOD 5.3 / 7.2); optionally its coord positions for L1/GIoU.
        ``stage2``: weigh the coord tokens with Stage-2's coord-CE weight instead of Stage-1's."""
        assistant = build_assistant_ids(objects, self.processor.tokenizer, self.vocab)
        enc = encode_example(self.processor, image or load_image(sample), self.cfg.data.prompt, assistant)
        prompt_len = enc.pop("prompt_len")
        loss = self.cfg.loss
        coord_ce = loss.lambda_coord_ce
        if stage2 and loss.lambda_coord_ce_stage2 is not None:
            coord_ce = loss.lambda_coord_ce_stage2
        weights = position_weights(enc["input_ids"], self.vocab, prompt_len, lambda_coord_ce=coord_ce,
                                   eos_weight=eos_weight, desc_weight=loss.desc_weight)
        seq = TrainSequence(enc, prompt_len, ce_weights=weights)
        if with_coords:
            bins = [self.vocab.bin_of(t) for t in enc["input_ids"].tolist()]
            seq.coord_positions = [t for t in range(prompt_len, len(bins)) if bins[t] is not None]
            seq.coord_targets = [bin_to_unit(bins[t]) for t in seq.coord_positions]
        return seq

    def check_prompt(self, row, sample: Sample, image: Image.Image) -> None:
        """Refuse a row whose prompt ids differ from the learner's: preprocessing drift between the engine
        and the learner would otherwise train on misaligned tokens without a sign."""
        ids = self._prompt_ids.get(sample.sample_id)
        if ids is None:
            ids = encode_prompt(self.processor, image, self.cfg.data.prompt)["input_ids"].tolist()
            self._prompt_ids[sample.sample_id] = ids
        if ids != list(row.prompt_ids):
            first = next((i for i, (a, b) in enumerate(zip(ids, row.prompt_ids)) if a != b),
                         min(len(ids), len(row.prompt_ids)))
            raise PromptMismatchError(
                f"rollout row {row.sample_id!r} (engine {row.engine!r}): prompt ids differ from the learner's "
                f"at position {first} (engine {len(row.prompt_ids)} tokens, learner {len(ids)}); the engine and "
                "the learner must use the same processor settings and prompt")
