"""The untied LM head (as Qwen3-VL-8B): learner steps, checkpoint save/load, export keep it separate.

The weight sync of an untied model into vLLM is tests/actors/test_vllm_weight_sync.py[untied].
"""

from __future__ import annotations

import pytest
import torch

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from coordexp_rl.modeling.load import load_model_and_processor
from learner.learner import Learner

OVERRIDES = ["optim.lr=5e-3", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    from coordexp_rl.modeling.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("untied") / "model", seed=0, tie_word_embeddings=False)


def test_untied_head_trains_saves_loads_and_exports(untied_dir, synth_dir, tmp_path):
    samples = load_samples(synth_dir / "train.jsonl")[:4]
    learner = Learner(load_config(None, OVERRIDES), untied_dir)
    head, embed = learner.model.lm_head.weight, learner.model.model.language_model.embed_tokens.weight
    assert head is not embed and not learner.model.config.tie_word_embeddings
    head0, embed0 = head.detach().clone(), embed.detach().clone()
    for _ in range(2):
        learner.stage1_step(samples)
    assert not torch.equal(head, head0) and not torch.equal(embed, embed0)
    assert not torch.equal(head, embed)  # two matrices, each trained

    ckpt = learner.save(tmp_path / "ckpt")
    after_save = learner.stage1_step(samples)["loss/total"]
    other = Learner(load_config(None, OVERRIDES), untied_dir)
    other.load(ckpt)
    assert other.model.lm_head.weight is not other.model.model.language_model.embed_tokens.weight
    assert other.stage1_step(samples)["loss/total"] == pytest.approx(after_save, rel=1e-6)

    model, _, _ = load_model_and_processor(learner.export_pretrained(tmp_path / "export"))
    assert not model.config.tie_word_embeddings
    state = dict(learner.named_weights())
    assert "lm_head.weight" in state
    for name, w in model.state_dict().items():
        assert torch.equal(w, state[name]), name
