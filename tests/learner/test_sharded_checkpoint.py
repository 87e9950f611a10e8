"""Sharded checkpoints on gloo ranks: 2 -> 2, 2 -> 1, 1 -> 2, with optimizer state, scheduler and RNG.

An FSDP learner writes the sharded layout (each rank its own shard, learner/sharded_files.py), a one-rank
learner the full one; each is loaded by learners of another world size and sharding. After the load the
whole model and optimizer state (gathered) must equal what the writer held when it saved, bit for bit, the
RNG must draw what the writer drew next, and the next training step must give the writer's loss.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.multiprocessing as mp

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from learner.checkpoint import CheckpointError, read_state
from learner.distributed import ParallelPlan, free_port
from learner.learner import Learner

OVERRIDES = ["optim.warmup_steps=0", "optim.batch_size=4", "optim.lr=1e-3", "loss.lambda_giou=0"]


def full_state(learner) -> dict:
    """Whole model and optimizer state by parameter name, on every rank (a collective on W ranks)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    model = get_model_state_dict(learner.model, options=opts)
    optim = get_optimizer_state_dict(learner.model, learner.optimizer, options=opts)
    return {"model": {k: v.detach().clone() for k, v in model.items()},
            "optim": {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in s.items()}
                      for k, s in optim["state"].items()},
            "lr": learner.scheduler.get_last_lr()}


def _rank(rank: int, world: int, port: int, model_dir: str, train_path: str, jobs: list, out: str):
    """One process of a world: each job writes (trains 2 steps, saves) or reads (loads) a checkpoint,
    then records the state, the next RNG draw and the next step's loss. Rank 0 saves the records."""
    import torch.distributed as dist

    from coordexp_rl.runtime import prepare_runtime
    from learner.distributed import init_process_group

    prepare_runtime()
    if world > 1:
        init_process_group(rank, world, "127.0.0.1", port, use_cuda=False, timeout_s=120)
    samples = load_samples(train_path)
    records = {}
    for name, sharding, action, path in jobs:
        learner = Learner(load_config(None, OVERRIDES), model_dir, ParallelPlan(sharding=sharding))
        if action == "write":
            for i in range(2):
                learner.stage1_step(samples[4 * i:4 * i + 4])
            learner.save(path, {"stream": {"epoch": 0, "index": 8, "seed": 0}})
        else:
            assert learner.load(path) == {"stream": {"epoch": 0, "index": 8, "seed": 0}}
        rec = {"state": full_state(learner), "step": learner.step, "rng": torch.rand(4)}
        rec["loss"] = learner.stage1_step(samples[8:12])["loss/total"]
        records[name] = rec
    if rank == 0:
        torch.save(records, out)
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, jobs: list, tiny_model_dir, synth_dir, out) -> dict:
    mp.spawn(_rank, nprocs=world, join=True,
             args=(world, free_port(), str(tiny_model_dir), str(synth_dir / "train.jsonl"), jobs, str(out)))
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, synth_dir, tmp_path_factory):
    """Two writers (2 FSDP ranks: sharded; 1 rank: full) and the readers of each at the other world size."""
    tmp = tmp_path_factory.mktemp("sharded")
    a, b = tmp / "fsdp2", tmp / "one_rank"
    args = (tiny_model_dir, synth_dir)
    rec = run_world(2, [("write2", "fsdp", "write", a)], *args, tmp / "w2.pt")
    rec |= run_world(1, [("write1", "replicate", "write", b), ("2to1", "replicate", "read", a)], *args, tmp / "r1.pt")
    rec |= run_world(2, [("2to2", "fsdp", "read", a), ("1to2", "fsdp", "read", b)], *args, tmp / "r2.pt")
    return {"paths": {"sharded": a, "full": b}, **rec}


def assert_same_state(got: dict, want: dict):
    assert got["model"].keys() == want["model"].keys()
    for k, w in want["model"].items():
        assert torch.equal(got["model"][k], w), k
    assert got["optim"].keys() == want["optim"].keys() and want["optim"]
    for k, w in want["optim"].items():
        for n, t in w.items():
            assert torch.equal(torch.as_tensor(got["optim"][k][n]), torch.as_tensor(t)), (k, n)
    assert got["lr"] == want["lr"]


def test_each_rank_writes_its_own_shard(runs):
    folder = runs["paths"]["sharded"]
    state = read_state(folder)
    assert state["layout"] == "sharded" and state["world_size"] == 2
    assert sorted(p.name for p in (folder / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (folder / "rng-0.pt").is_file() and (folder / "rng-1.pt").is_file()
    assert not (folder / "model.safetensors").exists()  # no rank gathered the whole model
    assert read_state(runs["paths"]["full"])["layout"] == "full"


@pytest.mark.parametrize("reader, writer", [("2to2", "write2"), ("2to1", "write2"), ("1to2", "write1")])
def test_a_checkpoint_resumes_on_another_world_size(runs, reader, writer):
    got, want = runs[reader], runs[writer]
    assert got["step"] == want["step"] == 2
    assert_same_state(got["state"], want["state"])
    assert torch.equal(got["rng"], want["rng"])
    # The next step: the same batch from the same state; ranks sum in another order (float rounding).
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_a_foreign_object_in_the_shard_metadata_is_refused_before_it_runs(runs, tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(runs["paths"]["sharded"], folder)
    target = tmp_path / "pwned"
    (folder / "shards" / ".metadata").write_bytes(pickle.dumps(_Payload(str(target))))
    learner = Learner(load_config(None, OVERRIDES), tiny_model_dir)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="do not load"):
        learner.load(folder)
    assert not target.exists()
    assert all(torch.equal(v, before[k]) for k, v in learner.model.state_dict().items())


class _Payload:
    """Creates a file when unpickled (what a malicious metadata file could do)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.target),)


def test_export_consolidates_a_sharded_checkpoint_group_by_group(runs, tmp_path):
    """The export of the 2-rank checkpoint holds the writer's weights; read 64 KiB at a time, the same."""
    from safetensors.torch import load_file

    from coordexp_rl.tools.export import export_checkpoint
    from learner import sharded_files

    want = runs["write2"]["state"]["model"]
    grouped = dict(sharded_files.read_tensors(runs["paths"]["sharded"] / "shards", want, "model.", 1 << 16))
    assert all(torch.equal(grouped[k], w) for k, w in want.items())
    out = export_checkpoint(runs["paths"]["sharded"], tmp_path / "model")
    got = {}
    for f in out.glob("*.safetensors"):
        got |= load_file(str(f))
    for k, w in want.items():
        if k in got:  # a tied lm_head is stored once
            assert torch.equal(got[k], w), k
    assert "model.language_model.embed_tokens.weight" in got and len(got) >= len(want) - 1
