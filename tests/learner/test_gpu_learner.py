"""CUDA variants of the learner tests: bf16 autocast over float32 master weights, Stage-1 and Stage-2.

Skipped without a CUDA device (tests/conftest.py); `pytest -m gpu` and deploy/gpu_check.sh run them.
"""

import math

import pytest
import torch

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_image, load_samples
from coordexp_rl.method.protocol import BoxObject, build_assistant_ids, parse_ids
from coordexp_rl.modeling.inputs import encode_prompt
from coordexp_rl.rollout.schema import RolloutRow
from learner.learner import Learner

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def samples(synth_dir):
    return load_samples(synth_dir / "train.jsonl")[:4]


def make_learner(model_dir, *overrides, gpu=True):
    on = ["learner.gpus=1", "model.dtype=bfloat16"] if gpu else []
    cfg = load_config(None, ["optim.warmup_steps=0", "optim.batch_size=4", *on, *overrides])
    return Learner(cfg, model_dir)


def test_bf16_autocast_keeps_fp32_master_weights_and_tracks_the_cpu_loss(tiny_model_dir, samples):
    cpu = make_learner(tiny_model_dir, "optim.lr=1e-12", gpu=False).stage1_step(samples)
    learner = make_learner(tiny_model_dir, "optim.lr=1e-12")
    assert learner.device.type == "cuda" and learner.autocast
    assert {p.dtype for p in learner.model.parameters()} == {torch.float32}
    assert next(learner.model.parameters()).is_cuda
    gpu = learner.stage1_step(samples)
    # bf16 matmuls in the forward: a few tenths of a percent, not more.
    assert gpu["loss/total"] == pytest.approx(cpu["loss/total"], rel=2e-2)
    assert math.isfinite(gpu["grad_norm"]) and gpu["grad_norm"] > 0


def test_stage1_steps_on_cuda_lower_the_loss(tiny_model_dir, samples):
    learner = make_learner(tiny_model_dir, "optim.lr=3e-3", "loss.lambda_l1=1.0")
    losses = [learner.stage1_step(samples)["loss/total"] for _ in range(6)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def test_stage2_step_on_cuda_trains_the_geometric_term(tiny_model_dir, samples):
    learner = make_learner(tiny_model_dir, "optim.lr=1e-3")
    rows = []
    for s in samples:
        objects = [BoxObject(o.desc, tuple(min(999, b + 5) for b in o.bins)) for o in reversed(s.objects)]
        prompt = encode_prompt(learner.processor, load_image(s), learner.cfg.data.prompt)["input_ids"].tolist()
        generated = build_assistant_ids(objects, learner.tokenizer, learner.vocab)
        parsed = parse_ids(generated, learner.tokenizer, learner.vocab)
        rows.append(RolloutRow(sample_id=s.sample_id, prompt_ids=prompt, generated_ids=generated,
                               objects=parsed.objects, parse_status=parsed.status))
    m = learner.stage2_step(rows, {s.sample_id: s for s in samples})
    assert math.isfinite(m["loss/total"]) and m["loss/geo_self"] > 0
    assert m["match/matched"] > 0 and m["match/parse_failure_rate"] == 0
    version, named = learner.publish()
    assert version == 1 and all(t.is_cuda and t.dtype == torch.float32 for _, t in named)


def test_step_phases_are_timed_by_cuda_events(tiny_model_dir, samples):
    """On a GPU the phases are CUDA events read at the step's end (learner/step_timer.py): each positive,
    their sum inside the step's wall time."""
    import time

    learner = make_learner(tiny_model_dir)
    learner.stage1_step(samples)  # warm-up
    t0 = time.perf_counter()
    m = learner.stage1_step(samples)
    wall = time.perf_counter() - t0
    phases = [m[f"time/{k}_s"] for k in ("prepare", "forward", "backward", "optimizer")]
    assert all(v > 0 for v in phases) and sum(phases) <= wall * 1.01



def test_compiled_layers_on_cuda_track_the_eager_loss(tiny_model_dir, samples):
    """learner.compile on CUDA (inductor's GPU kernels, which the CPU test cannot reach): the same loss."""
    eager = make_learner(tiny_model_dir, "optim.lr=1e-12").stage1_step(samples)
    compiled = make_learner(tiny_model_dir, "optim.lr=1e-12", "learner.compile=true").stage1_step(samples)
    assert compiled["loss/total"] == pytest.approx(eager["loss/total"], rel=2e-2)
    assert math.isfinite(compiled["grad_norm"]) and compiled["grad_norm"] > 0
