"""``predict`` on the taught tiny model: scores from the engine's log-probs, the CoordExp decode against a
direct computation, and (integration) vLLM against HF."""

from __future__ import annotations

import math

import pytest
import torch

from actors.engines import make_engine
from coordexp_rl.data.loader import load_image, load_samples
from coordexp_rl.method.protocol import parse_ids
from coordexp_rl.rollout.engine import DecoderModel, EngineConfig, GenerationRequest, SamplingConfig
from coordexp_rl.rollout.predict import predict
from tests.inference.conftest import PROMPT, TAUGHT


@pytest.fixture(scope="module")
def samples(synth_dir):
    return load_samples(synth_dir / "val.jsonl")[:3]


@pytest.fixture(scope="module")
def hf_engine(taught_dir):
    engine = make_engine(EngineConfig(str(taught_dir), kind="hf"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_preds(hf_engine, samples):
    return list(predict(hf_engine, samples, PROMPT, batch_size=2, max_new_tokens=20))


def test_one_record_per_sample_in_order(hf_preds, samples):
    assert [p["sample_id"] for p in hf_preds] == [s.sample_id for s in samples]
    assert all(p["parse_status"] == "ok" and len(p["objects"]) == 1 for p in hf_preds)


def test_score_is_mean_prob_of_the_engines_coord_logprobs(hf_engine, hf_preds, samples):

    res = hf_engine.generate([GenerationRequest(load_image(samples[0]), PROMPT)], SamplingConfig(max_new_tokens=20))[0]
    (obj,) = parse_ids(res.generated_ids, hf_engine.processor.tokenizer, hf_engine.vocab).objects
    assert obj.bins == TAUGHT[0].bins
    want = sum(math.exp(res.logprobs[t]) for t in obj.coord_positions) / 4
    assert hf_preds[0]["objects"][0]["score"] == pytest.approx(want, abs=1e-6)


def direct_coordexp_px(model, processor, vocab, sample, generated_ids) -> list[float]:
    """Full-vocab logits of a plain forward -> coord logits -> softmax -> sum_k p_k k/1000 -> pixels."""
    from coordexp_rl.modeling.inputs import collate, encode_example

    image = load_image(sample)
    enc = encode_example(processor, image, PROMPT, generated_ids)
    with torch.no_grad():
        logits = model(**collate([enc], pad_id=0)).logits[0].double()  # (L, V)
    (obj,) = parse_ids(generated_ids, processor.tokenizer, vocab).objects
    coord = logits[[enc["prompt_len"] + t - 1 for t in obj.coord_positions]][:, list(vocab.coord_ids)]  # (4, 1000)
    unit = (coord.softmax(-1) * torch.arange(1000, dtype=torch.float64) / 1000).sum(-1)  # (4,)
    size = [sample.width, sample.height] * 2
    return [float(u) * s for u, s in zip(unit, size)]


def test_coordexp_decode_equals_a_direct_computation(hf_engine, samples):
    preds = list(predict(hf_engine, samples, PROMPT, batch_size=2, max_new_tokens=20, decode="coordexp"))
    results = hf_engine.generate([GenerationRequest(load_image(s), PROMPT) for s in samples],
                                 SamplingConfig(max_new_tokens=20))
    for sample, pred, res in zip(samples, preds, results):
        want = direct_coordexp_px(hf_engine.model, hf_engine.processor, hf_engine.vocab, sample, res.generated_ids)
        got = pred["objects"][0]["bbox_2d"]
        assert got == pytest.approx(want, abs=2e-3)  # lines keep 3 decimals
        # continuous, yet near the discrete box: the taught coord tokens carry most of the mass
        discrete = [b / 1000 * s for b, s in zip(TAUGHT[0].bins, [sample.width, sample.height] * 2)]
        assert got != pytest.approx(discrete, abs=1e-3)
        assert got == pytest.approx(discrete, abs=0.1 * sample.width)


def test_coordexp_with_a_separate_decoder_model(hf_engine, samples, taught_dir):
    from coordexp_rl.modeling.load import load_model_and_processor

    decoder = DecoderModel(*load_model_and_processor(taught_dir))
    own = list(predict(hf_engine, samples[:1], PROMPT, batch_size=2, max_new_tokens=20, decode="coordexp"))
    separate = list(predict(hf_engine, samples[:1], PROMPT, batch_size=2, max_new_tokens=20, decode="coordexp",
                            decoder_model=decoder))
    assert separate[0]["objects"][0]["bbox_2d"] == pytest.approx(own[0]["objects"][0]["bbox_2d"], abs=1e-3)


def test_bad_arguments_fail_before_generating(hf_engine, samples):
    with pytest.raises(ValueError, match="decode="):
        predict(hf_engine, samples, PROMPT, batch_size=2, max_new_tokens=20, decode="beam")
    with pytest.raises(ValueError, match="batch_size="):
        predict(hf_engine, samples, PROMPT, batch_size=0, max_new_tokens=20)


@pytest.mark.integration
def test_vllm_predictions_equal_hf(taught_dir, samples, hf_engine, hf_preds):
    from coordexp_rl.modeling.load import load_model_and_processor

    decoder = DecoderModel(*load_model_and_processor(taught_dir))
    engine = make_engine(EngineConfig(str(taught_dir), kind="vllm"))
    try:
        preds = list(predict(engine, samples, PROMPT, batch_size=2, max_new_tokens=20))
        cont = list(predict(engine, samples, PROMPT, batch_size=2, max_new_tokens=20, decode="coordexp",
                            decoder_model=decoder))
        with pytest.raises(ValueError, match="decoder_model"):
            predict(engine, samples, PROMPT, batch_size=2, max_new_tokens=20, decode="coordexp")
    finally:
        engine.close()
    for v, h in zip(preds, hf_preds):
        assert {k: v[k] for k in v if k != "objects"} == {k: h[k] for k in h if k != "objects"}
        assert [(o["desc"], o["bbox_2d"]) for o in v["objects"]] == [(o["desc"], o["bbox_2d"]) for o in h["objects"]]
        for vo, ho in zip(v["objects"], h["objects"]):
            assert vo["score"] == pytest.approx(ho["score"], abs=1e-4)
            assert vo["score_desc"] == pytest.approx(ho["score_desc"], abs=1e-4)
            assert vo["score_object"] == pytest.approx(ho["score_object"], abs=1e-4)
    hf_cont = list(predict(hf_engine, samples, PROMPT, batch_size=2, max_new_tokens=20, decode="coordexp"))
    for v, h in zip(cont, hf_cont):
        assert v["objects"][0]["bbox_2d"] == pytest.approx(h["objects"][0]["bbox_2d"], abs=2e-3)
