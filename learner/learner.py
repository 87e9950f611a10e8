"""The Learner: Stage-1 SFT steps and Stage-2 EM steps on one process (no Ray needed).

Stage-1 (METHOD 5): teacher forcing on canonical GT sequences; CE (+ coord CE) (+ CoordExp L1).
Stage-2 (METHOD 6-8), per rollout row: Hungarian match of the parsed predictions to GT; a self-context
forward on the rollout tokens with CoordExp L1 + GIoU at matched coord positions toward the GT boxes;
a reordered-GT forward with CE. Both forwards of a whole batch run as one padded batch.

On W ranks (learner.distributed), every step takes the GLOBAL batch, each rank works on its contiguous
share, in ``plan.accum_steps`` micro-batches (or under learner.micro_batch_tokens; padded or packed, in
batch or length order: learner/batching.py). Every loss is (local sum / global normaliser), with the
normalisers (CE weight sum, coord count) summed over ranks before any forward, so W ranks x accum micro-
batches give the same loss and gradients as one rank on the whole batch (up to float rounding).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch

from coordexp_rl.config import Config, stage2_lr
from coordexp_rl.data.loader import Sample
from coordexp_rl.data.sequences import SequenceBuilder, TrainSequence
from coordexp_rl.evaluation.exposure import teacher_forced_box_ious
from coordexp_rl.method.coordexp import CoordExpOutput, coord_expectation, coord_logits, tau_at
from coordexp_rl.method.losses import TokenCE, coord_terms, weighted_token_ce, weighted_total
from coordexp_rl.method.matching import MatchCurriculum
from coordexp_rl.method.protocol import canonical_order
from coordexp_rl.modeling.inputs import collate, pack
from coordexp_rl.modeling.load import load_model_and_processor
from coordexp_rl.rollout.schema import RolloutRow
from learner import lora
from learner.batching import forward_tokens, gather_supervision, micro_batches
from learner.checkpoint import load_checkpoint, save_checkpoint
from learner.distributed import (
    DistContext,
    ParallelPlan,
    compile_decoder_layers,
    full_tensor,
    fully_shard_model,
    split,
)
from learner.step_timer import PhaseTimer

log = logging.getLogger(__name__)


class Learner:
    def __init__(self, cfg: Config, model_path: str | Path, plan: ParallelPlan | None = None):
        """``plan``: sharding / accumulation / checkpointing; W > 1 when torch.distributed is initialised."""
        self.cfg = cfg
        self.model_path = str(Path(model_path).resolve())  # recorded in checkpoints (coordexp-rl export)
        self.plan = plan or ParallelPlan()
        self.dist = DistContext()
        torch.manual_seed(cfg.run.seed)
        # Parameters stay float32 (master weights: bf16 would round lr 1e-5 updates away); bfloat16 runs
        # the forward under autocast on GPUs.
        self.device = torch.device("cuda" if cfg.learner.gpus > 0 and torch.cuda.is_available() else "cpu")
        self.autocast = cfg.model.dtype == "bfloat16" and self.device.type == "cuda"
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # AdamW moments decay into denormals, which crawl on CPUs
        self.model, self.processor, self.vocab = load_model_and_processor(
            model_path, "float32", str(self.device), max_pixels=cfg.data.max_pixels, min_pixels=cfg.data.min_pixels,
            attn_implementation=cfg.model.attn_implementation)
        self.tokenizer = self.processor.tokenizer
        if self.plan.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.lora.rank:  # adapters + coord rows train; the vision tower per freeze_vision
            self.model = lora.apply_lora(self.model, cfg.model.lora, self.vocab, cfg.model.freeze_vision)
        if cfg.learner.compile:  # after checkpointing and adapters wrap the layers, before FSDP shards them
            compile_decoder_layers(self.model)
        self.model.train()
        if cfg.model.freeze_vision:
            for p in self.model.model.visual.parameters():
                p.requires_grad_(False)
        # FSDP2: self.model keeps its class; its parameters become DTensor shards, and the forward goes
        # through self.sharded (the root FSDP module). None = every rank holds the whole model.
        mixed = self.autocast if self.plan.mixed_precision is None else self.plan.mixed_precision
        self.sharded = fully_shard_model(self.model, mixed) if self.plan.sharding == "fsdp" else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters on CUDA; the CPU keeps the for-each implementation (its numbers)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                           fused=self.device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg))
        self.curriculum = MatchCurriculum.from_config(cfg.matching)
        self.sequences = SequenceBuilder(cfg, self.processor, self.vocab)  # no model: data in, sequences out
        self.step = 0  # optimizer steps taken (both stages)
        self.stage2_steps = 0  # Stage-2 steps taken (drives the matching curriculum)
        self.version = 0  # published weight version: bumps when weights go to the rollout engines
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.packing = cfg.learner.packing  # each forward's sequences in one row, no padding (inputs.pack)

    # ------------------------------------------------------------------------------------------------
    # Steps
    # ------------------------------------------------------------------------------------------------

    def stage1_step(self, samples: list[Sample]) -> dict[str, float]:
        """METHOD 5.3 on a batch of GT samples; returns the logged terms."""
        return self._stage1_train(self._fail_together(lambda: self._stage1_sequences(samples, self.step)))

    def stage1_steps(self, next_batch: Callable[[], list[Sample]], n: int) -> list[dict[str, float]]:
        """``n`` Stage-1 steps on ``next_batch()``'s batches, each equal to ``stage1_step``.

        Why a thread: building a batch's sequences (image decode, processor, tokens) needs no model and is
        about 30 % of a CPU step; here the next batch is built while the current one trains. Only the
        batches of these ``n`` steps are drawn, so the stream's state stays exact for checkpoints.
        """
        out: list[dict[str, float]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage1-data") as pool:
            pending = pool.submit(self._stage1_sequences, next_batch(), self.step)
            for i in range(n):
                seqs = self._fail_together(pending.result)  # collectives stay on this thread
                if i + 1 < n:
                    pending = pool.submit(self._stage1_sequences, next_batch(), self.step + 1)
                out.append(self._stage1_train(seqs))
        return out

    def _stage1_sequences(self, samples: list[Sample], step: int) -> list[TrainSequence]:
        """This rank's GT sequences of a Stage-1 batch at optimizer step ``step`` (no model: a thread builds
        the next batch's while this one trains)."""
        return self.sequences.stage1(self._share(samples), step)

    def _stage1_train(self, seqs: list[TrainSequence]) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = self._train_step(seqs, "stage1")
        tokens = self.dist.sum({"tokens": float(sum(len(s.input_ids) for s in seqs))})["tokens"]
        metrics["tokens_per_s"] = tokens / (time.perf_counter() - t0)
        metrics["compute/learner_tokens"] = tokens  # COMPUTE: see stage2_step
        return metrics

    def stage2_step(self, rows: list[RolloutRow], samples: dict[str, Sample]) -> dict[str, float]:
        """METHOD 6-8 on a batch of rollout rows (their GT looked up by sample id)."""
        t0 = time.perf_counter()
        params = self.curriculum.at(self.stage2_steps)
        local = self._share(rows)
        batch = self._fail_together(lambda: self.sequences.stage2(local, samples, params))
        seqs, stats, ious = batch.sequences, batch.stats, batch.ious
        sequences_s = time.perf_counter() - t0  # parse checks, matching, both sequences of every row (host)

        self.stage2_steps += 1
        metrics = self._train_step(seqs, "stage2")
        totals = self.dist.sum({**stats, "iou_sum": sum(ious), "iou_count": float(len(ious)),
                                "tokens": float(sum(len(s.input_ids) for s in seqs))})
        n = max(1, len(rows))
        # per row: objects matched / missed / ..., and the share of rows reordered, with extra EOS weight
        metrics.update({f"match/{k}": totals[k] / n for k in stats if k not in ("parse_failed", "empty_answers")})
        metrics["match/parse_failure_rate"] = totals["parse_failed"] / n
        metrics["match/empty_answer_rate"] = totals["empty_answers"] / n
        # the share of the rollouts' objects that feed the geometric loss (matched and through the gate)
        metrics["match/gated_fraction"] = totals["matched"] / totals["pred_objects"] if totals["pred_objects"] else 0.0
        metrics["match/mean_iou"] = totals["iou_sum"] / totals["iou_count"] if totals["iou_count"] else 0.0
        metrics["match/iou_thr"] = params.iou_thr
        metrics["weight_version_lag"] = self.version - min((r.weight_version for r in rows), default=self.version)
        metrics["tokens_per_s"] = totals["tokens"] / (time.perf_counter() - t0)
        metrics["time/sequences_s"] = sequences_s
        # COMPUTE: the step's work in tokens, for equal-compute comparisons (`coordexp-rl ablate`). Learner
        # tokens went through forward + backward (summed over ranks; unpadded, image tokens included: the
        # self-context and the GT sequence of every row); rollout tokens are the prompt + generated tokens of
        # the rows this step consumed (generated once, by one forward each). FLOP-proportional units, an
        # approximation (the vision tower, padding, attention's quadratic term and rows generated but dropped
        # as stale are left out): a learner token costs 3 (forward + backward ~ 3 forwards), a rollout token 1.
        metrics["compute/learner_tokens"] = totals["tokens"]
        metrics["compute/rollout_tokens"] = float(sum(len(r.prompt_ids) + len(r.generated_ids) for r in rows))
        return metrics

    # ------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------

    def teacher_forced_ious(self, samples: list[Sample], batch_size: int) -> list[list[float]]:
        """Exposure bias, the teacher-forced side (coordexp_rl/evaluation/exposure.py): per sample, the IoU
        of each GT box (canonical order) with the box CoordExp decodes at its 4 coord positions of the GT
        sequence (states at t-1, as in training), in [0, 1].

        Changes no training state: no grad, the model in its current mode, no optimizer or scheduler, and
        the torch RNG state is restored afterwards (a forward in train mode may draw, e.g. dropout).
        Ranks: each runs its contiguous share in batches of ``batch_size``, every rank the same number of
        forwards (FSDP's all-gathers are collectives: a rank short of items runs one again and drops it);
        the IoUs are summed over ranks, so every rank returns the whole result.
        """
        if not samples:
            return []
        starts = [0]  # sample i's boxes are flat[starts[i]:starts[i + 1]]
        for s in samples:
            starts.append(starts[-1] + len(s.objects))
        shares = split(list(range(len(samples))), self.dist.world_size)
        mine = shares[self.dist.rank]
        batch_size = max(1, batch_size)
        rounds = math.ceil(max(len(share) for share in shares) / batch_size)
        flat = [0.0] * starts[-1]
        rng_devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            for r in range(rounds):
                idx = mine[r * batch_size:(r + 1) * batch_size]
                seqs = self._fail_together(lambda: [self._gt_coord_sequence(samples[i])
                                                    for i in (idx or mine[:1] or [0])])
                for i, seq, coords in zip(idx, seqs, self._decode_coords(seqs)):
                    flat[starts[i]:starts[i + 1]] = teacher_forced_box_ious(coords, seq.coord_targets)
        flat = list(self.dist.sum({str(k): v for k, v in enumerate(flat)}).values())  # one rank wrote each box
        return [flat[starts[i]:starts[i + 1]] for i in range(len(samples))]

    def _gt_coord_sequence(self, sample: Sample) -> TrainSequence:
        """The canonical GT sequence with its coord positions and targets (bin / 1000)."""
        return self.sequences.gt_sequence(sample, canonical_order(sample.objects), eos_weight=self.cfg.loss.eos_weight,
                                          with_coords=True)

    def _decode_coords(self, seqs: list[TrainSequence]) -> list[list[float]]:
        """One forward (the caller holds no_grad): per sequence, CoordExp at its coord positions."""
        def apply(hidden: torch.Tensor) -> torch.Tensor:
            coords = gather_supervision(seqs, hidden, self.packing)["coord_hidden"].to(self.device)
            return self._coordexp(coords).expectation.float().cpu() if coords.shape[0] else torch.zeros(0)

        values = self._forward(seqs, apply)
        return [v.tolist() for v in values.split([len(s.coord_positions) for s in seqs])]

    # ------------------------------------------------------------------------------------------------
    # Ranks
    # ------------------------------------------------------------------------------------------------

    def _share(self, items: list):
        """This rank's share of a global batch; every rank's every micro-batch must get at least one item
        (an FSDP rank without data would leave the others waiting in the all-gather)."""
        parts = self.dist.world_size * self.plan.accum_steps
        if self.dist.world_size > 1 and len(items) < parts:
            raise ValueError(f"a global batch of {len(items)} items cannot feed {self.dist.world_size} ranks x "
                             f"{self.plan.accum_steps} micro-batches; raise optim.batch_size to at least {parts}")
        return self.dist.shard(items)

    def _fail_together(self, fn: Callable):
        """``fn()`` on every rank; if it raises on any rank, every rank raises (none waits in a collective)."""
        try:
            result, error = fn(), None
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            result, error = None, e
        failed = self.dist.sum({"failed": float(error is not None)})["failed"]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"learner rank {self.dist.rank}: another rank failed to build its sequences "
                               "(see that rank's error)")
        return result

    # ------------------------------------------------------------------------------------------------
    # Forward, losses, optimizer
    # ------------------------------------------------------------------------------------------------

    def _forward(self, seqs: list[TrainSequence], apply: Callable[[torch.Tensor], object]):
        """``apply(hidden)`` on one forward of ``seqs`` (hidden float32: (B, T, H) padded, (1, sum L, H) with
        learner.packing), inside the FSDP root's forward when sharded, so the LM head is whole while
        ``apply`` reads it."""
        encs = [s.enc for s in seqs]
        inputs = pack(encs, self.model.model.get_rope_index) if self.packing else collate(encs, self.pad_id)
        inputs["use_cache"] = False  # a training forward needs no KV cache (Qwen3-VL's config builds one)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if self.sharded is not None:
            return self.sharded(batch, apply, autocast=self.autocast)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.model.model(**batch).last_hidden_state.float()  # (B, T, H); losses in fp32
        return apply(hidden)

    def _forward_loss(self, seqs: list[TrainSequence], stage: str, norm: dict[str, float]):
        """One micro-batch: one forward (padded or packed), supervision picked out, the stage's losses applied."""
        def apply(hidden: torch.Tensor):
            sup = {k: v.to(self.device) for k, v in gather_supervision(seqs, hidden, self.packing).items()}
            return self._losses(stage, sup, torch.tensor(max(1.0, norm["ce_weight"]), device=self.device))

        return self._forward(seqs, apply)

    def _losses(self, stage: str, sup: dict[str, torch.Tensor], W: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Every term: a sum over this micro-batch / W, the global batch's CE weight (losses.py docstring)."""
        head = self._lm_head_losses(sup)
        out = self._coord_decode(head.coord_logits) if head.coord_logits is not None else None
        terms = {k: (None if v is None else v / W, lam)
                 for k, (v, lam) in coord_terms(stage, self.cfg.loss, out, sup["coord_targets"]).items()}
        return weighted_total(head.loss_sum / W, terms, "ce_all" if stage == "stage1" else "ce_gt")

    def _lm_head_losses(self, sup: dict[str, torch.Tensor]) -> TokenCE:
        """Token CE and the coord logits in one pass over the LM head. Logits exist only at the supervised
        positions (gather_supervision), coord logits come from the 1,000 coord rows, and the LM head gets one
        (V, H) gradient buffer (a separate CoordExp projection would add a second). The coord states join
        the CE's with weight 0: they get coord logits and no CE."""
        ce_hidden, coord_hidden = sup["ce_hidden"], sup["coord_hidden"]
        n, p = ce_hidden.shape[0], coord_hidden.shape[0]
        weight = self._head_weight()
        hidden = torch.cat([ce_hidden, coord_hidden]).to(weight.dtype)  # (n + p, H)
        targets = torch.cat([sup["ce_targets"].long(), sup["ce_targets"].new_zeros(p, dtype=torch.long)])
        weights = torch.cat([sup["ce_weights"], sup["ce_weights"].new_zeros(p)])
        coords = dict(coord_positions=torch.arange(n, n + p, device=self.device), coord_ids=self.vocab.coord_ids) \
            if p else {}
        return weighted_token_ce(hidden, weight, targets, weights, chunk_size=self.cfg.loss.ce_chunk_size, **coords)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight  # (V, H)

    def _head_weight(self) -> torch.Tensor:
        """The LM head in the losses' compute dtype: bf16 under CUDA autocast (the float32 master weights cast,
        as autocast casts every linear layer's; the CE's log-sum-exp stays float32), else as it is (float32
        on the CPU; bf16 when FSDP's mixed-precision policy gathered it so)."""
        weight = self.lm_head_weight
        return weight.to(torch.bfloat16) if self.autocast else weight

    def _coordexp(self, hidden: torch.Tensor) -> CoordExpOutput:
        """CoordExp of (P, H) hidden states (evaluation; training gets its coord logits from the CE pass)."""
        weight = self._head_weight()
        return self._coord_decode(coord_logits(hidden.to(weight.dtype), weight, self.vocab.coord_ids))

    def _coord_decode(self, logits: torch.Tensor) -> CoordExpOutput:
        c = self.cfg.coordexp
        tau = tau_at(self.step, c.tau_start, c.tau_end, c.anneal_steps)
        return coord_expectation(logits, tau=tau, top_k=c.top_k or None)

    def _train_step(self, seqs: list[TrainSequence], stage: str) -> dict[str, float]:
        """This rank's sequences in micro-batches (``_micro_batches``; backward each), then one optimizer step.

        Normalisers are summed over ranks first, so the summed gradients are the whole batch's gradient.
        """
        timer = PhaseTimer(self.device)
        micros = self._micro_batches(seqs)
        # one all-reduce for the normalisers and the padding counts (pad_fraction below)
        norm = self.dist.sum({
            "ce_weight": sum(float(s.ce_weights[1:].sum()) for s in seqs if s.ce_weights is not None),
            "coords": float(sum(len(s.coord_positions) for s in seqs)),
            "forward_tokens": float(sum(forward_tokens(m, self.packing) for m in micros)),
            "tokens": float(sum(len(s.input_ids) for s in seqs))})
        self.optimizer.zero_grad(set_to_none=True)
        timer.mark("prepare")  # micro-batches and the normalisers' all-reduce
        terms: dict[str, float] = {}
        for micro in micros:
            if not micro and self.dist.world_size == 1:  # fewer sequences than accum_steps micro-batches
                continue
            # A rank with fewer micro-batches than another (a token budget) runs its first sequence again and
            # drops it (loss x 0): FSDP's all-gathers and reduce-scatters are collectives of every rank.
            filler = not micro
            total, micro_terms = self._forward_loss(micro or seqs[:1], stage, norm)
            timer.mark("forward")
            (total * 0 if filler else total).backward()  # even when non-finite (checked below, on every rank)
            timer.mark("backward")
            for k, v in ({} if filler else micro_terms).items():
                terms[k] = terms.get(k, 0.0) + v
        terms = self.dist.sum(terms)
        if not math.isfinite(terms["total"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"{stage} step {self.step}: loss is {terms['total']}; terms {terms}")
        if self.sharded is None:
            self.dist.all_reduce_grads(self.params)  # FSDP reduce-scatters its gradients in backward
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        timer.mark("optimizer")  # with the gradients' all-reduce (unsharded ranks) and clipping
        self.step += 1
        metrics = {f"loss/{k}": v for k, v in terms.items()}
        metrics.update({f"time/{k}_s": v for k, v in timer.seconds().items()})
        metrics.update({"step": self.step, "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)})
        # the share of the tokens through the forwards that were padding (all ranks)
        metrics["pad_fraction"] = 1.0 - norm["tokens"] / norm["forward_tokens"] if norm["forward_tokens"] else 0.0
        metrics.update(self._peak_memory())
        return metrics

    def _micro_batches(self, seqs: list[TrainSequence]) -> list[list[TrainSequence]]:
        """This rank's micro-batches (batching.micro_batches: learner.micro_batch_order, micro_batch_tokens);
        with a token budget, padded with empty ones to the most any rank formed (every rank must run as many
        forwards; _train_step fills an empty one)."""
        lc = self.cfg.learner
        micros = micro_batches(seqs, self.plan.accum_steps, lc.micro_batch_order, lc.micro_batch_tokens,
                               self.packing)
        if lc.micro_batch_tokens:
            micros += [[] for _ in range(int(self.dist.max(len(micros))) - len(micros))]
        return micros

    def _peak_memory(self) -> dict[str, float]:
        """This rank's peak memory: on a GPU the step's peak allocation (reset after each step), on the CPU
        the process's peak resident memory so far (the OS keeps only the high-water mark)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            return {"memory/peak_device_gib": peak}
        return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

    # ------------------------------------------------------------------------------------------------
    # Weights and checkpoints
    # ------------------------------------------------------------------------------------------------

    def named_weights(self, frozen: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Weights in checkpoint (save_pretrained) naming, detached, for the rollout engines.

        ``frozen``: None = all; True = only frozen parameters (model.freeze_vision); False = all but them.
        Sharded: each tensor is gathered whole in turn (a collective: every rank must run this generator to
        the end), and only rank 0 yields; a consumer that packs as it goes holds one tensor + one bucket.
        """
        if self.cfg.model.lora.rank:  # the merged model, in the base model's names (learner/lora.py); not sharded
            if self.dist.is_main:
                yield from lora.merged_weights(self.model, frozen)
            return
        skip = set() if frozen is None else set(self.frozen_names())
        for name, tensor in self.model.state_dict().items():
            if frozen is not None and (name in skip) != frozen:
                continue
            whole = full_tensor(tensor.detach())
            if self.dist.is_main:
                yield name, whole

    def frozen_names(self) -> list[str]:
        """State-dict names of the parameters that never train (they need sending once per engine life)."""
        if self.cfg.model.lora.rank:  # all but the adapted layers, the coord rows' matrices, a trained tower
            return lora.frozen_names(self.model)
        return [n for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad]

    def new_version(self) -> int:
        self.version += 1
        return self.version

    def publish(self) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """A new weight version and its tensors (the caller sends them to every engine); [] off rank 0."""
        return self.new_version(), list(self.named_weights())

    def save(self, path: str | Path, data_state: dict | None = None) -> Path:
        return save_checkpoint(self, Path(path), data_state or {})

    def load(self, path: str | Path) -> dict:
        """Restore a checkpoint; returns the data state saved with it."""
        return load_checkpoint(self, Path(path))

    def export_pretrained(self, path: str | Path) -> Path:
        """A folder transformers and vLLM load (weights, config, tokenizer, processor)."""
        path = Path(path)
        # collective when sharded; LoRA: the merged weights, in the base model's names
        state = dict(self.named_weights()) if self.sharded is not None or self.cfg.model.lora.rank else None
        if self.dist.is_main:
            self.model.save_pretrained(path, state_dict=state)
            self.processor.save_pretrained(path)
        self.dist.barrier()
        return path


def lr_schedule(cfg: Config):
    """Multiplier of optim.lr at each optimizer step: Stage-1 warms up, then follows a cosine to 10 % at
    its last step; Stage-2 runs at its own constant rate (``config.stage2_lr``)."""
    warmup, schedule, stage1_steps = cfg.optim.warmup_steps, cfg.optim.schedule, max(1, cfg.stage1.steps)
    stage2_factor = stage2_lr(cfg) / cfg.optim.lr if cfg.optim.lr else 0.0

    def factor(step: int) -> float:
        if step >= cfg.stage1.steps:
            return stage2_factor
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, stage1_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine down to 10%

    return factor
