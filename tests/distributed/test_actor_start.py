"""The rollout actors start beside Stage-1 (``Rollout.raise_start_failure``): an actor that cannot start stops the
run at the next Stage-1 chunk with its own error, not after Stage-1 at the first sync."""

from __future__ import annotations

import time

import pytest

from coordexp_rl.driver.rollout import Rollout

pytestmark = pytest.mark.integration


def test_an_actor_that_fails_to_start_is_reported_during_stage1(ray_local, tmp_path):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Actor:
        def __init__(self, fail: bool):
            time.sleep(0.5)  # still starting when Stage-1 begins
            if fail:
                raise RuntimeError("no model at /nowhere")

        def weight_version(self) -> int:
            return 0

    actors = [Actor.remote(False), Actor.remote(True)]
    rollout = Rollout(buffer=None, actors=actors, work_list=ray.put([]),
                      starting=[a.weight_version.remote() for a in actors])
    rollout.raise_start_failure()  # neither is up yet: Stage-1 goes on
    assert len(rollout.starting) == 2
    with pytest.raises(ray.exceptions.RayActorError, match="no model at /nowhere"):
        for _ in range(300):
            rollout.raise_start_failure()
            time.sleep(0.1)
