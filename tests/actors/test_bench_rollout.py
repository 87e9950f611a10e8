"""bench rollout's engine comparison: engines take turns batch by batch; throughput is counted per engine."""

from __future__ import annotations

import time

import pytest

from coordexp_rl.rollout.engine import GenerationRequest, GenerationResult, SamplingConfig
from coordexp_rl.tools.bench.rollout import run_engines


class FakeEngine:
    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def reset_caches(self):
        self.calls.append((self.name, "reset"))

    def generate(self, requests, sampling):
        self.calls.append((self.name, len(requests)))
        time.sleep(0.02)  # a measurable batch time
        return [GenerationResult(r.sample_id, [1], [7, 8], [-0.1, -0.2], "length") for r in requests]


def test_engines_alternate_batch_by_batch_after_one_warm_up_each(tiny_model_dir):
    from coordexp_rl.method.coords import CoordVocab
    from coordexp_rl.modeling.load import load_processor

    tok = load_processor(tiny_model_dir).tokenizer
    calls = []
    engines = {"vllm": FakeEngine("vllm", calls), "hf": FakeEngine("hf", calls)}
    requests = [GenerationRequest(None, "p", f"s{i}") for i in range(6)]
    res = run_engines(engines, requests, 2, SamplingConfig(max_new_tokens=2), CoordVocab.from_tokenizer(tok), tok)
    # warm-ups, then batches 0, 1, 2 with the first engine switching each time, each timed batch cold
    generates = [c for c in calls if c[1] != "reset"]
    assert [c[0] for c in generates] == ["vllm", "hf", "vllm", "hf", "hf", "vllm", "vllm", "hf"]
    timed = calls[2:]
    assert timed[0::2] == [(c[0], "reset") for c in generates[2:]] and timed[1::2] == generates[2:]
    for kind in engines:
        assert res[kind]["images"] == 6 and res[kind]["_outputs"] == [[7, 8]] * 6
        assert res[kind]["tokens_per_s"] == pytest.approx(12 / res[kind]["seconds"], rel=0.01)
        assert res[kind]["valid_objects"] == 0
