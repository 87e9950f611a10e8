"""The Learner: Stage-1 SFT steps and Stage-2 EM steps on one process (no Ray needed).

Stage-1 (SPEC 5): teacher forcing on canonical GT sequences; CE (+ coord CE) (+ CoordExp L1).
Stage-2 (SPEC 6-8), per rollout row: Hungarian match of the parsed predictions to GT; a self-context
forward on the rollout tokens with CoordExp L1 + GIoU at matched coord positions toward the GT boxes;
a reordered-GT forward with CE. Both forwards of a whole batch run as one padded batch.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from coordexp_rl.config import Config
from coordexp_rl.coordexp import coordexp, tau_at
from coordexp_rl.coords import NUM_BINS, bin_to_unit
from coordexp_rl.data.loader import Sample, load_image
from coordexp_rl.losses import coord_l1, geo_loss, position_weights, stage1_loss, stage2_loss, weighted_token_ce
from coordexp_rl.matching import MatchCurriculum, match_objects
from coordexp_rl.modeling.inputs import collate, encode_example, encode_prompt
from coordexp_rl.modeling.load import load_model_and_processor
from coordexp_rl.protocol import BoxObject, build_assistant_ids, canonical_order, random_order
from coordexp_rl.reorder import reorder_gt
from coordexp_rl.rollout_schema import RolloutRow
from coordexp_rl.semantic import make_semantic_distance
from learner.batching import Sequence, gather_supervision
from learner.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


class PromptMismatchError(ValueError):
    """The learner's rebuilt prompt ids differ from the ones the rollout engine used."""


class Learner:
    def __init__(self, cfg: Config, model_path: str | Path):
        self.cfg = cfg
        torch.manual_seed(cfg.run.seed)
        # Parameters stay float32 (master weights: bf16 would round lr 1e-5 updates away); bfloat16 runs
        # the forward under autocast on GPUs.
        self.device = torch.device("cuda" if cfg.learner.gpus > 0 and torch.cuda.is_available() else "cpu")
        self.autocast = cfg.model.dtype == "bfloat16" and self.device.type == "cuda"
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # AdamW moments decay into denormals, which crawl on CPUs
        self.model, self.processor, self.vocab = load_model_and_processor(model_path, "float32", str(self.device))
        self.tokenizer = self.processor.tokenizer
        self.model.train()
        if cfg.model.freeze_vision:
            for p in self.model.model.visual.parameters():
                p.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        total = max(1, cfg.stage1.steps + cfg.stage2.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg, total))
        m = cfg.matching
        self.curriculum = MatchCurriculum(
            start_step=0, ramp_steps=m.curriculum_steps, lambda_sem_start=m.lambda_sem_start,
            lambda_sem_end=m.lambda_sem_end, iou_thr_start=m.iou_thr_start, iou_thr_end=m.iou_thr_end,
            l1_thr_start=m.l1_thr_start, l1_thr_end=m.l1_thr_end)
        self.semantic = make_semantic_distance(m.semantic)
        self.step = 0  # optimizer steps taken (both stages)
        self.stage2_steps = 0  # Stage-2 steps taken (drives the matching curriculum)
        self.version = 0  # published weight version: bumps when weights go to the rollout engines
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._prompt_cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------------------------------------

    def stage1_step(self, samples: list[Sample]) -> dict[str, float]:
        """SPEC 5.3 on a batch of GT samples; returns the logged terms."""
        t0 = time.perf_counter()
        seqs = [self._gt_sequence(s, self._stage1_order(s), eos_weight=self.cfg.loss.eos_weight,
                                  with_coords=self.cfg.loss.lambda_l1 > 0) for s in samples]
        sup = self._forward(seqs)
        ce = self._ce(sup)
        l1 = None
        if sup["coord_hidden"].shape[0]:
            out = self._coordexp(sup["coord_hidden"])
            l1 = coord_l1(out.expectation, sup["coord_targets"] * NUM_BINS, reduction="mean")
        total, terms = stage1_loss(ce, l1_coord=l1, lambda_l1=self.cfg.loss.lambda_l1)
        metrics = self._optimize(total, terms, "stage1")
        metrics["tokens_per_s"] = sum(len(s.input_ids) for s in seqs) / (time.perf_counter() - t0)
        return metrics

    def stage2_step(self, rows: list[RolloutRow], samples: dict[str, Sample]) -> dict[str, float]:
        """SPEC 6-8 on a batch of rollout rows (their GT looked up by sample id)."""
        t0 = time.perf_counter()
        params = self.curriculum.at(self.stage2_steps)
        seqs: list[Sequence] = []
        stats = {"matched": 0, "missed": 0, "extra": 0, "rejected": 0, "parse_failed": 0}
        ious: list[float] = []
        for row in rows:
            sample = samples[row.sample_id]
            image = load_image(sample)
            self._check_prompt(row, sample, image)
            if not row.objects:  # SPEC 6.1 note: nothing usable -> Stage-1 loss for this sample
                stats["parse_failed"] += 1
                seqs.append(self._gt_sequence(sample, canonical_order(sample.objects), image=image,
                                              eos_weight=self.cfg.loss.eos_weight))
                continue
            match = match_objects(
                [[bin_to_unit(b) for b in o.bins] for o in row.objects],
                [[bin_to_unit(b) for b in o.bins] for o in sample.objects],
                [o.desc for o in row.objects], [o.desc for o in sample.objects],
                lambda_geo=self.cfg.matching.lambda_geo, lambda_sem=params.lambda_sem,
                overlap=self.cfg.matching.geometry, iou_thr=params.iou_thr, l1_thr=params.l1_thr,
                semantic=self.semantic)
            stats["matched"] += len(match.pairs)
            stats["missed"] += len(match.unmatched_gt)
            stats["extra"] += len(match.unmatched_pred)
            stats["rejected"] += len(match.rejected)
            ious += match.ious
            seqs.append(self._self_context_sequence(row, sample, match.pairs, image))
            reordered = reorder_gt(sample.objects, match, self.cfg.matching.missing_policy)
            eos_weight = self.cfg.loss.extra_eos_weight if reordered.over_generated else self.cfg.loss.eos_weight
            seqs.append(self._gt_sequence(sample, reordered.objects, image=image, eos_weight=eos_weight))
        sup = self._forward(seqs)
        ce = self._ce(sup)
        geo = entropy = None
        if sup["coord_hidden"].shape[0]:
            out = self._coordexp(sup["coord_hidden"])
            boxes, targets = out.expectation.view(-1, 4), sup["coord_targets"].view(-1, 4)
            geo = geo_loss(boxes, targets, alpha=self.cfg.loss.alpha_l1, beta=self.cfg.loss.beta_giou,
                           reduction="mean")
            entropy = out.entropy.mean()
        total, terms = stage2_loss(ce, geo, entropy=entropy, lambda_geo=self.cfg.loss.lambda_geo,
                                   lambda_ent=self.cfg.loss.lambda_entropy)
        self.stage2_steps += 1
        metrics = self._optimize(total, terms, "stage2")
        n = max(1, len(rows))
        metrics.update({f"match/{k}": v / n for k, v in stats.items() if k != "parse_failed"})
        metrics["match/parse_failure_rate"] = stats["parse_failed"] / n
        metrics["match/mean_iou"] = sum(ious) / len(ious) if ious else 0.0
        metrics["match/iou_thr"] = params.iou_thr
        metrics["weight_version_lag"] = self.version - min((r.weight_version for r in rows), default=self.version)
        metrics["tokens_per_s"] = sum(len(s.input_ids) for s in seqs) / (time.perf_counter() - t0)
        return metrics

    # ------------------------------------------------------------------------------------------------
    # Sequences
    # ------------------------------------------------------------------------------------------------

    def _stage1_order(self, sample: Sample) -> list[BoxObject]:
        if self.cfg.stage1.order == "random":
            # A stable seed (not hash(), which changes per process) so resumed runs see the same orders.
            seed = zlib.crc32(f"{self.cfg.run.seed}:{self.step}:{sample.sample_id}".encode())
            return random_order(sample.objects, seed=seed)
        return canonical_order(sample.objects)

    def _gt_sequence(self, sample: Sample, objects: list[BoxObject], *, eos_weight: float,
                     image: Image.Image | None = None, with_coords: bool = False) -> Sequence:
        """A GT sequence with CE weights (SPEC 5.2 / 7.2); optionally its coord positions for L1."""
        assistant = build_assistant_ids(objects, self.tokenizer, self.vocab)
        enc = encode_example(self.processor, image or load_image(sample), self.cfg.data.prompt, assistant)
        prompt_len = enc.pop("prompt_len")
        weights = position_weights(enc["input_ids"], self.vocab, prompt_len,
                                   lambda_coord_ce=self.cfg.loss.lambda_coord_ce, eos_weight=eos_weight)
        seq = Sequence(enc, prompt_len, ce_weights=weights)
        if with_coords:
            bins = [self.vocab.bin_of(t) for t in enc["input_ids"].tolist()]
            seq.coord_positions = [t for t in range(prompt_len, len(bins)) if bins[t] is not None]
            seq.coord_targets = [bin_to_unit(bins[t]) for t in seq.coord_positions]
        return seq

    def _self_context_sequence(self, row: RolloutRow, sample: Sample, pairs: list[tuple[int, int]],
                               image: Image.Image) -> Sequence:
        """SPEC 7.1: the rollout as context; matched coord positions move toward their GT boxes."""
        enc = encode_example(self.processor, image, self.cfg.data.prompt, row.generated_ids)
        seq = Sequence(enc, enc.pop("prompt_len"))
        prompt_len = seq.prompt_len
        for i, j in pairs:
            seq.coord_positions += [prompt_len + p for p in row.objects[i].coord_positions]
            seq.coord_targets += [bin_to_unit(b) for b in sample.objects[j].bins]
        return seq

    def _check_prompt(self, row: RolloutRow, sample: Sample, image: Image.Image) -> None:
        """LESSONS: preprocessing drift silently corrupts training; refuse rows whose prompt differs."""
        ids = self._prompt_cache.get(sample.sample_id)
        if ids is None:
            ids = encode_prompt(self.processor, image, self.cfg.data.prompt)["input_ids"].tolist()
            self._prompt_cache[sample.sample_id] = ids
        if ids != list(row.prompt_ids):
            first = next((i for i, (a, b) in enumerate(zip(ids, row.prompt_ids)) if a != b),
                         min(len(ids), len(row.prompt_ids)))
            raise PromptMismatchError(
                f"rollout row {row.sample_id!r} (engine {row.engine!r}): prompt ids differ from the learner's "
                f"at position {first} (engine {len(row.prompt_ids)} tokens, learner {len(ids)}); the engine and "
                "the learner must use the same processor settings and prompt")

    # ------------------------------------------------------------------------------------------------
    # Forward, losses, optimizer
    # ------------------------------------------------------------------------------------------------

    def _forward(self, seqs: list[Sequence]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device) for k, v in collate([s.enc for s in seqs], self.pad_id).items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.model.model(**batch).last_hidden_state.float()  # (B, T, H); losses in fp32
        return {k: v.to(self.device) for k, v in gather_supervision(seqs, hidden).items()}

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight  # (V, H)

    def _ce(self, sup: dict[str, torch.Tensor]) -> torch.Tensor:
        out = weighted_token_ce(sup["ce_hidden"], self.lm_head_weight, sup["ce_targets"], sup["ce_weights"],
                                chunk_size=self.cfg.loss.ce_chunk_size)
        return out.loss_sum / out.weight_sum.clamp_min(1.0)

    def _coordexp(self, hidden: torch.Tensor):
        c = self.cfg.coordexp
        tau = tau_at(self.step, c.tau_start, c.tau_end, c.anneal_steps)
        return coordexp(hidden, self.lm_head_weight, self.vocab.coord_ids, tau=tau, top_k=c.top_k or None)

    def _optimize(self, total: torch.Tensor, terms: dict[str, float], stage: str) -> dict[str, float]:
        if not math.isfinite(float(total.detach())):
            raise FloatingPointError(f"{stage} step {self.step}: loss is {float(total.detach())}; terms {terms}")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics = {f"loss/{k}": v for k, v in terms.items()}
        metrics.update({"step": self.step, "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)})
        return metrics

    # ------------------------------------------------------------------------------------------------
    # Weights and checkpoints
    # ------------------------------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Weights in checkpoint (save_pretrained) naming, detached, for the rollout engines."""
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach()

    def publish(self) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """A new weight version and its tensors (the caller sends them to every engine)."""
        self.version += 1
        return self.version, list(self.named_weights())

    def save(self, path: str | Path, data_state: dict | None = None) -> Path:
        return save_checkpoint(self, Path(path), data_state or {})

    def load(self, path: str | Path) -> dict:
        """Restore a checkpoint; returns the data state saved with it."""
        return load_checkpoint(self, Path(path))

    def export_pretrained(self, path: str | Path) -> Path:
        """A folder transformers and vLLM load (weights, config, tokenizer, processor)."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        return path


def _lr_lambda(cfg: Config, total_steps: int):
    warmup, schedule = cfg.optim.warmup_steps, cfg.optim.schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine down to 10%

    return factor
