"""After a weight sync, the learner's log-probs of a rollout's sampled tokens equal the engine's (fp32)."""

import pytest
import torch

from actors.rollout_actor import RolloutWorker
from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_image, load_samples
from coordexp_rl.modeling.inputs import collate, encode_example
from coordexp_rl.rollout.engine import EngineConfig, SamplingConfig
from coordexp_rl.rollout.weight_transport import ObjectStoreTransport
from learner.learner import Learner

pytestmark = pytest.mark.integration


def learner_logprobs(learner, sample, row) -> torch.Tensor:
    """log p(generated token t | prefix) from a plain teacher-forced forward of the learner's model."""
    enc = encode_example(learner.processor, load_image(sample), learner.cfg.data.prompt, row.generated_ids)
    prompt_len = enc.pop("prompt_len")
    with torch.no_grad():
        hidden = learner.model.model(**collate([enc], learner.pad_id)).last_hidden_state[0]
        logits = learner.model.lm_head(hidden[prompt_len - 1:-1])  # states that predict the generated tokens
    return logits.log_softmax(-1).gather(-1, torch.tensor(row.generated_ids)[:, None])[:, 0]


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_learner_and_engine_logprobs_agree_after_sync(tiny_model_dir, synth_dir, engine):
    samples = load_samples(synth_dir / "train.jsonl")[:4]
    learner = Learner(load_config(None, ["optim.lr=5e-3", "optim.warmup_steps=0"]), tiny_model_dir)
    for _ in range(5):  # move the learner away from the weights the engine starts with
        learner.stage1_step(samples)
    worker = RolloutWorker(EngineConfig(model_path=str(tiny_model_dir), kind=engine),
                           [(s.sample_id, str(s.image_path), s.image_rel) for s in samples], learner.cfg.data.prompt,
                           SamplingConfig(max_new_tokens=24, temperature=1.0, seed=0), batch_size=4)
    stale = worker.generate_rows(4)
    version, named = learner.publish()
    assert worker.update_weights(ObjectStoreTransport().send(version, named)) == version == 1
    rows = worker.generate_rows(4)
    by_id = {s.sample_id: s for s in samples}
    for row in rows:
        assert row.weight_version == 1
        ours = learner_logprobs(learner, by_id[row.sample_id], row)
        assert torch.allclose(ours, torch.tensor(row.logprobs), atol=1e-4), \
            (ours - torch.tensor(row.logprobs)).abs().max()
    # Before the sync the engine ran other weights: the same check fails there, so the test can tell.
    gaps = [(learner_logprobs(learner, by_id[r.sample_id], r) - torch.tensor(r.logprobs)).abs().max() for r in stale]
    assert max(gaps) > 1e-2
    worker.close()
