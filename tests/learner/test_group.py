"""LearnerGroup: 2 FSDP2 learner ranks as Ray actors behind one LearnerActor-shaped handle (gloo, CPU)."""

from __future__ import annotations

import pytest
import torch

from coordexp_rl.config import load_config
from coordexp_rl.data.loader import load_samples
from coordexp_rl.rollout.schema import rows_to_batch
from coordexp_rl.rollout.weight_transport import unpack_all
from tests.learner.test_multirank import OVERRIDES, TOL, make_rows

pytestmark = pytest.mark.integration


def test_fsdp_group_trains_syncs_checkpoints_and_exports(ray_local, tiny_model_dir, synth_dir, tmp_path):
    ray = ray_local
    from actors.buffer import RolloutBuffer
    from coordexp_rl.modeling.load import load_model_and_processor
    from learner.group import LearnerGroup
    from learner.ray_learner import LearnerWorker

    cfg = load_config(None, OVERRIDES).model_dump()
    train = str(synth_dir / "train.jsonl")
    group = LearnerGroup(cfg, str(tiny_model_dir), train, world_size=2, num_cpus=1, plan={"sharding": "fsdp"})
    one = LearnerWorker(cfg, str(tiny_model_dir), train)  # the one-rank reference, in this process
    assert ray.get(group.status.remote())["world_size"] == 2

    # The same seeded stream on every rank: the group's Stage-1 step is the one-rank step.
    got = ray.get(group.stage1_steps.remote(1))
    want = one.stage1_steps(1)
    assert got[0]["loss/total"] == pytest.approx(want[0]["loss/total"], rel=1e-5)

    # Weight sync: one call, rank 0's ref holds every full tensor, equal to the one-rank learner's.
    version, ref, frozen_ref = ray.get(group.put_weights.remote(64))
    payload = ray.get(ref)
    published = dict(unpack_all(ray.get(payload.buckets)))
    assert frozen_ref is None and payload.omitted == ()  # nothing frozen in this config
    reference = dict(one.learner.publish()[1])
    assert version == payload.version == 1 and list(published) == list(reference)
    for name, w in reference.items():
        torch.testing.assert_close(published[name], w, **TOL, msg=name)

    # Resume: the step after a load repeats the step after the save.
    ckpt = str(tmp_path / "ckpt")
    ray.get(group.save_checkpoint.remote(ckpt))
    after_save = ray.get(group.stage1_steps.remote(1))[0]["loss/total"]
    assert ray.get(group.load_checkpoint.remote(ckpt)) == {"step": 1, "version": 1}
    assert ray.get(group.stage1_steps.remote(1))[0]["loss/total"] == pytest.approx(after_save, rel=1e-6)

    # Stage-2 from a buffer: rank 0 pulls the global batch; an empty buffer gives None on every rank.
    samples = load_samples(train)[:4]
    buffer = RolloutBuffer.remote(capacity=16)
    assert ray.get(buffer.put.remote(rows_to_batch(make_rows(one.learner, samples)), 10))
    metrics = ray.get(group.stage2_step_from_buffer.remote(buffer, 30))
    assert metrics["match/parse_failure_rate"] == 0.25 and metrics["loss/geo_self"] > 0
    assert ray.get(group.stage2_step_from_buffer.remote(buffer, 0.5)) is None

    # Export gathers the shards into one loadable folder, equal to what a sync would send now.
    model, _, _ = load_model_and_processor(ray.get(group.export.remote(str(tmp_path / "export"))))
    payload = ray.get(ray.get(group.put_weights.remote(64))[1])
    for name, w in unpack_all(ray.get(payload.buckets)):
        assert torch.equal(model.state_dict()[name], w), name
    group.kill()


def test_frozen_vision_is_packed_once_per_learner_life(ray_local, tiny_model_dir, synth_dir):
    """model.freeze_vision: every sync's payload leaves the vision tower out (and says so); the tower's own
    payload is built at the first sync only and handed out again after (for actors that start later)."""
    ray = ray_local
    from learner.ray_learner import LearnerWorker

    cfg = load_config(None, [*OVERRIDES, "model.freeze_vision=true"]).model_dump()
    worker = LearnerWorker(cfg, str(tiny_model_dir), str(synth_dir / "train.jsonl"))
    frozen = worker.learner.frozen_names()
    assert frozen and all(".visual." in n for n in frozen)
    (v1, ref1, frozen1), (v2, ref2, frozen2) = worker.put_weights(64), worker.put_weights(64)
    assert (v1, v2) == (1, 2) and frozen2 == frozen1  # the same object: not packed again
    learner_weights = dict(worker.learner.named_weights())
    for ref, names in ((ref1, set(learner_weights) - set(frozen)), (ref2, set(learner_weights) - set(frozen)),
                       (frozen1, set(frozen))):
        payload = ray.get(ref)
        got = dict(unpack_all(ray.get(payload.buckets)))
        assert set(got) == names and set(payload.omitted) == (set(frozen) if ref is not frozen1 else set())
        for name, w in got.items():
            assert torch.equal(w, learner_weights[name]), name


def test_a_restart_whose_rendezvous_port_is_taken_starts_again_on_another(ray_local, tiny_model_dir, synth_dir,
                                                                         monkeypatch):
    """Rank 0 cannot bind a port someone else listens on, and rank 1 would wait for it until dist_timeout_s:
    restart() ends both at once and starts the group again on a new port (seen once in CI: EADDRINUSE)."""
    import socket
    import time

    import learner.group as group_module
    from learner.group import LearnerGroup

    ray = ray_local
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(8)  # rank 1 connects here and waits for a store that never answers
    picks = []
    real = group_module._rendezvous_address

    class TakenPort:
        def remote(self):
            return ray.put(("127.0.0.1", taken.getsockname()[1]))

    class FirstTaken:  # the first start of restart() gets the taken port, later ones a free one
        def options(self, **kw):
            picks.append(kw)
            return TakenPort() if len(picks) == 2 else real.options(**kw)

    cfg = load_config(None, OVERRIDES).model_dump()
    group = LearnerGroup(cfg, str(tiny_model_dir), str(synth_dir / "train.jsonl"), world_size=2, num_cpus=1,
                         dist_timeout_s=600)
    monkeypatch.setattr(group_module, "_rendezvous_address", FirstTaken())
    picks.append({})  # the group's first start, before the patch
    t0 = time.monotonic()
    group.restart()
    assert len(picks) == 3  # the taken port, then a new one
    assert time.monotonic() - t0 < 300  # not dist_timeout_s
    assert ray.get(group.status.remote())["world_size"] == 2
    taken.close()
    group.kill()



def test_a_rank_that_dies_while_its_peer_waits_fails_the_group_call_at_once(ray_local):
    """The peer of a dead rank may wait in an NCCL collective until the group's timeout (1,800 s); the
    group's call must fail with the dead rank's error at once, for the driver to re-form the group. Here
    the peer sleeps, as an NCCL rank would wait (gloo peers fail at once on the closed connection)."""
    ray = ray_local
    import os
    import time

    from learner.group import LearnerGroup

    @ray.remote(num_cpus=0, max_restarts=0)
    class Rank:
        def __init__(self, rank: int):
            self.rank = rank

        def step(self, rank_that_dies: int) -> int:
            if self.rank == rank_that_dies:
                os._exit(1)
            time.sleep(600)  # the peer, waiting for the dead rank
            return self.rank

    for dies in (0, 1):
        group = LearnerGroup.__new__(LearnerGroup)  # the group's fan-out, over stand-in ranks
        group.workers, group.world_size = [Rank.remote(0), Rank.remote(1)], 2
        ray.get([w.__ray_ready__.remote() for w in group.workers])
        start = time.monotonic()
        with pytest.raises(ray.exceptions.RayActorError) as failed:
            ray.get(group.step.remote(dies), timeout=60)
        assert time.monotonic() - start < 30, "the call waited for the sleeping peer"
        assert group.owns(failed.value) and failed.value.actor_id == group.workers[dies]._actor_id.hex()
        group.kill()


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_restart_whose_ranks_cannot_be_placed_gives_up_after_its_timeout(ray_local, world_size):
    """The learner's node lost, none with its resources joined: the ranks' bundles wait for a node, and
    restart() stops waiting after start_timeout_s (one rank: its actor; two: the rendezvous task first)."""
    import time

    from ray.util.placement_group import placement_group, remove_placement_group

    from learner.group import LearnerGroup, LearnerNotPlaced

    # a bundle no node here can hold, as the lost node's bundles wait after it is gone
    pg = placement_group([{"CPU": 1, "coordexp_lost_node": 1}] * world_size, strategy="STRICT_PACK")
    group = LearnerGroup.__new__(LearnerGroup)  # its first start would wait without limit, as a launch does
    group.world_size, group.start_timeout_s, group.workers = world_size, 3.0, []
    group._args = ({}, "model", "train.jsonl", None)
    group._options = dict(placement_group=pg, bundle_indices=list(range(world_size)), num_cpus=1, num_gpus=0,
                          plan=None, dist_timeout_s=60, actor_options=None)
    start = time.monotonic()
    with pytest.raises(LearnerNotPlaced):
        group.restart()
    assert 3.0 <= time.monotonic() - start < 30
    remove_placement_group(pg)
