"""The rollout actors start beside Stage-1 (launch.Driver.check_actors): an actor that cannot start stops the
run at the next Stage-1 chunk with its own error, not after Stage-1 at the first sync."""

from __future__ import annotations

import time

import pytest

from coordexp_rl.config import load_config
from coordexp_rl.driver.driver import Driver

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

    driver = Driver(load_config(None, [f"run.out_dir={tmp_path}"]))
    driver.actors = [Actor.remote(False), Actor.remote(True)]
    driver.starting = [a.weight_version.remote() for a in driver.actors]
    driver.check_actors()  # neither is up yet: Stage-1 goes on
    assert len(driver.starting) == 2
    with pytest.raises(ray.exceptions.RayActorError, match="no model at /nowhere"):
        for _ in range(300):
            driver.check_actors()
            time.sleep(0.1)
