"""The design card's way in: `ray start --head` on 127.0.0.1, then `ray job submit -- python -m coordexp_rl.launch`.

Ray 2.60 turns token authentication on by default; the cluster and the client share one token file
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), which is the choice documented in docs/DEPLOY.md.
"""

import subprocess
from pathlib import Path

import pytest

from coordexp_rl.local_head import RAY, ROOT, launch_job, local_ray_head, token_env

pytestmark = pytest.mark.integration
SHORT_RUN = ["stage1.steps=4", "stage2.steps=4", "stage2.sync_every=2", "data.synth_train=32", "data.synth_val=8",
             "eval.max_samples=8", "rollout.max_new_tokens=48", "optim.batch_size=4"]


JOBS = {
    "object_store": [],  # the default: object-store weight sync, one learner rank
    # the scale-out path: broadcast weight sync over gloo, two FSDP2 learner ranks (half a CPU each)
    "broadcast_fsdp2": ["weight_sync.transport=broadcast", "learner.world_size=2", "learner.cpus=0.5",
                        "learner.sharding=fsdp"],
}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ray_head")
    env = token_env(tmp_path, COORDEXP_CACHE=str(tmp_path / "cache"))
    # 4 logical CPUs on the 2 cores: both jobs (2 CPUs of bundles each) are placed at once.
    with local_ray_head(env, num_cpus=4) as address:
        yield env, address


@pytest.fixture(scope="module")
def jobs(ray_head, tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Both JOBS submitted at once (each its own run; only the wall time is shared): name -> (exit code of
    `ray job submit`, its output, the run folder)."""
    env, dashboard = ray_head
    started = {}
    for name, overrides in JOBS.items():
        out = tmp_path_factory.mktemp(name) / "run"
        cmd = launch_job(dashboard, *SHORT_RUN, f"run.out_dir={out}", *overrides)
        with open(out.parent / "submit.log", "w") as log:
            started[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), out)
    return {name: (proc.wait(timeout=900), (out.parent / "submit.log").read_text(), out)
            for name, (proc, out) in started.items()}


@pytest.mark.parametrize("name", list(JOBS))
def test_ray_job_submit_runs_both_stages_syncs_and_evaluates(jobs, name):
    code, logs, out = jobs[name]
    assert code == 0 and "succeeded" in logs, logs[-4000:]
    for line in ("stage1 done: 4 steps", "stage-2 done", "weight sync v1", "weight sync v3", "eval stage2"):
        assert line in logs, line
    assert (out / "report.md").read_text().count("| stage2 |") == 1
    for label in ("initial", "stage1", "stage2"):  # each evaluation leaves something to look at
        folder = out / "eval" / label
        assert (folder / "report.md").is_file() and (folder / "iou_histogram.png").is_file()
        assert len(list((folder / "overlays").glob("*.png"))) == 8
    stages = {line.split('"stage": "')[1].split('"')[0] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {"stage1", "stage2", "sync", "eval", "rollout"} <= stages


def test_ray_job_submit_without_the_token_is_refused(ray_head):
    env, dashboard = ray_head
    env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    job = subprocess.run([RAY, "job", "list", "--address", dashboard], env=env,
                         capture_output=True, text=True, timeout=120)
    assert job.returncode != 0
    assert "authentication" in (job.stdout + job.stderr).lower()
