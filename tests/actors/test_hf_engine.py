"""The transformers engine: prompt ids, raw log-probs, EOS/length, seeds, weight loading."""

from __future__ import annotations

import pytest
import torch

from coordexp_rl.rollout.engine import GenerationResult, SamplingConfig, WeightLoadError
from tests.actors.conftest import PROMPT, checkpoint_state, learner_logprobs, perturbed

GREEDY = SamplingConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def greedy(hf_engine, requests_) -> list[GenerationResult]:
    return hf_engine.generate(requests_, GREEDY)


def test_prompt_ids_equal_encode_prompt(hf_engine, greedy, images):
    from coordexp_rl.modeling.inputs import encode_prompt

    for res, image in zip(greedy, images):
        assert res.prompt_ids == encode_prompt(hf_engine.processor, image, PROMPT)["input_ids"].tolist()
    # the three image sizes give 12, 16 and 10 image tokens, so the batch really was left-padded
    lengths = {len(r.prompt_ids) for r in greedy}
    assert len(lengths) == 3


def test_greedy_is_varied_and_hits_max_new_tokens(greedy):
    for res in greedy:
        assert res.finish_reason == "length" and len(res.generated_ids) == GREEDY.max_new_tokens
        assert len(set(res.generated_ids)) > 3  # the perturbed weights do not just repeat one token
    assert greedy[0].generated_ids != greedy[1].generated_ids  # the image matters


def test_batched_equals_one_by_one(hf_engine, requests_, greedy):
    """Left padding must not change anything: each request alone gives the same ids and log-probs."""
    for req, res in zip(requests_, greedy):
        alone = hf_engine.generate([req], GREEDY)[0]
        assert alone.generated_ids == res.generated_ids
        assert alone.logprobs == pytest.approx(res.logprobs, abs=1e-4)


def test_logprobs_are_raw_and_match_a_learner_forward(hf_engine, greedy, images):
    for res, image in zip(greedy, images):
        ref = learner_logprobs(hf_engine.model, hf_engine.processor, image, PROMPT, res.generated_ids)
        assert res.logprobs == pytest.approx(ref, abs=1e-4)
        assert all(lp < 0 for lp in res.logprobs)


def test_logprobs_ignore_temperature(hf_engine, requests_):
    """Raw semantics: a hot sampler's tokens get the log-probs of the untempered model."""
    res = hf_engine.generate(requests_[:1], SamplingConfig(max_new_tokens=6, temperature=3.0, seed=5))[0]
    ref = learner_logprobs(hf_engine.model, hf_engine.processor, requests_[0].image, PROMPT, res.generated_ids)
    assert res.logprobs == pytest.approx(ref, abs=1e-4)


def test_sampling_seed_is_reproducible(hf_engine, requests_):
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    a = hf_engine.generate(requests_, s)
    b = hf_engine.generate(requests_, s)
    c = hf_engine.generate(requests_, SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50, seed=8))
    assert [r.generated_ids for r in a] == [r.generated_ids for r in b]
    assert [r.generated_ids for r in a] != [r.generated_ids for r in c]
    # the seed is local: the global generator is untouched
    state = torch.random.get_rng_state()
    hf_engine.generate(requests_[:1], s)
    assert torch.equal(state, torch.random.get_rng_state())


def test_top_k_1_sampling_equals_greedy(hf_engine, requests_, greedy):
    res = hf_engine.generate(requests_, SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=1, seed=3))
    assert [r.generated_ids for r in res] == [r.generated_ids for r in greedy]


def test_repetition_penalty_changes_output(hf_engine, requests_, greedy):
    res = hf_engine.generate(requests_, SamplingConfig(max_new_tokens=12, repetition_penalty=2.0))
    assert [r.generated_ids for r in res] != [r.generated_ids for r in greedy]
    for r in res:  # a strong penalty forbids immediate repeats of an argmax that would otherwise loop
        assert len(set(r.generated_ids)) >= len(r.generated_ids) // 2


def test_load_weights_changes_outputs_and_version(hf_engine, requests_, greedy, tiny_dir):
    original = checkpoint_state(tiny_dir)
    assert hf_engine.weight_version == 0
    hf_engine.load_weights(perturbed(original, seed=2).items(), version=3)
    assert hf_engine.weight_version == 3
    changed = hf_engine.generate(requests_, GREEDY)
    assert [r.generated_ids for r in changed] != [r.generated_ids for r in greedy]
    assert all(r.weight_version == 3 for r in changed)
    hf_engine.load_weights(original.items(), version=4)
    back = hf_engine.generate(requests_, GREEDY)
    assert [r.generated_ids for r in back] == [r.generated_ids for r in greedy]


@pytest.mark.parametrize("damage, match", [
    (lambda s: {**s, "model.language_model.norm.weight": torch.ones(7)}, "wrong shapes"),
    (lambda s: {**s, "model.not_a_layer.weight": torch.ones(2)}, "unknown names"),
    (lambda s: {k: v for k, v in s.items() if "layers.1." not in k}, "missing names"),
])
def test_rejected_load_keeps_version_and_weights(hf_engine, requests_, tiny_dir, damage, match):
    before_version = hf_engine.weight_version
    before = hf_engine.generate(requests_[:1], GREEDY)[0]
    bad = damage(perturbed(checkpoint_state(tiny_dir), seed=9))
    with pytest.raises(WeightLoadError, match=match):
        hf_engine.load_weights(bad.items(), version=before_version + 1)
    assert hf_engine.weight_version == before_version
    assert hf_engine.generate(requests_[:1], GREEDY)[0].generated_ids == before.generated_ids


def test_stops_at_eos(hf_engine, requests_, tiny_dir):
    """Weights that make EOS the argmax everywhere: generation stops after one token, EOS kept."""
    original = checkpoint_state(tiny_dir)
    forced = eos_forcing(original, hf_engine.vocab.eos_id)
    hf_engine.load_weights(forced.items(), version=10)
    try:
        res = hf_engine.generate(requests_, GREEDY)
        # the learner's plain forward on the same weights: the log-prob of EOS at the first position
        refs = [learner_logprobs(hf_engine.model, hf_engine.processor, q.image, PROMPT, [hf_engine.vocab.eos_id])[0]
                for q in requests_]
    finally:
        hf_engine.load_weights(original.items(), version=11)
    for r, ref in zip(res, refs):
        assert r.generated_ids == [hf_engine.vocab.eos_id] and r.finish_reason == "stop"
        assert r.logprobs[0] == pytest.approx(ref, abs=1e-4)  # raw log-prob, as the learner computes it


def eos_forcing(state: dict[str, torch.Tensor], eos_id: int) -> dict[str, torch.Tensor]:
    """Embedding column 0 = 10 for every token (it dominates the residual stream, so the final hidden
    state points along dim 0) and 11 for EOS: with tied embeddings EOS's logit beats all others by ~10."""
    key = "model.language_model.embed_tokens.weight"
    emb = state[key].clone()
    emb[:, 0] = 10.0
    emb[eos_id, 0] = 11.0
    return {**state, key: emb}
