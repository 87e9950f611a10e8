"""CUDA variants of the transformers-engine tests: generation on the GPU, raw log-probs, weight loading.

Skipped without a CUDA device (tests/conftest.py); `pytest -m gpu` and deploy/gpu_check.sh run them.
"""

from __future__ import annotations

import pytest
import torch

from actors.engines import make_engine
from coordexp_rl.rollout.engine import EngineConfig, SamplingConfig
from tests.actors.conftest import PROMPT, checkpoint_state, learner_logprobs, perturbed

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_tf32")]  # fixture: tests/conftest.py

GREEDY = SamplingConfig(max_new_tokens=12)


def test_fp32_cuda_logprobs_match_a_cpu_forward(tiny_dir, requests_, images):
    """Whatever tokens the GPU picks, the CPU model gives them the same raw log-probs (fp32)."""
    engine = make_engine(EngineConfig(str(tiny_dir), kind="hf", device="cuda"))
    results = engine.generate(requests_, GREEDY)
    cpu = make_engine(EngineConfig(str(tiny_dir), kind="hf"))
    for res, image in zip(results, images):
        assert len(res.generated_ids) == GREEDY.max_new_tokens
        ref = learner_logprobs(cpu.model, cpu.processor, image, PROMPT, res.generated_ids)
        assert res.logprobs == pytest.approx(ref, abs=2e-3)


def test_bf16_cuda_engine_generates_and_loads_fp32_weights(tiny_dir, requests_):
    engine = make_engine(EngineConfig(str(tiny_dir), kind="hf", device="cuda", dtype="bfloat16"))
    assert engine.model.dtype == torch.bfloat16
    before = engine.generate(requests_, GREEDY)
    assert all(len(r.logprobs) == GREEDY.max_new_tokens for r in before)
    assert all(torch.isfinite(torch.tensor(r.logprobs)).all() for r in before)
    # A learner sends float32 CPU tensors; the engine copies them into its bf16 CUDA parameters.
    engine.load_weights(perturbed(checkpoint_state(tiny_dir), seed=7, std=0.3).items(), version=3)
    after = engine.generate(requests_, GREEDY)
    assert engine.weight_version == 3 and all(r.weight_version == 3 for r in after)
    assert [r.generated_ids for r in after] != [r.generated_ids for r in before]
