"""model.tiny_pretrain_steps: the tiny model first trained N Stage-1 steps on the default's sparse task, in
the driver's process, built once into the cache folder (the dense task starts from it, as a real run starts
from a pretrained VLM). Here with a small training set and a few steps."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from coordexp_rl.config import ConfigError, load_config
from coordexp_rl.driver import assets


@pytest.fixture
def small_pretrain(tmp_path, monkeypatch):
    monkeypatch.setenv("COORDEXP_CACHE", str(tmp_path))
    full = assets.pretrain_config

    def small(cfg):
        base = full(cfg)
        base.data.synth_train, base.data.synth_val, base.optim.batch_size = 16, 4, 2
        return base

    monkeypatch.setattr(assets, "pretrain_config", small)
    return tmp_path


def test_pretrained_once_into_the_cache_and_trained(small_pretrain):
    cfg = load_config(None, ["model.tiny_pretrain_steps=3"])
    model = assets.prepare_assets(cfg).model_path
    init = assets.tiny_model(load_config(None))
    assert model.parent == init.parent == small_pretrain and model.name.startswith("tiny-pretrained-")
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
    trained, start = load_file(model / "model.safetensors"), load_file(init / "model.safetensors")
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)  # the steps changed the weights
    # the pretrain run: the embedded default's Stage-1 over these steps, seeded by the tiny model's seed
    base = assets.pretrain_config(load_config(None, ["model.tiny_pretrain_steps=3", "model.tiny_seed=4"]))
    assert (base.stage1.steps, base.run.seed, base.model.tiny_seed, base.data.synth_max_objects) == (3, 4, 4, 3)
    stamp = (model / "model.safetensors").stat().st_mtime_ns
    assert assets.tiny_model(cfg) == model and (model / "model.safetensors").stat().st_mtime_ns == stamp  # cached
    # the dense settings of the run itself do not change the pretraining; its steps do
    dense = load_config(None, ["model.tiny_pretrain_steps=3", "data.synth_max_objects=10", "optim.lr=0.0005"])
    assert assets.tiny_model(dense) == model
    assert assets.tiny_model(load_config(None, ["model.tiny_pretrain_steps=4"])) != model


def test_the_cache_key_holds_what_stage1_reads_and_nothing_else():
    """A new Stage-2, evaluation or run setting (a schema change) must not retrain the cached model; a
    Stage-1 setting must."""
    base = assets.pretrain_config(load_config(None, ["model.tiny_pretrain_steps=3"]))
    key = assets.stage1_settings(base)
    assert "optim.lr" in key and "loss.lambda_l1" in key and "rollout.max_new_tokens" in key
    assert not [k for k in key if k.startswith(("stage2.", "eval.", "matching.", "buffer."))]
    assert "run.out_dir" not in key and "run.seed" in key
    changed = base.model_copy(deep=True)
    changed.stage2.lr_ratio, changed.eval.every_samples, changed.run.keep_last = 0.5, 7, 9
    assert assets.stage1_settings(changed) == key
    changed.optim.warmup_steps = 1
    assert assets.stage1_settings(changed) != key


def test_lora_keys_join_the_cache_key_only_when_lora_is_on():
    """model.lora came after the cached pretrained model: off (rank 0), it must leave its key as it was
    (a new key costs every test run an 11-minute retrain); on, it trains something else."""
    base = assets.pretrain_config(load_config(None, ["model.tiny_pretrain_steps=3"]))
    key = assets.stage1_settings(base)
    assert not [k for k in key if k.startswith("model.lora.")]
    lora = base.model_copy(deep=True)
    lora.model.lora.rank = 8
    assert assets.stage1_settings(lora)["model.lora.rank"] == 8


def test_a_real_model_path_and_pretraining_are_refused_together():
    with pytest.raises(ConfigError, match="model.tiny_pretrain_steps=5 pretrains the tiny model, but model.path"):
        load_config(None, ["model.tiny_pretrain_steps=5", "model.path=/models/qwen3-vl"])
