"""Micro-batches in length order, under a token budget, and packed into one row: the same step as padding.

The learner's losses are sums over a micro-batch / a global normaliser (learner/learner.py), so how a rank
splits and lays out its sequences changes only the padding (the time), never the loss or the gradients.
Each variant here runs a Stage-1 and a Stage-2 step (lr ~0: the weights stay, so both steps' gradients
compare) on sequences of mixed lengths and must equal padded micro-batches in batch order up to float
rounding (the forwards differ in shape and attention mask, so the matmuls round differently).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from coordexp_rl.config import ConfigError, load_config
from coordexp_rl.data.loader import load_samples
from learner.batching import forward_tokens, micro_batches
from learner.distributed import ParallelPlan
from learner.learner import Learner
from tests.learner.test_multirank import make_rows

OVERRIDES = ["optim.warmup_steps=0", "optim.batch_size=6", "optim.lr=1e-12", "loss.lambda_l1=1.0",
             "loss.lambda_giou=1.0", "loss.lambda_entropy=0.01"]
VARIANTS = {  # name: (overrides, accum_steps); the reference is padded, batch order, 2 micro-batches
    "length": (["learner.micro_batch_order=length"], 2),
    "budget": (["learner.micro_batch_tokens=250"], 1),
    "packed": (["learner.packing=true"], 2),
    "packed_budget": (["learner.packing=true", "learner.micro_batch_tokens=250"], 1),
}


def mixed_lengths(synth_dir) -> list:
    """6 samples of 1 to 3 objects (55 to 79 tokens), long and short ones alternating."""
    by_count: dict[int, list] = {}
    for s in load_samples(synth_dir / "train.jsonl"):
        by_count.setdefault(len(s.objects), []).append(s)
    return [by_count[n][i] for i, n in enumerate((1, 3, 1, 3, 2, 2))]


@pytest.fixture(scope="module")
def samples(synth_dir):
    return mixed_lengths(synth_dir)


def run(tiny_model_dir, samples, overrides=(), accum_steps=2) -> list[dict]:
    """A Stage-1 then a Stage-2 step: each step's metrics and gradients."""
    cfg = load_config(None, [*OVERRIDES, *overrides])
    learner = Learner(cfg, tiny_model_dir, ParallelPlan(accum_steps=accum_steps))
    rows = make_rows(learner, samples)
    by_id = {s.sample_id: s for s in samples}
    out = []
    for step in (lambda: learner.stage1_step(samples), lambda: learner.stage2_step(rows, by_id)):
        metrics = step()
        grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
        out.append({"metrics": metrics, "grads": grads, "micro": learner._micro_batches(learner.sequences.stage1(
            samples, 0))})
    out[0]["ious"] = learner.teacher_forced_ious(samples, batch_size=4)  # the evaluation forward packs too
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir, samples):
    return run(tiny_model_dir, samples)


def test_reference_has_mixed_lengths_and_trains_every_term(reference):
    lengths = [len(s.input_ids) for s in sum(reference[0]["micro"], [])]
    assert len(set(lengths)) == 3, lengths
    s1, s2 = reference[0]["metrics"], reference[1]["metrics"]
    assert s1["loss/l1_coord"] > 0 and s1["loss/giou_coord"] > 0 and s2["loss/geo_self"] > 0
    assert s2["match/parse_failure_rate"] > 0 and s2["match/matched"] > 0
    assert s1["pad_fraction"] > 0 and s2["pad_fraction"] > 0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_micro_batch_layout_leaves_the_loss_and_gradients_unchanged(tiny_model_dir, samples, reference, name):
    overrides, accum = VARIANTS[name]
    got = run(tiny_model_dir, samples, overrides, accum)
    for step, (g, w) in enumerate(zip(got, reference)):
        losses = [k for k in w["metrics"] if k.startswith(("loss/", "match/")) or k == "grad_norm"]
        for k in losses:
            assert g["metrics"][k] == pytest.approx(w["metrics"][k], rel=1e-5, abs=1e-7), (step, k)
        assert g["grads"].keys() == w["grads"].keys()
        for n, gw in w["grads"].items():
            torch.testing.assert_close(g["grads"][n], gw, rtol=1e-4, atol=1e-5 * float(gw.abs().max()),
                                       msg=f"step {step} {n}")
    for g, w in zip(got[0]["ious"], reference[0]["ious"]):
        assert g == pytest.approx(w, abs=1e-5)
    # fewer pad tokens: sorted micro-batches pad less (none, where each holds one length); packed rows none
    for step in (0, 1):
        pad, ref_pad = got[step]["metrics"]["pad_fraction"], reference[step]["metrics"]["pad_fraction"]
        assert pad == 0.0 if "packed" in name else pad < ref_pad, (step, pad, ref_pad)
    if "budget" in name:  # micro-batches within 250 forward tokens (every sequence here is shorter)
        assert all(forward_tokens(m, "packed" in name) <= 250 for m in got[0]["micro"])
        assert len(got[0]["micro"]) > 1


def _seqs(*lengths):
    return [SimpleNamespace(input_ids=torch.zeros(n, dtype=torch.long), n=n) for n in lengths]


def test_micro_batches_by_count_by_length_and_under_a_budget():
    seqs = _seqs(5, 9, 5, 9)
    assert [[s.n for s in m] for m in micro_batches(seqs, 2)] == [[5, 9], [5, 9]]
    assert [[s.n for s in m] for m in micro_batches(seqs, 2, "length")] == [[5, 5], [9, 9]]
    assert sum(forward_tokens(m) for m in micro_batches(seqs, 2)) == 36
    assert sum(forward_tokens(m) for m in micro_batches(seqs, 2, "length")) == 28
    # a budget: padded count x longest, packed the sum; a sequence over it goes alone; all of them, once
    seqs = _seqs(3, 12, 4, 5, 4)
    assert [[s.n for s in m] for m in micro_batches(seqs, 1, max_tokens=12)] == [[3, 4, 4], [5], [12]]
    assert [[s.n for s in m] for m in micro_batches(seqs, 1, max_tokens=12, packed=True)] == [[3, 4, 4], [5], [12]]
    assert [[s.n for s in m] for m in micro_batches(seqs, 1, max_tokens=16, packed=True)] == [[3, 4, 4, 5], [12]]
    assert [[s.n for s in m] for m in micro_batches(seqs, 1, max_tokens=10)] == [[3, 4], [4, 5], [12]]


def test_a_token_budget_and_a_fixed_count_are_refused_together():
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        load_config(None, ["learner.micro_batch_tokens=4096", "learner.accum_steps=2", "optim.batch_size=8"])
