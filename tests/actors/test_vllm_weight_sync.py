"""Weight sync into the vLLM engine, read back parameter by parameter (tied and untied LM head).

vLLM's CPU backend packs every linear weight into a kernel-private layout and leaves an empty
``weight``; ``engine_parameters`` reads such a weight back by applying the layer's kernel to an identity
matrix (x = I gives x @ W.T = W.T), so the comparison is with what the engine actually computes with.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from actors.rollout_actor import RolloutWorker
from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from coordexp_rl.rollout.engine import EngineConfig, SamplingConfig, WeightLoadError
from coordexp_rl.rollout.weight_transport import ObjectStoreTransport
from learner.learner import Learner

pytestmark = pytest.mark.integration

# HF checkpoint name -> vLLM parameter name (Qwen3VLForConditionalGeneration.hf_to_vllm_mapper), and the
# HF tensors that vLLM stacks into one parameter (dim 0, in this order).
PREFIXES = [("model.visual.", "visual."), ("lm_head.", "language_model.lm_head."),
            ("model.language_model.", "language_model.model.")]
STACKED = {".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
           ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}


def engine_parameters(worker) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's model (runs inside vLLM's worker via collective_rpc)."""
    out = {}
    for mname, module in worker.model_runner.get_model().named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if pname == "weight" and p.numel() == 0 and hasattr(module, "cpu_linear"):
                eye = torch.eye(module.input_size, dtype=p.dtype)
                p = module.cpu_linear(eye, p, None).t()  # (N, K): the packed weight as the kernel applies it
            out[f"{mname}.{pname}"] = p.detach().clone()
    return out


def in_engine_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    parts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for name, t in hf.items():
        for a, b in PREFIXES:
            if name.startswith(a):
                name = b + name[len(a):]
                break
        for a, (b, i) in STACKED.items():
            if a in name:
                parts[name.replace(a, b)][i] = t
                break
        else:
            parts[name][0] = t
    return {n: torch.cat([p[i] for i in sorted(p)]) for n, p in parts.items()}


def assert_engine_equals(engine: dict, hf: dict) -> None:
    want = in_engine_layout(hf)
    assert sorted(engine) == sorted(want)  # every engine parameter is covered, nothing left over
    for name, w in want.items():
        got = engine[name][:w.shape[0]]  # vLLM pads the vocabulary rows of embed_tokens / lm_head
        assert got.shape == w.shape and torch.equal(got, w.to(got.dtype)), name


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def setup(request, tmp_path_factory, synth_dir):
    from coordexp_rl.modeling.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "model", seed=0, tie_word_embeddings=request.param)
    samples = load_samples(synth_dir / "train.jsonl")[:4]
    learner = Learner(load_config(None, ["model.freeze_vision=true", "optim.lr=5e-3", "optim.warmup_steps=0"]),
                      model_dir)
    worker = RolloutWorker(EngineConfig(model_path=str(model_dir), kind="vllm", max_model_len=512, max_num_seqs=4),
                           [(s.sample_id, str(s.image_path), s.image_rel) for s in samples], learner.cfg.data.prompt,
                           SamplingConfig(max_new_tokens=8), batch_size=4)
    yield learner, worker, samples
    worker.close()


def read(worker) -> dict[str, torch.Tensor]:
    return worker.engine.llm.collective_rpc(engine_parameters)[0]


def publish(learner) -> tuple:
    """What LearnerWorker.put_weights builds, without the object store."""
    version, frozen = learner.new_version(), learner.frozen_names()
    send = ObjectStoreTransport(bucket_bytes=1 << 16).send
    payload = send(version, learner.named_weights(frozen=False), dtype="float32", omitted=frozen)
    return payload, send(version, learner.named_weights(frozen=True), dtype="float32")


def test_every_engine_parameter_equals_the_learners_and_frozen_go_once(setup):
    learner, worker, samples = setup
    assert learner.model.config.tie_word_embeddings == ("lm_head.weight" not in learner.frozen_names() and
                                                       learner.model.lm_head.weight is
                                                       learner.model.model.language_model.embed_tokens.weight)
    for _ in range(2):
        learner.stage1_step(samples)
    with torch.no_grad():  # a frozen tower that differs from the engine's folder: only a sync can bring it
        for p in learner.model.model.visual.parameters():
            p.add_(0.01)
    before = read(worker)
    payload, frozen_payload = publish(learner)
    assert payload.omitted and all(n.startswith("model.visual.") for n in payload.omitted)
    assert worker.update_weights(payload, [frozen_payload]) == payload.version
    after = read(worker)
    assert_engine_equals(after, dict(learner.named_weights()))
    assert not torch.equal(after["visual.blocks.0.attn.qkv.weight"], before["visual.blocks.0.attn.qkv.weight"])

    # The second sync: trainable tensors only; the frozen payload is not even looked at.
    learner.stage1_step(samples)
    payload, _ = publish(learner)
    sent = {s.name for b in payload.buckets for s in b.manifest}
    assert sent.isdisjoint(payload.omitted) and sent | set(payload.omitted) == set(learner.model.state_dict())
    assert worker.update_weights(payload, ["not a payload: fetching it would fail"]) == payload.version
    assert_engine_equals(read(worker), dict(learner.named_weights()))


@pytest.mark.parametrize("damage, listed", [
    (lambda named: [(n.replace("q_proj", "q_projection"), t) for n, t in named],
     ["unknown names: model.language_model.layers.0.self_attn.q_projection.weight",
      "missing names: model.language_model.layers.0.self_attn.q_proj.weight"]),
    (lambda named: [(n, t) for n, t in named if n != "model.language_model.norm.weight"],
     ["1 missing names: model.language_model.norm.weight"]),
])
def test_misnamed_or_missing_tensor_is_refused_and_nothing_is_applied(setup, damage, listed):
    learner, worker, _ = setup
    before, version = read(worker), worker.weight_version()
    named = [(n, t + 1.0) for n, t in learner.named_weights()]  # every tensor different from the engine's
    with pytest.raises(WeightLoadError) as err:
        worker.load_weights(damage(named), version + 1)
    for text in listed:
        assert text in str(err.value)
    assert worker.weight_version() == version
    after = read(worker)
    assert all(torch.equal(after[n], before[n]) for n in before)
