"""The GPU configs' memory comments are what coordexp_rl/modeling/memory.py derives from their settings."""

from __future__ import annotations

import pytest

from coordexp_rl.config import load_config
from coordexp_rl.modeling.memory import (
    GPU_GB,
    QWEN3VL,
    VOCAB_WITH_COORDS,
    budget_comment,
    checkpoint_gb,
    count_params,
    engine_budget,
    learner_budget,
    trainable_params,
)
from tests.deploy.packing import CONFIGS, GPU_CONFIGS


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_config_carries_its_derived_memory_block_verbatim(name):
    assert budget_comment(load_config(CONFIGS / name)) in (CONFIGS / name).read_text()


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_config_fits_its_gpus(name):
    cfg = load_config(CONFIGS / name)
    lb, eb = learner_budget(cfg), engine_budget(cfg)
    assert cfg.learner.sharding == "fsdp" and cfg.learner.world_size > 1 and cfg.learner.gpus == 1.0
    assert lb["micro"] * cfg.learner.world_size * cfg.learner.accum_steps == cfg.optim.batch_size
    assert lb["total"] < 0.9 * GPU_GB  # headroom for what the arithmetic leaves out
    assert eb["total"] < eb["limit"]
    assert cfg.rollout.enforce_eager is False  # CUDA graphs on GPU engines


def test_8b_arithmetic_by_hand():
    """Qwen3-VL-8B: 36 layers of (q 4096x4096 + k, v 4096x1024 + o 4096x4096 + q/k norms 2x128 + MLP
    3x4096x12288 + 2 norms of 4096) = 192,946,432 each; untied 152,675 x 4096 embed + head."""
    p = count_params(QWEN3VL["8b"])
    assert p["layer"] == 4096 * 4096 * 2 + 4096 * 1024 * 2 + 2 * 128 + 3 * 4096 * 12288 + 2 * 4096 == 192_946_432
    assert p["text"] == 36 * p["layer"] + 2 * VOCAB_WITH_COORDS * 4096 + 4096
    cfg = load_config(CONFIGS / "qwen3vl_8b_1node.yaml")
    lb = learner_budget(cfg)
    # fp32 weights / 4 ranks; grads 4 B and AdamW 8 B per trainable (text) parameter / 4 ranks
    assert lb["weights"] == pytest.approx(4 * p["total"] / 4 / 1e9)
    assert lb["grads"] + lb["adam"] == pytest.approx(12 * p["text"] / 4 / 1e9)
    # KV: 2 (k, v) x 36 layers x 8 kv heads x 128 x 2 B = 147,456 B = 144 KiB per token
    assert engine_budget(cfg)["kv_per_token_kib"] == 144


@pytest.mark.parametrize("key", ["2b", "8b"])
def test_param_count_matches_a_transformers_build(key):
    """The closed form equals the parameter count of transformers' Qwen3-VL built (on the meta device)
    from the same config numbers."""
    import torch

    from coordexp_rl.runtime import prepare_runtime

    prepare_runtime()
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    t, v = QWEN3VL[key]["text"], QWEN3VL[key]["vision"]
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=VOCAB_WITH_COORDS, hidden_size=t["hidden"], intermediate_size=t["intermediate"],
                         num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                         num_key_value_heads=t["kv_heads"], head_dim=t["head_dim"], tie_word_embeddings=t["tied"]),
        vision_config=dict(depth=v["depth"], hidden_size=v["hidden"], intermediate_size=v["intermediate"],
                           out_hidden_size=v["out_hidden"], num_heads=16, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=v["positions"],
                           deepstack_visual_indexes=list(range(v["deepstack"]))),
        tie_word_embeddings=t["tied"])
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    counted = count_params(QWEN3VL[key])
    assert (counted["total"], counted["vision"]) == (sum(p.numel() for p in model.parameters()), vision)


def test_lora_fits_8b_on_one_gpu_per_rank_where_a_full_fine_tune_does_not():
    """One learner GPU, replicated: a full fine-tune carries 16 B per trained parameter (fp32 weights, grads,
    AdamW m and v) for 8.2 B text parameters, ~134 GB; LoRA rank 16 keeps the fp32 base (35 GB) without
    grads or AdamW state and trains 16 x (in + out) per projection of 36 layers + 1,006 coord rows of 4,096
    in the untied embeddings and head."""
    one_gpu = ["learner.world_size=1", "learner.sharding=replicate", "learner.accum_steps=8"]
    full = load_config(CONFIGS / "qwen3vl_8b_1node.yaml", one_gpu)
    lora = load_config(CONFIGS / "qwen3vl_8b_1node.yaml", one_gpu + ["model.lora.rank=16"])
    assert learner_budget(full)["total"] > GPU_GB
    assert learner_budget(lora)["total"] < 0.9 * GPU_GB
    h, q, kv, i = 4096, 32 * 128, 8 * 128, 12288
    per_layer = 16 * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    assert trainable_params(lora) == 36 * per_layer + 2 * 1006 * h == 51_888_128
    assert learner_budget(lora)["grads"] == pytest.approx(4 * 51_888_128 / 1e9)
    assert checkpoint_gb(lora) == pytest.approx(12 * 51_888_128 / 1e9)  # adapters + AdamW, no base
    assert "of 0.05 B trained params (LoRA rank 16, vision frozen)" in budget_comment(lora)


def test_a_token_budget_bounds_the_activations_by_hand():
    """Qwen3-VL-2B (hidden 2,048, 28 layers, no checkpointing), 2 rollouts per rank = 4 sequences of <= 2,048
    tokens. learner.micro_batch_tokens 3,000: a micro-batch's forward stays within 3,000 tokens (padded rows x
    the longest, or packed the sum), so 3,000 x 2,048 x 34 B x 28 layers = 5,849,088,000 B, + one CE chunk
    256 x 152,675 x 4 B x 3 = 469,017,600 B, + the fp32 final hidden 3,000 x 2,048 x 4 = 24,576,000 B
    = 6.3426816 GB (the fixed count's 8,192 tokens: 16.5 GB). A budget under one sequence leaves it alone
    (2,048 tokens); one over the rank's share holds all of it (8,192)."""
    def budget(*overrides):
        return learner_budget(load_config(CONFIGS / "qwen3vl_2b_1node.yaml", list(overrides)))

    for packing in ("false", "true"):
        lb = budget("learner.micro_batch_tokens=3000", f"learner.packing={packing}")
        assert lb["tokens"] == 3000
        assert lb["activations"] == pytest.approx((5_849_088_000 + 469_017_600 + 24_576_000) / 1e9)
    assert budget()["tokens"] == budget("learner.packing=true")["tokens"] == 8192
    assert budget("learner.micro_batch_tokens=1000")["tokens"] == 2048
    assert budget("learner.micro_batch_tokens=100000")["tokens"] == 8192
    assert "<= 3,000 tokens per micro-batch (learner.micro_batch_tokens; packed: the sum of lengths) 6.3 GB" in (
        budget_comment(load_config(CONFIGS / "qwen3vl_2b_1node.yaml",
                                   ["learner.micro_batch_tokens=3000", "learner.packing=true"])))
