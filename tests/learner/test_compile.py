"""learner.compile: torch.compile (inductor, dynamic shapes) of each decoder layer; the loss path is unchanged."""

import pytest
import torch

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from coordexp_rl.data.stream import BatchStream
from coordexp_rl.driver import assets
from learner.distributed import compile_decoder_layers
from learner.learner import Learner

OVERRIDES = ["optim.warmup_steps=0", "optim.batch_size=4", "optim.lr=1e-3"]


@pytest.mark.integration  # a minute's inductor compile: scheduled with the slow files (tests/conftest.py)
def test_compiled_layers_train_as_the_eager_model(tiny_model_dir, synth_dir):
    """Two Stage-1 steps of different sequence lengths (one compile serves both: dynamic shapes): the losses
    and gradient norms of the compiled learner equal the eager learner's to float rounding."""
    samples = load_samples(synth_dir / "train.jsonl")
    runs = {}
    for compiled in (False, True):
        learner = Learner(load_config(None, [*OVERRIDES, f"learner.compile={compiled}"]), tiny_model_dir)
        layers = learner.model.model.language_model.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
        stream = BatchStream(samples, 4, seed=0)
        runs[compiled] = [learner.stage1_step(stream.next_batch()) for _ in range(2)]
    for eager, compiled in zip(runs[False], runs[True]):
        for key in ("loss/total", "loss/ce_all", "loss/l1_coord", "grad_norm"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key
    assert runs[True][0]["loss/total"] != runs[True][1]["loss/total"]  # two different batches, not one twice


def test_a_model_without_decoder_layers_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="learner.compile: expected one language_model.layers"):
        compile_decoder_layers(torch.nn.Linear(2, 2))


def test_compile_keeps_the_pretrained_cache_key_unless_set():
    assert "learner.compile" not in assets.stage1_settings(load_config(None))
    assert assets.stage1_settings(load_config(None, ["learner.compile=true"]))["learner.compile"] is True
