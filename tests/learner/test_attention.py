"""model.attn_implementation: the attention kernel the learner (and the hf engine) load the model with.

sdpa (the default, transformers' own) and eager compute the same attention, so a Stage-1 step gives the same
losses and gradient norm up to float rounding, on padded micro-batches (a padding mask) and on a packed row
(the block-diagonal mask transformers builds from the restarting position ids). flash_attention_2 needs a
CUDA device and the flash_attn package: where either is missing, loading the model fails naming the setting.
"""

from __future__ import annotations

import pytest

from coordexp_rl.config import ConfigError, load_config
from coordexp_rl.driver import assets
from learner.learner import Learner
from tests.learner.test_micro_batches import mixed_lengths

OVERRIDES = ["optim.warmup_steps=0", "optim.batch_size=6", "optim.lr=1e-12", "loss.lambda_l1=1.0",
             "loss.lambda_giou=1.0"]
FLASH = "model.attn_implementation=flash_attention_2"
NAMES_THE_FIX = r"model\.attn_implementation=flash_attention_2 needs a CUDA device.*set model\.attn_implementation=sdpa"


@pytest.fixture(scope="module")
def samples(synth_dir):
    """6 samples of 1 to 3 objects: one padded micro-batch holds sequences of three lengths."""
    return mixed_lengths(synth_dir)


def stage1(tiny_model_dir, samples, attn: str, packing: bool) -> dict[str, float]:
    cfg = load_config(None, [*OVERRIDES, f"model.attn_implementation={attn}", f"learner.packing={packing}"])
    learner = Learner(cfg, tiny_model_dir)
    model_cfg = learner.model.config  # the setting reaches every attention: text decoder and vision tower
    assert (model_cfg.text_config._attn_implementation, model_cfg.vision_config._attn_implementation) == (attn, attn)
    return learner.stage1_step(samples)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sdpa_and_eager_give_the_same_stage1_step(tiny_model_dir, samples, packing):
    sdpa = stage1(tiny_model_dir, samples, "sdpa", packing)
    eager = stage1(tiny_model_dir, samples, "eager", packing)
    assert (sdpa["pad_fraction"] == 0.0) == packing  # padded: the mask hides pad tokens; packed: none
    terms = [k for k in sdpa if k.startswith("loss/")] + ["grad_norm"]
    assert sdpa["loss/l1_coord"] > 0 and sdpa["loss/giou_coord"] > 0
    for k in terms:
        assert eager[k] == pytest.approx(sdpa[k], rel=1e-5, abs=1e-7), k


def test_flash_attention_2_where_it_cannot_run_names_the_setting_and_the_fix(tiny_model_dir):
    from actors.hf_engine import HFEngine
    from coordexp_rl.rollout.engine import EngineConfig

    cfg = load_config(None, [FLASH, "model.dtype=bfloat16"])
    assert cfg.learner.gpus == 0 and cfg.rollout.gpus_per_actor == 0  # both load on the CPU, even beside a GPU
    with pytest.raises(ValueError, match=NAMES_THE_FIX):
        Learner(cfg, tiny_model_dir)
    with pytest.raises(ValueError, match=NAMES_THE_FIX):
        HFEngine(EngineConfig.from_config(cfg, tiny_model_dir, kind="hf"))


def test_flash_attention_2_needs_bfloat16():
    """The learner autocasts to bfloat16 only for model.dtype=bfloat16; flash_attn refuses float32."""
    with pytest.raises(ConfigError, match="set model.dtype=bfloat16 or model.attn_implementation=sdpa"):
        load_config(None, [FLASH])


def test_the_kernel_joins_the_pretrained_models_cache_key_only_when_set():
    """Same loss up to rounding: the default keeps the cached tiny model's folder name (a new key in it costs
    every test run a retrain); another kernel is a setting of its own."""
    assert "model.attn_implementation" not in assets.stage1_settings(load_config(None))
    assert assets.stage1_settings(load_config(None, ["model.attn_implementation=eager"]))[
        "model.attn_implementation"] == "eager"
