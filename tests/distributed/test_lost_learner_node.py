"""The learner's node lost (two raylets on one machine, as in test_two_nodes): the learner ranks on it die,
Ray re-places the learner's placement-group bundles on a node that joins with `learner.node_resource`, and the
driver re-forms the group there from the newest checkpoint; a run whose learner resource no node brings back
stops after run.placement_timeout_s with its checkpoint and resume command (exit 5).

Two launcher runs share one cluster, with the rollout actors on the head and each learner on the second node,
which is lost in Stage-2: "back" gets a new node with its resource, "gone" does not.
"""

from __future__ import annotations

from collections import Counter

import pyarrow.parquet as pq
import pytest

from coordexp_rl.tools.local_head import ROOT, join_node, kill_node, local_ray_head, token_env
from learner.checkpoint import is_complete
from tests.distributed import launcher
from tests.distributed.test_two_nodes import FAST_NODE_DEATH

pytestmark = pytest.mark.integration

# Stage-2 steps of the run that gets a node back, 2 rows each (SMALL_RUN), a checkpoint every 2: ~1.2 s each,
# so that it is still in Stage-2 when the other run (started with it) has begun its own
STEPS = 16
# the fault is the learner's: the transformers engine (it starts in a third of vLLM's time), on the head
ROLLOUT = ["rollout.engine=hf", "rollout.node_resource=coordexp_rollout"]
RUNS = {
    "back": ["learner.node_resource=coordexp_learner", f"stage2.steps={STEPS}"],
    # long enough to be still under way at the kill; its learner resource lives only on the lost node
    "gone": ["learner.node_resource=coordexp_learner_gone", "stage2.steps=100", "run.placement_timeout_s=20"],
}


@pytest.fixture(scope="module")
def lost_learner_runs(tmp_path_factory, launch_cache) -> dict[str, tuple[int, str, object]]:
    """Name -> (exit code, output, run folder). The kill comes once both runs are in Stage-2."""
    root = tmp_path_factory.mktemp("lost_learner")
    env = token_env(root, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", **FAST_NODE_DEATH)
    info: dict = {}
    with local_ray_head(env, num_cpus=len(RUNS), info=info, resources={"coordexp_rollout": len(RUNS)}, jobs=False):
        node = join_node(env, info["gcs"], num_cpus=len(RUNS),
                         resources={"coordexp_learner": 1, "coordexp_learner_gone": 1})
        outs = {name: root / name for name in RUNS}
        procs = {name: launcher.start(outs[name], launch_cache, f"run.ray_address={info['gcs']}", *ROLLOUT, *o,
                                  env=env)
                 for name, o in RUNS.items()}
        try:
            launcher.wait_until_all_in_stage2(procs, outs, 2, timeout_s=400)  # a Stage-2 checkpoint each
            assert all(p.poll() is None for p in procs.values()), "a run ended Stage-2 before the other began it"
            kill_node(node)
            join_node(env, info["gcs"], num_cpus=1, resources={"coordexp_learner": 1})
            return {name: (launcher.finish(procs[name], outs[name]), launcher.output(outs[name]), outs[name])
                    for name in RUNS}
        finally:
            for p in procs.values():
                launcher.kill_tree(p)


def test_a_lost_learner_node_is_replaced_by_one_that_joins_and_every_row_is_consumed_once(lost_learner_runs):
    rc, text, out = lost_learner_runs["back"]
    assert rc == 0, text[-4000:]
    first, *_, last = launcher.records(out, "placement")
    lost = first["learner"][0]
    assert lost not in ("", first["driver"]) and first["rollout"] == [first["driver"]]
    assert last["learner"][0] not in ("", lost, first["driver"])  # re-formed on the node that joined
    (fault,) = launcher.records(out, "fault")
    assert fault["learner_restarts"] == 1 and fault["step"] % 2 == 0 and fault["step"] <= fault["lost_at_step"]
    records = launcher.records(out, "stage2")
    assert [r["step"] for r in records] == list(range(3, 3 + STEPS))  # rewound: each once
    ids = [(actor, seq) for r in records for actor, seq, _ in r["rows/ids"]]
    assert sorted(seq for _, seq in ids) == list(range(2 * STEPS))  # each row once, none skipped
    assert all(r["rows/duplicate_ids"] == 0 and r["rows/skipped_ids"] == 0 for r in records)
    # the spill logs every hand-out: the rows of the steps taken again were handed to the lost learner too
    spilled = Counter((a, s) for p in sorted((out / "spill").glob("rollouts-*.parquet"))
                      for a, s in zip(*pq.read_table(p, columns=["actor_id", "seq"]).to_pydict().values()))
    handed_twice = spilled - Counter(ids)
    assert sum(handed_twice.values()) == 2 * fault["steps_lost"] and set(handed_twice) <= set(ids)


def test_with_no_learner_node_returning_the_run_stops_after_placement_timeout_with_its_resume_command(
        lost_learner_runs):
    rc, text, out = lost_learner_runs["gone"]
    assert rc == 5, text[-4000:]
    assert "learner rank died after step" in text and "within run.placement_timeout_s=20 s (its node lost, none " \
           "with the learner's resources joined)" in text, text[-4000:]
    checkpoint = text.split("Checkpoint: ")[1].split()[0]
    assert is_complete(checkpoint) and f"run.resume={checkpoint}" in text
