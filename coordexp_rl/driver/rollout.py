"""The rollout side of a run as the driver holds it: the buffer actor, the rollout actors, their work list.

``start_rollout`` places one actor per bundle of the rollout placement group; they start beside Stage-1
(which needs only the learner) and ``Rollout.raise_start_failure`` raises a failed start as soon as it is
there, not at the end of Stage-1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from actors.buffer import RolloutBuffer
from actors.rollout_actor import RolloutActor
from coordexp_rl.config import Config
from coordexp_rl.rollout.engine import EngineConfig, SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    buffer: object  # the RolloutBuffer actor
    actors: list  # RolloutActor handles, rollout-0 ... rollout-(n-1)
    # Held for the run: a restarted actor's constructor reads it again, and Ray alone frees a large
    # argument once the first construction is done (ray-project/ray#53727; restarts then fail).
    work_list: ray.ObjectRef
    starting: list = field(default_factory=list)  # refs that answer once each actor is up

    def raise_start_failure(self) -> None:
        """Raise a rollout actor's start-up error if one has arrived (non-blocking)."""
        if self.starting:
            ready, self.starting = ray.wait(self.starting, num_returns=len(self.starting), timeout=0)
            ray.get(ready)
            if not self.starting:
                log.info("%d rollout actors up", len(self.actors))


def start_rollout(cfg: Config, group, train: list, model_path: Path, out: Path, resumed: dict,
                  actor_options: dict | None = None) -> Rollout:
    """The buffer (continuing a resumed run's version and row ids) and ``rollout.num_actors`` actors in the
    placement group ``group``, each generating for its shard of ``train``; ``actor_options``: Ray options
    every actor gets (Driver.actor_options)."""
    r, options = cfg.rollout, actor_options or {}
    spill = str(out / cfg.buffer.spill_dir) if cfg.buffer.spill_dir else None
    # Restarted empty when its process dies; the learner's next get restores it (actors/buffer.py). On the
    # driver's node (the head, under `ray job submit`): a lost rollout node must not take the rows with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    buffer = RolloutBuffer.options(max_restarts=cfg.buffer.max_restarts, scheduling_strategy=here, **options).remote(
        cfg.buffer.capacity, cfg.buffer.max_staleness, rows_per_version=cfg.optim.batch_size * cfg.stage2.sync_every,
        spill_dir=spill, version=resumed.get("version", 0), next_seq=resumed.get("consumed"))
    work_list = ray.put([(s.sample_id, str(s.image_path), s.image_rel) for s in train])
    engine = EngineConfig.from_config(cfg, model_path)  # `coordexp-rl infer --config` uses it too
    sampling = SamplingConfig.from_config(r)
    actors = [
        RolloutActor.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor, max_restarts=r.max_restarts, **options).remote(
            engine, work_list, cfg.data.prompt, sampling, batch_size=r.batch_size, actor_id=f"rollout-{i}",
            num_shards=r.num_actors, shard_index=i, buffer=buffer, per_image=r.per_image)
        for i in range(r.num_actors)]
    return Rollout(buffer, actors, work_list, starting=[a.weight_version.remote() for a in actors])
