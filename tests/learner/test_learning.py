"""The tiny model really learns: 200 Stage-1 steps, then a Stage-2 step on its own greedy rollouts."""

import pytest
import torch

from actors.hf_engine import HFEngine
from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_image, load_samples
from coordexp_rl.data.stream import BatchStream
from coordexp_rl.method.coords import bin_to_unit
from coordexp_rl.method.matching import match_objects
from coordexp_rl.method.protocol import parse_ids
from coordexp_rl.rollout.engine import EngineConfig, GenerationRequest, SamplingConfig
from coordexp_rl.rollout.schema import RolloutRow
from learner.learner import Learner

pytestmark = pytest.mark.integration


def greedy_rollouts(learner, samples, folder):
    """Rollouts of the learner's current weights (exported, then transformers generate)."""
    engine = HFEngine(EngineConfig(model_path=str(learner.export_pretrained(folder)), kind="hf"))
    results = engine.generate([GenerationRequest(load_image(s), learner.cfg.data.prompt, s.sample_id) for s in samples],
                              SamplingConfig(max_new_tokens=80))
    rows = []
    for r in results:
        parsed = parse_ids(r.generated_ids, learner.tokenizer, learner.vocab)
        rows.append(RolloutRow(sample_id=r.sample_id, prompt_ids=r.prompt_ids, generated_ids=r.generated_ids,
                               logprobs=r.logprobs, objects=parsed.objects, parse_status=parsed.status))
    return rows


def mean_iou_per_gt(rows, samples):
    """Mean over GT boxes of the IoU of their Hungarian partner (0 when missed)."""
    ious = []
    for row, s in zip(rows, samples):
        m = match_objects([[bin_to_unit(b) for b in o.bins] for o in row.objects],
                          [[bin_to_unit(b) for b in o.bins] for o in s.objects], iou_thr=-1.0, l1_thr=2.0)
        ious += m.ious + [0.0] * len(m.unmatched_gt)
    return sum(ious) / len(ious)


def test_stage1_learns_then_stage2_runs_on_real_rollouts(tiny_model_dir, tmp_path):
    from coordexp_rl.data.synth import make_synthetic_set

    # 256 images: 200 steps x 8 is ~6 epochs (32 images would be memorised instead of learned).
    paths = make_synthetic_set(tmp_path / "data", n_train=256, n_val=16, seed=0, image_size=128, max_objects=3)
    train, held_out = load_samples(paths["train"]), load_samples(paths["val"])
    # CE only, lr decaying over ~300 steps after a 20-step warmup: the format is learned within 200 steps.
    # (The default's L1 + GIoU terms, 500-step warmup and 8,500-step schedule need longer to learn it.)
    cfg = load_config(None, ["optim.batch_size=8", "optim.lr=1e-3", "optim.warmup_steps=20",
                             "matching.l1_thr_start=1.0", "loss.lambda_l1=0", "loss.lambda_giou=0",
                             "stage1.steps=300", "stage2.steps=60"])
    learner = Learner(cfg, tiny_model_dir)
    before = greedy_rollouts(learner, held_out, tmp_path / "before")
    stream = BatchStream(train, 8, seed=0)
    losses = [learner.stage1_step(stream.next_batch())["loss/total"] for _ in range(200)]
    after = greedy_rollouts(learner, held_out, tmp_path / "after")

    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    parsed_after = sum(r.parse_status != "failed" for r in after)
    assert parsed_after >= len(after) // 2, [r.parse_status for r in after]
    iou_before, iou_after = mean_iou_per_gt(before, held_out), mean_iou_per_gt(after, held_out)
    assert iou_after > iou_before + 0.03, (iou_before, iou_after)

    # Stage-2 on those rollouts: matches form and the LM head's coord rows get finite, non-zero gradients.
    metrics = learner.stage2_step(after, {s.sample_id: s for s in held_out})
    assert metrics["match/matched"] > 0 and metrics["loss/geo_self"] > 0
    grad = learner.model.lm_head.weight.grad[list(learner.vocab.coord_ids)]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
