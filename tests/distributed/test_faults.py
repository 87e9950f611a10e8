"""Faults injected with run.fail_at into the real launcher (real Ray, the tiny model, the transformers engine
on CPU): a dead buffer, a dead learner in Stage-1 and in Stage-2, a learner or a buffer that cannot come back.

Every run is the launcher's SMALL_RUN (on-policy, a sync after every step, 2 rows per step, one actor), so
the row ids (actor, seq) the learner consumes are known: 2 per Stage-2 step, seq 0..9 over 5 steps, each
once, whatever died in between. All runs go at once, as jobs of one Ray head (a Ray each, four starting at
once, would crowd the 2 cores); only the faults' steps are fixed, not the timings. These faults are the
driver's and the buffer's, not the engine's (a vLLM actor's death and restart: test_actor_restart,
test_two_nodes), so the rollouts come from the transformers engine, which starts in a third of vLLM's time.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from coordexp_rl.config import ConfigError, load_config
from coordexp_rl.driver.faults import FaultInjector
from coordexp_rl.tools.local_head import ROOT, local_ray_head, token_env
from learner.checkpoint import is_complete
from tests.distributed import launcher

pytestmark = pytest.mark.integration

# checkpoints at 2, 4, 6 (Stage-1), 8, 10 (Stage-2); two learner ranks, so that a rank's death is seen by
# the driver while its peer is in (or about to enter) a collective with it
HF = "rollout.engine=hf"
LONGER_STAGE1 = ["stage1.steps=6", "run.keep_last=0", "learner.world_size=2", HF]
FAULT_RUNS = {
    # its Stage-1 is also the uninterrupted one the learner run's is compared with
    "buffer": [*LONGER_STAGE1, "run.fail_at=buffer@stage2:2"],
    # one restart in each stage: from step 2 after step 3, from step 8 after step 9 (learner.max_restarts=2)
    "learner": [*LONGER_STAGE1, "run.fail_at=[learner@stage1:3, learner@stage2:3]"],
    "no_checkpoint": ["stage1.steps=4", "run.fail_at=learner@stage1:1", HF],
    "spent": ["stage1.steps=4", "run.fail_at=learner@stage1:3", "learner.max_restarts=0", HF],
    "buffer_spent": ["stage1.steps=4", "run.fail_at=buffer@stage2:2", "buffer.max_restarts=0", HF],
}


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory, launch_cache) -> dict[str, tuple[int, str, object]]:
    """Name -> (exit code, output, run folder)."""
    root = tmp_path_factory.mktemp("faults")
    env = token_env(root, PYTHONPATH=str(ROOT))
    info: dict = {}
    with local_ray_head(env, num_cpus=3 * len(FAULT_RUNS), info=info, jobs=False):  # 2 learner ranks + 1 actor each
        procs = {name: launcher.start(root / name, launch_cache, f"run.ray_address={info['gcs']}", *overrides,
                                      env=env) for name, overrides in FAULT_RUNS.items()}
        try:
            return {name: (launcher.finish(p, root / name), launcher.output(root / name), root / name)
                    for name, p in procs.items()}
        finally:
            for p in procs.values():
                launcher.kill_tree(p)


def assert_every_row_once(out, steps: range) -> None:
    """The Stage-2 records of ``steps`` (each once: a rewound log), 2 row ids each, seq 0..9 once each."""
    records = launcher.records(out, "stage2")
    assert [r["step"] for r in records] == list(steps)
    ids = [(actor, seq) for r in records for actor, seq, _ in r["rows/ids"]]
    assert sorted(seq for _, seq in ids) == list(range(2 * len(steps)))  # none twice, none skipped
    assert all(r["rows/duplicate_ids"] == 0 and r["rows/skipped_ids"] == 0 for r in records)


def test_a_killed_buffer_is_restarted_and_its_rows_are_generated_again(fault_runs):
    rc, text, out = fault_runs["buffer"]
    assert rc == 0, text[-4000:]
    assert "run.fail_at=buffer@stage2:2: SIGKILL" in text and "the rollout buffer was restarted" in text
    assert_every_row_once(out, range(7, 12))
    final = launcher.records(out, "rollout")[-1]
    # counters of the restarted process: restored once (by the learner's get), from the learner's row ids
    assert final["supervisor/buffer_restarts"] == 1 and final["buffer/restores"] == 1
    assert final["supervisor/actor_deaths"] == 0  # the actor waited for the buffer; it did not die
    # the spill folder continues across the restart: every row handed to the learner in it, once
    import pyarrow.parquet as pq

    spilled = [(a, s) for p in sorted((out / "spill").glob("rollouts-*.parquet"))
               for a, s in zip(*pq.read_table(p, columns=["actor_id", "seq"]).to_pydict().values())]
    assert sorted(s for _, s in spilled) == list(range(10))
    assert json.loads((out / "faults.json").read_text()) == ["buffer@stage2:2"]


def test_a_killed_learner_is_re_formed_from_its_checkpoint_in_either_stage(fault_runs):
    rc, text, out = fault_runs["learner"]
    assert rc == 0, text[-4000:]
    assert text.count("re-forming the learner group from") == 2
    faults = launcher.records(out, "fault")
    assert [(r["step"], r["lost_at_step"], r["learner_restarts"]) for r in faults] == [(2, 3, 1), (8, 9, 2)]
    assert [r["step"] for r in launcher.records(out, "stage1")] == list(range(1, 7))  # rewound: each once
    assert_every_row_once(out, range(7, 12))  # the buffer dropped what came after step 8 and was refilled
    final = launcher.records(out, "rollout")[-1]
    assert final["buffer/restores"] == 1 and final["buffer/stale_dropped"] == 0
    # the actors got the restored weights as a new version, past the one the lost learner published after
    # the checkpoint (v3 at step 8, lost v4 at step 9, restored v5), and step 9 ran again on rows of it
    (restart,) = launcher.records(out, "restart")
    kept = max(r["version"] for r in launcher.records(out, "sync") if r["step"] <= 8)
    assert restart["step"] == 8 and restart["version"] == kept + 2
    step9 = next(r for r in launcher.records(out, "stage2") if r["step"] == 9)
    assert {version for _, _, version in step9["rows/ids"]} == {restart["version"]}


def test_stage1_after_a_learner_restart_equals_the_uninterrupted_run(fault_runs):
    (rc, text, out), (rc_ref, text_ref, ref) = fault_runs["learner"], fault_runs["buffer"]
    assert rc == 0 and rc_ref == 0, (text + text_ref)[-4000:]
    losses = {r["step"]: r["loss/total"] for r in launcher.records(out, "stage1")}
    assert losses == {r["step"]: r["loss/total"] for r in launcher.records(ref, "stage1")}
    a = load_file(str(out / "checkpoints" / "step-000006" / "model.safetensors"))
    b = load_file(str(ref / "checkpoints" / "step-000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_learner_that_cannot_be_re_formed_ends_the_job_with_its_resume_command(fault_runs):
    rc, text, out = fault_runs["no_checkpoint"]
    assert rc == 5, text[-4000:]
    assert "learner rank died after step 1" in text and "no complete checkpoint to re-form the learner" in text
    assert "Resume with:" in text and "run.resume=auto" in text
    assert json.loads((out / "faults.json").read_text()) == ["learner@stage1:1"]  # a resume does not fire it

    rc, text, out = fault_runs["spent"]
    assert rc == 5, text[-4000:]
    assert "learner.max_restarts=0 restarts used up" in text
    checkpoint = text.split("Checkpoint: ")[1].split()[0]
    assert checkpoint.endswith("step-000002") and is_complete(checkpoint) and f"run.resume={checkpoint}" in text


def test_a_buffer_whose_restarts_are_spent_ends_the_job_with_a_checkpoint_and_its_resume_command(fault_runs):
    rc, text, out = fault_runs["buffer_spent"]
    assert rc == 4, text[-4000:]
    stopped = text.split("run stopped: ")[1].split("\n")[0]
    # the learner's or the driver's own words, without the remote traceback Ray wraps around a task's error
    assert stopped.startswith("the rollout buffer died and is not restarted (buffer.max_restarts used up): "), stopped
    checkpoint = text.split("Checkpoint: ")[1].split()[0]  # the Stage-2 checkpoint at step 6, before the kill
    assert checkpoint.endswith("step-000006") and is_complete(checkpoint) and f"run.resume={checkpoint}" in text
    assert [r["step"] for r in launcher.records(out, "stage2")] == [5, 6]


def test_fault_points_are_checked_when_the_config_loads_and_fire_once_per_run_folder(tmp_path):
    assert load_config(None, ["run.fail_at=rollout@stage2:3"]).run.fail_at == ["rollout@stage2:3"]
    with pytest.raises(ConfigError, match=r"run.fail_at: .*'learner@stage3:1' is not ROLE@STAGE:STEP"):
        load_config(None, ["run.fail_at=learner@stage3:1"])
    with pytest.raises(ConfigError, match=r"run.fail_at=buffer@stage2:400: stage2 has stage2.steps=300"):
        load_config(None, ["run.fail_at=buffer@stage2:400"])
    with pytest.raises(ConfigError, match=r"run.fail_at: .*a rollout fault needs stage2"):
        load_config(None, ["run.fail_at=rollout@stage1:3"])
    (tmp_path / FaultInjector.FILE).write_text('["learner@stage1:3"]')  # fired before a restart or a resume
    assert FaultInjector(["learner@stage1:3"], tmp_path).fire_due("stage1", 3, targets={}) == []
