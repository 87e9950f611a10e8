"""Model FLOPs by formula (coordexp_rl/tools/gpu_check/mfu.py) on hand-worked numbers, and its counts on
the tiny Qwen3-VL."""

import pytest

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from coordexp_rl.tools.gpu_check.mfu import (
    ModelShape,
    SequenceCounts,
    bf16_peak_flops,
    forward_flops,
    model_shape,
    sequence_counts,
    step_flops,
)
from learner.learner import Learner

SHAPE = ModelShape(decoder_params=100, decoder_layers=2, attention_width=4, hidden=3, vocab=10, vision_params=50,
                   merger_params=20, vision_layers=1, vision_width=2, vision_trained=False, coord_bins=5,
                   spatial_merge=2)
WITH_IMAGE = SequenceCounts(tokens=6, ce_positions=2, coord_positions=1, image_tokens=(2,))
TEXT_ONLY = SequenceCounts(tokens=3, ce_positions=1, coord_positions=0)


def test_forward_flops_by_hand():
    # language: 2*100*6 = 1200 (linear layers) + 4*2*4*6^2 = 1152 (attention) + 2*3*(10*2 + 5*1) = 150 (LM head)
    # vision: 2 image tokens = 8 patches: 2*50*8 = 800 + 2*20*2 = 80 (mergers) + 4*1*2*8^2 = 512 (attention)
    assert forward_flops(SHAPE, WITH_IMAGE) == (2502.0, 1392.0)
    # 2*100*3 = 600 + 4*2*4*9 = 288 + 2*3*10 = 60
    assert forward_flops(SHAPE, TEXT_ONLY) == (948.0, 0.0)


def test_step_flops_count_three_forwards_for_what_trains():
    # frozen vision: 3 * (2502 + 948) + 1 * 1392 = 11742; trained: 3 * (2502 + 948 + 1392) = 14526
    assert step_flops(SHAPE, [WITH_IMAGE, TEXT_ONLY]) == 11742.0
    trained = ModelShape(**{**SHAPE.__dict__, "vision_trained": True})
    assert step_flops(trained, [WITH_IMAGE, TEXT_ONLY]) == 14526.0


def test_bf16_peaks_by_device_name():
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak_flops("NVIDIA H200") == 989e12
    assert bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bf16_peak_flops("cpu") is None and bf16_peak_flops("NVIDIA GeForce RTX 4090") is None


def test_counts_of_the_tiny_qwen3_vl(tiny_model_dir, synth_dir):
    learner = Learner(load_config(None, ["loss.lambda_l1=1.0"]), tiny_model_dir)
    model = learner.model
    shape = model_shape(model, vision_trained=True)
    embed = model.model.language_model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    total = sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    assert shape.decoder_params + shape.vision_params + shape.merger_params + embed.numel() + \
        (0 if tied else model.lm_head.weight.numel()) == total
    assert shape.vocab == embed.shape[0] and shape.hidden == embed.shape[1]
    seq = learner.sequences.stage1(load_samples(synth_dir / "train.jsonl")[:1], 0)[0]
    counts = sequence_counts(seq, model.config.image_token_id, shape.spatial_merge)
    assert counts.tokens == len(seq.input_ids) and counts.image_tokens[0] > 0
    assert counts.coord_positions == len(seq.coord_positions) > 0
    assert counts.ce_positions == pytest.approx(int((seq.ce_weights != 0).sum()))  # prompt and image: no logits
    assert counts.ce_positions < counts.tokens - sum(counts.image_tokens)
