"""LoRA on the learner (learner/lora.py): the merged weights compute what the adapted model computes, the
base is never touched, a checkpoint holds only the trained tensors and resumes exactly, export merges.

The adapters start at B = 0 (merged == base), so the tests first set every trained tensor to noise: a
merge that dropped a layer's update, the scale alpha / rank or the coord rows would then show.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_image, load_samples
from coordexp_rl.modeling.inputs import collate, encode_example
from coordexp_rl.modeling.load import load_model_and_processor
from coordexp_rl.tools.export import export_checkpoint
from learner.checkpoint import CheckpointError
from learner.learner import Learner
from learner.lora import ADAPTER_FILE, trained_token_ids

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.freeze_vision=true", "optim.lr=5e-3",
        "optim.warmup_steps=0", "optim.batch_size=2"]


def noised(learner: Learner, seed: int = 0) -> Learner:
    """Every trained tensor (adapters A and B, coord rows) moved by N(0, 0.05^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return learner


def logits(model, learner: Learner, sample) -> torch.Tensor:
    """(T, V) logits of ``model`` on ``sample``'s prompt + a few answer tokens (image included)."""
    ids = trained_token_ids(learner.vocab)[:6] + [learner.vocab.eos_id]
    enc = encode_example(learner.processor, load_image(sample), learner.cfg.data.prompt, ids)
    enc.pop("prompt_len")
    with torch.no_grad():
        hidden = model.model(**collate([enc], learner.pad_id)).last_hidden_state[0]
        return model.lm_head(hidden)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path_factory):
    from coordexp_rl.modeling.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "model", seed=0, tie_word_embeddings=request.param)


def test_merged_weights_compute_what_the_adapted_model_computes(model_dir, synth_dir):
    learner = noised(Learner(load_config(None, LORA), model_dir))
    learner.model.eval()
    base, _, _ = load_model_and_processor(model_dir)
    base_state = {n: t.clone() for n, t in base.state_dict().items()}
    merged = dict(learner.named_weights())
    assert set(merged) == set(base_state)  # the base model's own names, nothing of peft's
    plain, _, _ = load_model_and_processor(model_dir)
    plain.load_state_dict(merged)
    plain.eval()
    sample = load_samples(synth_dir / "train.jsonl")[0]
    ours, theirs = logits(learner.model, learner, sample), logits(plain, learner, sample)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (logits(base, learner, sample) - ours).abs().max() > 1e-2  # the adapters do change the outputs

    # What changes: the adapted projections and the coord rows (embeddings, head); the vision tower, norms
    # and the other token rows are the base's, and the learner's own base weights were not touched.
    changed = {n for n in merged if not torch.equal(merged[n], base_state[n])}
    assert changed == set(merged) - set(learner.frozen_names())
    assert {n.rsplit(".", 2)[-2] for n in changed} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj", "embed_tokens", "lm_head"}
    rows = torch.tensor(trained_token_ids(learner.vocab))
    others = torch.ones(merged["lm_head.weight"].shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(merged["lm_head.weight"][others], base_state["lm_head.weight"][others])
    for key, t in learner.model.state_dict().items():  # peft's names: "...q_proj.base_layer.weight"
        name = key.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")
        assert name not in base_state or torch.equal(t, base_state[name]), key
    assert all(not p.requires_grad for p in learner.model.model.visual.parameters())


def test_vision_tower_trains_in_full_unless_frozen(tiny_model_dir):
    learner = Learner(load_config(None, ["model.lora.rank=4", "model.freeze_vision=false"]), tiny_model_dir)
    visual = list(learner.model.model.visual.parameters())
    assert all(p.requires_grad for p in visual)
    assert not any(n.startswith("model.visual.") for n in learner.frozen_names())
    # the text model's base weights stay frozen: adapters, coord rows and the tower are all that trains
    assert sum(p.numel() for p in learner.params) < sum(p.numel() for p in learner.model.parameters())


def test_checkpoint_holds_the_trained_tensors_and_resumes_exactly(tiny_model_dir, synth_dir, tmp_path):
    samples = load_samples(synth_dir / "train.jsonl")[:2]
    cfg = load_config(None, LORA)
    learner = Learner(cfg, tiny_model_dir)
    learner.stage1_step(samples)
    path = learner.save(tmp_path / "step-1", {"stream": {"index": 2}})
    assert not (path / "model.safetensors").exists()  # the frozen base is model_path, not copied
    saved = load_file(str(path / ADAPTER_FILE))
    assert set(saved) == {n for n, p in learner.model.named_parameters() if p.requires_grad}
    assert json.loads((path / "state.json").read_text())["lora"]["rank"] == 4

    resumed = Learner(cfg, tiny_model_dir)
    assert resumed.load(path) == {"stream": {"index": 2}} and resumed.step == 1
    a, b = learner.stage1_step(samples), resumed.stage1_step(samples)
    assert a["loss/total"] == b["loss/total"]
    for (n, x), (_, y) in zip(learner.named_weights(), resumed.named_weights()):
        assert torch.equal(x, y), n
    assert torch.is_grad_enabled()  # a weights generator left unfinished (zip) must not leave grad mode off

    # A LoRA checkpoint into a full fine-tune, a full one into LoRA, other LoRA settings: refused by name.
    with pytest.raises(CheckpointError, match="a LoRA checkpoint .*this learner trains the full model"):
        Learner(load_config(None, LORA[2:]), tiny_model_dir).load(path)
    with pytest.raises(CheckpointError, match="LoRA settings differ"):
        Learner(load_config(None, LORA + ["model.lora.rank=8"]), tiny_model_dir).load(path)
    full = Learner(load_config(None, LORA[2:]), tiny_model_dir).save(tmp_path / "full")
    with pytest.raises(CheckpointError, match="a full fine-tune checkpoint, this learner trains LoRA"):
        resumed.load(full)

    # export merges: plain model folders (`coordexp-rl export` of the checkpoint, the run's final_model) whose
    # weights are the learner's merged ones
    resumed.load(path)
    want = dict(resumed.named_weights())
    for out in (export_checkpoint(path, tmp_path / "exported"), resumed.export_pretrained(tmp_path / "final")):
        model, _, _ = load_model_and_processor(out)
        for n, t in model.state_dict().items():
            assert torch.equal(t, want[n]), n
