"""Where a run's workers go: one Ray bundle per rollout actor and per learner rank, reserved up front.

Used by the driver (``coordexp_rl.launch``): ``connect_ray(cfg)`` then ``reserve_resources(cfg)``: the rollout
actors' group (PACK) and the learner ranks' group (STRICT_PACK), apart.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import placement_group

from coordexp_rl.config import Config

log = logging.getLogger("coordexp_rl.launch")


class ResourceError(RuntimeError):
    """The config asks for more than the cluster has."""


def bundles(cfg: Config) -> list[dict[str, float]]:
    """One bundle per rollout actor, then one per learner rank (dedicated devices for each)."""
    rollout, learner = cfg.rollout, cfg.learner
    actor = {"CPU": rollout.cpus_per_actor, **({"GPU": rollout.gpus_per_actor} if rollout.gpus_per_actor else {})}
    rank = {"CPU": learner.cpus, **({"GPU": learner.gpus} if learner.gpus else {})}
    return [dict(actor) for _ in range(rollout.num_actors)] + [dict(rank) for _ in range(learner.world_size)]


def placement_groups(cfg: Config) -> dict[str, tuple[list[dict[str, float]], str]]:
    """Rollout actors and learner ranks in separate placement groups, so neither takes the other's devices;
    the learner's is STRICT_PACK (all ranks on one node: FSDP's all-gathers stay on NVLink)."""
    b, n = bundles(cfg), cfg.rollout.num_actors
    return {"rollout": (b[:n], "PACK"), "learner": (b[n:], "STRICT_PACK")}


def connect_ray(cfg: Config) -> None:
    """Join ``run.ray_address`` / ``RAY_ADDRESS`` (inside `ray job submit`), else start a local Ray."""
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        need = sum(b.get("CPU", 0) for b in bundles(cfg))
        ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
                 include_dashboard=False, _node_ip_address="127.0.0.1")
    log.info("ray: %s", ray.cluster_resources())


def reserve_resources(cfg: Config) -> dict:
    """The ``placement_groups(cfg)``, ready (role -> group, None for a role without bundles); ResourceError
    naming the knobs when the cluster is too small."""
    wanted = bundles(cfg)
    have = ray.cluster_resources()
    for key in ("CPU", "GPU"):
        want = sum(b.get(key, 0) for b in wanted)
        if want > have.get(key, 0):
            raise ResourceError(
                f"the config asks for {want:g} {key} ({cfg.rollout.num_actors} rollout actors x "
                f"{'gpus' if key == 'GPU' else 'cpus'}_per_actor + the learner's), the cluster has "
                f"{have.get(key, 0):g}; lower rollout.num_actors / rollout.{key.lower()}s_per_actor / "
                f"learner.{key.lower()}s or add nodes")
    pgs = {role: placement_group(b, strategy=strategy) if b else None
           for role, (b, strategy) in placement_groups(cfg).items()}
    ray.get([pg.ready() for pg in pgs.values() if pg is not None], timeout=600)
    return pgs
