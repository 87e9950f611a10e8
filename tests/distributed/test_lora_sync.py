"""LoRA end to end on the tiny model with the real vLLM CPU engine: the loss falls, the engine serves the
merged model after a sync (its log-probs equal the learner's adapted model), and a resumed learner continues
exactly where the saved one goes on."""

import pytest
import torch

from actors.rollout_actor import RolloutWorker
from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from coordexp_rl.rollout.engine import EngineConfig, SamplingConfig
from coordexp_rl.rollout.weight_transport import ObjectStoreTransport
from learner.learner import Learner
from tests.distributed.test_sync_parity import learner_logprobs

pytestmark = pytest.mark.integration


def test_lora_learns_syncs_merged_weights_to_vllm_and_resumes(tiny_model_dir, synth_dir, tmp_path):
    samples = load_samples(synth_dir / "train.jsonl")[:2]
    cfg = load_config(None, ["model.lora.rank=8", "model.freeze_vision=true", "optim.lr=5e-3",
                             "optim.warmup_steps=0", "optim.batch_size=2"])
    learner = Learner(cfg, tiny_model_dir)
    losses = [learner.stage1_step(samples)["loss/total"] for _ in range(4)]
    assert losses[-1] < 0.9 * losses[0], losses  # 8.6 -> 6.0 over 8 such steps when written

    worker = RolloutWorker(EngineConfig(model_path=str(tiny_model_dir), kind="vllm", max_model_len=512,
                                        max_num_seqs=2),
                           [(s.sample_id, str(s.image_path), s.image_rel) for s in samples], cfg.data.prompt,
                           SamplingConfig(max_new_tokens=16, temperature=1.0, seed=0), batch_size=2)
    stale = worker.generate_rows(2)
    # What LearnerWorker.put_weights sends: the weights training moves, and once the frozen rest.
    version, frozen = learner.new_version(), learner.frozen_names()
    send = ObjectStoreTransport().send
    payload = send(version, learner.named_weights(frozen=False), dtype="float32", omitted=frozen)
    assert {n.rsplit(".", 2)[-2] for n in payload.omitted} >= {"input_layernorm", "qkv"}  # norms, vision
    assert worker.update_weights(payload, [send(version, learner.named_weights(frozen=True))]) == version
    rows = worker.generate_rows(2)
    by_id = {s.sample_id: s for s in samples}
    for row in rows:
        ours = learner_logprobs(learner, by_id[row.sample_id], row)  # the adapters' forward, not merged
        assert torch.allclose(ours, torch.tensor(row.logprobs), atol=1e-4), \
            (ours - torch.tensor(row.logprobs)).abs().max()
    gaps = [(learner_logprobs(learner, by_id[r.sample_id], r) - torch.tensor(r.logprobs)).abs().max() for r in stale]
    assert max(gaps) > 1e-2  # the base model's log-probs differ: the check can tell
    worker.close()

    # Resume: a new learner from the checkpoint takes the same Stage-2 step (on these rollouts) to the same weights.
    path = learner.save(tmp_path / "step-4")
    resumed = Learner(cfg, tiny_model_dir)
    resumed.load(path)
    a, b = learner.stage2_step(rows, by_id), resumed.stage2_step(rows, by_id)
    assert a["loss/total"] == b["loss/total"] and a["step"] == b["step"] == 5
    for (n, x), (_, y) in zip(learner.named_weights(), resumed.named_weights()):
        assert torch.equal(x, y), n
