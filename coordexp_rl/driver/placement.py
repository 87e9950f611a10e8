"""Where a run's workers go: one Ray bundle per rollout actor and per learner rank, reserved up front.

Used by the driver (``coordexp_rl.launch``): ``connect_ray(cfg)`` then ``reserve_resources(cfg, local)``:
the rollout actors' group (PACK) and the learner ranks' group (STRICT_PACK), apart. On a Ray this launch
started (``local``) the cluster cannot grow, so a request larger than it is refused at once; on a cluster
it joined, the groups are created and waited for (``run.placement_timeout_s``, with progress lines): nodes
may still be joining, and a pending group is what asks an autoscaler for them.
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from coordexp_rl.config import Config

log = logging.getLogger("coordexp_rl.launch")


class ResourceError(RuntimeError):
    """The config asks for more than the cluster has."""


def bundles(cfg: Config) -> list[dict[str, float]]:
    """One bundle per rollout actor, then one per learner rank (dedicated devices for each); a role's
    ``node_resource`` pins its bundles to the nodes that declare that custom resource."""
    rollout, learner = cfg.rollout, cfg.learner
    actor = {"CPU": rollout.cpus_per_actor, **({"GPU": rollout.gpus_per_actor} if rollout.gpus_per_actor else {}),
             **({rollout.node_resource: 1.0} if rollout.node_resource else {})}
    rank = {"CPU": learner.cpus, **({"GPU": learner.gpus} if learner.gpus else {}),
            **({learner.node_resource: 1.0} if learner.node_resource else {})}
    return [dict(actor) for _ in range(rollout.num_actors)] + [dict(rank) for _ in range(learner.world_size)]


def placement_groups(cfg: Config) -> dict[str, tuple[list[dict[str, float]], str]]:
    """Rollout actors and learner ranks in separate placement groups, so neither takes the other's devices;
    the learner's is STRICT_PACK (all ranks on one node: FSDP's all-gathers stay on NVLink)."""
    b, n = bundles(cfg), cfg.rollout.num_actors
    return {"rollout": (b[:n], "PACK"), "learner": (b[n:], "STRICT_PACK")}


def connect_ray(cfg: Config, log_to_driver: bool = True) -> bool:
    """Join ``run.ray_address`` / ``RAY_ADDRESS`` (inside `ray job submit`), else start a local Ray; True
    for a local Ray (one that cannot grow). ``log_to_driver``: print the actors' output here (a quiet
    launch writes it into the run folder instead: driver/console.py)."""
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        need = sum(b.get("CPU", 0) for b in bundles(cfg))
        ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
                 include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=log_to_driver)
    log.info("ray: %s", ray.cluster_resources())
    return not address


def shortfall(cfg: Config, have: dict) -> str:
    """What the config asks for beyond ``have`` (Ray resources), with the knobs; "" when it fits."""
    wanted = bundles(cfg)
    for role, key in (("rollout", cfg.rollout.node_resource), ("learner", cfg.learner.node_resource)):
        want = sum(b.get(key, 0) for b in wanted) if key else 0
        if want > have.get(key, 0):
            return (f"the config asks for {want:g} {key} ({role}.node_resource), the cluster has {have.get(key, 0):g}; "
                    f"declare it on the {role} node types (`ray start --resources='{{\"{key}\": 8}}'`, "
                    f"deploy/ray_cluster.yaml) or set {role}.node_resource='' to place anywhere")
    for key in ("CPU", "GPU"):
        want = sum(b.get(key, 0) for b in wanted)
        if want > have.get(key, 0):
            return (f"the config asks for {want:g} {key} ({cfg.rollout.num_actors} rollout actors x "
                    f"{'gpus' if key == 'GPU' else 'cpus'}_per_actor + the learner's), the cluster has "
                    f"{have.get(key, 0):g}; lower rollout.num_actors / rollout.{key.lower()}s_per_actor / "
                    f"learner.{key.lower()}s or add nodes")
    return ""


def reserve_resources(cfg: Config, local: bool = True, poll_s: float = 30.0) -> dict:
    """The ``placement_groups(cfg)``, ready (role -> group, None for a role without bundles). ResourceError
    naming the knobs when a local Ray is too small, or when the groups are not ready after
    ``run.placement_timeout_s`` (progress logged every ``poll_s``)."""
    missing = shortfall(cfg, ray.cluster_resources())
    if missing and local:
        raise ResourceError(missing)
    timeout = cfg.run.placement_timeout_s
    if missing:
        log.warning("%s: waiting up to run.placement_timeout_s=%g s for nodes to join", missing, timeout)
    groups = placement_groups(cfg)
    pgs = {role: placement_group(b, strategy=strategy) if b else None for role, (b, strategy) in groups.items()}
    pending = {pg.ready(): role for role, pg in pgs.items() if pg is not None}
    start = time.monotonic()
    while pending:
        left = timeout - (time.monotonic() - start)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=max(0.0, min(poll_s, left)))
        for ref in ready:
            ray.get(ref)
            log.info("placement group of the %s ready", pending.pop(ref))
        if not pending:
            break
        waiting = ", ".join(f"{role} ({_describe(groups[role][0])})" for role in pending.values())
        if time.monotonic() - start >= timeout:
            for pg in pgs.values():
                if pg is not None:
                    remove_placement_group(pg)
            raise ResourceError(
                f"placement groups not ready after run.placement_timeout_s={timeout:g} s: {waiting}; the cluster "
                f"has {_describe([ray.available_resources()])} free of {_describe([ray.cluster_resources()])}; "
                "lower rollout.num_actors / rollout.gpus_per_actor / rollout.cpus_per_actor / learner.gpus / "
                "learner.cpus, add nodes, or raise run.placement_timeout_s")
        log.info("waiting for placement: %s; %.0f s of %g s; the cluster has %s free", waiting,
                 time.monotonic() - start, timeout, _describe([ray.available_resources()]))
    return pgs


def node_ids(pg) -> list[str]:
    """The node id of each bundle of ``pg`` now, in bundle order ("" while Ray reschedules a bundle whose
    node was lost: the group waits for a node with the bundle's resources, then its actors restart there)."""
    table = placement_group_table(pg)
    return [table["bundles_to_node_id"].get(i) or "" for i in range(len(table["bundles"]))]


def bundle_text(bundle: dict) -> str:
    """One bundle's resources: ``{8 CPU, 1 GPU, 1 coordexp_rollout}`` (one it does not ask for is left out)."""
    keys = ["CPU", "GPU", *sorted(k for k in bundle if k not in ("CPU", "GPU"))]
    return "{" + ", ".join(f"{bundle[k]:g} {k}" for k in keys if bundle.get(k)) + "}"


def _describe(bundle_list: list[dict]) -> str:
    """Bundles summed over CPU and GPU: ``4 x {8 CPU, 1 GPU}`` for equal bundles, else the totals."""
    if not bundle_list:
        return "nothing"
    if len(bundle_list) > 1 and all(b == bundle_list[0] for b in bundle_list):
        return f"{len(bundle_list)} x {bundle_text(bundle_list[0])}"
    keys = ["CPU", "GPU", *sorted({k for b in bundle_list for k in b} - {"CPU", "GPU"})]
    keys = [k for k in keys if any(b.get(k) for b in bundle_list)]
    return ", ".join(f"{sum(b.get(k, 0) for b in bundle_list):g} {k}" for k in keys)
