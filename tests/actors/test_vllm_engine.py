"""The vLLM engine against the transformers reference (fp32, tiny model, one engine start per module)."""

from __future__ import annotations

import logging

import pytest
import torch

from actors.engines import make_engine
from coordexp_rl.rollout.engine import EngineConfig, GenerationResult, SamplingConfig, WeightLoadError
from tests.actors.conftest import PROMPT, checkpoint_state, learner_logprobs, perturbed
from tests.actors.test_hf_engine import eos_forcing

pytestmark = pytest.mark.integration
GREEDY = SamplingConfig(max_new_tokens=16)


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir):
    eng = make_engine(EngineConfig(str(tiny_dir), kind="vllm", max_model_len=512, max_num_seqs=4))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def greedy(vllm_engine, requests_) -> list[GenerationResult]:
    return vllm_engine.generate(requests_, GREEDY)


def ids(results):
    return [r.generated_ids for r in results]


def assert_same(vllm_results, hf_results, tol=1e-4):
    assert ids(vllm_results) == ids(hf_results)
    for v, h in zip(vllm_results, hf_results):
        assert v.prompt_ids == h.prompt_ids and v.finish_reason == h.finish_reason
        assert v.logprobs == pytest.approx(h.logprobs, abs=tol)


def test_prompt_ids_equal_encode_prompt(greedy, hf_engine, images):
    from coordexp_rl.modeling.inputs import encode_prompt

    for res, image in zip(greedy, images):
        assert res.prompt_ids == encode_prompt(hf_engine.processor, image, PROMPT)["input_ids"].tolist()


def test_greedy_matches_hf_token_for_token(greedy, hf_engine, requests_):
    assert all(len(set(r.generated_ids)) > 3 for r in greedy)  # non-trivial outputs
    assert_same(greedy, hf_engine.generate(requests_, GREEDY))


def test_greedy_with_repetition_penalty_matches_hf(vllm_engine, hf_engine, requests_):
    s = SamplingConfig(max_new_tokens=16, repetition_penalty=1.3)
    v = vllm_engine.generate(requests_, s)
    assert ids(v) != ids(vllm_engine.generate(requests_, GREEDY))
    assert_same(v, hf_engine.generate(requests_, s))


def test_logprobs_match_a_learner_forward(greedy, hf_engine, images):
    for res, image in zip(greedy, images):
        ref = learner_logprobs(hf_engine.model, hf_engine.processor, image, PROMPT, res.generated_ids)
        assert res.logprobs == pytest.approx(ref, abs=1e-4)


def test_max_new_tokens_gives_length(vllm_engine, requests_):
    res = vllm_engine.generate(requests_, SamplingConfig(max_new_tokens=5))
    assert all(r.finish_reason == "length" and len(r.generated_ids) == 5 == len(r.logprobs) for r in res)


def test_sampling_seed_is_reproducible_and_logprobs_are_raw(vllm_engine, hf_engine, requests_, images):
    s = SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=0.9, top_k=100, seed=11)
    a, b = vllm_engine.generate(requests_, s), vllm_engine.generate(requests_, s)
    c = vllm_engine.generate(requests_, SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=0.9, top_k=100,
                                                       seed=12))
    assert ids(a) == ids(b) and ids(a) != ids(c)
    # raw semantics: the untempered model's log-probs of the sampled tokens
    ref = learner_logprobs(hf_engine.model, hf_engine.processor, images[0], PROMPT, a[0].generated_ids)
    assert a[0].logprobs == pytest.approx(ref, abs=1e-4)


def test_load_weights_matches_hf_with_the_same_weights(vllm_engine, hf_engine, requests_, greedy, tiny_dir):
    original = checkpoint_state(tiny_dir)
    new = perturbed(original, seed=2)
    vllm_engine.load_weights(new.items(), version=1)
    hf_engine.load_weights(new.items(), version=1)
    assert vllm_engine.weight_version == 1
    v = vllm_engine.generate(requests_, GREEDY)
    assert ids(v) != ids(greedy) and all(r.weight_version == 1 for r in v)
    assert_same(v, hf_engine.generate(requests_, GREEDY))
    # a second push (the CPU backend's repacked weights must reload again) back to the original
    vllm_engine.load_weights(original.items(), version=2)
    hf_engine.load_weights(original.items(), version=2)
    assert ids(vllm_engine.generate(requests_, GREEDY)) == ids(greedy)


def test_a_complete_payload_logs_no_failed_layer(vllm_engine, tiny_dir):
    """Layers with no checkpoint tensors (rotary tables, image-normalising constants, the tied lm_head)
    receive nothing at a reload; vLLM's per-layer "Failed to load weights" warning is dropped for them."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    layerwise.addHandler(handler)
    try:
        vllm_engine.load_weights(checkpoint_state(tiny_dir).items(), version=vllm_engine.weight_version + 1)
    finally:
        layerwise.removeHandler(handler)
    assert not [m for m in seen if "Failed to load weights" in m], seen


def test_tied_lm_head_in_payload_is_accepted(vllm_engine, requests_, greedy, tiny_dir):
    """The learner's state_dict carries lm_head.weight (tied, absent from the checkpoint)."""
    state = checkpoint_state(tiny_dir)
    state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    vllm_engine.load_weights(state.items(), version=3)
    assert vllm_engine.weight_version == 3
    assert ids(vllm_engine.generate(requests_, GREEDY)) == ids(greedy)


@pytest.mark.parametrize("damage, match", [
    (lambda s: {**s, "model.language_model.norm.weight": torch.ones(7)}, "wrong shapes"),
    (lambda s: {**s, "model.not_a_layer.weight": torch.ones(2)}, "unknown names"),
    (lambda s: {k: v for k, v in s.items() if "layers.1." not in k}, "missing names"),
])
def test_rejected_load_keeps_version_and_weights(vllm_engine, requests_, tiny_dir, damage, match):
    version = vllm_engine.weight_version
    before = vllm_engine.generate(requests_, GREEDY)
    with pytest.raises(WeightLoadError, match=match):
        vllm_engine.load_weights(damage(perturbed(checkpoint_state(tiny_dir), seed=9)).items(), version + 1)
    assert vllm_engine.weight_version == version and vllm_engine.healthy
    assert ids(vllm_engine.generate(requests_, GREEDY)) == ids(before)


def test_stops_at_eos_like_hf(vllm_engine, hf_engine, requests_, tiny_dir):
    original = checkpoint_state(tiny_dir)
    forced = eos_forcing(original, hf_engine.vocab.eos_id)
    vllm_engine.load_weights(forced.items(), version=20)
    hf_engine.load_weights(forced.items(), version=20)
    try:
        v, h = vllm_engine.generate(requests_, GREEDY), hf_engine.generate(requests_, GREEDY)
    finally:
        vllm_engine.load_weights(original.items(), version=21)
        hf_engine.load_weights(original.items(), version=21)
    assert all(r.generated_ids == [hf_engine.vocab.eos_id] and r.finish_reason == "stop" for r in v)
    assert_same(v, h)
