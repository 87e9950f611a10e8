"""W learner ranks as Ray actors behind one handle that looks like a single ``LearnerActor``.

``group.X.remote(*args)`` calls ``X`` on every rank (they must all take part: the collectives inside
need them) and returns ONE object ref, which resolves to rank 0's result once every rank has finished,
or raises the first failing rank's error as soon as it fails. So the launcher's
``ray.get(self.learner.X.remote(...))`` and ``ray.wait([step_ref, ...])`` work unchanged.

>>> group = LearnerGroup(cfg.model_dump(), model, train, world_size=2, placement_group=pg,
...                      bundle_indices=[3, 4], num_cpus=1, num_gpus=1)  # doctest: +SKIP
>>> ray.get(group.stage1_steps.remote(10))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from learner.ray_learner import LearnerActor, node_address

log = logging.getLogger(__name__)


class LearnerNotPlaced(RuntimeError):
    """A re-formed group's ranks did not start within ``start_timeout_s``: their node was lost and no node
    with the learner's resources joined (its placement-group bundles wait for one)."""


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Rank 0's node address and a free port there (runs in rank 0's bundle)."""
    return node_address()


@ray.remote(num_cpus=0)
def _node_and_gpus() -> tuple[str, list[str]]:
    """The node and GPU ids of a bundle (runs in it, with the rank's GPUs)."""
    return ray.get_runtime_context().get_node_id(), [str(g) for g in ray.get_gpu_ids()]


def share_node_gpus(placements: list[tuple[str, list[str]]]) -> list[tuple[str, int]]:
    """Per rank, from its (node, own GPU ids): CUDA_VISIBLE_DEVICES = every learner GPU of its node, and the
    index of its own first GPU in that list (its local device). As Ray Train does: Ray masks each actor to
    its own GPU, and NCCL between processes that cannot see each other's devices loses peer access (hangs
    and slower transports were reported on NVSwitch nodes).

    >>> share_node_gpus([("a", ["3"]), ("a", ["1"]), ("b", ["0"])])
    [('1,3', 1), ('1,3', 0), ('0', 0)]
    """
    by_node: dict[str, set[str]] = {}
    for node, gpus in placements:
        by_node.setdefault(node, set()).update(gpus)
    out = []
    for node, gpus in placements:
        shared = sorted(by_node[node], key=int)
        out.append((",".join(shared), shared.index(gpus[0]) if gpus else 0))
    return out


@ray.remote(num_cpus=0)
def _rank0_result(refs: list[ray.ObjectRef]) -> Any:
    """Rank 0's result once every rank has finished; the first rank that fails raises at once (its error,
    the dead actor's id included). At once: the peers of a dead rank may wait in an NCCL collective until
    the group's timeout, and the driver must not wait with them (gloo peers fail at once by themselves)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs[0])


class _FanOut:
    def __init__(self, workers: list, name: str, here: dict):
        self.workers, self.name, self.here = workers, name, here

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        refs = [getattr(w, self.name).remote(*args, **kwargs) for w in self.workers]
        return refs[0] if len(refs) == 1 else _rank0_result.options(**self.here).remote(refs)


class LearnerGroup:
    """``world_size`` ``LearnerWorker`` ranks (rank i in ``bundle_indices[i]`` of ``placement_group``).

    Methods are those of ``LearnerWorker`` (status, stage1_steps, stage2_step_from_buffer,
    put_weights, save_checkpoint, load_checkpoint, export), called as ``group.status.remote()``.
    ``plan``: learner.distributed.ParallelPlan fields (sharding, accum_steps, activation_checkpointing).
    ``start_timeout_s``: how long ``restart`` waits for its ranks to be placed and up (None: no limit).
    """

    def __init__(self, cfg_dict: dict, model_path: str, train_path: str, image_root: str | None = None, *,
                 world_size: int = 1, placement_group=None, bundle_indices: Sequence[int] | None = None,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, plan: dict | None = None,
                 dist_timeout_s: float = 1800.0, actor_options: dict | None = None,
                 start_timeout_s: float | None = None):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if placement_group is not None and (bundle_indices is None or len(bundle_indices) != world_size):
            raise ValueError(f"give one placement-group bundle index per learner rank: world_size {world_size}, "
                             f"bundle_indices {bundle_indices}")
        self.world_size, self.start_timeout_s = world_size, start_timeout_s
        # Kept for restart(): a re-formed group starts from the same arguments.
        self._args = (cfg_dict, model_path, train_path, image_root)
        self._options = dict(placement_group=placement_group, bundle_indices=bundle_indices, num_cpus=num_cpus,
                             num_gpus=num_gpus, plan=plan, dist_timeout_s=dist_timeout_s,
                             actor_options=actor_options)
        self.workers = self._start_workers(*self._args, **self._options)

    def _start_workers(self, cfg_dict: dict, model_path: str, train_path: str, image_root: str | None, *,
                       placement_group, bundle_indices, num_cpus: float, num_gpus: float, plan: dict | None,
                       dist_timeout_s: float, actor_options: dict | None, deadline: float | None = None) -> list:
        """The ranks, starting (``deadline``: time.monotonic() by which their bundles must be placed)."""
        world_size = self.world_size

        def where(rank: int) -> dict:
            if placement_group is None:
                return {}
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group, placement_group_bundle_index=bundle_indices[rank])}

        addr, port = "", 0
        devices: list = [None] * world_size
        if world_size > 1:
            addr, port = _get_placed(_rendezvous_address.options(**where(0)).remote(), deadline)
            if num_gpus:  # ranks on one node see all of its learner GPUs, each picks its own
                devices = share_node_gpus(_get_placed([_node_and_gpus.options(num_gpus=num_gpus, **where(r)).remote()
                                                       for r in range(world_size)], deadline))
        workers = [
            LearnerActor.options(num_cpus=num_cpus, num_gpus=num_gpus, **where(rank), **(actor_options or {})).remote(
                cfg_dict, model_path, train_path, image_root, rank=rank, world_size=world_size,
                master_addr=addr, master_port=port, plan=plan, dist_timeout_s=dist_timeout_s,
                devices=devices[rank])
            for rank in range(world_size)]
        log.info("learner group: %d ranks, rendezvous %s:%d", world_size, addr, port)
        return workers

    def __getattr__(self, name: str) -> _FanOut:  # only for names that are not attributes of the group
        if name.startswith("_") or name in ("workers", "world_size"):
            raise AttributeError(name)
        # on the driver's node: the learner's may be lost, and the driver must see the rank's error, not this task's
        here = {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)}
        return _FanOut(self.workers, name, here)

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w)

    def restart(self, tries: int = 2) -> None:
        """A rank died: end every rank (the survivors may wait in a collective) and start the group again
        in the same bundles, untrained (load a checkpoint next), returning once every rank is up. Every holder
        of this group sees the new ranks. A rank that fails to start (its rendezvous port taken meanwhile,
        say) ends the others at once, which would otherwise wait for it until dist_timeout_s, and the group
        starts again on a new port; the last try's error is raised. Ranks whose node was lost wait for a node
        to join, up to ``start_timeout_s`` in all: then LearnerNotPlaced."""
        deadline = None if self.start_timeout_s is None else time.monotonic() + self.start_timeout_s
        for attempt in range(1, tries + 1):
            self.kill()
            try:
                self.workers = self._start_workers(*self._args, **self._options, deadline=deadline)
                self._wait_started(deadline)
                return
            except LearnerNotPlaced:
                self.kill()
                raise
            except RayActorError as exc:
                if attempt == tries:
                    self.kill()
                    raise
                log.warning("learner group: a rank failed to start (%s); starting the group again", exc)

    def _wait_started(self, deadline: float | None = None, poll_s: float = 30.0) -> None:
        """Until every rank's constructor has returned; the first one that failed raises at once."""
        pending, start = [w.__ray_ready__.remote() for w in self.workers], time.monotonic()
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise LearnerNotPlaced(f"{len(pending)} of {self.world_size} learner ranks not started")
            done, pending = ray.wait(pending, num_returns=1, timeout=poll_s if left is None else min(poll_s, left))
            if done:
                ray.get(done)
            else:
                log.warning("learner group: %d of %d ranks still starting after %.0f s (a rank whose node was lost "
                            "waits for a node with the learner's resources)", len(pending), self.world_size,
                            time.monotonic() - start)

    def owns(self, exc: BaseException) -> bool:
        """Whether the actor error ``exc`` (a RayActorError) is about one of this group's ranks."""
        actor_id = getattr(exc, "actor_id", None)
        return actor_id is not None and actor_id in {w._actor_id.hex() for w in self.workers}


def _get_placed(refs, deadline: float | None):
    """``ray.get(refs)`` of tasks in the group's bundles, by ``deadline`` (they wait for their bundles)."""
    try:
        return ray.get(refs, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except GetTimeoutError:
        raise LearnerNotPlaced("the learner's placement-group bundles were not placed") from None
