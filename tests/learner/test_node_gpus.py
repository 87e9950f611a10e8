"""Learner ranks on one node share that node's learner GPUs and each picks its own (learner/group.py
share_node_gpus), as Ray Train does. On CPU: a Ray that declares GPUs it does not have (`num_gpus`), two
ranks in a placement group, each rank's CUDA_VISIBLE_DEVICES and chosen device asserted."""

from __future__ import annotations

import pytest

from coordexp_rl.config import load_config
from learner.group import share_node_gpus
from tests.learner.test_multirank import OVERRIDES

pytestmark = pytest.mark.integration


def test_share_node_gpus_groups_by_node():
    assert share_node_gpus([("n1", ["2"]), ("n1", ["0"]), ("n2", ["5"]), ("n2", ["4"])]) == [
        ("0,2", 1), ("0,2", 0), ("4,5", 1), ("4,5", 0)]
    assert share_node_gpus([("n1", ["10"]), ("n1", ["9"])]) == [("9,10", 1), ("9,10", 0)]  # numeric order


def test_ranks_see_the_node_gpus_and_pick_their_own(tiny_model_dir, synth_dir):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from learner.group import LearnerGroup

    assert not ray.is_initialized()
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, address="local", _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        pg = placement_group([{"CPU": 0.5, "GPU": 1}, {"CPU": 0.5, "GPU": 1}], strategy="STRICT_PACK")
        ray.get(pg.ready(), timeout=60)
        cfg = load_config(None, [*OVERRIDES, "learner.gpus=1"]).model_dump()  # no CUDA here: gloo, CPU
        group = LearnerGroup(cfg, str(tiny_model_dir), str(synth_dir / "train.jsonl"), world_size=2,
                             placement_group=pg, bundle_indices=[0, 1], num_cpus=0.5, num_gpus=1)
        status = ray.get([w.status.remote() for w in group.workers])
        visible = {s["cuda_visible_devices"] for s in status}
        assert len(visible) == 1  # both ranks see the same two GPUs
        shared = visible.pop().split(",")
        assert len(shared) == 2 and sorted({s["local_device"] for s in status}) == [0, 1]
        group.kill()
        remove_placement_group(pg)
    finally:
        ray.shutdown()
