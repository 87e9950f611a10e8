"""FSDP2 mixed precision on 2 gloo ranks: bf16 parameters and all-gathers, float32 reductions, float32
master weights and AdamW state; the step agrees with the one-rank float32 learner within bf16 rounding.

What runs here: the real MixedPrecisionPolicy over gloo on CPUs (bf16 all-gathers of the parameter shards,
float32 reduce-scatters of the gradients), the whole model's forward and backward in bf16 (no autocast on
CPUs), the loss path's bf16 LM head with its float32 log-sum-exp. What does not: NCCL, CUDA kernels, and
the CUDA combination of this policy with autocast (the GPU check's fsdp step runs that).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from coordexp_rl.config import load_config
from learner.distributed import ParallelPlan, free_port
from learner.learner import Learner
from tests.learner.test_multirank import OVERRIDES, make_rows, train


def _rank_main(rank: int, world: int, port: int, model_dir: str, train_path: str, rows, out: str):
    import torch.distributed as dist

    from coordexp_rl.data.loader import load_samples
    from coordexp_rl.runtime import prepare_runtime
    from learner.distributed import init_process_group

    prepare_runtime()
    init_process_group(rank, world, "127.0.0.1", port, use_cuda=False, timeout_s=300)
    learner = Learner(load_config(None, OVERRIDES), model_dir, ParallelPlan(sharding="fsdp", mixed_precision=True))
    seen = set()  # the dtypes a decoder layer's weights have while it runs (gathered)
    layer = learner.model.model.language_model.layers[0]
    layer.register_forward_pre_hook(lambda m, args: seen.add(m.self_attn.q_proj.weight.dtype))
    result = train(learner, load_samples(train_path)[:4], rows)
    state = [s for group in learner.optimizer.state.values() for s in group.values() if torch.is_tensor(s)]
    result.update(gathered=seen, master={p.dtype for p in learner.model.parameters()},
                  adam={s.dtype for s in state if s.dim()})
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def samples(synth_dir):
    from coordexp_rl.data.loader import load_samples

    return load_samples(synth_dir / "train.jsonl")[:4]


def test_fsdp_mixed_precision_on_two_gloo_ranks_tracks_the_one_rank_learner(tiny_model_dir, synth_dir, samples,
                                                                            tmp_path):
    learner = Learner(load_config(None, OVERRIDES), tiny_model_dir)
    rows = make_rows(learner, samples)
    want = train(learner, samples, rows)
    out = tmp_path / "results.pt"
    mp.spawn(_rank_main, nprocs=2, join=True,
             args=(2, free_port(), str(tiny_model_dir), str(synth_dir / "train.jsonl"), rows, str(out)))
    got = torch.load(out, weights_only=False)
    assert got["gathered"] == {torch.bfloat16}  # the layers computed with bf16 all-gathered weights
    assert got["master"] == {torch.float32} and got["adam"] == {torch.float32}
    assert {t.dtype for t in got["published"].values()} == {torch.float32}
    for step, (g, w) in enumerate(zip(got["metrics"], want["metrics"])):
        assert g.keys() == w.keys()
        for k in w:
            # bf16 has 8 bits of mantissa (2^-8 = 0.4 %); losses are sums over hundreds of bf16 products
            assert g[k] == pytest.approx(w[k], rel=2e-2, abs=2e-3), (step, k, g[k], w[k])
