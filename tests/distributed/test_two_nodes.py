"""Two Ray nodes on one machine (two raylets on loopback, as Ray's own multi-node tests do), the real launcher
joining them (`run.ray_address`): the learner on the head (`learner.node_resource`), the rollout actors on the
second node (`rollout.node_resource`), weights synced across the nodes by either transport. In Stage-2 the
rollout node is lost (its raylet and everything under it SIGKILLed): Ray reschedules the rollout placement
group's bundles on a node that joins later and restarts the actors there, which load the newest weights;
a run whose resource no node brings back stops after rollout.gone_timeout_s with a checkpoint and its
resume command. Every row id is consumed once (metrics and the spill files), the rows lost are counted.

Three launcher runs share one cluster and lose the same node at once (each run's own rollout resource):
"object_store" and "broadcast" get a new node, "gone" does not (its resource lives only on the lost node).
"""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest

from coordexp_rl.tools.local_head import ROOT, join_node, kill_node, local_ray_head, token_env
from learner.checkpoint import is_complete
from tests.distributed import launcher

pytestmark = pytest.mark.integration

# The GCS marks a node dead after failure_threshold failed health checks, one per period: a killed raylet
# refuses them at once, so ~6 s here instead of Ray's 15 s (3 s x 5). Ray's 10 s timeout stays: a head
# raylet slow to answer on a loaded machine must not be taken for dead.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "2000", "RAY_health_check_failure_threshold": "3"}
# Stage-2 steps of the runs that get a node back, 2 rows each (SMALL_RUN: on-policy, a sync after every
# step): ~3 s each, enough that neither ends Stage-2 before the other's vLLM engine is up (~20 s apart).
STEPS = 10
RUNS = {
    "object_store": ["weight_sync.transport=object_store", "rollout.node_resource=coordexp_rollout"],
    "broadcast": ["weight_sync.transport=broadcast", "rollout.node_resource=coordexp_rollout"],
    # the transformers engine (the stop does not depend on the engine, which starts in a third of the time);
    # Stage-2 long enough to be still under way when the vLLM runs reach it
    "gone": ["rollout.node_resource=coordexp_rollout_gone", "rollout.gone_timeout_s=20", "rollout.engine=hf",
             "stage2.steps=100",
             # the sync that meets the lost actor asks again while Ray restarts it, up to this long; Ray never
             # can (no node has its resource), so the default 120 s would be waited in full before gone_timeout_s
             "weight_sync.timeout_s=20"],
}


@pytest.fixture(scope="module")
def lost_node_runs(tmp_path_factory, launch_cache) -> dict[str, tuple[int, str, object]]:
    """Name -> (exit code, output, run folder). The kill comes once every run has a Stage-2 record."""
    root = tmp_path_factory.mktemp("two_nodes")
    env = token_env(root, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", **FAST_NODE_DEATH)
    info: dict = {}
    with local_ray_head(env, num_cpus=len(RUNS), info=info, resources={"coordexp_learner": len(RUNS)}, jobs=False):
        node = join_node(env, info["gcs"], num_cpus=3, resources={"coordexp_rollout": 2, "coordexp_rollout_gone": 1})
        outs = {name: root / name for name in RUNS}
        procs = {name: launcher.start(outs[name], launch_cache, f"run.ray_address={info['gcs']}",
                                 "learner.node_resource=coordexp_learner", f"stage2.steps={STEPS}", *o, env=env)
                 for name, o in RUNS.items()}
        try:
            launcher.wait_until_all_in_stage2(procs, outs, 1, timeout_s=500)
            # Right after one of the object_store run's syncs: its actor dies in a step call, not in a sync.
            synced = len(launcher.records(outs["object_store"], "sync"))
            while len(launcher.records(outs["object_store"], "sync")) == synced:
                time.sleep(0.05)
            assert all(p.poll() is None for p in procs.values()), "a run ended Stage-2 before the others began it"
            kill_node(node)
            join_node(env, info["gcs"], num_cpus=2, resources={"coordexp_rollout": 2})  # takes ~20 s itself
            return {name: (launcher.finish(procs[name], outs[name]), launcher.output(outs[name]), outs[name])
                    for name in RUNS}
        finally:
            for p in procs.values():
                launcher.kill_tree(p)


def consumed_ids(out) -> list[tuple[str, int]]:
    """The row ids the learner consumed (Stage-2 records), checked against the spill files' audit trail."""
    ids = [(actor, seq) for r in launcher.records(out, "stage2") for actor, seq, _ in r["rows/ids"]]
    spilled = [(a, s) for p in sorted((out / "spill").glob("rollouts-*.parquet"))
               for a, s in zip(*pq.read_table(p, columns=["actor_id", "seq"]).to_pydict().values())]
    assert sorted(spilled) == sorted(ids)
    assert all(r["rows/duplicate_ids"] == 0 and r["rows/skipped_ids"] == 0 for r in launcher.records(out, "stage2"))
    return ids


def assert_rows_accounted(final: dict) -> None:
    """Every row permitted was put, lost with the dead actor (voided at its restart), or is still permitted
    (at a stop: in flight on the lost node). Rows lost: 0 or 2 (on-policy, 2 per version); this tiny model
    generates them in a fraction of a step, so the kill rarely finds any in flight (test_buffer counts them)."""
    lost = final["buffer/lost_rows"] + final["buffer/outstanding_permits"]
    assert final["buffer/permits_granted"] == final["buffer/rows_in"] + lost and lost in (0, 2)


@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_actors_on_a_lost_node_restart_on_a_node_that_joins_and_every_row_is_consumed_once(lost_node_runs,
                                                                                           transport):
    rc, text, out = lost_node_runs[transport]
    assert rc == 0, text[-4000:]
    first, *_, last = launcher.records(out, "placement")
    head = first["driver"]  # the launcher joined the head; the buffer is there too
    assert first["learner"] == [head] and first["rollout"][0] not in ("", head)  # the two nodes
    lost = first["rollout"][0]
    assert lost == launcher.records(lost_node_runs["gone"][2], "placement")[0]["rollout"][0]  # the node killed
    assert last["learner"] == [head] and last["rollout"][0] not in ("", head, lost)  # restarted on the new node
    assert "rollout-0 is gone" in text and "rollout-0 is back" in text

    ids = consumed_ids(out)
    assert sorted(seq for _, seq in ids) == list(range(2 * STEPS))  # each once, none skipped
    syncs = launcher.records(out, "sync")
    assert len(syncs) == 1 + STEPS  # across the nodes
    # The kill falls between the object_store run's syncs; the broadcast run's may meet the dying actor, which
    # keeps its old weights and loads the newest at its restart (test_sync_faults): one failed sync at most.
    failed = [r["failed_actors"] for r in syncs if r["failed_actors"]]
    assert failed == [] if transport == "object_store" else failed in ([], [1])
    final = launcher.records(out, "rollout")[-1]
    assert final["supervisor/actor_deaths"] == final["supervisor/actor_recoveries"] == 1
    assert final["buffer/stale_dropped"] == 0
    assert_rows_accounted(final)


def test_with_no_node_returning_the_run_stops_after_gone_timeout_with_its_resume_command(lost_node_runs):
    rc, text, out = lost_node_runs["gone"]
    assert rc == 4, text[-4000:]
    assert "every rollout actor has been gone for more than rollout.gone_timeout_s=20 s" in text
    checkpoint = text.split("Checkpoint: ")[1].split()[0]
    assert is_complete(checkpoint) and f"run.resume={checkpoint}" in text
    ids = consumed_ids(out)
    assert sorted(seq for _, seq in ids) == list(range(len(ids)))  # what it consumed, each once
    final = launcher.records(out, "rollout")[-1]
    assert final["actors/0/gone"] == 1  # logged at the stop
    assert_rows_accounted(final)
