"""Step ``fsdp``: the multi-rank learner code path with one rank: FSDP2 over NCCL, then a checkpoint round trip.

A one-rank process group is initialised in this process (``learner.distributed.init_process_group``,
what each ``LearnerActor`` rank runs), the Learner shards its model with ``fully_shard`` (DTensor
parameters, the root ``LossForward`` module), takes Stage-1 steps, saves a checkpoint (full state
gathered to CPU), takes one more step, restores the checkpoint and takes that step again: the weights
after the restore must equal the saved ones exactly, and the repeated step must give the same loss.
The dry run does the same over gloo on the CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from coordexp_rl.tools.gpu_check.build import SHALLOW
from coordexp_rl.tools.gpu_check.common import Profile, Timer, peak_memory, require, require_cuda, reset_peak, rounded
from coordexp_rl.tools.gpu_check.train import learner_overrides, load_data


def run(work: Path, p: Profile) -> dict:
    require_cuda(p)
    require("pydantic", why="coordexp_rl.config and the data contract are pydantic models")
    import torch.distributed as dist

    from learner.distributed import free_port, init_process_group

    use_cuda = p.device == "cuda"
    with Timer() as t:
        init_process_group(0, 1, "127.0.0.1", free_port(), use_cuda=use_cuda, timeout_s=120)
    out: dict = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "init_s": round(t.s, 2)}
    try:
        out.update(round_trip(work, p))
    finally:
        dist.destroy_process_group()
    return out


def round_trip(work: Path, p: Profile) -> dict:
    from coordexp_rl.config import load_config
    from learner.distributed import ParallelPlan, is_sharded
    from learner.learner import Learner

    samples = load_data(work)
    batch = samples[:p.batch_size]
    cfg = load_config(None, learner_overrides(p))
    with Timer() as t:
        learner = Learner(cfg, work / SHALLOW, plan=ParallelPlan(sharding="fsdp"))
    out: dict = {"model": str(work / SHALLOW), "load_s": round(t.s, 1), "autocast": learner.autocast,
                 "parameters_are_dtensors": all(is_sharded(q) for q in learner.params)}
    reset_peak()
    with Timer() as t:
        losses = [learner.stage1_step(batch)["loss/total"] for _ in range(2)]
    out["steps_s"] = round(t.s, 2)
    ckpt = work / "fsdp_checkpoint"
    with Timer() as t:
        learner.save(ckpt, {"cursor": 2})
    out["save_s"] = round(t.s, 2)
    out["checkpoint_gib"] = round(sum(f.stat().st_size for f in ckpt.iterdir()) / 2 ** 30, 3)
    saved = _fingerprint(learner)
    after = learner.stage1_step(batch)["loss/total"]
    with Timer() as t:
        data = learner.load(ckpt)
    out["load_checkpoint_s"] = round(t.s, 2)
    restored = _fingerprint(learner)
    again = learner.stage1_step(batch)["loss/total"]
    with Timer() as t:
        version, named = learner.publish()  # gathers every tensor whole (what a weight sync sends)
    out["publish_s"] = round(t.s, 2)
    out["published_tensors"] = len(named)
    shutil.rmtree(ckpt, ignore_errors=True)
    out.update(rounded({"losses": losses, "loss_after_save": after, "loss_after_restore": again}, 6))
    out["restored_weights_equal"] = restored == saved
    out["loss_repeat_abs_diff"] = abs(after - again)
    out["data_state"] = data
    out.update(peak_memory() or {})
    if not out["restored_weights_equal"] or learner.step != 3:  # 2 steps, save, 1 step, restore, 1 step
        raise AssertionError(f"checkpoint round trip: weights equal {out['restored_weights_equal']}, "
                             f"step {learner.step} (expected 3)")
    if abs(after - again) > 1e-3 * max(1.0, abs(after)):
        raise AssertionError(f"the step after the restore gave loss {again}, the same step before it {after}")
    return out


def _fingerprint(learner) -> list[float]:
    """Per-parameter float64 sums of the whole (gathered) tensors (one optimizer step changes them all)."""
    from learner.distributed import full_tensor

    return [float(full_tensor(q.detach()).double().sum()) for q in learner.model.parameters()]
