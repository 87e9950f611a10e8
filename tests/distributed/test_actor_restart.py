"""SIGKILL a rollout actor's process during Stage-2 of the real launcher (vLLM engine, real Ray).

With restarts (the default rollout.max_restarts) Ray restarts it, it loads the newest published weights
from the buffer before generating again (by either weight transport: with `broadcast` the driver leaves
them in the buffer after the death and re-forms the group at the next sync), and the run completes: every
row id (actor, seq) is consumed exactly once, none skipped, each with a weight version within the
staleness bound. The broadcast run is also the scale-out path's run through the launcher: two FSDP2
learner ranks (half a CPU each; `ray job submit` runs the default path in test_ray_job). Without restarts
(max_restarts=0, i.e. the restart code removed) the driver stops after rollout.gone_timeout_s with a
clear message and a checkpoint instead of hanging.
"""

from __future__ import annotations

import re
import signal
import time

import psutil
import pytest

from learner.checkpoint import is_complete
from tests.distributed import launcher

pytestmark = pytest.mark.integration


def rollout_actor_process(proc) -> psutil.Process:
    """The rollout actor's worker process among the launcher's own descendants (its local Ray)."""
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RolloutWorker" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no RolloutWorker process under the launcher")


# 2,000 training images: the actors' work list (~250 KB) is a constructor argument too big to travel inline,
# and Ray alone does not keep such an argument for a restart (ray-project/ray#53727); the embedded default's
# 8,000 and COCO's 118,000 are far bigger still. Keeping it is the driver's work, whatever the transport.
BIG_SET = ["data.synth_train=2000"]
KILL_RUNS = {  # three launcher runs at once (each its own local Ray); every one loses its actor in Stage-2
    "object_store": ["rollout.gone_timeout_s=300", "weight_sync.transport=object_store", *BIG_SET],
    "broadcast": ["rollout.gone_timeout_s=300", "weight_sync.transport=broadcast", "learner.world_size=2",
                  "learner.cpus=0.5", "learner.sharding=fsdp"],
    # the transformers engine: the driver's stop does not depend on the engine, which starts in a third of the time
    "no_restarts": ["rollout.max_restarts=0", "rollout.gone_timeout_s=5", "rollout.engine=hf"],
}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, launch_cache) -> dict[str, tuple[int, str, object]]:
    """Name -> (exit code, output, run folder). The runs share the machine; none depends on its timing
    except the kill, which comes as soon as each run's first Stage-2 record is there."""
    root = tmp_path_factory.mktemp("killed")
    outs = {name: root / name for name in KILL_RUNS}
    procs = {name: launcher.start(outs[name], launch_cache, *o) for name, o in KILL_RUNS.items()}
    pending, deadline = set(procs), time.monotonic() + 400
    while pending:  # kill each run's actor as soon as its first Stage-2 record is there
        for name in sorted(pending):
            if launcher.records(outs[name], "stage2"):
                rollout_actor_process(procs[name]).send_signal(signal.SIGKILL)  # a crash, not a polite ray.kill
                pending.discard(name)
            elif procs[name].poll() is not None or time.monotonic() > deadline:
                for p in procs.values():
                    launcher.kill_tree(p)
                raise AssertionError(f"{name}: no Stage-2 record (rc {procs[name].returncode}):\n"
                                     f"{launcher.output(outs[name])[-4000:]}")
        time.sleep(0.2)
    return {name: (launcher.finish(procs[name], outs[name]), launcher.output(outs[name]), outs[name])
            for name in KILL_RUNS}


@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_a_killed_actor_is_restarted_and_every_row_is_consumed_once(killed_runs, transport):
    rc, text, out = killed_runs[transport]
    assert rc == 0, text[-4000:]
    if transport == "broadcast":  # the scale-out path: two FSDP2 ranks, a sharded model saved whole at the end
        assert "learner group: 2 ranks" in text and is_complete(out / "checkpoints" / "final")
    assert "rollout-0 is gone" in text and "rollout-0 is back" in text
    actors = "".join(p.read_text() for p in (out / "logs").glob("worker-*.log"))  # the actors' own output
    assert "actor rollout-0 restarted" in actors  # the new process registered (and loaded weights) first

    steps = launcher.records(out, "stage2")
    assert [r["step"] for r in steps] == list(range(3, 8))  # 2 Stage-1 steps, then all 5 Stage-2 steps
    ids = [(actor, seq) for r in steps for actor, seq, _ in r["rows/ids"]]
    assert len(ids) == len(set(ids)) == 5 * 2  # none twice
    assert sorted(seq for _, seq in ids) == list(range(10))  # none skipped
    assert all(r["rows/duplicate_ids"] == 0 and r["rows/skipped_ids"] == 0 for r in steps)
    assert max(r["weight_version_lag"] for r in steps) <= 0  # buffer.max_staleness=0 in the small run
    final = launcher.records(out, "rollout")[-1]
    assert final["supervisor/actor_deaths"] == final["supervisor/actor_recoveries"] == 1  # one kill, one restart
    assert final["buffer/stale_dropped"] == 0
    # The new process loaded the learner's weights (a version > 0) before generating, by either transport
    # (broadcast: from the failed sync's object-store fallback or the copy the driver left after the death).
    restarted = re.search(r"actor rollout-0 restarted: next row seq \d+, weight version (\d+)", actors)
    assert restarted and int(restarted.group(1)) >= 1

    # The actors' throughput counters at every sync (and once more at the end of Stage-2).
    syncs = [r["step"] for r in launcher.records(out, "sync")]
    rollout = launcher.records(out, "rollout")
    assert len(syncs) == 1 + 5 and [r["step"] for r in rollout[:-1]] == syncs
    assert all("actors/0/images_per_s" in r or "actors/0/gone" in r for r in rollout)
    assert rollout[-1]["actors/0/images"] > 0 and rollout[-1]["actors/0/tokens_per_s"] > 0


def test_without_restarts_the_driver_stops_with_a_checkpoint_instead_of_hanging(killed_runs):
    rc, text, _ = killed_runs["no_restarts"]
    assert rc == 4, text[-4000:]
    assert "every rollout actor has been gone for more than rollout.gone_timeout_s=5 s" in text
    checkpoint = text.split("Checkpoint: ")[1].split()[0]
    assert is_complete(checkpoint) and "run.resume=" in text
